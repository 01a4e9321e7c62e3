"""The processor registry: names to processor classes, with no dependency on the processors themselves.

:mod:`auto_round.mllm.template` validates the processor a template names here, and
:mod:`auto_round.mllm.processor` / :mod:`auto_round.mllm.remote_processors` register into it, so the
templates and the processors never import each other. The package (``auto_round/mllm/__init__.py``)
imports both processor modules, so the built-in names are registered whatever ``auto_round.mllm``
module is imported first.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Type, TypeVar, Union

P = TypeVar("P", bound=type)

PROCESSORS: Dict[str, Type[Any]] = {}


def register_processor(name: str) -> Callable[[P], P]:
    """Class decorator adding a processor under ``name`` (duplicates are refused)."""

    def deco(cls: P) -> P:
        if name in PROCESSORS:
            raise ValueError(f"a processor named {name!r} is already registered ({PROCESSORS[name].__name__})")
        cls.name = name
        PROCESSORS[name] = cls
        return cls

    return deco


def processor_name(processor: Union[str, Type[Any]]) -> str:
    """Registered name of a processor class or name; raises listing the valid names."""
    if isinstance(processor, str):
        if processor not in PROCESSORS:
            raise ValueError(f"processor {processor!r} is not registered; valid: {sorted(PROCESSORS)}")
        return processor
    for name, cls in PROCESSORS.items():
        if cls is processor:
            return name
    raise ValueError(f"processor class {processor!r} is not registered; use register_processor(name)")
