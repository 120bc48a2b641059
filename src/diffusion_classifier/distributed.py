"""torch.distributed plumbing for multi-process evaluation (torchrun, accelerate launch).

Launchers set RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 we join a process group
(gloo on CPU, nccl on GPU) and every rank takes the images whose index is congruent to its
rank. Noise is seeded per image, so predictions equal a one-process run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def shard(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world_size == self.rank]

    def device(self, requested: torch.device) -> torch.device:
        """With several processes on one GPU machine, each takes the GPU of its local rank."""
        if requested.type == "cuda" and requested.index is None and self.world_size > 1:
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return requested


def init_from_env() -> ProcessGroup:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        torch.distributed.init_process_group(backend=backend)
    return ProcessGroup(rank, world_size, local_rank)


def shutdown(group: ProcessGroup) -> None:
    if group.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def process_group() -> Iterator[ProcessGroup]:
    """The launcher's process group for the duration of a run; torn down afterwards only if this call
    created it (a caller's own group stays up)."""
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized()
    group = init_from_env()
    try:
        yield group
    finally:
        if created:
            shutdown(group)
