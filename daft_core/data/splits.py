"""Seeded, stratified splitting and small array helpers shared by the dataset builders."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """An independent numpy RNG per (seed, purpose), so adding a new random step never shifts another's."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(purpose.encode("utf-8"))])


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split indices into ``len(fractions)`` parts with each class divided in the same proportions.

    Per class, the counts are the rounded fractions (largest remainder, so they sum to the class size);
    parts after the first get at least one sample of a class when that class has enough samples. Each
    returned index array is sorted, so the order of a split does not depend on the shuffle.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 2 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {list(fractions)}")
    labels = np.asarray(labels)
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        counts = _apportion(len(idx), fr)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k in range(len(fr)):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _apportion(n: int, fr: np.ndarray) -> np.ndarray:
    raw = fr * n
    counts = np.floor(raw).astype(np.int64)
    rem = n - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rem]] += 1
    # a non-zero fraction should not leave a split without this class when the class can spare one
    for k in range(1, len(fr)):
        if fr[k] > 0 and counts[k] == 0 and counts[0] > 1:
            counts[k] += 1
            counts[0] -= 1
    return counts


def resize_uint8(images: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (N, C, H, W) to ``size`` (H, W) with area averaging (exact block mean for integer
    down-scaling such as STL-10's 96 -> 32), rounding back to uint8."""
    x = torch.as_tensor(np.asarray(images))
    if tuple(x.shape[-2:]) == tuple(size):
        return x.numpy().copy()
    y = F.interpolate(x.float(), size=tuple(size), mode="area")
    return y.round().clamp_(0, 255).to(torch.uint8).numpy()
