"""The GGUF exporter: checks before tuning, then one ``.gguf`` file streamed tensor by tensor."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from auto_round.export.gguf import arch as archmod
from auto_round.export.gguf import kmix
from auto_round.export.gguf import mmproj
from auto_round.export.gguf.blocks import BLOCK, BLOCK_TYPES, BlockType, layer_problem, pack_blocks, permute_rows
from auto_round.export.gguf.kblocks import K_BLOCK_TYPES, pack_k_blocks
from auto_round.export.gguf.vocab import build_vocab
from auto_round.export.registry import Exporter
from auto_round.quant.kquant import SUPER_BLOCK, is_kquant, kquant_params, kquant_type
from auto_round.quant.qdq import QuantParams
from auto_round.quant.types import QuantizedWeight

logger = logging.getLogger(__name__)

CONFIG_FILE = "quantization_config.json"
GGUF_QUANT_VERSION = 2  # general.quantization_version of the current ggml block layouts
FP16_MAX = 65504.0
_INSTALL_HINT = "GGUF export needs the 'gguf' package: pip install 'auto-round[gguf]' (or pip install gguf)"


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return gguf


@dataclass
class _Tensor:
    """One tensor of the file: its GGUF name, numpy shape/dtype, ggml type and how to make it."""

    name: str
    shape: Tuple[int, ...]
    dtype: Any  # numpy dtype of the bytes written
    ggml_type: int
    nbytes: int
    make: Callable[[], np.ndarray]


def gguf_file_name(model: nn.Module, bt: Any) -> str:
    """``<name>-<TYPE>.gguf``; ``<name>`` is the last part of ``config.name_or_path`` or ``model``;
    ``bt`` is a :class:`BlockType` or a :class:`~auto_round.export.gguf.kmix.KMix` (its ``name``)."""
    source = str(getattr(getattr(model, "config", None), "name_or_path", "") or "").rstrip("/\\")
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", re.split(r"[/\\]", source)[-1]).strip("-.") or "model"
    return f"{base}-{bt.name.upper()}.gguf"


class GGUFExporter(Exporter):
    """Writes ``gguf:<type>`` files for llama.cpp (see :mod:`auto_round.export.gguf`)."""

    mix: Optional[kmix.KMix] = None  # set by GGUFKExporter

    def __init__(self, bt: Optional[BlockType]) -> None:
        self.bt = bt
        self.name = f"gguf:{bt.name}" if bt is not None else ""

    # ------------------------------------------------------------------ checks (before tuning)
    def check_layer(self, name: str, out_features: int, in_features: int, bits: int, group_size: int,
                    sym: bool) -> Optional[str]:
        why = layer_problem(self.bt, in_features, bits, group_size, sym)
        if why:
            return f"{why}; or keep the layer in full precision (fp_layers='{name}'), written as F16"
        return None

    def check_scale_dtype(self, scale_dtype: torch.dtype) -> Optional[str]:
        if scale_dtype != torch.float16:
            return (f"{self.name} blocks hold fp16 scales, not {scale_dtype}; use scale_dtype='fp16' "
                    "(the tuned fp16 scale is then stored exactly)")
        return None

    def check_model(self, model: nn.Module, tokenizer: Any) -> Optional[str]:
        """``tokenizer``: the tokenizer, or a processor (a VLM's: its tokenizer and image processor)."""
        try:
            _gguf()
        except ImportError as err:
            return str(err)
        tokenizer, image_processor = mmproj.split_processor(tokenizer)
        family = archmod.family_of(model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        why = mmproj.vlm_problem(model, image_processor, tokenizer)
        if why is None and family is None:
            if archmod.is_vlm(model):
                why = (f"its language model ({archmod.model_type_of(model)!r}) is not a llama.cpp text arch "
                       f"written here ({archmod.supported_model_types()})")
            else:
                return (f"{self.name} writes text causal LMs of the model types {archmod.supported_model_types()}"
                        f", not {model_type!r} (and the VLMs {mmproj.supported_vlm_types()}, with an mmproj "
                        "file); export with format='auto_round' instead")
        why = why or archmod.config_problem(model, family)
        if why is None:
            unnamed = [hf for hf, gguf_name in self._tensor_names(model, family) if gguf_name is None]
            if unnamed:
                why = (f"{len(unnamed)} parameters have no llama.cpp tensor name for arch {family.arch!r}: "
                       f"{unnamed[:4]}")
        if why is None:
            try:
                vocab = build_vocab(tokenizer, int(archmod.text_config(model).vocab_size))
            except ValueError as err:
                why = str(err)
            else:
                for note in vocab.notes + archmod.config_notes(model, family):
                    logger.warning("%s: %s", self.name, note)
        return f"{self.name} cannot write this {model_type!r} model: {why}" if why else None

    def _tensor_names(self, model: nn.Module, family: archmod.GGUFFamily) -> List[Tuple[str, Optional[str]]]:
        """``(HF parameter name, GGUF tensor name or None)`` for every parameter (tied ones once)."""
        gguf = _gguf()
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family.arch)
        cfg = archmod.text_config(model)
        name_map = gguf.get_tensor_name_map(arch_enum, int(cfg.num_hidden_layers))
        return [(n, name_map.get_name(m, try_suffixes=(".weight", ".bias"))) for n, m in mmproj.text_names(model)]

    # ------------------------------------------------------------------ writing
    def save(self, model: nn.Module, layers: Dict[str, QuantizedWeight], output_dir: Path,
             quantization_config: dict, inplace: bool) -> None:
        """Not usable alone: a GGUF file embeds the tokenizer; call :meth:`export` with it."""
        raise TypeError(f"{self.name} embeds the tokenizer in the file: call export(..., tokenizer=...) "
                        "(AutoRound.save_quantized does)")

    def export(self, model: nn.Module, layers: Dict[str, QuantizedWeight], output_dir: Path,
               quantization_config: dict, inplace: bool, tokenizer: Any = None) -> None:
        """Write ``<output_dir>/<name>-<TYPE>.gguf`` and ``quantization_config.json`` + ``config.json``;
        for a VLM (``tokenizer`` is then its processor) also ``mmproj-<name>-F16.gguf``.

        The model is only read (``inplace`` changes nothing: nothing is packed into it).
        """
        why = self.check_model(model, tokenizer)
        if why:
            raise ValueError(why)
        self.check_records(layers)
        gguf = _gguf()
        tokenizer, image_processor = mmproj.split_processor(tokenizer)
        family = archmod.family_of(model)
        cfg = archmod.text_config(model)
        vocab = build_vocab(tokenizer, int(cfg.vocab_size))
        tensors = self._plan_tensors(model, layers, family)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / gguf_file_name(model, self.bt or self.mix)
        vision_layers = sorted(mmproj.iter_vision_layers(model, layers))
        mm_path = output_dir / mmproj.mmproj_file_name(path.name) if archmod.is_vlm(model) else None
        writer = gguf.GGUFWriter(path, family.arch)
        writer.add_name(path.stem)
        writer.add_file_type(self.file_type)
        writer.add_quantization_version(GGUF_QUANT_VERSION)
        archmod.add_hparams(writer, model, family)
        vocab.add_to(writer)
        config = {**quantization_config, "gguf_type": (self.bt or self.mix).name, "gguf_file": path.name,
                  **self._config_extra({n: q for n, q in layers.items() if n not in vision_layers})}
        if mm_path is not None:
            config.update(gguf_mmproj_file=mm_path.name, gguf_mmproj_vision_layers_dequantized=len(vision_layers))
        writer.add_string("auto_round.quantization_config", json.dumps(config, sort_keys=True))
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:  # one tensor in memory at a time
                writer.write_tensor_data(t.make())
        finally:
            writer.close()
        if mm_path is not None:
            written = mmproj.write_mmproj(mm_path, model, layers, image_processor,
                                          [("auto_round.quantization_config", json.dumps(config, sort_keys=True))],
                                          tokenizer=tokenizer)
            logger.info("wrote %s: %d tensors (%d tuned vision layers dequantized to F16, %.1f MiB)", mm_path,
                        len(written), len(vision_layers), mm_path.stat().st_size / 2**20)
        with open(output_dir / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        # config.json beside the file: what transformers' gguf_file loading reads first, and what
        # lets a later export replace this folder as an earlier checkpoint.
        model.config.to_json_file(str(output_dir / "config.json"))
        n_fp = len(tensors) - (len(layers) - len(vision_layers))
        logger.info("wrote %s: %d quantized tensors (%s), %d F16/F32 tensors (%.1f MiB)", path,
                    len(layers) - len(vision_layers),
                    self._types_label(layers), n_fp, path.stat().st_size / 2**20)

    def _plan_tensors(self, model: nn.Module, layers: Dict[str, QuantizedWeight],
                      family: archmod.GGUFFamily) -> List[_Tensor]:
        cfg = archmod.text_config(model)
        n_head = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        params = dict(model.named_parameters())
        by_weight = {f"{n}.weight": n for n in layers}
        planned = []
        for hf_name, gguf_name in self._tensor_names(model, family):
            heads = None
            if family.permute_qk and re.search(r"\.attn_[qk]\.(weight|bias)$", gguf_name):
                heads = n_head if ".attn_q." in gguf_name else n_kv
            if hf_name in by_weight:
                planned.append(self._quantized(gguf_name, layers[by_weight[hf_name]], heads))
            elif family.norm_shift and hf_name.endswith("norm.weight"):  # Gemma: 1 + weight, as convert writes
                planned.append(_float_tensor(gguf_name, params[hf_name].detach().float() + family.norm_shift, heads))
            else:
                planned.append(_float_tensor(gguf_name, params[hf_name], heads))
        planned += [_float_tensor(n, t, None) for n, t in archmod.extra_tensors(model).items()]
        return planned

    @property
    def file_type(self) -> int:
        """``general.file_type`` (llama.h LLAMA_FTYPE_MOSTLY_*)."""
        return self.bt.file_type

    def _config_extra(self, layers: Dict[str, QuantizedWeight]) -> Dict[str, Any]:
        return {}

    def _types_label(self, layers: Dict[str, QuantizedWeight]) -> str:
        return self.bt.name.upper()

    def _quantized(self, name: str, qw: QuantizedWeight, heads: Optional[int]) -> _Tensor:
        if qw.kquant is not None:
            kb = K_BLOCK_TYPES[kquant_type(qw).name]
            per_block, type_size, ggml_type, pack = SUPER_BLOCK, kb.type_size, kb.ggml_type, pack_k_blocks
        else:
            bt = legacy_type_of(qw) if self.bt is None else self.bt
            per_block, type_size, ggml_type = BLOCK, bt.type_size, bt.ggml_type
            pack = lambda q: pack_blocks(q, bt)  # noqa: E731
        nbytes = qw.out_features * (qw.in_features // per_block) * type_size

        def make() -> np.ndarray:
            q = permute_rows(qw, archmod.rope_order(qw.out_features, heads)) if heads else qw
            return pack(q)

        # numpy shape of the raw bytes; the writer turns it into the element shape [out, in].
        return _Tensor(name, (qw.out_features, nbytes // qw.out_features), np.uint8, ggml_type, nbytes, make)


def _float_tensor(name: str, value: torch.Tensor, heads: Optional[int]) -> _Tensor:
    """F32 for 1-D tensors (norms, biases, rope factors, as llama.cpp keeps them), F16 otherwise;
    F32 also for a matrix whose values overflow fp16 (announced)."""
    value = value.detach()
    as_f32 = value.dim() <= 1 or bool(value.abs().max() > FP16_MAX)
    if as_f32 and value.dim() > 1:
        logger.warning("gguf: %s has values beyond fp16's range; written as F32", name)
    dtype, ggml_type = (np.float32, 0) if as_f32 else (np.float16, 1)  # GGML_TYPE_F32 / F16

    def make() -> np.ndarray:
        v = value.cpu()
        v = v[archmod.rope_order(v.shape[0], heads)] if heads else v
        return np.ascontiguousarray(v.float().numpy().astype(dtype))

    shape = tuple(value.shape)
    return _Tensor(name, shape, dtype, ggml_type, int(np.prod(shape)) * np.dtype(dtype).itemsize, make)


def legacy_type_of(qw: Any) -> BlockType:
    """The legacy block type storing a (non-K) record or scheme: by bits and sym, group 32."""
    for bt in BLOCK_TYPES.values():
        if (bt.bits, bt.sym) == (qw.bits, qw.sym) and qw.group_size == BLOCK:
            return bt
    raise ValueError(f"no GGUF legacy type stores bits={qw.bits} group_size={qw.group_size} sym={qw.sym}")


def _legacy_params(bt: BlockType) -> QuantParams:
    return QuantParams(bits=bt.bits, group_size=BLOCK, scheme="sym" if bt.sym else "asym", scale_dtype=torch.float16)


class GGUFKExporter(GGUFExporter):
    """Writes ``gguf:<mix>`` files (``q4_k_m``, ...): each layer's ggml type comes from llama.cpp's rules
    (:mod:`.kmix`), decided in the plan before tuning (:meth:`layer_params`); K-type layers are tuned
    on the K grid (:mod:`auto_round.quant.kquant`) and a row that is not whole super-blocks takes the
    legacy fallback type, both listed in the plan."""

    stores_kquant = True

    def __init__(self, mix: kmix.KMix) -> None:
        super().__init__(None)
        self.mix = mix
        self.name = f"gguf:{mix.name}"

    @property
    def file_type(self) -> int:
        return self.mix.file_type

    def layer_params(self, model: nn.Module, layers: Dict[str, Tuple[int, int]]
                     ) -> Optional[Dict[str, Tuple[Optional[QuantParams], str]]]:
        """``{layer: (params, note)}``: the ggml type llama.cpp's rules give each layer's tensor, after
        the shape fallback; params None = F16 (a row not even a multiple of 32), note = why."""
        family = archmod.family_of(model)
        if family is None:
            return None  # check_model refuses the model with the reason
        cfg = archmod.text_config(model)
        n_blocks = int(cfg.num_hidden_layers)
        n_head = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
        is_70b = n_blocks == 80 and (family.arch == "qwen2" or n_kv != n_head)
        names = {hf[:-len(".weight")]: g for hf, g in self._tensor_names(model, family)
                 if hf.endswith(".weight") and g is not None}
        chosen: Dict[str, Tuple[Optional[QuantParams], str]] = {}
        vision = set(mmproj.iter_vision_layers(model, layers))
        for name, (_out, in_) in layers.items():
            gname = names.get(name)
            if name in vision:
                chosen[name] = (None, f"{self.name}: vision layer, written F16 in the mmproj file")
                continue
            if gname is None:
                chosen[name] = (None, f"{self.name}: no llama.cpp tensor name")
                continue
            block = re.match(r"blk\.(\d+)\.", gname)
            ktype, why = kmix.tensor_type(self.mix, gname, int(block.group(1)) if block else None, n_blocks,
                                          n_head // max(n_kv, 1), is_70b)
            final, fb = kmix.fallback(ktype, in_)
            if final is None:
                chosen[name] = (None, f"{self.name}: {fb}")
                continue
            params = kquant_params(final) if final in K_BLOCK_TYPES else _legacy_params(BLOCK_TYPES[final])
            because = "; ".join(x for x in (why, fb) if x)
            chosen[name] = (params, f"{self.name} {final}" + (f" ({because})" if because else ""))
        return chosen

    def check_params(self, name: str, out_features: int, in_features: int, params: Any) -> Optional[str]:
        if is_kquant(params):
            if in_features % SUPER_BLOCK:
                return (f"in_features={in_features} is not a multiple of {SUPER_BLOCK}: K-type rows are whole "
                        f"super-blocks (the plan gives such layers a fallback type)")
            return None
        return self.check_layer(name, out_features, in_features, params.bits, params.group_size, params.sym)

    def check_layer(self, name: str, out_features: int, in_features: int, bits: int, group_size: int,
                    sym: bool) -> Optional[str]:
        """A non-K layer must be one of the fallback legacy types (bits 4/5/8, group 32)."""
        fits = [bt for bt in BLOCK_TYPES.values() if bt.name in kmix.FALLBACK.values()
                and layer_problem(bt, in_features, bits, group_size, sym) is None]
        if fits:
            return None
        return (f"{self.name} stores its layers as the K types the plan gives them (tune with "
                f"format='{self.name}' so the plan chooses them) or as a fallback type "
                f"{sorted(set(kmix.FALLBACK.values()))}; bits={bits} group_size={group_size} sym={sym} is neither")

    def _config_extra(self, layers: Dict[str, QuantizedWeight]) -> Dict[str, Any]:
        return {"gguf_tensor_types": self._type_counts(layers)}

    def _type_counts(self, layers: Dict[str, QuantizedWeight]) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for qw in layers.values():
            t = kquant_type(qw).name if qw.kquant is not None else legacy_type_of(qw).name
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))

    def _types_label(self, layers: Dict[str, QuantizedWeight]) -> str:
        return ", ".join(f"{n} {t.upper()}" for t, n in self._type_counts(layers).items())
