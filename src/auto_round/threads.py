"""How many CPU threads a run uses: the cores really available to this process, or ``threads=N``.

``os.cpu_count()`` (what torch starts from) counts the machine's cores, not the ones this process
may use: a CPU affinity mask (``taskset``, ``docker --cpuset-cpus``) or a cgroup quota (``docker
--cpus``, Kubernetes limits) gives it fewer, and more threads than cores make every OpenMP barrier
wait for a descheduled thread (measured on this project's shared 2-core machine: 2 threads beside
another busy process ran a block 20x slower than 1). The CLI also asks OpenMP to sleep rather than
spin while it waits (``OMP_WAIT_POLICY=PASSIVE``, set before torch is loaded; see
:mod:`auto_round._entry`), so idle threads do not take CPU from the other processes.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(v2: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                     v1_period: Path = CGROUP_V1_PERIOD) -> Optional[float]:
    """CPUs allowed by the cgroup quota (e.g. 1.5), or None when there is no quota or it cannot be read."""
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota != "max" and period:
                return int(quota) / int(period)
            return None
        if v1_quota.is_file() and v1_period.is_file():
            quota_us, period_us = int(v1_quota.read_text()), int(v1_period.read_text())
            if quota_us > 0 and period_us > 0:
                return quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """Cores this process may run on: the affinity mask, capped by the cgroup quota (rounded up), >= 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def resolve_threads(threads: Optional[int]) -> int:
    """The thread count of a run: ``threads`` when given (checked against the available cores), else
    :func:`available_cpus`."""
    avail = available_cpus()
    if threads is None:
        return avail
    if threads < 1:
        raise ValueError(f"threads={threads} must be at least 1 (or None: the {avail} core(s) available here)")
    if threads > avail:
        logger.warning("threads=%d exceeds the %d core(s) this process may use (affinity / cgroup quota); threads "
                       "beyond the cores wait on each other at every parallel region", threads, avail)
    return threads


def apply_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op thread count for a run and return it.

    ``threads`` given: exactly that many (see :func:`resolve_threads`). None: torch's own count,
    lowered to :func:`available_cpus` when it is above it (never raised: a count you set with
    ``torch.set_num_threads`` is kept)."""
    import torch

    current = torch.get_num_threads()
    n = resolve_threads(threads) if threads is not None else min(current, available_cpus())
    if n != current:
        if threads is None:
            logger.info("using %d CPU thread(s): this process may run on %d core(s) (affinity / cgroup quota), torch "
                        "would start %d", n, available_cpus(), current)
        torch.set_num_threads(n)
    return n
