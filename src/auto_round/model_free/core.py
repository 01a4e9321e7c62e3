"""Model-free round-to-nearest: a safetensors checkpoint in, a quantized checkpoint out, shard by shard.

Lifecycle of a run (:func:`quantize_model_free`):

1. **read the checkpoint's headers** (:mod:`auto_round.model_free.checkpoint`): ``config.json`` and
   the ``.safetensors`` shards (one file or an index); only headers are read here.
2. **resolve the plan** on a weightless skeleton: ``AutoModelForCausalLM.from_config(config)`` (or
   ``AutoModelForImageTextToText`` for a vision-language model) built on the meta device, handed to
   the same facade the in-memory path uses (:class:`~auto_round.AutoRound` /
   :class:`~auto_round.AutoRoundMLLM`; checkpoint tensor names are mapped to the model's with
   transformers' own load-time renaming), so the block lists, what stays FP and why (lm_head,
   embeddings, norms, vision tower, ``fp_layers``, ``layer_config``) and the group-size fitting are
   :func:`auto_round.tuning.plan.resolve_plan`'s, and the format's capability checks run before any
   weight is read.
3. **lay out the output** before computing anything: each quantized Linear becomes the tensors its
   exporter writes (a meta-device :class:`~auto_round.inference.qlinear.QuantLinear` after the
   format's ``prepare_module``), every other tensor is copied unchanged; input shard ``i`` becomes
   output shard ``i``. The folder is checked (:func:`~auto_round.export.folder.check_output_dir`)
   with the exact file names and sizes.
4. **stream** (:mod:`auto_round.model_free.shards`): each output shard's header is written, then each
   tensor is produced just before it is written: a quantized weight is read in row chunks,
   quantized with :func:`~auto_round.quant.qdq.quantize_weight` (what ``rtn_quantize`` runs) and
   packed with ``QuantLinear.from_quantized``, so the tensors are byte-identical to
   ``AutoRound(model, iters=0, disable_opt_rtn=True).quantize_and_save(format=...)``; tensors kept as
   they are are copied in 64 MiB row chunks. Peak memory is one layer's packing (its codes, 1 byte per
   weight, and the packer's int32 temporaries: measured 7.2 more bytes per weight for a 14336x4096
   layer, so about 2 GB for a Llama-70B MLP projection) plus one chunk, whatever the model's depth or
   shard size.
5. ``config.json`` (with ``quantization_config``), ``quantization_config.json``, an index and the
   tokenizer and other small files, all inside :func:`~auto_round.export.folder.write_atomically`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from auto_round.export.folder import MANIFEST, check_output_dir, write_atomically
from auto_round.model_free.checkpoint import INDEX, SINGLE, Checkpoint, find_checkpoint, map_names
from auto_round.model_free.shards import OutSpec, write_shard
from auto_round.quant.qdq import n_groups, quantize_weight
from auto_round.quant.types import QuantizedWeight
from auto_round.tuning.plan import LayerPlan, QuantPlan

logger = logging.getLogger(__name__)

# Not copied: weights (model-free reads safetensors only; pickles are never read) and what is rewritten.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
REWRITTEN = ("config.json", "quantization_config.json", INDEX, MANIFEST)
CHUNK_ELEMENTS = 1 << 22  # weights quantized in row chunks of about 4M elements (16 MiB as float32)
COPY_CHUNK_BYTES = 64 << 20  # tensors kept as they are are copied in chunks of 64 MiB


# ----------------------------------------------------------------------------------------- plan
def build_skeleton(folder: Path, trust_remote_code: bool = False,
                   mllm: Optional[bool] = None) -> Tuple[nn.Module, bool]:
    """The model built from ``folder``'s config on the meta device (no weights, no memory) and whether
    it is handled as a vision-language model: as the in-memory loaders decide, a model
    ``AutoModelForCausalLM`` cannot build but ``AutoModelForImageTextToText`` can (``mllm`` forces it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise ValueError(f"{str(folder)!r} is already quantized (config.json has quantization_config, quant_method "
                         f"{method!r}); model-free RTN reads full-precision checkpoints: pass the original model")
    auto_map = getattr(config, "auto_map", None) or {}

    def builds(auto: Any) -> bool:
        return type(config) in auto._model_mapping or (trust_remote_code and auto.__name__ in auto_map)

    is_vlm = builds(AutoModelForImageTextToText) and not builds(AutoModelForCausalLM) if mllm is None else mllm
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    if not builds(auto):
        raise ValueError(f"{str(folder)!r} holds a {type(config).__name__} (model_type {config.model_type!r}), which "
                         f"{auto.__name__} cannot build; model-free mode quantizes causal LMs and "
                         "vision-language models")
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval(), is_vlm


def _planner(skeleton: nn.Module, is_vlm: bool, settings: Dict[str, Any], mllm_options: Dict[str, Any]) -> Any:
    """The facade the in-memory path would use for this model, holding the skeleton: its hooks decide
    the block lists and the FP reasons, its ``quantization_config`` writes the config."""
    if is_vlm:
        from auto_round.mllm.autoround_mllm import AutoRoundMLLM

        return AutoRoundMLLM(skeleton, None, None, **mllm_options, **settings)
    given = {k: v for k, v in mllm_options.items() if v not in (None, False)}
    if given:
        raise TypeError(f"{sorted(given)} apply to vision-language models only; {type(skeleton).__name__} is a text "
                        "model (pass mllm=True to treat it as one)")
    from auto_round.autoround import AutoRound

    return AutoRound(skeleton, None, **settings)


def plan_model(planner: Any, fmt: str) -> QuantPlan:
    """:meth:`AutoRound.resolve_plan` on the skeleton, without the checks that read weights (NaN/Inf
    weights are refused per chunk while streaming instead)."""
    return planner.resolve_plan([fmt], read_weights=False)


# ----------------------------------------------------------------------------------------- layout
@dataclass
class _Layer:
    """One quantized Linear: where its weight (and bias) are read and what its exporter writes."""

    plan: LayerPlan
    weight: str
    bias: Optional[str]
    weight_dtype: torch.dtype  # the dtype the in-memory path loads the weight in (the skeleton's)
    bias_dtype: Optional[torch.dtype]
    outputs: List[OutSpec] = field(default_factory=list)

    @property
    def stored_prefix(self) -> str:
        """The layer's packed tensors are named as its weight is in the checkpoint (``<prefix>.qweight``, ...),
        as ``save_pretrained`` names them after reverting the renamings of the load."""
        return self.weight[: -len("weight")]


def _meta_record(lp: LayerPlan, has_bias: bool) -> QuantizedWeight:
    """A shape-only record (meta tensors) for the exporter's checks and ``final_config``."""
    p = lp.params
    g = n_groups(lp.in_features, p.group_size)
    meta = torch.device("meta")
    return QuantizedWeight(codes=torch.empty(lp.out_features, lp.in_features, dtype=torch.uint8, device=meta),
                           scale=torch.empty(lp.out_features, g, dtype=p.scale_dtype, device=meta),
                           zero=torch.empty(lp.out_features, g, dtype=torch.int32, device=meta), bits=p.bits,
                           group_size=p.group_size, sym=p.sym,
                           bias=torch.empty(lp.out_features, device=meta) if has_bias else None)


def _meta_quant_linear(qw: QuantizedWeight, style: str) -> nn.Module:
    """The module ``QuantLinear.from_quantized(qw, style)`` builds, on the meta device (nothing packed)."""
    from auto_round.inference.qlinear import QuantLinear

    return QuantLinear(qw.in_features, qw.out_features, qw.bits, qw.group_size, sym=qw.sym, bias=qw.bias is not None,
                       packing_format=style, device=torch.device("meta"), scale_dtype=qw.scale.dtype)


def _layers(skeleton: nn.Module, plan: QuantPlan, ckpt: Checkpoint,
            exporter: Any) -> Tuple[Dict[str, _Layer], str, Dict[str, QuantizedWeight]]:
    """Every quantized layer's tensors in the checkpoint and on disk; the packing style; the meta records.
    The skeleton's quantized Linears are replaced by meta QuantLinears (``final_config`` reads them)."""
    layers, style, records, modules = layer_layout(skeleton, plan, ckpt, exporter)
    replace_with_packed(skeleton, modules)
    return layers, style, records


def replace_with_packed(skeleton: nn.Module, modules: Mapping[str, nn.Module]) -> None:
    """Put the meta QuantLinears of :func:`layer_layout` in place of the skeleton's Linears."""
    from auto_round.tuning.wrapper import set_module

    for name, module in modules.items():
        set_module(skeleton, name, module)


def layer_layout(skeleton: nn.Module, plan: QuantPlan, ckpt: Checkpoint, exporter: Any
                 ) -> Tuple[Dict[str, _Layer], str, Dict[str, QuantizedWeight], Dict[str, nn.Module]]:
    """Every quantized layer's tensors in the checkpoint and on disk, the packing style, the meta records and
    each layer's meta QuantLinear (what the exporter writes), the skeleton left as it is."""
    problems, layers, records = [], {}, {}
    for lp in plan.quantized:
        lin = skeleton.get_submodule(lp.name)
        wanted = [(f"{lp.name}.weight", (lp.out_features, lp.in_features))]
        wanted += [(f"{lp.name}.bias", (lp.out_features,))] if lin.bias is not None else []
        stored = [ckpt.stored_name(t) for t, _ in wanted]
        for (t, shape), st in zip(wanted, stored):
            if st is None or not st.endswith(t.rpartition(".")[2]):
                problems.append(f"{t} is missing")
            elif ckpt.info(st).shape != shape:
                problems.append(f"{st} is {list(ckpt.info(st).shape)}, the model's layer {lp.name} needs {list(shape)}")
        w, b = stored[0], stored[1] if len(stored) > 1 else None
        layers[lp.name] = _Layer(lp, w or "", b, lin.weight.dtype, None if b is None else lin.bias.dtype)
        records[lp.name] = _meta_record(lp, b is not None)
    if problems:
        sample = ", ".join(list(ckpt.where)[:3])
        raise ValueError(f"the checkpoint does not hold the {type(skeleton).__name__} layers the plan quantizes:\n  "
                         + "\n  ".join(problems[:8]) + (f"\n  (+{len(problems) - 8} more)" if len(problems) > 8 else "")
                         + f"\nits tensors are named like {sample}; a checkpoint whose names transformers renames "
                         "at load cannot be quantized model-free: use AutoRound(model_dir, iters=0, "
                         "disable_opt_rtn=True), or load and save_pretrained it once")
    exporter.check_records(records)
    style = exporter.packing_style(records)
    modules = {}
    for name, layer in layers.items():
        modules[name] = module = _meta_quant_linear(records[name], style)
        exporter.prepare_module(module)
        layer.outputs = [OutSpec(layer.stored_prefix + k, v.dtype, tuple(v.shape))
                         for k, v in module.state_dict().items()]
    return layers, style, records, modules


@dataclass
class _Shard:
    """One output shard: its tensors, and which job produces each (a layer name, or a tensor to copy)."""

    specs: List[OutSpec]
    source: Dict[str, Tuple[str, str]]  # output tensor -> ("layer", layer name) | ("copy", checkpoint tensor)


def tied_copies(skeleton: nn.Module, ckpt: Checkpoint) -> List[str]:
    """Checkpoint tensors that are tied copies of another stored tensor (a tied ``lm_head.weight`` stored beside
    the embeddings): ``save_pretrained`` writes only the source, and so does model-free mode."""
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    out = []
    for target, source in tied.items():
        stored_target, stored_source = ckpt.stored_name(target), ckpt.stored_name(source)
        if stored_target is not None and stored_source is not None and stored_target != stored_source:
            out.append(stored_target)
    if out:
        logger.info("not written (tied to another tensor, as save_pretrained drops them): %s", ", ".join(out[:6]))
    return out


def _shards(ckpt: Checkpoint, layers: Dict[str, _Layer], dropped: Sequence[str] = ()) -> List[_Shard]:
    """Input shard ``i`` -> output shard ``i`` (a layer goes where its weight is; empty shards dropped)."""
    by_weight = {layer.weight: layer for layer in layers.values()}
    biases = {layer.bias for layer in layers.values() if layer.bias} | set(dropped)
    shards = []
    for reader in ckpt.readers.values():
        specs: List[OutSpec] = []
        source: Dict[str, Tuple[str, str]] = {}
        for t, info in reader.tensors.items():
            if t in by_weight:
                layer = by_weight[t]
                specs.extend(layer.outputs)
                source.update({s.name: ("layer", layer.plan.name) for s in layer.outputs})
            elif t not in biases:
                specs.append(OutSpec(t, info.dtype, info.shape))
                source[t] = ("copy", t)
        if specs:
            shards.append(_Shard(specs, source))
    names = [s.name for sh in shards for s in sh.specs]
    if len(names) != len(set(names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the output would hold tensors twice: {dup[:4]}; the checkpoint already has packed tensors "
                         "for these layers (it is quantized): pass the full-precision model")
    return shards


def shard_names(n: int) -> List[str]:
    """``model.safetensors`` for one shard, else ``model-0000i-of-0000n.safetensors`` (transformers' names)."""
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _small_files(folder: Path) -> Tuple[List[str], List[str]]:
    """``(copied, skipped)``: the folder's top-level files that travel with the checkpoint (tokenizer,
    generation config, chat template, processor, license, README), and what does not (weights, what is
    rewritten, hidden files, sub-folders)."""
    copied, skipped = [], []
    for p in sorted(folder.iterdir()):
        weights = p.name.endswith(WEIGHT_SUFFIXES)
        if p.is_file() and not p.name.startswith(".") and p.name not in REWRITTEN and not weights:
            copied.append(p.name)
        else:
            skipped.append(p.name + ("/" if p.is_dir() else ""))
    return copied, skipped


# ----------------------------------------------------------------------------------------- compute
class _Stats:
    def __init__(self) -> None:
        self.read_bytes = 0
        self.written_bytes = 0


def _quantize_layer(layer: _Layer, ckpt: Checkpoint, style: str, exporter: Any, device: torch.device,
                    stats: _Stats) -> Dict[str, torch.Tensor]:
    """The exporter's tensors of one layer: its weight read and quantized in row chunks (rows are
    independent in :func:`quantize_weight`, so chunking changes no bit), then packed as the in-memory
    export packs it."""
    lp, p = layer.plan, layer.plan.params
    out, in_ = lp.out_features, lp.in_features
    g = n_groups(in_, p.group_size)
    codes = torch.empty(out, in_, dtype=torch.uint8)
    scale = torch.empty(out, g, dtype=p.scale_dtype)
    zero = torch.empty(out, g, dtype=torch.int32)
    reader = ckpt.readers[ckpt.where[layer.weight]]
    rows = max(1, CHUNK_ELEMENTS // in_)
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        w = reader.get_rows(layer.weight, r0, r1)
        stats.read_bytes += w.numel() * w.element_size()
        w = w.to(device=device, dtype=layer.weight_dtype)
        c, s, z = quantize_weight(w.float(), p)
        # A NaN/Inf weight makes its group's range, hence its scale, non-finite: the scales (1/group_size
        # of the weight) are checked, the weight only to word the error.
        if not bool(torch.isfinite(s).all()):
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"the weight of {lp.name} holds NaN or Inf (rows {r0}-{r1}); the model is damaged "
                                 f"(check the checkpoint), or keep it FP with fp_layers='{lp.name}'")
            raise RuntimeError(f"non-finite scales in {lp.name}: its weights overflow scale_dtype {p.scale_dtype}; use "
                               f"scale_dtype='fp32' with format 'auto_round', or keep it FP with fp_layers='{lp.name}'")
        codes[r0:r1], scale[r0:r1], zero[r0:r1] = c.cpu(), s.cpu(), z.cpu()
    bias = None
    if layer.bias is not None:
        bias = ckpt.readers[ckpt.where[layer.bias]].get(layer.bias).to(layer.bias_dtype)
        stats.read_bytes += bias.numel() * bias.element_size()
    qw = QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=p.bits, group_size=p.group_size, sym=p.sym,
                         bias=bias)
    return packed_tensors(layer, qw, style, exporter)


def packed_tensors(layer: _Layer, qw: QuantizedWeight, style: str, exporter: Any) -> Dict[str, torch.Tensor]:
    """The tensors the exporter writes for ``layer`` quantized as ``qw``, named as on disk: the
    ``QuantLinear.from_quantized`` (and ``prepare_module``) state the in-memory export saves."""
    from auto_round.inference.qlinear import QuantLinear

    module = QuantLinear.from_quantized(qw, packing_format=style)
    exporter.prepare_module(module)
    return {layer.stored_prefix + k: v for k, v in module.state_dict().items()}


def _write_shard(path: Path, shard: _Shard, ckpt: Checkpoint, layers: Dict[str, _Layer], style: str, exporter: Any,
                 device: torch.device, stats: _Stats) -> None:
    pending: Dict[str, torch.Tensor] = {}  # tensors of a packed layer not yet reached in the shard's order

    def produce(name: str) -> Union[torch.Tensor, Iterator[torch.Tensor]]:
        if name in pending:
            return pending.pop(name)
        kind, what = shard.source[name]
        if kind == "copy":
            stats.read_bytes += ckpt.info(what).nbytes
            return ckpt.readers[ckpt.where[what]].iter_rows(what, COPY_CHUNK_BYTES)
        pending.update(_quantize_layer(layers[what], ckpt, style, exporter, device, stats))
        return pending.pop(name)

    stats.written_bytes += write_shard(path, shard.specs, produce, {"format": "pt"})
    if pending:
        raise RuntimeError(f"tensors computed but not written: {sorted(pending)[:4]}")


# ----------------------------------------------------------------------------------------- entry point
def _settings(options: Mapping[str, Any]) -> Dict[str, Any]:
    if options.get("iters", 0) != 0:
        raise ValueError(f"iters={options['iters']!r}: model-free mode is round-to-nearest without data, iters=0; "
                         "tune with AutoRound(model_dir, iters=...) instead")
    if options.get("disable_opt_rtn", True) is not True:
        raise ValueError("disable_opt_rtn=False: optimized RTN needs calibration activations, hence the model; "
                         "model-free mode is plain RTN (leave disable_opt_rtn out, or use "
                         "AutoRound(model_dir, iters=0))")
    mixed = [k for k in ("avg_bits", "scheme_options") if options.get(k) is not None]
    if mixed:
        raise ValueError(f"{', '.join(f'{k}={options[k]!r}' for k in mixed)}: mixed bits choose each layer's scheme by "
                         "its sensitivity on calibration data, which model-free mode has none of; pass per-layer "
                         "schemes with layer_config, or use AutoRound(model_dir, avg_bits=..., scheme_options=...)")
    if options.get("e2e_epochs"):
        raise ValueError(f"e2e_epochs={options['e2e_epochs']!r}: end-to-end scale tuning runs the whole model on "
                         "calibration data, which model-free mode never builds; use AutoRound(model_dir, "
                         "e2e_epochs=...) instead")
    return {**options, "iters": 0, "disable_opt_rtn": True}


def quantize_model_free(
    model_dir: Union[str, Path],
    output_dir: Union[str, Path],
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    format: str = "auto_round",
    layer_config: Optional[Mapping[str, Mapping[str, Any]]] = None,
    fp_layers: str = "",
    quant_lm_head: bool = False,
    overwrite: Optional[bool] = None,
    trust_remote_code: bool = False,
    mllm: Optional[bool] = None,
    quant_nontext_module: bool = False,
    device: Optional[str] = None,
    **options: Any,
) -> Path:
    """Quantize the safetensors checkpoint in ``model_dir`` with round-to-nearest, shard by shard, into
    ``output_dir``, never building the model with its weights (see the module docstring).

    Args:
        model_dir: local folder with ``config.json`` and ``model.safetensors`` or an index of shards.
        output_dir: the checkpoint folder; written atomically, your files in it are kept, a non-empty
            folder auto_round did not write needs ``overwrite=True``; never inside ``model_dir``.
        bits, group_size, sym, layer_config, fp_layers, quant_lm_head: as for :class:`~auto_round.AutoRound`
            (the same plan: block lists' Linear layers only, group sizes fitted to each layer).
        format: ``auto_round`` (sym: ``auto_round:auto_gptq`` packing, asym 4-bit: ``auto_round:auto_awq``),
            its aliases ``auto_round:auto_gptq``/``auto_round:gptq``/``auto_round:auto_awq``, ``auto_gptq``
            or ``auto_awq``.
        mllm: treat the model as a vision-language model (default: when only
            ``AutoModelForImageTextToText`` builds it); ``quant_nontext_module`` then also quantizes the
            vision blocks and projector, as in :class:`~auto_round.AutoRoundMLLM`.
        device: where the rounding runs (default CPU, as the in-memory RTN).
        **options: any other :class:`~auto_round.config.Settings` field (``scale_dtype``, ``sym_style``,
            ``to_quant_block_names``, ...); ``iters`` must be 0. Recorded in ``quantization_config``.

    Returns the output folder. The quantized tensors are byte-identical to
    ``AutoRound(model_dir, iters=0, disable_opt_rtn=True, ...).quantize_and_save(output_dir, format=format)``;
    every other tensor is copied unchanged.
    """
    from auto_round.export import get_format
    from auto_round.export.auto_round_format import AutoRoundExporter
    from auto_round.export.registry import available_formats

    t0 = time.perf_counter()
    exporter = get_format(format)
    if not isinstance(exporter, AutoRoundExporter):
        ok = [f for f in available_formats() if isinstance(get_format(f), AutoRoundExporter)]
        raise ValueError(f"format {format!r} is not available in model-free mode, which writes the packed-integer "
                         f"formats {ok}; for {format!r} use AutoRound(model_dir, iters=0, disable_opt_rtn=True)"
                         f".quantize_and_save(format={format!r})")
    settings = _settings({**options, "bits": bits, "group_size": group_size, "sym": sym, "layer_config": layer_config,
                          "fp_layers": fp_layers, "quant_lm_head": quant_lm_head, "device": device})
    mllm_options = {k: settings.pop(k) for k in ("extra_data_dir", "template", "truncation") if k in settings}
    mllm_options["quant_nontext_module"] = quant_nontext_module
    ckpt = find_checkpoint(model_dir)
    try:
        run = _prepare(ckpt, exporter, format, settings, mllm_options, trust_remote_code, mllm, device is not None)
        check_output_dir(output_dir, str(ckpt.folder), overwrite, will_write=run.will_write(),
                         estimated_bytes=run.total_bytes)
        target = write_atomically(output_dir, str(ckpt.folder), overwrite, run.write)
    finally:
        ckpt.close()
    seconds = time.perf_counter() - t0
    logger.info("model-free RTN: %d layers quantized (packing %r), %d shard(s); read %.2f GB, wrote %.2f GB in %.1f s "
                "(%.3f GB/s read) to %s", len(run.layers), run.style, len(run.names), run.stats.read_bytes / 1e9,
                run.stats.written_bytes / 1e9, seconds, run.stats.read_bytes / 1e9 / max(seconds, 1e-9), target)
    return target


@dataclass
class _Run:
    """Everything a model-free run writes, decided before any weight is read."""

    ckpt: Checkpoint
    skeleton: nn.Module
    exporter: Any
    layers: Dict[str, _Layer]
    style: str
    shards: List[_Shard]
    names: List[str]
    config: Dict[str, Any]  # the quantization_config written
    copied: List[str]
    device: torch.device
    stats: _Stats = field(default_factory=lambda: _Stats())

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for sh in self.shards for s in sh.specs)

    def will_write(self) -> List[str]:
        from auto_round.export.auto_round_format import CONFIG_FILE

        return [*self.names, *([INDEX] if len(self.names) > 1 else []), "config.json", CONFIG_FILE, *self.copied]

    def write(self, tmp: Path) -> None:
        """Shards, index, config.json, quantization_config.json and the small files, into ``tmp``."""
        from auto_round.export.auto_round_format import CONFIG_FILE

        for name, shard in zip(self.names, self.shards):
            _write_shard(tmp / name, shard, self.ckpt, self.layers, self.style, self.exporter, self.device, self.stats)
        if len(self.names) > 1:
            weight_map = {s.name: n for n, sh in zip(self.names, self.shards) for s in sh.specs}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        self.skeleton.config.quantization_config = self.config
        self.skeleton.config.save_pretrained(str(tmp))
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:  # as AutoRoundExporter.save writes it
            json.dump(self.config, f, indent=2, sort_keys=True)
        for name in self.copied:
            shutil.copy2(self.ckpt.folder / name, tmp / name)
        if "generation_config.json" not in self.copied and getattr(self.skeleton, "can_generate", lambda: False)():
            self.skeleton.generation_config.save_pretrained(str(tmp))  # as save_pretrained writes it


def _prepare(ckpt: Checkpoint, exporter: Any, fmt: str, settings: Dict[str, Any], mllm_options: Dict[str, Any],
             trust_remote_code: bool, mllm: Optional[bool], on_device: bool) -> _Run:
    """Phases 2 and 3 of the module docstring: skeleton, plan, each layer's tensors, the shards."""
    skeleton, is_vlm = build_skeleton(ckpt.folder, trust_remote_code, mllm)
    map_names(skeleton, ckpt)
    planner = _planner(skeleton, is_vlm, settings, mllm_options)
    plan = plan_model(planner, fmt)
    qconfig = planner.quantization_config()
    layers, style, records = _layers(skeleton, plan, ckpt, exporter)
    final = exporter.final_config(dict(qconfig), style, skeleton, records)
    shards = _shards(ckpt, layers, tied_copies(skeleton, ckpt))
    copied, skipped = _small_files(ckpt.folder)
    skipped = [f for f in skipped if f not in ckpt.readers and f not in REWRITTEN]
    if skipped:
        logger.info("not copied from %s: %s", ckpt.folder, ", ".join(skipped[:10]))
    device = planner.device if on_device else torch.device("cpu")
    return _Run(ckpt, skeleton, exporter, layers, style, shards, shard_names(len(shards)), final, copied, device)
