"""Processors: turn calibration samples (text, image) into model inputs, and collate batches.

``PROCESSORS`` maps a name to a processor class. ``"hf"`` is generic: it renders the conversation
with the model's own chat template (or the family :class:`~auto_round.mllm.template.Template`)
and calls the model's Hugging Face processor. Model-specific processors subclass it where inputs
differ. Register your own with :func:`register_processor` (:mod:`auto_round.mllm.registry`, re-exported
here); the remote-code families' processors are in :mod:`auto_round.mllm.remote_processors`.

Batches of samples of different lengths are right-padded; the padded positions are masked out of
the tuning loss through ``attention_mask`` (no forced ``batch_size=1``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from auto_round.mllm.dataset import ImageTextSample
from auto_round.mllm.registry import PROCESSORS, processor_name, register_processor  # noqa: F401 (re-exported)
from auto_round.mllm.template import Template

logger = logging.getLogger(__name__)

def _pad_value(key: str, pad_id: int) -> int:
    return pad_id if key == "input_ids" else (-100 if key == "labels" else 0)


class HFProcessor:
    """Generic processor built on the model's Hugging Face processor and chat template."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None, image_processor: Any = None,
                 template: Optional[Template] = None, seqlen: int = 512, truncation: Optional[bool] = None) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.image_processor = image_processor
        self.template = template or Template("default")
        self.seqlen, self.truncation = seqlen, truncation
        tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if tok is None:
            raise ValueError("image-text calibration needs a tokenizer or a processor with one")
        self.tok = tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        cfg = getattr(model, "config", None)
        self.image_token_id = next((getattr(cfg, k) for k in ("image_token_id", "image_token_index")
                                    if isinstance(getattr(cfg, k, None), int)), None)

    # ----------------------------------------------------------------- rendering
    def messages(self, sample: ImageTextSample) -> List[Dict[str, Any]]:
        """Chat messages in the HF content-list form, the image in the first user turn."""
        out, pending = [], sample.image is not None
        for role, text in sample.turns:
            content: List[Dict[str, Any]] = []
            if role == "user" and pending:
                content.append({"type": "image"})
                pending = False
            content.append({"type": "text", "text": text})
            out.append({"role": role, "content": content})
        return out

    def uses_chat_template(self) -> bool:
        chat = getattr(self.processor, "chat_template", None) or getattr(self.tok, "chat_template", None)
        return bool(chat) and self.processor is not None and hasattr(self.processor, "apply_chat_template")

    def render(self, sample: ImageTextSample) -> str:
        """Conversation text: the model's chat template when it has one, else the family template."""
        if self.uses_chat_template():
            return self.processor.apply_chat_template(self.messages(sample), tokenize=False)
        return self.template.render(sample.turns, has_image=sample.image is not None)

    def prepare_image(self, image: Any) -> Any:
        """Hook for model-specific resizing; identity here."""
        return image

    # ----------------------------------------------------------------- encoding
    def call_processor(self, text: str, image: Any) -> Dict[str, torch.Tensor]:
        if self.processor is None:
            if image is not None:
                raise ValueError("an image sample needs the model's processor: pass processor=AutoProcessor...")
            return dict(self.tok(text, return_tensors="pt", add_special_tokens=not self.uses_chat_template()))
        # A chat template already writes BOS and the other special tokens.
        kwargs: Dict[str, Any] = {"text": [text], "return_tensors": "pt",
                                  "add_special_tokens": not self.uses_chat_template()}
        if image is not None:
            kwargs["images"] = [image]
        return dict(self.processor(**kwargs))

    def encode(self, sample: ImageTextSample) -> Dict[str, torch.Tensor]:
        """Model inputs of one sample (batch dimension 1), truncated to ``seqlen`` when allowed."""
        image = self.prepare_image(sample.load_image()) if sample.image is not None else None
        enc = {k: v for k, v in self.call_processor(self.render(sample), image).items() if isinstance(v, torch.Tensor)}
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype):  # some image processors return bf16 pixels (Llama-4)
            enc = {k: v.to(dtype) if v.is_floating_point() else v for k, v in enc.items()}
        return self.truncate(enc)

    def truncate(self, enc: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Cut text past ``seqlen``, never through image placeholder tokens."""
        ids = enc["input_ids"]
        length = ids.shape[1]
        if self.truncation is False or length <= self.seqlen:
            return enc
        keep = self.seqlen
        if self.image_token_id is not None:
            pos = (ids[0] == self.image_token_id).nonzero()
            if len(pos):
                keep = max(keep, int(pos[-1]) + 1)
        return {k: (v[:, :keep] if v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == length else v)
                for k, v in enc.items()}

    def collate(self, items: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Right-pad sequence tensors to the longest sample; concatenate the rest along dim 0."""
        lengths = [it["input_ids"].shape[1] for it in items]
        longest = max(lengths)
        keys = list(items[0])
        if any(list(it) != keys for it in items):
            raise ValueError("cannot batch samples with different input keys (e.g. with and without images)")
        out: Dict[str, torch.Tensor] = {}
        for k in keys:
            vals = [it[k] for it in items]
            if all(v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == n for v, n in zip(vals, lengths)):
                padded = []
                for v, n in zip(vals, lengths):
                    shape = list(v.shape)
                    shape[1] = longest - n
                    padded.append(torch.cat([v, torch.full(shape, _pad_value(k, self.pad_id), dtype=v.dtype)], 1))
                out[k] = torch.cat(padded, 0)
            else:
                out[k] = torch.cat(vals, 0)
        return out


PROCESSORS["hf"] = HFProcessor


@register_processor("qwen2_vl")
class Qwen2VLProcessor(HFProcessor):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: pixels arrive as flat patches ``[patches, dim]`` with
    ``image_grid_thw``; the number of visual tokens grows with the image area, so calibration
    images are downscaled to keep them within half of ``seqlen``."""

    def prepare_image(self, image: Any) -> Any:
        ip = getattr(self.processor, "image_processor", None) or self.image_processor
        patch = int(getattr(ip, "patch_size", 14) or 14)
        merge = int(getattr(ip, "merge_size", 2) or 2)
        unit = patch * merge
        max_tokens = max(4, self.seqlen // 2)
        w, h = image.size
        tokens = (w / unit) * (h / unit)
        if tokens <= max_tokens:
            return image
        f = math.sqrt(max_tokens / tokens)
        size = (max(unit, int(w * f) // unit * unit), max(unit, int(h * f) // unit * unit))
        return image.resize(size)

