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
    choose each quantized layer's scheme (params None: kept FP, note = why), or None."""
    lists = []
    block_of: Dict[str, str] = {}
    for path in block_lists:
        ml = model.get_submodule(path)
        # A block list (ModuleList, or a Sequential of blocks as in timm ViTs) is tuned block by block;
        # any other module (a projector) is one unit.
        per_block = isinstance(ml, nn.ModuleList) or (isinstance(ml, nn.Sequential) and is_block_list(ml))
        names = tuple(f"{path}.{i}" for i in range(len(ml))) if per_block else (path,)
        lists.append((path, names))
        for bname in names:
            for sub, m in model.get_submodule(bname).named_modules():
                if isinstance(m, nn.Linear):  # sub == "" when the unit is itself a Linear
                    block_of[f"{bname}.{sub}" if sub else bname] = bname
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")
              and any(n.startswith(b + ".") for _, unit_names in lists for b in unit_names)]
    if conv1d:  # GPT-2-style transformers Conv1D: a Linear with transposed weight, not swapped here
        logger.warning("%d transformers Conv1D layer(s) in the tuned blocks stay in full precision (only nn.Linear "
                       "is quantized): %s", len(conv1d), ", ".join(conv1d[:6]) + (" ..." if len(conv1d) > 6 else ""))
    names = list(linears)
    # nn.MultiheadAttention reads out_proj.weight directly instead of calling its forward.
    unswappable = {f"{n}.{c}" if n else c: f"weight read directly by {type(m).__name__}"
                   for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                   for c, _ in m.named_children()}
    # Layers that can never be swapped for a quantized module, and why.
    fixed = dict(unswappable)
    for n in names:
        if n not in fixed and type(linears[n]).forward is not nn.Linear.forward:
            # e.g. Llama-4's router: an nn.Linear subclass returning a tuple; a wrapper would break it
            fixed[n] = f"{type(linears[n]).__name__} overrides Linear.forward"
    cfg: Dict[str, Dict[str, Any]] = {}
    reason: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    for n in names:
        if n in fixed:
            reason[n] = fixed[n]
        elif n in block_of:
            cfg[n] = {"bits": settings.bits, "group_size": settings.group_size, "sym": settings.sym}
        else:
            reason[n] = next((r for pre, r in outside_reasons.items() if n == pre or n.startswith(pre + ".")),
                             "outside the tuned blocks")
    if settings.quant_lm_head:
        if "lm_head" not in linears:
            raise ValueError("quant_lm_head=True but the model has no 'lm_head' Linear")
        if _tied_lm_head(model):
            raise ValueError("quant_lm_head=True is refused: lm_head shares its weight with the input "
                             "embeddings (tie_word_embeddings); quantizing it would change the embeddings too")
        cfg["lm_head"] = {"bits": settings.bits, "group_size": settings.group_size, "sym": settings.sym}
    for frag in [f.strip() for f in settings.fp_layers.split(",") if f.strip()]:
        hits = [n for n in names if frag in n]
        if not hits:
            raise ValueError(f"fp_layers entry {frag!r} matches no linear layer; e.g. {names[:3]}")
        for n in hits:
            cfg.pop(n, None)
            reason[n] = "fp_layers"
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
            base = cfg.get(n, {"bits": settings.bits, "group_size": settings.group_size, "sym": settings.sym})
            merged = {**base, **override}
            if merged["bits"] >= 16:
                cfg.pop(n, None)
                reason[n] = "layer_config bits >= 16"
            else:
                cfg[n] = merged
                reason.pop(n, None)
    for n, why in extra_fp.items():
        if n in cfg:
            cfg.pop(n)
            reason[n] = why
    chosen = _format_choice(format_params, settings, cfg, linears)
    for n, (chosen_params, note) in chosen.items():
        if chosen_params is None:
            cfg.pop(n, None)
            reason[n] = note
        else:
            notes[n] = note
    for n in list(cfg):  # shapes the requested group size cannot store without a padded group
        if n in chosen:
            continue
        gs = int(cfg[n]["group_size"])
        fitted = fit_group_size(linears[n].in_features, gs)
        if fitted is None:
            cfg.pop(n)
            reason[n] = (f"in_features={linears[n].in_features} has no group size dividing it among {gs} "
                         f"and its halves >= {MIN_GROUP}")
        elif gs != -1 and fitted != gs:
            cfg[n] = {**cfg[n], "group_size": fitted}
            notes[n] = f"group_size {gs} -> {fitted} (in_features not a multiple of {gs})"
    layers, problems = [], []
    for n in names:
        lin = linears[n]
        params = None
        if n in cfg:
            c = cfg[n]
            params = chosen[n][0] if n in chosen else layer_params(int(c["bits"]), int(c["group_size"]),
                                                                   lin.in_features, bool(c["sym"]), settings)
            if check_layer is not None:
                why = check_layer(n, lin.out_features, lin.in_features, params)
                if why:
                    problems.append(f"{n} [{lin.out_features}x{lin.in_features}]: {why}")
        layers.append(LayerPlan(n, lin.out_features, lin.in_features, params, reason.get(n, "quantized"),
                                block_of.get(n), notes.get(n, "") if params is not None else ""))
    if problems:
        raise ValueError("the export format cannot store these layers:\n  " + "\n  ".join(problems) +
                         "\nkeep them in full precision with fp_layers='<name>' or "
                         "layer_config={'<name>': {'bits': 16}}, or choose another group_size/format")
    plan = QuantPlan(tuple(lists), tuple(layers))
    if not plan.quantized:
        raise ValueError("the plan quantizes no layer; check to_quant_block_names, fp_layers and layer_config")
    return plan
