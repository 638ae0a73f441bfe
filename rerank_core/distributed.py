"""Scoring split over the processes of `torchrun` / `accelerate launch`: each scores its share, all get every result."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ProcessShard",
    "close_process_group",
    "launched_rank",
    "launched_world_size",
    "process_device",
    "process_shard",
]


def launched_rank() -> int:
    """This process's rank among the launched ones (torchrun and accelerate launch set RANK); 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun and accelerate launch set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_device(requested: str | None) -> str:
    """Under a launcher each process loads onto its own GPU (LOCAL_RANK), not all onto cuda:0."""
    import torch  # local: the launcher checks in this module run before any command has paid for torch

    device = requested or "auto"
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


@dataclass(frozen=True)
class ProcessShard:
    """This process's place among the launched ones; scoring takes every world_size-th prompt from rank."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """Indices 0..count-1 this process scores: interleaved, so ranks get equal work in every chunk."""
        return range(self.rank, count, self.world_size)

    def gather(self, value: Any) -> list[Any]:
        """Every process's value, in rank order, on every process (a collective: all ranks must call it)."""
        import torch.distributed as dist  # local: only a launched run needs it

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered



def process_shard(device: str) -> ProcessShard | None:
    """Join the launcher's process group (NCCL for CUDA devices, gloo otherwise); None in a single process."""
    if launched_world_size() == 1:
        return None
    # local: a single process (the usual case) never imports torch.distributed
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        on_cuda = device.startswith("cuda") and torch.cuda.is_available()
        if on_cuda:
            torch.cuda.set_device(torch.device(device))  # NCCL collectives run on the current device
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return ProcessShard(dist.get_rank(), dist.get_world_size())


def close_process_group() -> None:
    """Leave the launcher's process group at the end of a command (torch warns about one left open)."""
    if launched_world_size() == 1:
        return
    import torch.distributed as dist  # local: a single process never needs it

    if dist.is_initialized():
        dist.destroy_process_group()
