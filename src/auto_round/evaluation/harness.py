"""Text tasks through lm-eval (PyPI ``lm-eval``, the optional extra ``auto-round[eval]``).

The loaded model object is handed to lm-eval's ``HFLM`` wrapper, so a quantized checkpoint runs
on this package's inference backends. A task may be an lm-eval task name or a path to a task
``.yaml`` file (a custom task, e.g. on a local data file; its folder is added to lm-eval's task
search path). Offline, tasks whose data is already in the datasets cache run; one that needs a
download fails with an error naming the tasks and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

INSTALL_HINT = ("pip install 'auto-round[eval]' (or pip install lm-eval); the built-in ppl:FILE task needs no "
                "harness")
_NETWORK_WORDS = ("offline", "couldn't reach", "connection", "name resolution", "max retries",
                  "localentrynotfound", "not found on the hub", "cannot find the requested files")


def import_lm_eval() -> Any:
    """The ``lm_eval`` module, or ImportError with the install command."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the wrapper we need)
    except ImportError as e:
        raise ImportError(f"lm-eval is not installed, and these tasks need it: {INSTALL_HINT}") from e
    return lm_eval


def read_task_yaml(path: Path) -> Dict[str, Any]:
    """A task YAML as a dict; the harnesses' own tags (``!function utils.f``) are kept as their text."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    return data if isinstance(data, dict) else {}


def split_task_files(tasks: Sequence[str]) -> tuple:
    """``(task names, folders to search)``: a ``.yaml`` path becomes its ``task:`` name and its folder."""
    names: List[str] = []
    folders: List[str] = []
    for t in tasks:
        if t.endswith((".yaml", ".yml")):
            p = Path(t).expanduser()
            if not p.is_file():
                raise ValueError(f"task file {t!r} does not exist; give the path of an lm-eval task YAML")
            config = read_task_yaml(p)
            if "task" not in config:
                raise ValueError(f"task file {t!r} has no 'task:' name; lm-eval task YAMLs name their task")
            names.append(str(config["task"]))
            folders.append(str(p.resolve().parent))
        else:
            names.append(t)
    return names, sorted(set(folders))


@functools.lru_cache(maxsize=8)
def _task_manager(manager_cls: type, folders: tuple, defaults: bool) -> Any:
    """A harness's task index, once per search path; its own tasks (slow to index: it reads every task YAML)
    only when ``defaults``."""
    return manager_cls(include_path=list(folders) or None, include_defaults=defaults)


def task_index(tasks: Sequence[str], manager_cls: type) -> tuple:
    """``(task names, task manager)`` of a harness whose ``TaskManager`` class is ``manager_cls`` (lm-eval's,
    lmms-eval's); the harness's own task index is skipped when every task is a YAML file."""
    names, folders = split_task_files(tasks)
    return names, _task_manager(manager_cls, tuple(folders), not all(t.endswith((".yaml", ".yml")) for t in tasks))


def _manager_for(tasks: Sequence[str]) -> tuple:
    from lm_eval.tasks import TaskManager

    return task_index(tasks, TaskManager)


@contextlib.contextmanager
def missing_data_said_plainly(harness: str, names: Sequence[str], fix: str) -> Iterator[None]:
    """Re-raise a harness run's failure to download a data set as a ValueError naming the tasks and ``fix``;
    any other error passes unchanged."""
    try:
        yield
    except Exception as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if any(w in f"{type(e).__name__} {e}".lower() for w in _NETWORK_WORDS):
            raise ValueError(f"{harness} task(s) {list(names)} need a data set that is not on disk and cannot be "
                             f"downloaded here ({text}); run once with network access to fill the datasets cache, "
                             f"{fix}") from e
        raise


def unknown_tasks(names: Sequence[str], known: Any) -> List[str]:
    """Each of ``names`` a harness does not know, with its closest known names (``"mmeee (did you mean mme?)"``)."""
    import difflib

    known = set(known)
    return [n + (f" (did you mean {', '.join(c)}?)" if (c := difflib.get_close_matches(n, known, n=3)) else "")
            for n in names if n not in known]


def check_lm_eval_tasks(tasks: Sequence[str]) -> None:
    """ImportError without lm-eval; ValueError naming each task lm-eval does not know (with the closest
    names), so a typo fails before any tuning."""
    import_lm_eval()
    names, manager = _manager_for(tasks)
    unknown = unknown_tasks(names, manager.all_tasks)
    if unknown:
        raise ValueError(f"lm-eval has no task {'; '.join(unknown)}; list them with 'lm-eval ls tasks', or give a "
                         "task YAML path")


def _numeric_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], batch_size: int = 1,
                limit: Any = None) -> Dict[str, Dict[str, float]]:
    """Evaluate ``model`` on lm-eval ``tasks``; ``{task: {metric: value}}`` (numeric metrics only)."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    names, manager = _manager_for(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with missing_data_said_plainly("lm-eval", names, "or use a custom task YAML on a local file, or --tasks ppl:FILE"):
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit)
    return {task: _numeric_metrics(m) for task, m in (out or {}).get("results", {}).items()}
