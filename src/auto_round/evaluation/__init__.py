"""Evaluation of a model, quantized or not: the built-in ``ppl:FILE`` task, lm-eval and lmms-eval tasks.

``--tasks`` is a comma list. ``ppl:path/to/file.txt`` is the perplexity on a local text file
(:mod:`auto_round.evaluation.ppl`, no harness needed). Every other entry is a task of a harness:
``lm_eval:NAME`` for lm-eval (text; :mod:`auto_round.evaluation.harness`, ``pip install
'auto-round[eval]'``), ``lmms:NAME`` for lmms-eval (vision-language; :mod:`auto_round.evaluation.lmms`,
``pip install 'auto-round[vlm-eval]'``); a task without a prefix goes to lm-eval for a text model and
to lmms-eval for a VLM (``parse_tasks(..., vlm=True)``, what ``auto-round-mllm`` does). A task may be
a harness task name or a task YAML path. Results are ``{task: {metric: value}}`` per run (``"fp"``,
``"quantized"``); :func:`results_table` prints runs side by side and :func:`save_results` writes
``eval_results.json`` into a checkpoint of ours (recorded in its manifest), else into a fallback
folder: a folder we did not write is never written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
PPL_PREFIX = "ppl:"
# Explicit harness prefixes of a task: prefix -> Task.kind.
HARNESS_PREFIXES = {"lm_eval:": "lm_eval", "lmms:": "lmms_eval", "lmms_eval:": "lmms_eval"}
Results = Dict[str, Dict[str, float]]


@dataclass(frozen=True)
class Task:
    """One entry of ``--tasks``: ``kind`` is ``"ppl"`` (``target`` = the file), ``"lm_eval"`` or ``"lmms_eval"``
    (``target`` = a task name or task YAML of that harness)."""

    kind: str
    target: str

    @property
    def label(self) -> str:
        return f"{PPL_PREFIX}{Path(self.target).name}" if self.kind == "ppl" else self.target


def parse_tasks(text: Union[str, Sequence[str]], vlm: bool = False) -> List[Task]:
    """``"ppl:a.txt,hellaswag,lmms:mme"`` -> ``[Task("ppl", "a.txt"), Task("lm_eval", "hellaswag"),
    Task("lmms_eval", "mme")]``; an unprefixed task goes to lmms-eval when ``vlm``, else to lm-eval."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else [str(t).strip() for t in text]
    items = [t for t in items if t]
    if not items:
        raise ValueError(f"tasks={text!r} names no task; use e.g. ppl:path/to/file.txt or an lm-eval task name")
    tasks = []
    for t in items:
        if t.startswith(PPL_PREFIX):
            if not t[len(PPL_PREFIX):]:
                raise ValueError("task 'ppl:' needs a file: ppl:path/to/file.txt")
            tasks.append(Task("ppl", t[len(PPL_PREFIX):]))
            continue
        prefix = next((p for p in HARNESS_PREFIXES if t.startswith(p)), None)
        if prefix is None:
            tasks.append(Task("lmms_eval" if vlm else "lm_eval", t))
        elif not t[len(prefix):]:
            raise ValueError(f"task {t!r} names no task after {prefix!r}: e.g. {prefix}NAME")
        else:
            tasks.append(Task(HARNESS_PREFIXES[prefix], t[len(prefix):]))
    return tasks


def _targets(tasks: Sequence[Task], kind: str) -> List[str]:
    return [t.target for t in tasks if t.kind == kind]


def check_tasks(tasks: Sequence[Task]) -> None:
    """Fail before any work when a task cannot run: a ``ppl`` file that is missing or not text, harness tasks
    without their harness installed (ImportError with the install command), or a task the harness does not know."""
    from auto_round.evaluation.ppl import read_text

    for task in tasks:
        if task.kind == "ppl":
            read_text(task.target)
    if _targets(tasks, "lm_eval"):
        from auto_round.evaluation.harness import check_lm_eval_tasks

        check_lm_eval_tasks(_targets(tasks, "lm_eval"))
    if _targets(tasks, "lmms_eval"):
        from auto_round.evaluation.lmms import check_lmms_tasks

        check_lmms_tasks(_targets(tasks, "lmms_eval"))


def needs_processor(tasks: Sequence[Task]) -> bool:
    """Whether ``tasks`` include lmms-eval tasks (they need the model's processor)."""
    return bool(_targets(tasks, "lmms_eval"))


def _position_limit(model: nn.Module) -> Optional[int]:
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def evaluate(model: nn.Module, tokenizer: Any, tasks: Sequence[Task], batch_size: int = 1, seqlen: int = 2048,
             device: Optional[torch.device] = None, processor: Any = None, limit: Any = None) -> Results:
    """Run ``tasks`` on ``model`` (moved to ``device`` when given); ``{task label: {metric: value}}``.

    lmms-eval tasks need ``processor`` (the model's Hugging Face processor); ``limit`` caps the number of
    documents per harness task (lm-eval's and lmms-eval's ``limit``).

    ``seqlen`` (the perplexity window) is capped at the model's ``max_position_embeddings``, and the cap
    is logged and recorded in the result."""
    from auto_round.evaluation.ppl import perplexity, read_text

    if needs_processor(tasks) and processor is None:
        raise ValueError(f"lmms-eval tasks {_targets(tasks, 'lmms_eval')} need the model's processor: pass "
                         "processor=AutoProcessor.from_pretrained(folder), or save it beside the model")
    check_tasks(tasks)
    if tokenizer is None:
        raise ValueError("evaluation needs the model's tokenizer; save it beside the model (or pass tokenizer=...)")
    if device is not None and next(model.parameters()).device != device:
        model = model.to(device)
    model.eval()
    limit = _position_limit(model)
    if limit is not None and seqlen > limit:
        logger.info("perplexity windows of %d tokens instead of %d: the model's max_position_embeddings", limit, seqlen)
        seqlen = limit
    results: Results = {}
    for task in (t for t in tasks if t.kind == "ppl"):
        results[task.label] = perplexity(model, tokenizer, read_text(task.target), seqlen, batch_size)
    if _targets(tasks, "lm_eval"):
        from auto_round.evaluation.harness import run_lm_eval

        results.update(run_lm_eval(model, tokenizer, _targets(tasks, "lm_eval"), batch_size, limit=limit))
    if _targets(tasks, "lmms_eval"):
        from auto_round.evaluation.lmms import run_lmms_eval

        results.update(run_lmms_eval(model, processor, _targets(tasks, "lmms_eval"), limit=limit))
    return results


# ---------------------------------------------------------------------------------------- loading
def is_quantized_folder(path: Union[str, Path]) -> bool:
    """True for a local folder whose ``config.json`` holds a ``quantization_config``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "quantization_config" in json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError:
        return False


def load_for_eval(path: str, device: Union[str, torch.device] = "cpu", backend: str = "auto",
                  trust_remote_code: bool = False) -> Tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a folder or hub id: a quantized checkpoint through
    :func:`auto_round.inference.load_quantized` (our backends), any other model as a full-precision
    baseline with transformers' auto class for its config (causal LM, else image-text-to-text)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from auto_round.models.loading import load_pretrained

    kw = {"trust_remote_code": trust_remote_code}
    if is_quantized_folder(path):
        from auto_round.inference import load_quantized

        model = load_quantized(path, device=device, backend=backend, trust_remote_code=trust_remote_code)
    else:
        config = load_pretrained(AutoConfig, path, **kw)
        auto = AutoModelForCausalLM if type(config) in AutoModelForCausalLM._model_mapping else AutoModelForImageTextToText
        if type(config) not in auto._model_mapping and not trust_remote_code:
            raise ValueError(f"{path!r} holds a {type(config).__name__}, which is neither a causal LM nor an "
                             "image-text-to-text model: it cannot be evaluated here")
        model = load_pretrained(auto, path, **kw).to(device)
    return model.eval(), load_pretrained(AutoTokenizer, path, **kw)


def load_processor(path: str, trust_remote_code: bool = False) -> Any:
    """The Hugging Face processor saved with ``path`` (lmms-eval tasks need it), or ValueError saying so."""
    from transformers import AutoProcessor

    from auto_round.models.loading import load_pretrained

    try:
        return load_pretrained(AutoProcessor, path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"no processor could be loaded from {path!r} ({str(e).splitlines()[0] if str(e) else e!r}); "
                         "lmms-eval tasks need the model's processor files (preprocessor_config.json ...) beside "
                         "the model") from e


# ---------------------------------------------------------------------------------------- results
MAIN_METRICS = ("ppl", "acc,none", "acc_norm,none", "exact_match,strict-match", "word_perplexity,none")


def _shown_metrics(metrics: Mapping[str, float]) -> List[str]:
    main = [m for m in MAIN_METRICS if m in metrics]
    return main or [m for m in metrics if "stderr" not in m][:3]


def results_table(runs: Mapping[str, Results]) -> List[str]:
    """The runs side by side: one row per task and main metric, one column per run (``fp``, ``quantized``)."""
    labels = list(runs)
    tasks: Dict[str, List[str]] = {}
    for res in runs.values():
        for task, metrics in res.items():
            for m in _shown_metrics(metrics):
                tasks.setdefault(task, [])
                if m not in tasks[task]:
                    tasks[task].append(m)
    width = max([len("task")] + [len(t) for t in tasks])
    lines = [f"{'task':<{width}}  {'metric':<16}" + "".join(f"  {lb:>12}" for lb in labels)]
    for task, metrics in tasks.items():
        for m in metrics:
            cells = [runs[lb].get(task, {}).get(m) for lb in labels]
            lines.append(f"{task:<{width}}  {m:<16}" + "".join(f"  {'-' if v is None else f'{v:.4g}':>12}" for v in cells))
    return lines


def save_results(runs: Mapping[str, Results], model_dir: Union[str, Path], fallback_dir: Union[str, Path],
                 tasks: str = "") -> Path:
    """Write ``eval_results.json``: into ``model_dir`` when it is a checkpoint of ours (merged with the runs
    already there, and listed in its manifest), else ``<fallback_dir>/<model name>-eval_results.json``."""
    from auto_round.export.folder import read_manifest, record_in_manifest

    model_dir = Path(model_dir)
    ours = model_dir.is_dir() and read_manifest(model_dir) is not None
    path = model_dir / RESULTS_FILE if ours else Path(fallback_dir) / f"{model_dir.name or 'model'}-{RESULTS_FILE}"
    previous: Dict[str, Any] = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8")).get("runs", {})
        except (ValueError, AttributeError):
            logger.warning("%s is not valid JSON: replaced", path)
    data = {"model": str(model_dir), "tasks": tasks, "runs": {**previous, **runs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    if ours:
        record_in_manifest(model_dir, [RESULTS_FILE])
    return path
