"""Multi-process training: the process group as the training loop sees it.

``torchrun --nproc-per-node N -m cli.main train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address in their environment; :func:`session` turns that into a
``torch.distributed`` process group (gloo on CPU, nccl on CUDA) and a :class:`World`. Outside
torchrun (or with WORLD_SIZE 1) it gives :data:`SINGLE`, and the training loop takes its
single-process path unchanged.

What :func:`awe.train.fit` needs from the group is small: one sum all-reduce of a flat buffer a
step (the gradients, plus the step's loss and counts), a broadcast of rank 0's validation result
an epoch, and checks that the ranks agree. Rank 0 is the only writer of files.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from awe.errors import AweError

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    # where collectives run: nccl moves CUDA tensors only, gloo CPU ones
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and validates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _on(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device.type == torch.device(self.device).type else t.to(self.device)

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; every rank gets the same bits."""
        if not self.distributed:
            return t
        c = self._on(t)
        dist.all_reduce(c, op=dist.ReduceOp.SUM)
        if c is not t:
            t.copy_(c)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on all), on the CPU, by rank."""
        if not self.distributed:
            return [t.cpu()]
        c = self._on(t.contiguous())
        out = [torch.empty_like(c) for _ in range(self.size)]
        dist.all_gather(out, c)
        return [o.cpu() for o in out]

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (small JSON values: metrics, decisions).

        Sent as JSON bytes, not through ``broadcast_object_list``, which pickles: awe never
        unpickles, files or messages."""
        if not self.distributed:
            return obj
        payload = json.dumps(obj).encode() if self.is_main else b""
        size = self.all_reduce_(torch.tensor([len(payload)], dtype=torch.int64))
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        c = self._on(buffer)
        dist.broadcast(c, src=0)
        return json.loads(bytes(c.cpu().numpy()).decode())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_agree(self, what: str, values: list[float]) -> None:
        """Raise on every rank unless all ranks hold the same ``values`` (exactly).

        A rank that read other data, or parameters that drifted apart, would otherwise train a
        silently different model on each rank."""
        if not self.distributed:
            return
        mine = torch.tensor(values, dtype=torch.float64)
        ranks = self.all_gather(mine)
        differ = [r for r, v in enumerate(ranks) if not torch.equal(v, ranks[0])]
        if differ:
            raise AweError(f"{what} differ between ranks 0 and {differ[0]} "
                           f"({ranks[0].tolist()} vs {ranks[differ[0]].tolist()})")


SINGLE = World()


def current() -> World:
    """The World of an initialised process group (torchrun, or a caller's own
    ``init_process_group``), else :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    backend = dist.get_backend()
    device = "cuda" if backend == "nccl" else "cpu"
    return World(dist.get_rank(), dist.get_world_size(), device)


def is_main_process() -> bool:
    """Whether this process prints the run's summary: rank 0 of torchrun, or no torchrun."""
    return current().is_main and os.environ.get("RANK", "0") == "0"


def launched_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when absent)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise AweError(f"WORLD_SIZE={value!r} is not a number (set by torchrun)") from None


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[World]:
    """The World of this process for one training run.

    Under torchrun (WORLD_SIZE > 1) and with no process group yet, starts one from the
    environment (backend gloo on CPU, nccl on CUDA, each rank on GPU LOCAL_RANK) and ends it
    afterwards; a group the caller started is used as it is and left open.
    """
    if dist.is_available() and dist.is_initialized():
        yield current()
        return
    size = launched_size()
    if size <= 1:
        yield SINGLE
        return
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing or not dist.is_available():
        raise AweError(f"WORLD_SIZE={size} but {', '.join(missing) or 'torch.distributed'} "
                       f"missing: start multi-process training with torchrun --nproc-per-node N")
    backend = "gloo"
    if torch.device(device).type == "cuda":
        if not dist.is_nccl_available():
            raise AweError("--device cuda with torchrun needs torch built with NCCL; use "
                           "--device cpu (gloo)")
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def rank_share(n: int, world: World) -> slice:
    """This rank's positions in a sequence of ``n`` items shared out by rank: every
    ``world.size``-th item from ``world.rank``, ``n // size`` of them on every rank (the last
    ``n % size`` items of the sequence are left out, so all ranks take the same number of steps).

    With a batch of b items per rank, step t of rank r holds items r, r + size, ... of the
    sequence's block [t b size, (t + 1) b size): the ranks' step t together are one contiguous
    block of the sequence, as one process would take it.
    """
    per_rank = n // world.size
    return slice(world.rank, per_rank * world.size, world.size)
