"""Data-parallel training under PyTorch's launcher (``torchrun --nproc-per-node N``).

``torchrun`` starts N processes and sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``; :meth:`World.from_environment` joins the process group (NCCL
on CUDA, gloo on CPU). Each rank trains on its part of every global batch (see
:func:`diffss.core.loop.epoch_batches`) through :class:`~torch.nn.parallel.DistributedDataParallel`,
which averages the gradients; the trainers weight each rank's loss by its share of the batch, so
the averaged gradient is the gradient of the whole batch's loss, as one process computes it.
Rank 0 alone writes checkpoints, the published model, history and the tracking run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class BatchPart:
    """One rank's part of a global batch: ``indices`` (dataset indices it loads), rows
    ``start:stop`` of the ``total`` rows of the batch. ``share`` is 0 for a rank that got no row
    (it loads the batch's first sample to run in step with the others and contributes nothing)."""

    indices: tuple[int, ...]
    start: int
    stop: int
    total: int

    @property
    def share(self) -> float:
        return (self.stop - self.start) / self.total


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

    def part(self, batch: list[int]) -> BatchPart:
        """This rank's contiguous part of a global batch. A rank left without a sample (a last
        batch smaller than the world) loads the first one with share 0: it runs forward and
        backward like the others (DDP needs every rank in every all-reduce), weighted by 0."""
        if not self.distributed:
            return BatchPart(tuple(batch), 0, len(batch), len(batch))
        start, stop = len(batch) * self.rank // self.size, len(batch) * (self.rank + 1) // self.size
        if start == stop:
            return BatchPart((batch[0],), 0, 0, len(batch))
        return BatchPart(tuple(batch[start:stop]), start, stop, len(batch))

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a copy; ``value`` unchanged)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def step(self, loss: torch.Tensor, labels: torch.Tensor, part: "BatchPart", optimizer, scheduler,
             ignore_index: int) -> tuple[float, float]:
        """One update from this rank's pixel-mean ``loss`` over ``labels`` (pixels equal to
        ``ignore_index`` not counted); returns (the batch's mean loss, the learning rate).

        Under DDP the loss is first weighted by N x (this rank's counted pixels / the batch's):
        DDP averages the N ranks' gradients, so the result is the gradient of the pixel-mean over
        the whole batch, as in one process."""
        if self.distributed:
            share = part.share
            counted = ((labels != ignore_index).sum().double() if share > 0
                       else torch.zeros((), dtype=torch.float64, device=labels.device))
            loss = loss * (self.size * counted / self.sum(counted).clamp(min=1)).float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return float(self.sum(loss.detach()) / self.size), scheduler.get_last_lr()[0]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (itself when single-process)."""
        if not self.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


# ---- dropout as one process draws it ----------------------------------------------------------
# One process draws a dropout mask for the whole batch from the global generator (seeded by
# (seed, step)); a rank holding rows start:stop of it must apply exactly those rows of that mask,
# not a mask of its own. While `global_batch_dropout` is active, the model's Dropout modules draw
# the whole batch's mask (the same calls, so the same numbers, on every rank) and keep their rows.

_ACTIVE_PART: list[BatchPart] = []


@contextlib.contextmanager
def global_batch(part: BatchPart) -> Iterator[None]:
    """While active, modules made global (:func:`make_global_batch`) act on ``part`` as one
    process acts on the whole batch."""
    _ACTIVE_PART.append(part)
    try:
        yield
    finally:
        _ACTIVE_PART.pop()


def _sliced_dropout_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not module.training or module.p == 0 or not _ACTIVE_PART:
        return module._diffss_forward(x)
    part = _ACTIVE_PART[-1]
    rows = max(part.stop - part.start, 1)
    if x.shape[0] % rows:
        raise RuntimeError(f"{type(module).__name__}: batch dimension {x.shape[0]} is not a multiple of the rank's "
                           f"{rows} episode(s); cannot draw the global batch's dropout mask")
    per_row = x.shape[0] // rows  # e.g. K supports per episode, flattened episode-major
    feature = isinstance(module, (torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d))
    shape = (part.total * per_row, *(x.shape[1:2] + (1,) * (x.ndim - 2) if feature else x.shape[1:]))
    noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - module.p)
    if module.p < 1:
        noise.div_(1 - module.p)
    start = part.start * per_row if part.stop > part.start else 0
    return x * noise[start:start + x.shape[0]]


# ---- BatchNorm over the whole batch ---------------------------------------------------------
# A BatchNorm layer in training mode normalises with the statistics of the batch it sees: of one
# rank's part, unless the statistics are summed over the ranks. torch's SyncBatchNorm does that on
# GPUs only; this does it on any backend (gloo included) with an autograd-aware all-reduce, so the
# gradient through the statistics is the whole batch's too.

def _global_batchnorm_forward(module: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not module.training or not _ACTIVE_PART or not dist.is_initialized():
        return module._diffss_forward(x)
    part = _ACTIVE_PART[-1]
    counted = 1.0 if part.stop > part.start else 0.0  # a rank with no row of the batch adds nothing
    dims = [0, *range(2, x.ndim)]
    x64 = x.double()
    local = torch.cat([x64.sum(dims) * counted, (x64 * x64).sum(dims) * counted,
                       x64.new_tensor([x.numel() / x.shape[1] * counted])])
    with warnings.catch_warnings():  # deprecated in favour of a private module; the public one still works
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_reduce

        total = all_reduce(local)
    channels = x.shape[1]
    n = total[-1]
    mean = total[:channels] / n
    var = (total[channels:2 * channels] / n - mean * mean).clamp(min=0)  # biased, as BatchNorm normalises
    shape = (1, channels) + (1,) * (x.ndim - 2)
    y = ((x64 - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)).to(x.dtype)
    if module.affine:
        y = y * module.weight.view(shape) + module.bias.view(shape)
    if module.track_running_stats:
        with torch.no_grad():
            module.num_batches_tracked.add_(1)
            m = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
            module.running_mean.mul_(1 - m).add_(m * mean.to(module.running_mean.dtype))
            unbiased = var * n / (n - 1).clamp(min=1)
            module.running_var.mul_(1 - m).add_(m * unbiased.to(module.running_var.dtype))
    return y


_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)


def make_global_batch(model: torch.nn.Module) -> int:
    """Make ``model``'s Dropout modules draw the whole batch's mask and its BatchNorm layers use
    the whole batch's statistics while :func:`global_batch` is active; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "_diffss_forward"):
            continue
        if isinstance(module, _DROPOUTS):
            forward = _sliced_dropout_forward
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            forward = _global_batchnorm_forward
        else:
            continue
        module._diffss_forward = module.forward
        module.forward = forward.__get__(module)
        count += 1
    return count
