"""Data-parallel fine-tuning: joining torchrun's process group, and the few collectives the loop needs.

Every rank runs the same loop on its slice of each global batch (``world_size * batch_size`` images);
gradients are averaged by DistributedDataParallel, rank 0 validates and writes checkpoints, and its
decisions reach the other ranks by broadcast, so all ranks end with the same weights and history.
Single-process runs never touch ``torch.distributed``: every helper here is a no-op when ``world_size``
is 1. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from daft_core.devices import resolve_device

__all__ = [
    "RANK_SEED_STRIDE",
    "Dist",
    "DistributedError",
    "current",
    "distributed_session",
    "run_device",
    "shard_batches",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Rank r seeds its own streams (augmentation, global RNG) at seed + r * stride; rank 0 keeps the
# single-process seeds, so a 1-process run is exactly the run it always was.
RANK_SEED_STRIDE = 1_000_003
TIMEOUT_ENV = "DAFT_DIST_TIMEOUT_S"


class DistributedError(RuntimeError):
    """Another rank failed (its error is named) or the process group does not fit the run."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (``world_size`` 1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """torchrun (or any env:// launcher) set ``RANK`` and ``WORLD_SIZE`` > 1 for this process."""
    world = _env_int("WORLD_SIZE")
    return world is not None and world > 1 and _env_int("RANK") is not None


def current() -> Dist:
    """The initialised process group's view of this process, or ``Dist()`` outside one."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = _env_int("LOCAL_RANK")
    return Dist(rank=rank, world_size=world, local_rank=rank if local is None else local)


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[Dist]:
    """Join the group torchrun describes (gloo on CPU, nccl on CUDA) and leave it at the end.

    A group the caller initialised is used as it is and left alone; without torchrun's environment this
    yields ``Dist()`` (one process) and does nothing.
    """
    created = False
    if launched_by_torchrun() and not dist.is_initialized():
        if not dist.is_available():
            raise DistributedError("torch.distributed is not available in this torch build")
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            local = _env_int("LOCAL_RANK") or 0
            _check_local_gpu(local)
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=_timeout())
        created = True
        d = current()
        logger.info("joined process group: rank %d of %d (%s)", d.rank, d.world_size, dist.get_backend())
    try:
        yield current()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _timeout() -> datetime.timedelta:
    """How long a rank waits in a collective: rank 0 validates and publishes (MLflow uploads included)
    while the others wait, so longer than torch's default (10 min for nccl); ``DAFT_DIST_TIMEOUT_S``."""
    seconds = _env_int(TIMEOUT_ENV)
    return datetime.timedelta(seconds=seconds if seconds and seconds > 0 else 3600)


def _check_local_gpu(local_rank: int) -> None:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"local rank {local_rank} needs cuda:{local_rank}, but this machine has {count} GPU(s): "
            "start at most one process per GPU (torchrun --nproc-per-node)"
        )


def run_device(name: str, d: Dist) -> torch.device:
    """The device this rank trains on: CUDA means ``cuda:LOCAL_RANK`` under a group; CPU stays CPU."""
    device = resolve_device(name)
    if not d.active:
        return device
    if device.type == "cuda":
        if device.index is not None and device.index != d.local_rank:
            raise DistributedError(
                f"device {name!r} conflicts with rank {d.rank}'s GPU cuda:{d.local_rank}: with torchrun set "
                "the device to 'auto' or 'cuda' (each process uses the GPU of its LOCAL_RANK)"
            )
        _check_local_gpu(d.local_rank)
        device = torch.device("cuda", d.local_rank)
    elif dist.get_backend() == "nccl":
        raise DistributedError(
            f"the process group uses nccl, which cannot run on device {name!r}: use a CUDA device, or a "
            "gloo group for CPU training"
        )
    return device


# ------------------------------------------------------------------------------------------- collectives


def _object_device(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def broadcast_object(obj: T, d: Dist, device: torch.device) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects, tensors included)."""
    if not d.active:
        return obj
    box = [obj if d.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_object_device(device))
    return box[0]  # type: ignore[return-value]


def on_main(fn: Callable[[], T], d: Dist, device: torch.device) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    An exception on rank 0 is re-raised there and becomes a `DistributedError` naming it on the others,
    so no rank is left waiting in a collective for a rank that gave up.
    """
    if not d.active:
        return fn()
    error: BaseException | None = None
    outcome: tuple[bool, Any] = (True, None)
    if d.is_main:
        try:
            outcome = (True, fn())
        except Exception as e:
            error, outcome = e, (False, f"{type(e).__name__}: {e}")
    ok, value = broadcast_object(outcome, d, device)
    if error is not None:
        raise error
    if not ok:
        raise DistributedError(f"rank 0 failed, so rank {d.rank} stops too: {value}")
    return value


def all_gather(obj: T, d: Dist) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone)."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensors: list[torch.Tensor], d: Dist) -> list[torch.Tensor]:
    """Element-wise sums over ranks (float64 on the tensors' device), as new tensors."""
    if not d.active:
        return tensors
    flat = torch.stack([t.detach().to(torch.float64).reshape(()) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return list(flat.unbind())


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def broadcast_buffers(model: nn.Module, d: Dist) -> None:
    """Rank 0's buffers (BN running statistics) on every rank, so validation, checkpoints and each rank's
    result see one model. Parameters need nothing: DDP keeps them identical."""
    if not d.active:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


# ---------------------------------------------------------------------------------------------- sampling


def shard_batches(
    ds: Any,
    batch_size: int,
    d: Dist,
    *,
    generator: torch.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``batch_size`` slice of each global batch of one shuffled pass.

    One permutation per epoch, drawn from ``generator`` (seeded alike on every rank, so all draw the same
    one); global batch ``g`` is ``order[g*W*B : (g+1)*W*B]`` and rank ``r`` takes its contiguous ``r``-th
    slice. A ragged last global batch is dropped, so every rank makes the same number of steps and the
    averaged gradient is the mean over exactly ``W*B`` images.
    """
    images, labels = ds.images, ds.labels
    n = int(labels.shape[0])
    order = torch.randperm(n, generator=generator)
    step = batch_size * d.world_size
    pin = device.type == "cuda" and images.device.type == "cpu"
    for start in range(0, n - n % step, step):
        idx = order[start + d.rank * batch_size : start + (d.rank + 1) * batch_size]
        xb, yb = images[idx.to(images.device)], labels[idx.to(labels.device)]
        if pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
