"""Console entry points: OpenMP told to sleep, not spin, while waiting, before torch is loaded.

``auto-round*`` commands start here. With ``OMP_WAIT_POLICY=PASSIVE`` (unless you set it), OpenMP
threads that wait at a barrier sleep instead of spinning, so a run beside other busy processes
neither loses its time slices to its own spinning threads nor takes the others' (a probe on this
project's shared 2-core machine under a load average of 9: 2-thread matmuls 30% faster). This
module is the program, not the library: importing :mod:`auto_round` never changes the environment.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional


def _prepare() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _command(name: str) -> Callable[[Optional[List[str]]], int]:
    """The entry point running :mod:`auto_round.cli`'s ``name`` after :func:`_prepare`."""

    def run(argv: Optional[List[str]] = None) -> int:
        _prepare()
        from auto_round import cli

        return getattr(cli, name)(argv)

    run.__name__ = name
    return run


main = _command("main")
main_best = _command("main_best")
main_light = _command("main_light")
main_mllm = _command("main_mllm")
