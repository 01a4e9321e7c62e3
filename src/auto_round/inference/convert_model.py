"""Turn a freshly built (usually meta-device) transformers model into its quantized skeleton.

transformers' built-in ``auto-round`` quantizer calls, in this order:

1. :func:`infer_target_device` with the ``device_map`` given to ``from_pretrained``;
2. :func:`convert_hf_model` before the weights are loaded: every quantized ``nn.Linear`` is
   replaced by an empty :class:`~auto_round.inference.qlinear.QuantLinear` whose buffers have the
   checkpoint's shapes, so the weights load straight into them;
3. :func:`post_init` after loading: each layer picks its backend and repacks once.

Which layers are quantized is read from ``model.config.quantization_config`` (a dict or
transformers' ``AutoRoundConfig``): every ``nn.Linear`` inside the block lists named by
``block_name_to_quantize``, minus those whose ``extra_config`` entry has ``bits >= 16``; layers
outside the blocks (``lm_head``) only when ``extra_config`` names them exactly with ``bits < 16``.
``extra_config`` entries (exact names, else regexes matched with ``re.search``) override
``bits``/``group_size``/``sym`` per layer. ``scale_dtype`` (fp16 when absent) is the dtype of the
``scales`` buffers.

GPTQ checkpoints (``quant_method "gptq"``, loaded through ``AutoRoundConfig``, which renames them
``packing_format "auto_round:gptq"``; recognised by their ``desc_act`` key) carry ``g_idx``, act-order
(``desc_act=True``) ones included; GPTQModel's ``format "gptq_v2"`` (raw zeros) is read with the raw
layout, and its ``dynamic`` overrides (see :func:`dynamic_override`) apply per layer
(:mod:`auto_round.inference.foreign` prepares GPTQModel's configs for transformers). AWQ GEMM
checkpoints (``quant_method "awq"``, renamed ``packing_format "auto_round:awq"``) skip the layers named
in ``modules_to_not_convert`` (substring match, as AWQ readers do); ``zero_point`` is ``not sym``. Their
``lm_head: true`` quantizes ``lm_head`` with the global scheme; without
``block_name_to_quantize`` the outermost ``nn.ModuleList``s holding Linear layers are assumed
(announced with a warning).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from auto_round.inference.backends import get_backend, select_backend
from auto_round.export.layout import PACKING_FORMATS
from auto_round.inference.qlinear import SCALE_STORAGE_DTYPES, QuantLinear

logger = logging.getLogger(__name__)

GPTQ_PACKING = "auto_round:gptq"
AWQ_PACKING = "auto_round:awq"  # what transformers' AutoRoundConfig names AWQ GEMM checkpoints
RAW_PACKING = "auto_round"  # input-packed words, zeros stored as they are
_FP_BITS = 16


@dataclass(frozen=True)
class LayerScheme:
    """How one layer of a checkpoint is quantized (``group_size`` resolved, never -1)."""

    bits: int
    group_size: int
    sym: bool


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for dicts, ``config.key`` for config objects."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def infer_target_device(device_map: Union[None, str, int, torch.device, Mapping] = None) -> str:
    """The device type the quantized layers will run on: ``"cpu"``, ``"cuda"``, ``"xpu"``, ...

    ``device_map`` as given to ``from_pretrained``: None (CPU), a device, ``"auto"`` (the
    accelerator if there is one), or a ``{module: device}`` dict (the first accelerator named,
    else CPU; ``"disk"``/``"meta"`` entries count as CPU).
    """
    if device_map is None:
        return "cpu"
    if isinstance(device_map, Mapping):
        types = [infer_target_device(d) for d in device_map.values()]
        accelerators = [t for t in types if t != "cpu"]
        return accelerators[0] if accelerators else "cpu"
    if isinstance(device_map, int):
        return _accelerator_type() or "cuda"
    if isinstance(device_map, str) and device_map in (
        "auto",
        "balanced",
        "balanced_low_0",
        "sequential",
    ):
        return _accelerator_type() or "cpu"
    if isinstance(device_map, str) and device_map in ("disk", "meta"):
        return "cpu"
    return torch.device(device_map).type


def _accelerator_type() -> Optional[str]:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return None


def _block_prefixes(qconfig: Any) -> List[str]:
    names = _get(qconfig, "block_name_to_quantize") or _get(qconfig, "to_quant_block_names")
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    flat: List[str] = []
    for item in names:  # the reference sometimes writes a list of lists
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return [n.strip() for n in flat if n and n.strip()]


def dynamic_override(dynamic: Optional[Mapping[str, Any]], name: str) -> Union[None, bool, Mapping[str, Any]]:
    """GPTQModel's ``dynamic`` rule for module ``name``: the first pattern (in the config's order) that matches
    from the start of the name decides; ``-:pattern`` means the module is not quantized (False), ``+:pattern``
    or a bare pattern gives its overrides (``bits``, ``group_size``, ``sym``); None when no pattern matches."""
    for key, overrides in (dynamic or {}).items():
        negative = key.startswith("-:")
        raw = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            rx = re.compile(raw)
        except re.error as err:
            raise ValueError(f"quantization_config.dynamic pattern {key!r} is not a regular expression Python reads "
                             f"({err}); rewrite it in Python's re syntax in the checkpoint's config.json") from err
        if rx.match(name):
            return False if negative else (overrides or {})
    return None


def _extra_entry(extra: Mapping[str, Any], name: str, exact_only: bool,
                 patterns: Mapping[str, Optional["re.Pattern[str]"]]) -> Optional[Mapping]:
    if name in extra:
        return extra[name]
    if exact_only:
        return None
    for key, entry in extra.items():
        rx = patterns.get(key)
        if rx is not None and rx.search(name):
            return entry
    return None


def _extra_patterns(extra: Mapping[str, Any], layer_names: Iterable[str]) -> Dict[str, Optional["re.Pattern[str]"]]:
    """Compiled ``extra_config`` keys; a key that is not a valid regex matches only the layer it names
    exactly, announced with a WARNING when it names no layer either (its settings would apply nowhere)."""
    names = set(layer_names)
    patterns: Dict[str, Optional[re.Pattern]] = {}
    for key in extra:
        try:
            patterns[key] = re.compile(key)
        except re.error as err:
            patterns[key] = None
            if key not in names:
                logger.warning("quantization_config.extra_config key %r is neither a layer name nor a valid regex "
                               "(%s): its settings apply to no layer", key, err)
    return patterns


def _in_blocks(name: str, prefixes: Iterable[str]) -> bool:
    # A prefix may name a Linear itself (Llama-3.2-Vision's projector is one nn.Linear).
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _default_blocks(model: nn.Module) -> List[str]:
    """Outermost ``nn.ModuleList``s that contain Linear layers (for configs without block names)."""
    found: List[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not _in_blocks(name, found):
            if any(isinstance(m, nn.Linear) for m in module.modules()):
                found.append(name)
    return found


def quantized_layer_schemes(model: nn.Module, qconfig: Any) -> Dict[str, LayerScheme]:
    """``{module name: LayerScheme}`` for every ``nn.Linear`` the checkpoint stores quantized."""
    bits = int(_get(qconfig, "bits", None) or _get(qconfig, "w_bit", 4))
    group_size = int(_get(qconfig, "group_size", None) or _get(qconfig, "q_group_size", 128))
    sym = bool(_get(qconfig, "sym", True))
    is_awq = "awq" in str(_get(qconfig, "quant_method", "")) or packing_format_of(qconfig) == AWQ_PACKING
    if is_awq and _get(qconfig, "zero_point") is not None:
        sym = not bool(_get(qconfig, "zero_point"))
    not_converted = list(_get(qconfig, "modules_to_not_convert") or []) if is_awq else []
    global_type = _get(qconfig, "data_type", "int") or "int"
    extra = _get(qconfig, "extra_config") or {}
    dynamic = _get(qconfig, "dynamic")
    gptq_lm_head = bool(_get(qconfig, "lm_head", False))  # GPTQ configs' own lm_head flag
    prefixes = _block_prefixes(qconfig)
    if not prefixes:
        prefixes = _default_blocks(model)
        logger.warning(
            "quantization_config has no block_name_to_quantize; assuming the Linear layers in %s "
            "are quantized",
            prefixes,
        )
    schemes: Dict[str, LayerScheme] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    patterns = _extra_patterns(extra, (n for n, _ in linears))
    for name, module in linears:
        inside = _in_blocks(name, prefixes) or (name == "lm_head" and gptq_lm_head)
        if any(key in name for key in not_converted):  # AWQ's list, matched by substring as AWQ readers do
            continue
        entry = _extra_entry(extra, name, exact_only=not inside, patterns=patterns)
        if not inside and entry is None:
            continue
        rule = dynamic_override(dynamic, name) if inside else None
        if rule is False:  # GPTQModel's -: pattern: stored in full precision
            continue
        if rule:
            entry = {**(entry or {}), **rule}
        layer_bits = int(_get(entry or {}, "bits", bits) or bits)
        if layer_bits >= _FP_BITS:
            continue
        data_type = _get(entry or {}, "data_type", global_type) or global_type
        if not str(data_type).startswith("int"):
            raise ValueError(
                f"layer {name!r} has data_type={data_type!r}; this loader supports integer "
                "weight-only checkpoints (data_type 'int') only"
            )
        gs = int(_get(entry or {}, "group_size", group_size))
        schemes[name] = LayerScheme(
            bits=layer_bits,
            group_size=module.in_features if gs == -1 else gs,
            sym=bool(_get(entry or {}, "sym", sym)),
        )
    return schemes


def packing_format_of(qconfig: Any) -> str:
    """The ``packing_format`` (a key of :data:`auto_round.export.layout.PACKING_FORMATS`) of a checkpoint's
    config: its own key, else from ``quant_method``; GPTQModel's ``format "gptq_v2"`` stores raw zeros."""
    quant_method = str(_get(qconfig, "quant_method", "auto-round"))
    fmt = _get(qconfig, "packing_format")
    if fmt is None:
        fmt = GPTQ_PACKING if "gptq" in quant_method else AWQ_PACKING if "awq" in quant_method else "auto_round:auto_gptq"
    if fmt == GPTQ_PACKING and str(_get(qconfig, "format", "")) == "gptq_v2":
        fmt = RAW_PACKING
    if fmt not in PACKING_FORMATS:
        raise ValueError(
            f"checkpoint packing_format {fmt!r} is not supported by this auto_round; "
            f"supported: {sorted(PACKING_FORMATS)}"
        )
    return fmt


def scale_storage_dtype(qconfig: Any) -> torch.dtype:
    """The dtype of the checkpoint's ``scales``: ``quantization_config.scale_dtype`` (``"fp16"``,
    ``"bf16"``, ``"fp32"``, their long names, or the reference's ``"torch.float16"``); fp16 when absent."""
    raw = _get(qconfig, "scale_dtype")
    if raw is None:
        return torch.float16
    if isinstance(raw, torch.dtype):
        dtype = raw
    else:
        name = str(raw).removeprefix("torch.")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(name)
        dtype = dtype or getattr(torch, name, None)
    if dtype not in SCALE_STORAGE_DTYPES:
        raise ValueError(f"quantization_config scale_dtype={raw!r} is not a dtype this loader reads; "
                         f"expected fp16, bf16 or fp32")
    return dtype


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_hf_model(model: nn.Module, target_device: str = "cpu") -> Tuple[nn.Module, List[str]]:
    """Replace the quantized ``nn.Linear`` layers of ``model`` by empty ``QuantLinear`` modules.

    Returns ``(model, used_backends)``: the same model, modified in place, and the names of the
    backends chosen for ``target_device`` (a requested ``backend`` from the config that cannot
    run some layer raises here, before any weight is loaded).
    """
    qconfig = getattr(model.config, "quantization_config", None)
    if qconfig is None:
        raise ValueError("model.config has no quantization_config; is this a quantized checkpoint?")
    packing_format = packing_format_of(qconfig)
    requested = str(_get(qconfig, "backend", "auto") or "auto")
    if requested != "auto":
        get_backend(requested)  # unknown names fail here, listing the valid ones
    schemes = quantized_layer_schemes(model, qconfig)
    if not schemes:
        raise ValueError(
            "no Linear layer matched the quantization_config (block_name_to_quantize="
            f"{_block_prefixes(qconfig)}); check the block names against the model's modules"
        )
    # GPTQ checkpoints (v1, or GPTQModel's raw-zero v2) carry g_idx; their configs, unlike auto-round ones,
    # always have desc_act.
    with_g_idx = packing_format in (GPTQ_PACKING, RAW_PACKING) and _get(qconfig, "desc_act") is not None
    scale_dtype = torch.float16 if with_g_idx else scale_storage_dtype(qconfig)  # GPTQ: always fp16
    used: Counter = Counter()
    for name, scheme in schemes.items():
        linear = model.get_submodule(name)
        backend = select_backend(
            target_device,
            scheme.bits,
            scheme.group_size,
            linear.in_features,
            linear.out_features,
            requested=requested,
        )
        used[backend.name] += 1
        layer = QuantLinear(
            linear.in_features,
            linear.out_features,
            scheme.bits,
            scheme.group_size,
            sym=scheme.sym,
            bias=linear.bias is not None,
            packing_format=packing_format,
            backend=requested,
            with_g_idx=with_g_idx,
            device=linear.weight.device,
            scale_dtype=scale_dtype,
        )
        layer.expect_checkpoint()
        _replace(model, name, layer)
    logger.info(
        "quantized layers: %d; backends for %s: %s", len(schemes), target_device, dict(used)
    )
    return model, sorted(used)


def post_init(model: nn.Module, used_backends: Optional[List[str]] = None) -> None:
    """After the weights are loaded: each ``QuantLinear`` selects its backend and repacks."""
    chosen: Counter = Counter()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            try:
                module.post_init()
            except ValueError as err:
                raise ValueError(f"quantized layer {name!r}: {err}") from err
            chosen[module.backend_name] += 1
    if used_backends is not None and set(chosen) - set(used_backends):
        logger.info(
            "backends after loading differ from the plan %s: %s (layers moved device)",
            used_backends,
            dict(chosen),
        )
