"""``AutoRoundMLLM``: SignRound for vision-language models.

By default only the language model's decoder blocks are tuned; lm_head, embeddings, the vision
tower and the projector stay in full precision. With ``quant_nontext_module=True`` the vision
block lists are tuned first, then the projector (when it has linear layers), then the language
model, whose block inputs are captured from the *quantized* vision output.

Calibration is text-only (``NeelNanda/pile-10k`` by default, through the full VLM forward) or
image-text (LLaVA-format data, or the built-in offline set). Image-text samples of different
lengths are batched with right padding; padded tokens are masked out of the loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from auto_round.autoround import AutoRound
from auto_round.compat import check_family_versions
from auto_round.config import DEFAULT_DATASET, _opt, check_option_type
from auto_round.mllm.families import Family, family_for, processor_for, resolve_family_blocks
from auto_round.mllm.template import Template, get_template
from auto_round.models.blocks import resolve_block_names
from auto_round.models.loading import load_pretrained, pickle_kwargs, resolve_dtype

logger = logging.getLogger(__name__)

IMAGE_TEXT_SEQLEN = 512


@dataclass(frozen=True)
class MLLMSettings:
    """Options of ``AutoRoundMLLM`` beyond the engine's (shared with the CLI)."""

    quant_nontext_module: bool = _opt(False, "also quantize the vision tower's blocks and the projector")
    extra_data_dir: Optional[str] = _opt(None, "folder holding the images of an image-text data file")
    template: Optional[str] = _opt(None, "template name or JSON file (default: by model_type)")
    truncation: Optional[bool] = _opt(None, "truncate image-text samples to seqlen (never through image tokens)")


MLLM_SETTINGS = tuple(fields(MLLMSettings))


def is_image_text_dataset(dataset: str) -> bool:
    """True for the built-in image-text set, the LLaVA names and local LLaVA-format JSON files."""
    from auto_round.mllm.dataset import LLAVA_DATASETS, OFFLINE_IMAGE_TEXT

    name = dataset.split(":")[0] if not dataset.startswith("auto_round:") else dataset
    if name in (OFFLINE_IMAGE_TEXT, *LLAVA_DATASETS):
        return True
    p = Path(name)
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        with p.open(encoding="utf-8") as f:
            head = f.read(4096)
        return '"conversations"' in head
    return False


def load_vlm(model: Union[str, Path, nn.Module], tokenizer: Any, processor: Any, model_dtype: Optional[str],
             trust_remote_code: bool, allow_pickle: bool = False) -> Tuple[nn.Module, Any, Any]:
    """Load model, tokenizer and processor when ``model`` is a folder or hub id."""
    if isinstance(model, nn.Module):
        return model, tokenizer, processor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    name = str(model)
    kw = {"trust_remote_code": trust_remote_code}
    load_pretrained(AutoConfig, name, **kw)  # clear error for a bad folder / offline hub id
    weights = pickle_kwargs(name, allow_pickle)
    try:
        m = load_pretrained(AutoModelForImageTextToText, name, dtype=resolve_dtype(model_dtype), **kw, **weights)
    except ValueError:  # remote-code VLMs register as causal LMs
        m = load_pretrained(AutoModelForCausalLM, name, dtype=resolve_dtype(model_dtype), **kw, **weights)
    if processor is None:
        try:
            processor = AutoProcessor.from_pretrained(name, **kw)
        except (OSError, ValueError, TypeError) as e:
            logger.info("no processor could be loaded from %s (%s); image-text calibration needs one", name, e)
    if tokenizer is None:
        tokenizer = getattr(processor, "tokenizer", None) or load_pretrained(AutoTokenizer, name, **kw)
    return m.eval(), tokenizer, processor


class AutoRoundMLLM(AutoRound):
    """Quantize a vision-language model (seed API)::

        autoround = AutoRoundMLLM(model, tokenizer, processor, bits=4, group_size=128, sym=True)
        autoround.quantize()
        autoround.save_quantized("./tmp_autoround", format="auto_round", inplace=True)

    Args beyond :class:`~auto_round.AutoRound`: ``processor`` / ``image_processor`` (saved beside the
    weights and used for image-text data), ``dataset`` (default: the template's, normally
    ``NeelNanda/pile-10k``), ``extra_data_dir``, ``template``, ``quant_nontext_module``, ``truncation``.
    ``seqlen`` defaults to 512 for image-text data.
    """

    def __init__(self, model: Union[str, Path, nn.Module], tokenizer: Any = None, processor: Any = None,
                 image_processor: Any = None, *, dataset: Optional[str] = None, extra_data_dir: Optional[str] = None,
                 template: Union[None, str, Template] = None, quant_nontext_module: bool = False,
                 truncation: Optional[bool] = None, model_dtype: Optional[str] = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False, **options: Any) -> None:
        if options.get("low_cpu_mem_usage"):  # before the model is loaded
            raise ValueError("low_cpu_mem_usage=True streams the blocks of a text LLM (AutoRound); a vision-language "
                             "model's language blocks take the vision tower's output, which a weightless capture "
                             "cannot produce: use AutoRoundMLLM with low_cpu_mem_usage=False")
        model, tokenizer, processor = load_vlm(model, tokenizer, processor, model_dtype, trust_remote_code,
                                               allow_pickle)
        self.processor, self.image_processor = processor, image_processor
        self.quant_nontext_module, self.extra_data_dir, self.truncation = quant_nontext_module, extra_data_dir, truncation
        model_type = getattr(model.config, "model_type", None)
        self.family: Optional[Family] = family_for(model_type, getattr(model.config, "architectures", None) or ())
        if self.family is not None:
            check_family_versions(self.family.name, self.family.upstream_breaks)
        self.template = get_template(model_type or "", template, family_known=self.family is not None)
        self._resolved_blocks: Optional[Tuple[str, List[str], Optional[str]]] = None
        dataset = self._choose_dataset(dataset)
        self.data_kind = "image" if is_image_text_dataset(dataset) else "text"
        if self.data_kind == "image" and options.get("seqlen") is None:
            options["seqlen"] = IMAGE_TEXT_SEQLEN
        if options.get("seqlen") is None:
            options.pop("seqlen", None)
        super().__init__(model, tokenizer, dataset=dataset, **options)

    def _choose_dataset(self, requested: Optional[str]) -> str:
        from auto_round.mllm.dataset import OFFLINE_IMAGE_TEXT

        dataset = requested or self.template.default_dataset or DEFAULT_DATASET
        check_option_type("dataset", dataset)  # before the name checks below read it
        if is_image_text_dataset(dataset):
            return dataset
        if self.family is not None and not self.family.text_only:
            logger.warning("%s cannot calibrate on text alone (%s): switching dataset %r to image-text data %r",
                           self.family.name, self.family.why, dataset, OFFLINE_IMAGE_TEXT)
            return OFFLINE_IMAGE_TEXT
        if self.quant_nontext_module:
            if requested is not None:
                raise ValueError(f"quant_nontext_module=True needs image-text calibration data, but dataset="
                                 f"{requested!r} is text-only; pass a LLaVA-format JSON (with extra_data_dir) "
                                 f"or dataset={OFFLINE_IMAGE_TEXT!r}")
            logger.warning("quant_nontext_module=True: calibrating with image-text data %r instead of the "
                           "text-only default so the vision tower sees images", OFFLINE_IMAGE_TEXT)
            return OFFLINE_IMAGE_TEXT
        return dataset

    # ------------------------------------------------------------------ plan hooks
    def _blocks(self) -> Tuple[str, List[str], Optional[str]]:
        if self._resolved_blocks is None:  # resolved once: its fallbacks are announced once
            self._resolved_blocks = resolve_family_blocks(self.model, self.family)
        return self._resolved_blocks

    def block_list_names(self) -> List[str]:
        if self.settings.to_quant_block_names is not None:
            return resolve_block_names(self.model, self.settings.to_quant_block_names)
        text, vision, projector = self._blocks()
        if not self.quant_nontext_module:
            return [text]
        if self.family is not None and not self.family.quant_nontext:
            raise ValueError(f"quant_nontext_module=True is not supported for {self.family.name} ({self.family.why}); "
                             "leave it off, or name the lists yourself with to_quant_block_names")
        if not vision:
            raise ValueError("quant_nontext_module=True but no vision block list was found; "
                             "name it with to_quant_block_names='vision.path,text.path'")
        has_linear = projector is not None and any(
            isinstance(m, nn.Linear) for m in self.model.get_submodule(projector).modules())
        return [*vision, *([projector] if has_linear else []), text]

    def outside_reasons(self) -> Dict[str, str]:
        text, vision, projector = self._blocks()
        why = "" if self.quant_nontext_module else " (quant_nontext_module=False)"
        reasons = {v: f"vision tower{why}" for v in vision}
        if projector:
            reasons[projector] = f"projector{why or ' (no linear layers tuned)'}"
        return reasons

    # ------------------------------------------------------------------ data
    def calibration_batches(self) -> List[Dict[str, torch.Tensor]]:
        if self.data_kind == "text":
            return super().calibration_batches()
        from auto_round.mllm.dataset import load_image_text_samples
        from auto_round.mllm.processor import PROCESSORS

        s = self.settings
        samples, self.dataset_used = load_image_text_samples(s.dataset, self.extra_data_dir, s.nsamples, s.seed)
        self.samples_used = len(samples)
        name = processor_for(self.family, self.template.processor)
        if name not in PROCESSORS:
            raise ValueError(f"template {self.template.model_type!r} names processor {name!r}, which is not "
                             f"registered; valid: {sorted(PROCESSORS)}")
        proc = PROCESSORS[name](self.model, self.tokenizer, self.processor, self.image_processor, self.template,
                                s.seqlen, self.truncation)
        encoded = [proc.encode(sample) for sample in samples]
        return self._batch(encoded, proc)

    def _batch(self, encoded: List[Dict[str, torch.Tensor]], proc: Any) -> List[Dict[str, torch.Tensor]]:
        """Group samples with the same inputs, sort by length (less padding), batch and collate."""
        dev = next(self.model.parameters()).device
        groups: Dict[Tuple[str, ...], List[Dict[str, torch.Tensor]]] = {}
        for e in encoded:
            groups.setdefault(tuple(e), []).append(e)
        batches = []
        bs = self.settings.batch_size
        for items in groups.values():
            items.sort(key=lambda e: e["input_ids"].shape[1])
            for i in range(0, len(items), bs):
                batch = proc.collate(items[i:i + bs])
                batches.append({k: v.to(dev) for k, v in batch.items()})
        lengths = [e["input_ids"].shape[1] for e in encoded]
        logger.info("image-text calibration: %d samples in %d batches, %d-%d tokens", len(encoded), len(batches),
                    min(lengths), max(lengths))
        return batches

    # ------------------------------------------------------------------ export
    def export_tokenizer(self) -> Any:
        """The processor when there is one (its tokenizer and image processor), else the tokenizer."""
        return self.processor if getattr(self.processor, "tokenizer", None) is not None else self.tokenizer

    def save_extra_files(self, folder: Path) -> None:
        super().save_extra_files(folder)
        for obj in (self.processor, self.image_processor):
            if obj is not None and hasattr(obj, "save_pretrained"):
                obj.save_pretrained(str(folder))
