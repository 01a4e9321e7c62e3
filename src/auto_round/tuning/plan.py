"""The quantization plan: which linear layers get which scheme, and which stay FP and why.

Resolved once, before any tuning, from the settings and the model's module tree; an override that
matches nothing, a refused ``quant_lm_head`` or a shape the export format cannot store fails here.

No layer is stored with a padded last group (every engine reads ``in_features // group_size``
groups): where the requested group size does not divide ``in_features`` it is halved until it
does (at least 32; e.g. SmolLM2's 576-wide inputs at 128 take 64), else the layer stays in full
precision. Both are reported in the plan and recorded per layer in ``extra_config``.

An export format may decide each layer's scheme itself (``format_params``: GGUF K-quant mixes such as
``gguf:q4_k_m``, whose llama.cpp rules give some tensors a higher type and rows that are not whole
super-blocks a fallback type); then the settings' bits/group_size/sym are not used for those layers
and every layer's choice is a note of the plan.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from auto_round.config import Settings
from auto_round.models.blocks import is_block_list
from auto_round.quant.qdq import QuantParams

logger = logging.getLogger(__name__)

LAYER_CONFIG_KEYS = ("bits", "group_size", "sym", "data_type")


@dataclass(frozen=True)
class LayerPlan:
    """One linear layer: ``params`` None means kept in full precision, with ``reason``."""

    name: str
    out_features: int
    in_features: int
    params: Optional[QuantParams]
    reason: str
    block: Optional[str]  # name of the tuned block holding it; None = round-to-nearest alone
    note: str = ""  # how the requested scheme was adapted to the layer's shape, if it was


def unit_ranges(n_blocks: int, nblocks: int) -> List[Tuple[int, int]]:
    """``(start, end)`` of each tuning unit of a list of ``n_blocks`` blocks: ``nblocks`` consecutive ones."""
    return [(start, min(start + nblocks, n_blocks)) for start in range(0, n_blocks, nblocks)]


@dataclass(frozen=True)
class QuantPlan:
    """Block lists to tune (path, block names) and every linear layer's fate."""

    block_lists: Tuple[Tuple[str, Tuple[str, ...]], ...]
    layers: Tuple[LayerPlan, ...]

    @property
    def quantized(self) -> List[LayerPlan]:
        return [lp for lp in self.layers if lp.params is not None]

    @property
    def kept_fp(self) -> List[LayerPlan]:
        return [lp for lp in self.layers if lp.params is None]

    def in_block(self, block: str) -> List[LayerPlan]:
        return [lp for lp in self.quantized if lp.block == block]

    def units(self, nblocks: int) -> List[Tuple[str, ...]]:
        """The block names of each tuning unit, list after list (:func:`unit_ranges`)."""
        return [blocks[start:end] for _, blocks in self.block_lists for start, end in unit_ranges(len(blocks), nblocks)]

    def summary_lines(self) -> List[str]:
        """Human-readable plan: block lists, counts, and what stays FP and why."""
        lines = [f"block list {p}: {len(b)} blocks" for p, b in self.block_lists]
        lines.append(f"{len(self.quantized)} linear layers quantized, {len(self.kept_fp)} kept in full precision")
        reasons: Dict[str, List[str]] = {}
        for lp in self.kept_fp:
            reasons.setdefault(lp.reason, []).append(lp.name)
        for reason, names in reasons.items():
            lines.append(f"  FP ({reason}): {_shown(names)}")
        notes: Dict[str, List[str]] = {}
        for lp in self.quantized:
            if lp.note:
                notes.setdefault(lp.note, []).append(lp.name)
        for note, names in notes.items():
            lines.append(f"  {note}: {_shown(names)}")
        return lines


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


MIN_GROUP = 32  # the smallest group size the engines' kernels take


def fit_group_size(in_features: int, group_size: int) -> Optional[int]:
    """The group size a layer is stored with: ``group_size`` when it divides ``in_features``, else the
    largest ``group_size / 2**k >= 32`` that does (engines read ``in_features // group_size`` groups, so
    a padded last group is unreadable for them), else None (no portable group size: kept in FP).
    ``-1`` (one group per row) always fits."""
    if group_size == -1 or in_features % group_size == 0:
        return in_features if group_size == -1 else group_size
    g = group_size // 2
    while g >= MIN_GROUP and group_size % g == 0:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def layer_params(bits: int, group_size: int, in_features: int, sym: bool, s: Settings) -> QuantParams:
    """The :class:`QuantParams` of a layer: ``group_size`` -1 = one group per row; sym follows ``sym_style``."""
    gs = in_features if group_size == -1 else group_size
    scheme = "asym" if not sym else ("sym" if s.sym_style == "full_range" else "sym_gptq")
    return QuantParams(bits=bits, group_size=gs, scheme=scheme, scale_dtype=s.torch_scale_dtype)


def _format_choice(format_params, settings: Settings, cfg: Dict[str, Dict[str, Any]],
                   linears: Mapping[str, nn.Linear]) -> Dict[str, Tuple[Optional[QuantParams], str]]:
    """The export format's scheme per quantized layer (empty when the settings decide)."""
    if format_params is None:
        return {}
    chosen = format_params({n: (linears[n].out_features, linears[n].in_features) for n in cfg})
    if chosen is None:
        return {}
    for key, override in (settings.layer_config or {}).items():
        if any(k in override for k in ("group_size", "sym", "data_type")) or int(override.get("bits", 16)) < 16:
            raise ValueError(f"layer_config[{key!r}] = {override} sets a scheme, but the export format decides "
                             "each layer's scheme (a GGUF K-quant mix); layer_config may only keep layers in full "
                             "precision ({'bits': 16}), or choose another gguf type")
    missing = [n for n in cfg if n not in chosen]
    if missing:
        raise ValueError(f"the export format chose no scheme for {missing[:4]}")
    return chosen


def _tied_lm_head(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    text_cfg = getattr(cfg, "get_text_config", lambda: None)()
    if text_cfg is not None:
        tied = tied or bool(getattr(text_cfg, "tie_word_embeddings", False))
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and getattr(head, "weight", None) is getattr(emb, "weight", None):
        return True
    return tied


def _match(key: str, names: Sequence[str]) -> List[str]:
    if key in names:
        return [key]
    try:
        rx = re.compile(key)
    except re.error as e:
        raise ValueError(f"layer_config key {key!r} is neither a layer name nor a valid regex ({e})") from e
    return [n for n in names if rx.search(n)]


@dataclass
class _Draft:
    """The plan while it is resolved: quantized layers' settings, FP layers' reasons, per-layer notes."""

    cfg: Dict[str, Dict[str, Any]]
    reason: Dict[str, str]
    notes: Dict[str, str]

    def keep_fp(self, name: str, why: str) -> None:
        self.cfg.pop(name, None)
        self.reason[name] = why


def resolve_plan(
    model: nn.Module,
    settings: Settings,
    block_lists: Sequence[str],
    check_layer: Optional[Callable[[str, int, int, QuantParams], Optional[str]]] = None,
    extra_fp: Mapping[str, str] = {},
    outside_reasons: Mapping[str, str] = {},
    format_params: Optional[Callable[[Dict[str, Tuple[int, int]]],
                                     Optional[Dict[str, Tuple[Optional[QuantParams], str]]]]] = None,
) -> QuantPlan:
    """Build the plan. ``check_layer(name, out, in, params)`` returns why a format cannot store a
    layer (collected and raised together); ``extra_fp`` maps layer names to forced-FP reasons;
    ``format_params({name: (out, in)})`` (optional) returns ``{name: (params, note)}`` for formats that
    choose each quantized layer's scheme (params None: kept FP, note = why), or None.

    The steps, each a function below, in the order they override each other: the units and their layers;
    the layers that can never be swapped; the settings' scheme for block layers (and ``lm_head``);
    ``fp_layers``; ``layer_config``; the model's forced-FP layers; the format's own choice; group fitting;
    then every layer's :class:`LayerPlan`, checked against the format."""
    lists, block_of = _units(model, block_lists)
    _warn_conv1d(model, lists)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears)
    fixed = _unswappable(model, linears)
    draft = _settings_scheme(names, fixed, block_of, settings, outside_reasons)
    _apply_lm_head(model, linears, settings, draft)
    _apply_fp_layers(settings.fp_layers, names, draft)
    _apply_layer_config(settings, names, fixed, draft)
    for n, why in extra_fp.items():
        if n in draft.cfg:
            draft.keep_fp(n, why)
    chosen = _format_choice(format_params, settings, draft.cfg, linears)
    for n, (chosen_params, note) in chosen.items():
        if chosen_params is None:
            draft.keep_fp(n, note)
        else:
            draft.notes[n] = note
    _fit_groups(draft, chosen, linears)
    layers, problems = _layer_plans(names, linears, draft, chosen, block_of, settings, check_layer)
    if problems:
        raise ValueError("the export format cannot store these layers:\n  " + "\n  ".join(problems) +
                         "\nkeep them in full precision with fp_layers='<name>' or "
                         "layer_config={'<name>': {'bits': 16}}, or choose another group_size/format")
    plan = QuantPlan(tuple(lists), tuple(layers))
    if not plan.quantized:
        raise ValueError("the plan quantizes no layer; check to_quant_block_names, fp_layers and layer_config")
    return plan


def _units(model: nn.Module, block_lists: Sequence[str]) -> Tuple[List[Tuple[str, Tuple[str, ...]]], Dict[str, str]]:
    """Each block list with its units' names, and each Linear inside a unit -> its unit. A block list
    (ModuleList, or a Sequential of blocks as in timm ViTs) is tuned block by block; any other module (a
    projector) is one unit."""
    lists = []
    block_of: Dict[str, str] = {}
    for path in block_lists:
        ml = model.get_submodule(path)
        per_block = isinstance(ml, nn.ModuleList) or (isinstance(ml, nn.Sequential) and is_block_list(ml))
        unit_names = tuple(f"{path}.{i}" for i in range(len(ml))) if per_block else (path,)
        lists.append((path, unit_names))
        for bname in unit_names:
            for sub, m in model.get_submodule(bname).named_modules():
                if isinstance(m, nn.Linear):  # sub == "" when the unit is itself a Linear
                    block_of[f"{bname}.{sub}" if sub else bname] = bname
    return lists, block_of


def _warn_conv1d(model: nn.Module, lists: Sequence[Tuple[str, Tuple[str, ...]]]) -> None:
    """GPT-2-style transformers Conv1D (a Linear with transposed weight) in the units is not swapped: say so."""
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")
              and any(n.startswith(b + ".") for _, unit_names in lists for b in unit_names)]
    if conv1d:
        logger.warning("%d transformers Conv1D layer(s) in the tuned blocks stay in full precision (only nn.Linear "
                       "is quantized): %s", len(conv1d), ", ".join(conv1d[:6]) + (" ..." if len(conv1d) > 6 else ""))


def _unswappable(model: nn.Module, linears: Mapping[str, nn.Linear]) -> Dict[str, str]:
    """Layers that can never be swapped for a quantized module, and why."""
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling its forward.
    fixed = {f"{n}.{c}" if n else c: f"weight read directly by {type(m).__name__}"
             for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
             for c, _ in m.named_children()}
    for n, lin in linears.items():
        if n not in fixed and type(lin).forward is not nn.Linear.forward:
            # e.g. Llama-4's router: an nn.Linear subclass returning a tuple; a wrapper would break it
            fixed[n] = f"{type(lin).__name__} overrides Linear.forward"
    return fixed


def _scheme(settings: Settings) -> Dict[str, Any]:
    return {"bits": settings.bits, "group_size": settings.group_size, "sym": settings.sym}


def _settings_scheme(names: Sequence[str], fixed: Mapping[str, str], block_of: Mapping[str, str],
                     settings: Settings, outside_reasons: Mapping[str, str]) -> _Draft:
    """The settings' scheme for every swappable layer in a unit; every other layer FP with its reason."""
    draft = _Draft({}, {}, {})
    for n in names:
        if n in fixed:
            draft.reason[n] = fixed[n]
        elif n in block_of:
            draft.cfg[n] = _scheme(settings)
        else:
            draft.reason[n] = next((r for pre, r in outside_reasons.items() if n == pre or n.startswith(pre + ".")),
                                   "outside the tuned blocks")
    return draft


def _apply_lm_head(model: nn.Module, linears: Mapping[str, nn.Linear], settings: Settings, draft: _Draft) -> None:
    if not settings.quant_lm_head:
        return
    if "lm_head" not in linears:
        raise ValueError("quant_lm_head=True but the model has no 'lm_head' Linear")
    if _tied_lm_head(model):
        raise ValueError("quant_lm_head=True is refused: lm_head shares its weight with the input "
                         "embeddings (tie_word_embeddings); quantizing it would change the embeddings too")
    draft.cfg["lm_head"] = _scheme(settings)


def _apply_fp_layers(fp_layers: str, names: Sequence[str], draft: _Draft) -> None:
    for frag in [f.strip() for f in fp_layers.split(",") if f.strip()]:
        hits = [n for n in names if frag in n]
        if not hits:
            raise ValueError(f"fp_layers entry {frag!r} matches no linear layer; e.g. {names[:3]}")
        for n in hits:
            draft.keep_fp(n, "fp_layers")


def _apply_layer_config(settings: Settings, names: Sequence[str], fixed: Mapping[str, str], draft: _Draft) -> None:
    """Each ``layer_config`` entry (exact name or regex) merged over the layers it matches."""
    for key, override in (settings.layer_config or {}).items():
        bad = [k for k in override if k not in LAYER_CONFIG_KEYS]
        if bad:
            raise ValueError(f"layer_config[{key!r}] has unknown field(s) {bad}; valid: {LAYER_CONFIG_KEYS}")
        hits = _match(key, names)
        if not hits:
            raise ValueError(f"layer_config key {key!r} matches no linear layer (exact name or regex); "
                             f"names look like {names[:3]}")
        wants_quant = int(override.get("bits", settings.bits)) < 16
        stuck = [n for n in hits if n in fixed]
        if stuck and wants_quant:
            listing = "; ".join(f"{n} ({fixed[n]})" for n in stuck)
            if hits == [key]:
                raise ValueError(f"layer_config[{key!r}] asks to quantize a layer that cannot be swapped for a "
                                 f"quantized module: {listing}; remove the entry (it stays in full precision)")
            logger.warning("layer_config[%r] also matches %d layer(s) that stay in full precision: %s",
                           key, len(stuck), listing)
        for n in hits:
            if n in fixed:
                continue
            merged = {**draft.cfg.get(n, _scheme(settings)), **override}
            if merged["bits"] >= 16:
                draft.keep_fp(n, "layer_config bits >= 16")
            else:
                draft.cfg[n] = merged
                draft.reason.pop(n, None)


def _fit_groups(draft: _Draft, chosen: Mapping[str, Any], linears: Mapping[str, nn.Linear]) -> None:
    """Shapes the requested group size cannot store without a padded group: a smaller group, or FP."""
    for n in list(draft.cfg):
        if n in chosen:
            continue
        gs = int(draft.cfg[n]["group_size"])
        fitted = fit_group_size(linears[n].in_features, gs)
        if fitted is None:
            draft.keep_fp(n, f"in_features={linears[n].in_features} has no group size dividing it among {gs} "
                             f"and its halves >= {MIN_GROUP}")
        elif gs != -1 and fitted != gs:
            draft.cfg[n] = {**draft.cfg[n], "group_size": fitted}
            draft.notes[n] = f"group_size {gs} -> {fitted} (in_features not a multiple of {gs})"


def _layer_plans(names: Sequence[str], linears: Mapping[str, nn.Linear], draft: _Draft,
                 chosen: Mapping[str, Tuple[Optional[QuantParams], str]], block_of: Mapping[str, str],
                 settings: Settings, check_layer) -> Tuple[List[LayerPlan], List[str]]:
    """Every layer's :class:`LayerPlan`, and what the format's ``check_layer`` refuses."""
    layers, problems = [], []
    for n in names:
        lin = linears[n]
        params = None
        if n in draft.cfg:
            c = draft.cfg[n]
            params = chosen[n][0] if n in chosen else layer_params(int(c["bits"]), int(c["group_size"]),
                                                                   lin.in_features, bool(c["sym"]), settings)
            if check_layer is not None:
                why = check_layer(n, lin.out_features, lin.in_features, params)
                if why:
                    problems.append(f"{n} [{lin.out_features}x{lin.in_features}]: {why}")
        layers.append(LayerPlan(n, lin.out_features, lin.in_features, params, draft.reason.get(n, "quantized"),
                                block_of.get(n), draft.notes.get(n, "") if params is not None else ""))
    return layers, problems
