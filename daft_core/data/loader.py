"""Mini-batches straight from in-memory uint8 tensors.

The whole bundle fits in memory (uint8, stored small), so a DataLoader with workers would only add
process start-up and pickling; indexing a tensor is faster and deterministic. Images stay uint8 until they
reach the device; the model (or ``augment_batch``) converts them there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .format import ImageSet


def iterate_batches(
    ds: ImageSet | Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images_uint8, labels_int64)`` batches on ``device`` (default: where the data lives).

    ``ds`` is an :class:`ImageSet` or anything with ``.images``/``.labels``. Shuffling draws one
    ``torch.randperm`` from ``generator`` (a CPU generator; the global RNG if None), so a seeded generator
    gives the same order every run. Every sample appears exactly once per pass (minus the tail with
    ``drop_last``). On CUDA the batch is pinned and copied with ``non_blocking=True``.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    images, labels = ds.images, ds.labels
    n = int(labels.shape[0])
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but {n} labels")
    order = torch.randperm(n, generator=generator) if shuffle else None
    dev = torch.device(device) if device is not None else None
    pin = dev is not None and dev.type == "cuda" and images.device.type == "cpu" and torch.cuda.is_available()
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = images[start : start + batch_size], labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size].to(images.device)
            xb, yb = images[idx], labels[idx]
        if dev is not None:
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = xb.to(dev, non_blocking=True)
            yb = yb.to(dev, non_blocking=True)
        yield xb, yb


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`iterate_batches` yields for ``n`` samples (for progress bars / schedules)."""
    return n // batch_size if drop_last else -(-n // batch_size)
