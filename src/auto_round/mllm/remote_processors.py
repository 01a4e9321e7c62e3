"""Processors for VLM families whose modeling code ships with their checkpoints (``trust_remote_code``).

Each builds calibration inputs the way the family's own published code does:

- ``phi3_v`` (Phi-3 / Phi-3.5-Vision): ``processor(prompt, [image], return_tensors="pt")`` with ONE prompt
  string holding ``<|image_1|>`` (rendered with the tokenizer's chat template); image positions are the
  negative ids in ``input_ids``.
- ``cogvlm2``: the model's own ``build_conversation_input_ids(tokenizer, query=, history=, images=,
  template_version=)``; batches carry ``token_type_ids`` and ``images`` as one list of images per sample.
- ``deepseek_vl_v2``: ``DeepseekVLV2Processor(conversations=[{"role": "<|User|>", "content": "<image>\\n..."},
  ...], images=[...], force_batchify=True)``.
- ``molmo``: ``processor.process(tokens=..., images=[...])`` (unbatched tensors), the prompt in Molmo's
  ``" User: ... Assistant: ..."`` format.
- ``chatglm`` (GLM-4V-9B): the tokenizer's ``apply_chat_template([{"role", "image", "content"}],
  tokenize=True, return_dict=True)``, which also returns ``images``.

Kimi-VL has a Hugging Face style processor with a chat template: the generic ``"hf"`` processor serves it.

Samples of different lengths are right-padded like the generic processor does; per-sample image stacks of
different sizes (DeepSeek-VL2 tiles, Molmo crops, Phi-3-V crops) are padded along their second dimension.
Truncation to ``seqlen`` never cuts through image positions.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from auto_round.mllm.dataset import IMAGE_PLACEHOLDER, ImageTextSample
from auto_round.mllm.processor import HFProcessor, register_processor

logger = logging.getLogger(__name__)

__all__ = ["ImageLists", "Phi3VProcessor", "CogVLM2Processor", "DeepseekVLV2Processor", "MolmoProcessor",
           "GLM4VProcessor"]


class ImageLists(list):
    """One list of image tensors per sample (CogVLM2's ``images`` argument). ``.to()`` moves and casts
    every tensor, like a tensor's ``.to()``, so batches can be moved to the model's device as they are."""

    def to(self, *args: Any, **kwargs: Any) -> "ImageLists":
        return ImageLists([[im.to(*args, **kwargs) for im in per_sample] for per_sample in self])


def _pad_dim1(values: Sequence[torch.Tensor], fill: float) -> List[torch.Tensor]:
    """Pad ``[1, n_i, ...]`` tensors along dim 1 to the largest ``n_i`` with ``fill``."""
    longest = max(v.shape[1] for v in values)
    out = []
    for v in values:
        if v.shape[1] < longest:
            shape = list(v.shape)
            shape[1] = longest - v.shape[1]
            v = torch.cat([v, torch.full(shape, fill, dtype=v.dtype)], 1)
        out.append(v)
    return out


def _first_user_with_image(sample: ImageTextSample, fmt) -> List[Tuple[str, str]]:
    """``(role, text)`` turns with ``fmt(text)`` applied to the first user turn when the sample has an image."""
    pending, turns = sample.image is not None, []
    for role, text in sample.turns:
        if role == "user" and pending:
            text, pending = fmt(text), False
        turns.append((role, text))
    return turns


class RemoteCodeProcessor(HFProcessor):
    """Base of the processors below: model-dtype casting, truncation that keeps every image position
    (:meth:`image_positions`), and collation that pads per-sample image stacks (``media_pad``)."""

    media_pad: Dict[str, float] = {}  # keys padded along dim 1 (tiles / crops) before concatenation

    def image_positions(self, enc: Dict[str, Any]) -> Optional[torch.Tensor]:
        """Bool ``[T]`` mask of the image positions of one encoded sample, or None."""
        return None

    def load(self, sample: ImageTextSample) -> Any:
        return self.prepare_image(sample.load_image()) if sample.image is not None else None

    def finish(self, enc: Dict[str, Any]) -> Dict[str, Any]:
        """Cast floating tensors to the model dtype, then truncate."""
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            enc = {k: (v.to(dtype) if isinstance(v, ImageLists) or (isinstance(v, torch.Tensor) and
                                                                    v.is_floating_point()) else v)
                   for k, v in enc.items()}
        return self.truncate(enc)

    def truncate(self, enc: Dict[str, Any]) -> Dict[str, Any]:
        ids = enc["input_ids"]
        length = ids.shape[1]
        if self.truncation is False or length <= self.seqlen:
            return enc
        keep = self.seqlen
        pos = self.image_positions(enc)
        if pos is not None and bool(pos.any()):
            keep = max(keep, int(pos.nonzero()[-1]) + 1)
        return {k: (v[:, :keep] if isinstance(v, torch.Tensor) and k not in self.media_pad and v.dim() >= 2
                    and v.shape[0] == 1 and v.shape[1] == length else v) for k, v in enc.items()}

    def collate(self, items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        keys = list(items[0])
        if any(list(it) != keys for it in items):
            raise ValueError("cannot batch samples with different input keys (e.g. with and without images)")
        lengths = [it["input_ids"].shape[1] for it in items]
        longest = max(lengths)
        out: Dict[str, Any] = {}
        for k in keys:
            vals = [it[k] for it in items]
            if isinstance(vals[0], ImageLists):
                out[k] = ImageLists(x for v in vals for x in v)
                continue
            if k in self.media_pad:
                vals = _pad_dim1(vals, self.media_pad[k])
            elif all(v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == n for v, n in zip(vals, lengths)):
                pad = self.pad_id if k == "input_ids" else (-100 if k == "labels" else 0)
                vals = [torch.cat([v, torch.full((1, longest - n, *v.shape[2:]), pad, dtype=v.dtype)], 1)
                        for v, n in zip(vals, lengths)]
            out[k] = torch.cat(vals, 0)
        return out


@register_processor("phi3_v")
class Phi3VProcessor(RemoteCodeProcessor):
    """Phi-3 / Phi-3.5-Vision. The published ``Phi3VProcessor.__call__(text, images=None, ...)`` takes one
    prompt string (it splits it on ``<|image_N|>``) and no ``add_special_tokens``; its ``input_ids`` hold
    ``-N`` at the positions of image N."""

    image_tag = "<|image_1|>"
    media_pad = {"pixel_values": 0.0}

    def render(self, sample: ImageTextSample) -> str:
        turns = _first_user_with_image(sample, lambda t: f"{self.image_tag}\n{t}")
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False)
        return self.template.render(sample.turns, has_image=sample.image is not None).replace(
            IMAGE_PLACEHOLDER, self.image_tag)

    def call_processor(self, text: str, image: Any) -> Dict[str, torch.Tensor]:
        if self.processor is None:
            if image is not None:
                raise ValueError("phi3_v image-text calibration needs the model's processor: pass "
                                 "processor=AutoProcessor.from_pretrained(path, trust_remote_code=True)")
            return dict(self.tok(text, return_tensors="pt"))
        return dict(self.processor(text, [image] if image is not None else None, return_tensors="pt"))

    def encode(self, sample: ImageTextSample) -> Dict[str, Any]:
        enc = self.call_processor(self.render(sample), self.load(sample))
        return self.finish({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})

    def image_positions(self, enc: Dict[str, Any]) -> Optional[torch.Tensor]:
        return enc["input_ids"][0] < 0


VISION_TOKEN_TYPE = 1  # CogVLM's token type of image positions


@register_processor("cogvlm2")
class CogVLM2Processor(RemoteCodeProcessor):
    """CogVLM2 (and CogVLM): inputs come from the model's own ``build_conversation_input_ids``. The
    conversation's last user turn is the query, earlier (user, assistant) pairs the history; a final
    assistant answer is passed as ``answer=`` where the method takes one, else appended as text tokens."""

    def encode(self, sample: ImageTextSample) -> Dict[str, Any]:
        build = getattr(self.model, "build_conversation_input_ids", None)
        if not callable(build):
            raise ValueError("model has no build_conversation_input_ids: is trust_remote_code on? CogVLM2 builds "
                             "its inputs with the modeling code shipped with the checkpoint")
        turns = list(sample.turns)
        answer = turns.pop()[1] if turns and turns[-1][0] == "assistant" else None
        history: List[Tuple[str, str]] = []
        query: Optional[str] = None
        for role, text in turns:
            if role == "user":
                if query is not None:
                    history.append((query, ""))
                query = text
            else:
                history.append((query or "", text))
                query = None
        image = self.load(sample)
        kwargs: Dict[str, Any] = dict(query=query or "", history=history,
                                      images=[image] if image is not None else None,
                                      template_version=getattr(self.model.config, "template_version", None) or "chat")
        if answer is not None and "answer" in inspect.signature(build).parameters:
            kwargs["answer"], answer = answer, None
        out = build(self.tok, **kwargs)
        missing = [k for k in ("input_ids", "token_type_ids") if k not in out]
        if missing:
            raise ValueError(f"build_conversation_input_ids returned no {missing}; got {sorted(out)}")
        ids = torch.as_tensor(out["input_ids"], dtype=torch.long)
        types = torch.as_tensor(out["token_type_ids"], dtype=torch.long)
        mask = torch.as_tensor(out["attention_mask"]) if out.get("attention_mask") is not None else torch.ones_like(ids)
        if answer:
            extra = self.tok.encode(" " + answer, add_special_tokens=False)
            if self.tok.eos_token_id is not None:
                extra.append(self.tok.eos_token_id)
            tail = torch.tensor(extra, dtype=torch.long)
            ids, types = torch.cat([ids, tail]), torch.cat([types, torch.zeros_like(tail)])
            mask = torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)])
        enc: Dict[str, Any] = {"input_ids": ids[None], "token_type_ids": types[None], "attention_mask": mask[None]}
        images = out.get("images")
        if image is not None:
            if not images:
                raise ValueError("build_conversation_input_ids returned no images for an image sample")
            enc["images"] = ImageLists([list(images)])
        return self.finish(enc)

    def image_positions(self, enc: Dict[str, Any]) -> Optional[torch.Tensor]:
        return enc["token_type_ids"][0] == VISION_TOKEN_TYPE


@register_processor("deepseek_vl_v2")
class DeepseekVLV2Processor(RemoteCodeProcessor):
    """DeepSeek-VL2: the ``DeepseekVLV2Processor`` of the ``deepseek_vl2`` package, passed as ``processor=``,
    called with ``conversations`` (roles ``<|User|>`` / ``<|Assistant|>``, ``<image>`` placeholders)."""

    keys = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")
    roles = ("<|User|>", "<|Assistant|>")
    media_pad = {"images": 0.0, "images_spatial_crop": 0}

    def conversation(self, sample: ImageTextSample) -> List[Dict[str, str]]:
        turns = _first_user_with_image(sample, lambda t: f"{IMAGE_PLACEHOLDER}\n{t}")
        conv = [{"role": self.roles[0] if r == "user" else self.roles[1], "content": t} for r, t in turns]
        if not conv or conv[-1]["role"] != self.roles[1]:
            conv.append({"role": self.roles[1], "content": ""})
        return conv

    def encode(self, sample: ImageTextSample) -> Dict[str, Any]:
        call = getattr(self.processor, "__call__", None) if self.processor is not None else None
        try:
            takes_conversations = call is not None and "conversations" in inspect.signature(call).parameters
        except (TypeError, ValueError):
            takes_conversations = False
        if not takes_conversations:
            raise ValueError("deepseek_vl_v2 calibration needs DeepseekVLV2Processor (deepseek_vl2 package): pass "
                             "processor=DeepseekVLV2Processor.from_pretrained(path); it takes conversations=")
        image = self.load(sample)
        out = self.processor(conversations=self.conversation(sample), images=[image] if image is not None else [],
                             force_batchify=True, system_prompt="")
        have = set(out.keys())
        missing = [k for k in self.keys if k not in have]
        if missing:
            raise ValueError(f"DeepseekVLV2Processor output lacks {missing}; got {sorted(have)}")
        return self.finish({k: out[k] for k in self.keys})

    def image_positions(self, enc: Dict[str, Any]) -> Optional[torch.Tensor]:
        return enc["images_seq_mask"][0].bool()


@register_processor("molmo")
class MolmoProcessor(RemoteCodeProcessor):
    """Molmo: ``processor.process(tokens=..., images=[...])`` of the checkpoint's processor; its outputs
    are unbatched. Padded crops use -1 (Molmo's marker of a padding crop / invalid position)."""

    keys = ("input_ids", "images", "image_masks", "image_input_idx")
    media_pad = {"images": -1.0, "image_masks": -1.0, "image_input_idx": -1}

    def prompt(self, sample: ImageTextSample) -> str:
        parts = [("User: " if role == "user" else "Assistant: ") + text for role, text in sample.turns]
        if not sample.turns or sample.turns[-1][0] == "user":
            parts.append("Assistant:")
        return " " + " ".join(parts)

    def encode(self, sample: ImageTextSample) -> Dict[str, Any]:
        process = getattr(self.processor, "process", None)
        if not callable(process):
            raise ValueError("molmo calibration needs Molmo's processor, which has process(text=..., images=...): "
                             "pass processor=AutoProcessor.from_pretrained(path, trust_remote_code=True)")
        image = self.load(sample)
        tokens = self.tok.encode(self.prompt(sample), add_special_tokens=False)
        out = process(images=[image] if image is not None else None, tokens=tokens)
        enc: Dict[str, Any] = {k: torch.as_tensor(out[k])[None] for k in self.keys if k in out}
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        return self.finish(enc)

    def image_positions(self, enc: Dict[str, Any]) -> Optional[torch.Tensor]:
        idx = enc.get("image_input_idx")
        if idx is None:
            return None
        mask = torch.zeros(enc["input_ids"].shape[1], dtype=torch.bool)
        mask[idx[idx >= 0]] = True
        return mask


@register_processor("chatglm")
class GLM4VProcessor(RemoteCodeProcessor):
    """GLM-4V-9B: its tokenizer (``trust_remote_code``) renders ``{"role", "image", "content"}`` messages,
    tokenizes them and returns the pixel tensor as ``images``; the image sits between
    ``config.boi_token_id`` and ``config.eoi_token_id`` (the model expands it there)."""

    keys = ("input_ids", "attention_mask", "position_ids", "images")

    def encode(self, sample: ImageTextSample) -> Dict[str, Any]:
        image = self.load(sample)
        msgs, pending = [], image is not None
        for role, text in sample.turns:
            msg: Dict[str, Any] = {"role": role, "content": text}
            if role == "user" and pending:
                msg["image"], pending = image, False
            msgs.append(msg)
        out = self.tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True, return_tensors="pt",
                                           return_dict=True)
        if image is not None and "images" not in out:
            raise ValueError("the tokenizer returned no 'images': GLM-4V's own tokenizer (loaded with "
                             "trust_remote_code=True) builds the image input; pass it as tokenizer=")
        return self.finish({k: out[k] for k in self.keys if k in out})

    def image_positions(self, enc: Dict[str, Any]) -> Optional[torch.Tensor]:
        eoi = getattr(getattr(self.model, "config", None), "eoi_token_id", None)
        return None if eoi is None else enc["input_ids"][0] == eoi
