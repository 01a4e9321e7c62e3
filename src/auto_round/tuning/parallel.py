"""Data-parallel tuning over processes with ``torch.distributed`` (launched with ``torchrun``).

``batch_size`` stays what one step sees: under ``torchrun`` each of the ``world`` processes runs
``batch_size / world`` samples of it (:class:`~auto_round.autoround.AutoRound` divides the setting),
so the calibration is cut into ``world`` times as many micro-batches, and micro-batch ``i`` belongs
to shard ``i % world``. Each process captures, caches and runs only its own micro-batches, so the
cached activations and the forward/backward work are split ``world`` ways. Every process holds the
whole model and the same plan; at each tuning step all of them draw the same local index ``j`` (one
generator, the same seed: the same ``j`` a one-process run draws for its batch ``j``), each runs its
micro-batch ``j * world + shard`` (together: the samples of that one-process batch), and the
gradients of the rounding offsets and clip factors are summed over processes (``all_reduce``) before
the sign step, as are the squared-error sums that pick the best iteration, the optimized-RTN error
comparison and the activation importance. So every process applies the same update and ends with
the same records; rank 0 writes the checkpoint.

What this equals exactly: one process at ``batch_size / world`` that runs, at every step, the
``world`` micro-batches ``j * world + s`` and accumulates their gradients (:class:`DataParallel`
with every shard in ``shards`` and no process group; a one-process run is that with ``world == 1``).
With 2 processes and one micro-batch per process and step, the sum of two gradients is the same
float in either order, so the result is bit-identical; with more processes, or
``gradient_accumulate_steps > 1``, the float sums are grouped differently and a gradient component
near zero may change sign. Against a plain run at ``batch_size`` (the same samples per step, as one
batch) the matmuls of a smaller batch round differently (bf16 autocast especially), and signed
descent makes other, equally good, rounding choices of those differences: the block losses agree
(tests/test_data_parallel.py), the bits do not.

NCCL on CUDA devices (each process on ``cuda:LOCAL_RANK``, or the ``LOCAL_RANK``-th of
``device='0,1,...'``), gloo on CPU; the process group is the one ``torchrun``'s environment
describes (``init_process_group`` reads ``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataParallel:
    """Which calibration shards this process computes, out of ``world``, and how sums are shared.

    ``shards``: the shard indices run here (one per process: ``(rank,)``); ``distributed``: sums go
    through the default ``torch.distributed`` process group (False: this process holds every shard it
    sums, nothing to exchange)."""

    world: int = 1
    shards: Tuple[int, ...] = (0,)
    distributed: bool = False

    def __post_init__(self) -> None:
        if self.world < 1 or not self.shards or any(not 0 <= s < self.world for s in self.shards):
            raise ValueError(f"DataParallel(world={self.world}, shards={self.shards}): shards must be indices "
                             f"in 0..{self.world - 1}")

    @property
    def rank(self) -> int:
        """This process's rank (its first shard)."""
        return self.shards[0]

    @property
    def is_writer(self) -> bool:
        """True on the process that writes checkpoints and reports (rank 0)."""
        return self.rank == 0

    def local_batches(self, n: int) -> int:
        """The number of batches per shard for ``n`` batches in all; refuses ``n`` not a multiple of ``world``
        (every process must run the same number of steps on the same number of batches)."""
        if n % self.world:
            raise ValueError(f"{n} calibration batches do not split evenly over {self.world} data-parallel "
                             "processes (the data gave fewer samples than nsamples, or a last partial batch): use an "
                             "nsamples that is a multiple of batch_size and that the data set can fill")
        return n // self.world

    def own(self, items: Iterable[Any]) -> List[Any]:
        """The items (batches, in order) whose index belongs to this process's shards, shard-major within each
        group of ``world``: item ``j * world + s`` for ``j`` ascending, then ``s`` in ``shards`` order."""
        items = list(items)
        per = self.local_batches(len(items))
        return [items[j * self.world + s] for j in range(per) for s in self.shards]

    def step_positions(self, local: int) -> List[int]:
        """Positions in :meth:`own`'s list of the batches of local index ``local`` (one per shard held)."""
        k = len(self.shards)
        return [local * k + i for i in range(k)]

    def sum_(self, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        """Sum ``tensors`` (in place) over the processes; nothing to do in one process."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            if t is not None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def sum_floats(self, *values: float) -> List[float]:
        """Python floats summed over the processes (in float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        self.sum_([t])
        return t.tolist()


SINGLE = DataParallel()


def launched_world() -> int:
    """``WORLD_SIZE`` from the environment (``torchrun`` sets it), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from e


def local_device(device: Optional[str]) -> Optional[str]:
    """The device of this process under ``torchrun``: ``'0,1'`` -> the ``LOCAL_RANK``-th entry, ``'cuda'``/None
    with CUDA -> ``cuda:LOCAL_RANK``; anything else as given. A comma list outside ``torchrun`` is refused
    with the command to launch instead."""
    text = None if device is None else str(device).strip()
    world = launched_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if text is not None and "," in text:
        items = [d.strip() for d in text.split(",") if d.strip()]
        if world == 1:
            raise ValueError(f"device={device!r} names {len(items)} devices: tuning spreads over devices as one "
                             f"process per device; launch with torchrun --nproc-per-node {len(items)} -m auto_round "
                             "... (data-parallel), or pass one device")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if len(items) != local_world:
            raise ValueError(f"device={device!r} names {len(items)} devices but torchrun started {local_world} "
                             f"processes on this node: pass --nproc-per-node {len(items)}, or as many devices")
        return items[local_rank]
    if world > 1 and (text in (None, "auto", "cuda")) and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


def from_environment(device: torch.device) -> DataParallel:
    """The :class:`DataParallel` of this process: :data:`SINGLE` unless launched by ``torchrun`` with
    ``WORLD_SIZE > 1``, when the default process group is joined (created if needed: NCCL on CUDA, gloo
    on CPU)."""
    world = launched_world()
    if world == 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("data-parallel: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    if dist.get_world_size() != world:
        raise RuntimeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
    return DataParallel(world, (dist.get_rank(),), True)
