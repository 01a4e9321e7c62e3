"""The ``llm_compressor`` export format: a compressed-tensors ``pack-quantized`` checkpoint.

This is what llm-compressor writes for weight-only int schemes (W4A16, W8A16) and what vLLM loads
natively as ``quant_method "compressed-tensors"``; transformers loads it through its
compressed-tensors quantizer. It is written with the ``compressed-tensors`` package's own code:
``pack_to_int32`` packs the integers, ``QuantizationArgs`` / ``QuantizationScheme`` /
``QuantizationConfig`` describe them and ``ModelCompressor.update_config`` writes
``config.json``'s ``quantization_config``.

Our tuned integers are packed as they are: nothing is re-quantized from a float weight (the
package's compressor would recompute ``round(w / scale) + zp``), so the stored integers are our
codes by construction. compressed-tensors holds signed integers; with ``b`` bits and ``h = 2**(b-1)``:

- weights: ``q = code - h`` in ``[-h, h - 1]``; sym: ``w = scale * q`` (our sym zero is ``h``);
- asym: ``w = scale * (q - zp)`` with ``zp = zero - h``.

``pack_to_int32`` adds ``h`` back before packing, so the bits on disk are our unsigned codes and
zeros, as a little-endian bitstream along the packed dimension (value ``j`` in stream bits
``[b*j, b*j + b)``; for 2/4/8 bits: ``32 / b`` whole values per word).

Tensors per quantized Linear ``<name>`` (``out`` x ``in``, ``G = in / group_size``, ``G = 1``
for a per-channel layer):

==============================  =========================  =========================================
tensor                          shape                      dtype
==============================  =========================  =========================================
``<name>.weight_packed``        ``[out, ceil(in*b/32)]``   int32
``<name>.weight_scale``         ``[out, G]``               the layer's weight dtype (what
                                                           compressed-tensors and vLLM allocate) when
                                                           it holds our scales exactly (an fp32 model
                                                           always does), else the tuned
                                                           ``scale_dtype`` (announced; loaders cast)
``<name>.weight_shape``         ``[2]`` = ``[out, in]``    int64
``<name>.weight_zero_point``    ``[ceil(out*b/32), G]``    int32, asym only: ``zp`` packed along the
                                                           output dimension (sym layers store none,
                                                           as the package's compressor drops it)
``<name>.bias``                 ``[out]``                  unchanged
==============================  =========================  =========================================

Scales keep their sign (a sym "full range" scale may be negative; compressed-tensors multiplies,
it takes no ``abs``). Every other tensor is the model's own, saved by ``save_pretrained``
(``<name>.weight`` of a quantized layer is not written).

``quantization_config``: ``quant_method "compressed-tensors"``, ``format "pack-quantized"``,
``quantization_status "compressed"``, ``config_groups``: one group targeting ``"Linear"`` when every
quantized layer shares one scheme and only ``lm_head`` stays FP, else one group per distinct scheme
targeting the exact layer names (always so for a VLM: vLLM names its vision tower differently from
transformers, so the ``ignore`` entries miss it there and ``"Linear"`` reached it; measured with
``bench/bench_vllm.py``) (compressed-tensors matches a target by exact module name, class name, or ``re:`` regex);
``ignore`` lists every Linear kept in full precision (``lm_head``, a VLM's vision tower and
projector, ``fp_layers``): vLLM looks every Linear that is not ignored up in the targets. Schemes: weights only,
``type "int"``, ``strategy "group"`` (``group_size``) or ``"channel"`` (``group_size == in``).
The run's own record (settings, per-layer exceptions) goes to ``quantization_config.json``, which no
loader reads.

Stored: bits 4 and 8 (what vLLM's compressed-tensors kernels run) and 2 (compressed-tensors
readers only), sym or asym, group sizes dividing ``in_features``. 3 and 5-7 bits are refused:
compressed-tensors releases disagree on their layout (``32 // b`` values per word with unused high
bits, later a dense stream across words), the file tells them apart only by the package version,
and vLLM's kernels do not run them.

Loaders (transformers 5.23 with compressed-tensors 0.20.1, checked on CPU by the tests):

- plain ``from_pretrained(folder)``: sym checkpoints load (weights stay packed and are decompressed
  to float weights on the first forward), with one scheme or several; asym ones fail inside
  compressed-tensors, whose load-time compress leaves ``weight_zero_point`` unpacked (``[out, G]``)
  while its compressor writes it packed, as above and as vLLM reads it;
- ``from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))``
  (decompress while loading) loads sym and asym, but decompresses every layer with the first config
  group's scheme: single-scheme checkpoints only (several groups are warned about at save);
- vLLM (``quant_method "compressed-tensors"``, its WNA16 kernels; 4 and 8 bits): not run here.

Names: the config names the in-memory modules (what both loaders match against, vLLM through its
own name mapping); tensors get the names ``save_pretrained`` gives the model's tensors (a llava
model's ``model.language_model.*`` is written ``language_model.model.*``).

The model is only read: ``inplace`` changes nothing (the packed tensors go straight into the
saved state dict).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from auto_round.export.registry import Exporter, register_format
from auto_round.quant.types import QuantizedWeight

logger = logging.getLogger(__name__)

STORED_BITS = (2, 4, 8)
VLLM_BITS = (4, 8)
RECORD_FILE = "quantization_config.json"
_INSTALL_HINT = ("format 'llm_compressor' is written with the compressed-tensors package: "
                 "pip install 'auto-round[llm_compressor]' (or pip install compressed-tensors)")

Scheme = Tuple[int, bool, str, Optional[int]]  # (bits, sym, strategy, group_size or None)


def _ct_available() -> bool:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def scheme_of(qw: QuantizedWeight) -> Scheme:
    """``(bits, sym, strategy, group_size)``: ``"channel"`` (group_size None) when one group spans
    the row, else ``"group"``."""
    if qw.group_size >= qw.in_features:
        return qw.bits, qw.sym, "channel", None
    return qw.bits, qw.sym, "group", qw.group_size


def signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers in ``[0, 2**bits - 1]`` -> int8 ``values - 2**(bits-1)`` (compressed-tensors'
    signed range), exactly."""
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def scale_for_disk(scale: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """Our scales ``[out, G]``, in ``weight_dtype`` if that holds them exactly, else unchanged."""
    scale = scale.detach().cpu()
    cast = scale.to(weight_dtype)
    return (cast if torch.equal(cast.to(scale.dtype), scale) else scale).contiguous()


def compressed_tensors_of(qw: QuantizedWeight, weight_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The pack-quantized tensors of one layer, local names (``weight_packed``, ``weight_scale``,
    ``weight_shape``, and ``weight_zero_point`` for asym), packed by compressed-tensors."""
    from compressed_tensors.compressors import pack_to_int32

    out = {
        "weight_packed": pack_to_int32(signed(qw.codes.detach().cpu(), qw.bits), qw.bits),
        "weight_scale": scale_for_disk(qw.scale, weight_dtype),
        "weight_shape": torch.tensor([qw.out_features, qw.in_features], dtype=torch.int64),
    }
    if not qw.sym:
        zp = signed(qw.zero.detach().cpu(), qw.bits)
        out["weight_zero_point"] = pack_to_int32(zp, qw.bits, packed_dim=0).contiguous()
    return out


def _only_heads_fp(fp_linears: List[str]) -> bool:
    """Whether every Linear kept FP is an output head (``lm_head``), which engines build as their own
    class and name alike; then a ``"Linear"`` target with ``ignore`` is safe. Otherwise (a VLM's vision
    tower, ``fp_layers``) the groups name their layers: engines rename modules (vLLM's LLaVA has
    ``vision_tower.vision_model.encoder...`` where transformers 5 has ``model.vision_tower.encoder...``),
    so an ``ignore`` entry may miss and ``"Linear"`` would reach an FP layer whose tensors are not packed."""
    return all(name.rsplit(".", 1)[-1] == "lm_head" for name in fp_linears)


def build_ct_config(layers: Dict[str, QuantizedWeight], fp_linears: List[str]) -> Any:
    """The compressed-tensors ``QuantizationConfig`` of ``layers`` (see the module docstring)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_scheme: Dict[Scheme, List[str]] = {}
    for name, qw in layers.items():
        by_scheme.setdefault(scheme_of(qw), []).append(name)
    groups = {}
    for i, (key, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: str(kv[0]))):
        bits, sym, strategy, group_size = key
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                                group_size=group_size, dynamic=False)
        targets = ["Linear"] if len(by_scheme) == 1 and _only_heads_fp(fp_linears) else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args)
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=sorted(fp_linears))


def _linear(model: nn.Module, name: str, qw: QuantizedWeight) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"quantized layer {name!r} is not a module of the model") from err
    if not isinstance(module, nn.Linear):
        raise TypeError(f"layer {name!r} is a {type(module).__name__}; format 'llm_compressor' stores nn.Linear")
    if (module.out_features, module.in_features) != (qw.out_features, qw.in_features):
        raise ValueError(f"layer {name!r} is [{module.out_features}, {module.in_features}] but its codes are "
                         f"[{qw.out_features}, {qw.in_features}]")
    return module


class LLMCompressorExporter(Exporter):
    """Writes compressed-tensors ``pack-quantized`` checkpoints."""

    name = "llm_compressor"

    def check_model(self, model: nn.Module, tokenizer: Any) -> Optional[str]:
        return None if _ct_available() else _INSTALL_HINT

    def check_plan(self, schemes: Dict[str, Tuple[int, int, bool]]) -> Optional[str]:
        return None if _ct_available() else _INSTALL_HINT  # also asked before tuning, once

    def check_layer(self, name: str, out_features: int, in_features: int, bits: int, group_size: int,
                    sym: bool) -> Optional[str]:
        keep_fp = f"or keep it in full precision with fp_layers='{name}'"
        if bits not in STORED_BITS:
            why = (f"compressed-tensors releases pack {bits} bits differently: padded words, later a dense stream"
                   if bits < 8 else "pack-quantized holds at most 8 bits")
            return (f"format 'llm_compressor' stores bits {STORED_BITS}, not bits={bits} ({why}); use bits=4 "
                    f"or 8, format='auto_round', {keep_fp}")
        if group_size < in_features and in_features % group_size:  # (one group per row: strategy "channel")
            return (f"group_size={group_size} does not divide in_features={in_features} (compressed-tensors "
                    f"reads in_features / group_size whole groups); use a group_size dividing {in_features} "
                    f"{keep_fp}")
        return None

    def save(self, model: nn.Module, layers: Dict[str, QuantizedWeight], output_dir: Path, quantization_config: dict,
             inplace: bool) -> None:
        """``save_pretrained`` with the packed tensors in place of the quantized layers' weights, then
        ``ModelCompressor.update_config``; ``model`` is not modified."""
        if not _ct_available():
            raise ImportError(_INSTALL_HINT)
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.utils import match_named_modules

        self.check_records(layers)
        state = model.state_dict()
        for name, qw in layers.items():
            weight = _linear(model, name, qw).weight
            del state[f"{name}.weight"]
            for local, tensor in compressed_tensors_of(qw, weight.dtype).items():
                state[f"{name}.{local}"] = tensor
        # Every module the "Linear" target reaches (by compressed-tensors' own matching) that stays FP.
        fp_linears = [n for n, _ in match_named_modules(model, ["Linear"]) if n not in layers]
        ct_config = build_ct_config(layers, fp_linears)
        _announce(model, layers, state, len(ct_config.config_groups))  # before save_pretrained empties `state`
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        ModelCompressor(quantization_config=ct_config).update_config(str(output_dir))
        record = {**quantization_config, "format": "llm_compressor",
                  "note": "the checkpoint's quantization_config (compressed-tensors) is in config.json"}
        (output_dir / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        logger.info("saved %d pack-quantized layers (%d config groups, %d Linear kept FP) to %s", len(layers),
                    len(ct_config.config_groups), len(fp_linears), output_dir)


def _announce(model: nn.Module, layers: Dict[str, QuantizedWeight], state: Dict[str, torch.Tensor],
              n_groups: int) -> None:
    """Warnings about what some loaders will do with this checkpoint (see the module docstring)."""
    kept = [n for n, q in layers.items() if state[f"{n}.weight_scale"].dtype != model.get_submodule(n).weight.dtype]
    if kept:
        ours, model_dtype = layers[kept[0]].scale.dtype, model.get_submodule(kept[0]).weight.dtype
        setting = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(model_dtype, model_dtype)
        logger.warning("llm_compressor: %d layers (e.g. %s) keep their %s scales, which the model's dtype %s would "
                       "round; loaders computing in %s round them at load. For scales exact there, tune with "
                       "scale_dtype=%r", len(kept), kept[0], ours, model_dtype, model_dtype, setting)
    off_vllm = sorted({q.bits for q in layers.values()} - set(VLLM_BITS))
    if off_vllm:
        logger.warning("llm_compressor: bits %s load through compressed-tensors (transformers), not vLLM's "
                       "kernels (bits %s)", off_vllm, VLLM_BITS)
    if n_groups > 1:
        asym = any(not q.sym for q in layers.values())
        logger.warning("llm_compressor: %d config groups (per-layer schemes): transformers 5.23's "
                       "CompressedTensorsConfig(dequantize=True) decompresses every layer with the first group's "
                       "scheme; %s", n_groups,
                       "plain from_pretrained fails on asym layers (compressed-tensors 0.20.1), so vLLM is the "
                       "loader of this one" if asym else "load with plain from_pretrained, or vLLM")


register_format("llm_compressor", LLMCompressorExporter())
