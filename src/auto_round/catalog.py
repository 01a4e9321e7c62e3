"""What this installation supports, read from the registries themselves (``auto-round list ...``).

Each ``*_rows`` function returns a header and rows of strings; nothing here is a hand-kept copy of a
registry, so a format, backend or family added to its registry shows up here by itself.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

Table = Tuple[Tuple[str, ...], List[Tuple[str, ...]]]

# Shapes probed to describe what a format can store: a 4096x4096 layer at these group sizes
# (4096 = one group per row).
PROBE_GROUPS = (32, 64, 128, 4096)


def _first_line(doc: str) -> str:
    line = next((ln.strip() for ln in (doc or "").strip().splitlines() if ln.strip()), "")
    return line.replace("``", "").split(". ")[0].rstrip(".")


def _format_capability(check: Callable[..., object], sym: bool) -> str:
    """``"bits 2,3,4,8; groups 32,64,128,-1"`` for what ``check`` accepts, or ``"-"``."""
    from auto_round.quant.qdq import SUPPORTED_BITS

    ok = [(b, g) for b in SUPPORTED_BITS for g in PROBE_GROUPS if check("probe", 4096, 4096, b, g, sym) is None]
    if not ok:
        return "-"
    bits = sorted({b for b, _ in ok})
    groups = sorted({g for _, g in ok})
    return (f"bits {','.join(map(str, bits))}; groups "
            + ",".join("-1" if g == 4096 else str(g) for g in groups))


def format_rows() -> Table:
    """Every registered export format, with the bits and group sizes it stores (sym / asym)."""
    from auto_round.export import available_formats, get_format

    rows = []
    for name in available_formats():
        ex = get_format(name)
        rows.append((name, _format_capability(ex.check_layer, True), _format_capability(ex.check_layer, False),
                     _first_line(type(ex).__doc__ or "")))
    return ("format", "sym", "asym", "what it writes"), rows


def family_rows() -> Table:
    """The VLM family table, then the text-LLM rule (known decoder paths, else a structural search)."""
    from auto_round.mllm.families import FAMILIES
    from auto_round.models.blocks import TEXT_BLOCK_PATHS

    rows = []
    for f in FAMILIES:
        rows.append((f.name, ",".join(f.model_types), "yes" if f.text_only else "no (image-text)",
                     "yes" if f.quant_nontext else "no", "yes" if f.remote_code else "no", f.why))
    rows.append(("text LLMs", "any causal LM", "yes", "-", "no",
                 f"decoder blocks at one of {len(TEXT_BLOCK_PATHS)} known paths ({', '.join(TEXT_BLOCK_PATHS[:3])}, "
                 "...), else found structurally"))
    return ("family", "model types", "text calibration", "vision quantization", "remote code", "notes"), rows


def dataset_rows() -> Table:
    """Calibration data sources the text and image-text loaders accept."""
    from auto_round.calib.text import DEFAULT_DATASET, LOCAL_SUFFIXES, OFFLINE_CORPUS
    from auto_round.mllm.dataset import LLAVA_DATASETS, OFFLINE_IMAGE_TEXT

    rows = [
        (DEFAULT_DATASET, "text", "hub (needs datasets + network)",
         "default; offline it falls back to " + OFFLINE_CORPUS + " with a warning"),
        (OFFLINE_CORPUS, "text", "shipped", "small PSF-licensed corpus, works offline"),
        ("<any hub data set>", "text", "hub (needs datasets + network)", "name[:num=N][:split=S][:text_column=C]"),
        ("<local file or folder>", "text", "disk", f"{', '.join(LOCAL_SUFFIXES)} or a folder of .txt; comma lists mix"),
        (OFFLINE_IMAGE_TEXT, "image-text", "shipped", "43 conversations about 11 public-domain images (offline)"),
        *[(name, "image-text", "hub (JSON) + COCO images on disk", "LLaVA-Instruct; images under --extra_data_dir")
          for name in LLAVA_DATASETS],
        ("<local LLaVA .json/.jsonl>", "image-text", "disk", "LLaVA-format conversations; images beside it or in "
                                                             "--extra_data_dir"),
    ]
    return ("dataset", "kind", "where", "notes"), rows


def recipe_rows() -> Table:
    """Every recipe: its setting overrides and what it is for."""
    from auto_round.config import RECIPE_NOTES, RECIPES

    rows = [(name, ", ".join(f"{k}={v}" for k, v in over.items()) or "(defaults)", RECIPE_NOTES.get(name, ""))
            for name, over in RECIPES.items()]
    return ("recipe", "settings", "use"), rows


def backend_rows() -> Table:
    """Inference backends, highest priority first, with whether they run on this machine."""
    from auto_round.inference.backends import get_backend, list_backends

    rows = []
    for name in list_backends():
        b = get_backend(name)
        rows.append((name, ",".join(b.devices), ",".join(map(str, b.bits)), b.group_size_rule,
                     "yes" if b.is_available() else "no", "yes" if b.auto else "no (by name only)", b.description))
    return ("backend", "devices", "bits", "group size", "available here", "picked by auto", "notes"), rows


CATALOGS: Dict[str, Callable[[], Table]] = {
    "formats": format_rows,
    "families": family_rows,
    "datasets": dataset_rows,
    "recipes": recipe_rows,
    "backends": backend_rows,
}


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], max_width: int = 70) -> List[str]:
    """Left-aligned text columns; a cell longer than ``max_width`` (but in the last column) is cut with "...".

    >>> render_table(("a", "b"), [("x", "yy")])
    ['a  b', '-  --', 'x  yy']
    """
    last = len(header) - 1
    cut = [[c if len(c) <= max_width or i == last else c[:max_width - 3] + "..." for i, c in enumerate(map(str, r))]
           for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cut)) if cut else len(str(h)) for i, h in enumerate(header)]
    
    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in cut]]
