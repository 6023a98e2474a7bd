"""Data-parallel training under PyTorch's launcher (``torchrun --nproc-per-node N``).

``torchrun`` starts N processes and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``; :meth:`World.from_environment` joins the process group (NCCL
on CUDA, gloo on CPU). Each rank trains on its part of every global batch (see
:func:`diffss.training.loop.epoch_batches`) through :class:`~torch.nn.parallel.DistributedDataParallel`,
which averages the gradients; the trainers weight each rank's loss by its share of the batch, so
the averaged gradient is the gradient of the whole batch's loss, as one process computes it.
Rank 0 alone writes checkpoints, the published model, history and the tracking run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def single(cls) -> "World":
        return cls()

    @classmethod
    def from_environment(cls, device: str = "auto") -> "World":
        """The process group ``torchrun`` describes in the environment (joined once per process);
        a single process when ``WORLD_SIZE`` is unset or 1."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls.single()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and device in ("auto", "cuda")
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank=rank, size=size, local_rank=local_rank)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """``name`` ("auto", "cpu", "cuda") resolved for this rank: its own GPU under torchrun."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def part(self, batch: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous part of a global batch and its share (len(part) / len(batch)).
        A rank left without a sample (a last batch smaller than the world) gets the first one with
        share 0: it runs forward and backward like the others (DDP needs every rank in every
        all-reduce) and contributes nothing."""
        if not self.distributed:
            return list(batch), 1.0
        bounds = [len(batch) * r // self.size for r in range(self.size + 1)]
        mine = list(batch[bounds[self.rank]:bounds[self.rank + 1]])
        if not mine:
            return [batch[0]], 0.0
        return mine, len(mine) / len(batch)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a copy; ``value`` unchanged)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (itself when single-process)."""
        if not self.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
