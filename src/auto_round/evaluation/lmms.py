"""Vision-language tasks through lmms-eval (PyPI ``lmms-eval``, the optional extra ``auto-round[vlm-eval]``).

lmms-eval's own model wrappers load a model from a path; ours hands it the model object already
loaded (a quantized checkpoint on this package's backends, or the full-precision model) with its
Hugging Face processor, through a small adapter (:func:`harness_model`) that answers lmms-eval's two
request kinds with the functions below:

- ``loglikelihood``: :func:`continuation_logprob`, the summed log-probability of the continuation's
  tokens after the prompt (images included), and whether greedy decoding would produce it;
- ``generate_until``: :func:`generate_text`, greedy (or sampled, as the task asks) generation cut at
  the task's stop strings.

The prompt is the model's chat template applied to one user turn (the images first, then the task's
text), with the generation prompt; a model without a chat template uses its family template
(:mod:`auto_round.mllm.template`). A task may be an lmms-eval task name or a task ``.yaml`` path (a
custom task, e.g. on a local JSON file with local images); offline, a task whose data set is not in
the datasets cache fails with an error naming the task and the fix.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

INSTALL_HINT = ("pip install 'auto-round[vlm-eval]' (or pip install lmms-eval); text tasks of lm-eval are "
                "named lm_eval:TASK, and the built-in ppl:FILE task needs no harness")


def import_lmms_eval() -> Any:
    """The ``lmms_eval`` module, or ImportError with the install command."""
    try:
        import lmms_eval
        from lmms_eval.api.model import lmms  # noqa: F401  (the base class the adapter needs)
    except ImportError as e:
        raise ImportError(f"lmms-eval is not installed, and these tasks need it: {INSTALL_HINT}") from e
    return lmms_eval


# ---------------------------------------------------------------------------------------- prompts
def _tokenizer(processor: Any) -> Any:
    tok = getattr(processor, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{type(processor).__name__} has no tokenizer; VLM evaluation needs the model's "
                         "processor (AutoProcessor.from_pretrained of the model folder)")
    return tok


def render_prompt(model: nn.Module, processor: Any, context: str, n_images: int) -> str:
    """The text of one user turn (``n_images`` images, then ``context``) with the generation prompt."""
    chat = getattr(processor, "chat_template", None) or getattr(_tokenizer(processor), "chat_template", None)
    if chat and hasattr(processor, "apply_chat_template"):
        content: List[Dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": context})
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    from auto_round.mllm.template import get_template

    if n_images > 1:
        raise ValueError(f"a prompt with {n_images} images needs a chat template, and this model's processor has "
                         "none: give the processor a chat_template, or evaluate single-image tasks")
    template = get_template(getattr(model.config, "model_type", "default"))
    text = template.render([("user", context)], has_image=n_images == 1)
    return text + template.assistant_format.split("{content}")[0]


def encode(model: nn.Module, processor: Any, text: str, images: Sequence[Any]) -> Dict[str, torch.Tensor]:
    """Model inputs (batch 1) of ``text`` with ``images``, on the model's device, pixels in its dtype."""
    kwargs: Dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
    if images:
        kwargs["images"] = list(images)
    enc = {k: v for k, v in dict(processor(**kwargs)).items() if isinstance(v, torch.Tensor)}
    param = next(model.parameters())
    return {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
            for k, v in enc.items()}


@torch.no_grad()
def continuation_logprob(model: nn.Module, processor: Any, context: str, continuation: str,
                         images: Sequence[Any] = ()) -> Tuple[float, bool]:
    """``(sum of log p(continuation tokens | prompt), greedy)`` for one request.

    The prompt is :func:`render_prompt`; the continuation's tokens are those of ``prompt +
    continuation`` past the prompt's own length (images expand identically in both)."""
    prompt = render_prompt(model, processor, context, len(images))
    n_prompt = int(encode(model, processor, prompt, images)["input_ids"].shape[1])
    full = encode(model, processor, prompt + continuation, images)
    ids = full["input_ids"]
    if ids.shape[1] <= n_prompt:
        raise ValueError(f"continuation {continuation!r} adds no token after the prompt; lmms-eval loglikelihood "
                         "tasks need a non-empty continuation")
    logits = model(**full).logits[0, n_prompt - 1:ids.shape[1] - 1].float()
    target = ids[0, n_prompt:]
    logprobs = torch.log_softmax(logits, dim=-1)
    total = float(logprobs.gather(1, target[:, None]).sum())
    return total, bool((logits.argmax(dim=-1) == target).all())


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


@torch.no_grad()
def generate_text(model: nn.Module, processor: Any, context: str, images: Sequence[Any] = (),
                  gen_kwargs: Optional[Dict[str, Any]] = None) -> str:
    """The model's answer to one request: generation from :func:`render_prompt`, cut at ``until``.

    ``gen_kwargs`` are lmms-eval's: ``until`` (str or list), ``max_new_tokens`` (default 128),
    ``temperature`` (0: greedy), ``top_p``, ``num_beams``."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kw.get("temperature") or 0.0)
    tok = _tokenizer(processor)
    inputs = encode(model, processor, render_prompt(model, processor, context, len(images)), images)
    generate: Dict[str, Any] = {"max_new_tokens": int(kw.get("max_new_tokens") or 128),
                                "num_beams": int(kw.get("num_beams") or 1), "do_sample": temperature > 0,
                                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    if temperature > 0:
        generate["temperature"] = temperature
        if kw.get("top_p") is not None:
            generate["top_p"] = float(kw["top_p"])
    out = model.generate(**inputs, **generate)
    return _cut(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), until)


def _images(visuals: Any) -> List[Any]:
    """lmms-eval's ``doc_to_visual`` result as a flat list of PIL images; videos and audio are refused."""
    from PIL import Image

    flat: List[Any] = []
    stack = [visuals] if not isinstance(visuals, (list, tuple)) else list(visuals)
    for v in stack:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            flat.extend(_images(v))
        elif isinstance(v, Image.Image):
            flat.append(v.convert("RGB"))
        else:
            raise ValueError(f"lmms-eval gave a visual of type {type(v).__name__} ({str(v)[:60]!r}); this evaluator "
                             "runs image tasks only (videos and audio are not supported)")
    return flat


# ---------------------------------------------------------------------------------------- harness
def _pair_wrapper() -> Any:
    """How a ``(logprob, greedy)`` answer must be returned to this lmms-eval version.

    lmms-eval 0.7.3's evaluator passes every model answer through ``unwrap_generation_output``, which
    turns a tuple into its ``str()`` (so multiple-choice tasks fail with "too many values to unpack" for
    every model); a ``GenerationResult`` whose ``text`` is the pair passes through unchanged. Versions
    that keep tuples get them as they are."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return lambda pair: pair
    if unwrap_generation_output((0.0, True))[0] == (0.0, True):
        return lambda pair: pair
    return lambda pair: GenerationResult(text=pair)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1)
def _adapter_class() -> type:
    """The lmms-eval model class answering requests with a loaded model (built once lmms_eval imports)."""
    import_lmms_eval()
    from lmms_eval.api.model import lmms

    wrap = _pair_wrapper()

    class LoadedVLM(lmms):
        """A loaded Hugging Face VLM and its processor, for ``lmms_eval.evaluator.simple_evaluate``."""

        def __init__(self, model: nn.Module, processor: Any) -> None:
            super().__init__()
            self.model, self.processor = model.eval(), processor

        def _doc(self, task: str, split: str, doc_id: int) -> Any:
            return self.task_dict[task][split][doc_id]

        def loglikelihood(self, requests: List[Any]) -> List[Tuple[float, bool]]:
            out = []
            for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                out.append(wrap(continuation_logprob(self.model, self.processor, context, continuation,
                                                     _images(doc_to_visual(doc)))))
            return out

        def generate_until(self, requests: List[Any]) -> List[str]:
            out = []
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
                doc = self._doc(task, split, doc_id)
                out.append(generate_text(self.model, self.processor, context, _images(doc_to_visual(doc)),
                                         dict(gen_kwargs or {})))
            return out

        def generate_until_multi_round(self, requests: List[Any]) -> List[str]:
            raise NotImplementedError("multi-round lmms-eval tasks are not supported by auto_round's evaluator; "
                                      "run single-turn tasks")

    return LoadedVLM


def harness_model(model: nn.Module, processor: Any) -> Any:
    """An lmms-eval model object answering with ``model`` and its ``processor``."""
    if processor is None:
        raise ValueError("lmms-eval tasks need the model's processor (AutoProcessor.from_pretrained of the folder); "
                         "none was given")
    return _adapter_class()(model, processor)


def _manager_for(tasks: Sequence[str]) -> Tuple[List[str], Any]:
    from lmms_eval.tasks import TaskManager

    from auto_round.evaluation.harness import task_index

    return task_index(tasks, TaskManager)


def check_lmms_tasks(tasks: Sequence[str]) -> None:
    """ImportError without lmms-eval; ValueError naming each task lmms-eval does not know (closest names
    suggested), so a typo fails before any tuning."""
    from auto_round.evaluation.harness import unknown_tasks

    import_lmms_eval()
    names, manager = _manager_for(tasks)
    unknown = unknown_tasks(names, manager.all_tasks)
    if unknown:
        raise ValueError(f"lmms-eval has no task {'; '.join(unknown)}; a text task of lm-eval is named lm_eval:TASK, "
                         "and a custom task is a task YAML path")


def run_lmms_eval(model: nn.Module, processor: Any, tasks: Sequence[str], limit: Any = None) -> Dict[str, Dict[str, float]]:
    """Evaluate ``model`` on lmms-eval ``tasks``; ``{task: {metric: value}}`` (numeric metrics only)."""
    from auto_round.evaluation.harness import _numeric_metrics, missing_data_said_plainly

    import_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate

    names, manager = _manager_for(tasks)
    with missing_data_said_plainly("lmms-eval", names, "or use a custom task YAML on local files"):
        out = simple_evaluate(model=harness_model(model, processor), tasks=names, task_manager=manager, limit=limit,
                              batch_size=1, log_samples=False)
    return {task: _numeric_metrics(m) for task, m in (out or {}).get("results", {}).items()}
