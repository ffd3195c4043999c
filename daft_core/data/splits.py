"""Seeded, stratified splitting and small array helpers shared by the dataset builders."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from daft_core.errors import DatasetFormatError

MAX_SEARCHED_CLASS_SIZE = 100_000  # min_per_class stops looking here (only a message needs the number)


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


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """How many of a class of ``n`` samples :func:`stratified_split` puts in each part."""
    return _apportion(int(n), np.asarray(fractions, dtype=np.float64)).tolist()


def min_per_class(fractions: Sequence[float]) -> int | None:
    """The smallest class size for which every part with a non-zero fraction gets at least one sample
    (``None`` when no size up to :data:`MAX_SEARCHED_CLASS_SIZE` does)."""
    fr = np.asarray(fractions, dtype=np.float64)
    wanted = fr > 0
    for n in range(1, MAX_SEARCHED_CLASS_SIZE + 1):
        if (_apportion(n, fr)[wanted] > 0).all():
            return n
    return None


def check_split_sizes(
    class_sizes: Mapping[str, int],
    fractions: Sequence[float],
    part_names: Sequence[str],
    *,
    source: str,
    setting: str,
    fix: str,
) -> None:
    """Raise :class:`DatasetFormatError` when a stratified split by ``fractions`` would leave a part
    (``id_train``, ``id_val``, ...) without any sample of some class.

    Run it *before* splitting: a class with one image would otherwise give an ``id_val`` without that class
    (or an empty one) that only a later step rejects, or that silently scores the wrong thing.
    ``class_sizes`` maps class name -> samples; ``source`` names the data (a folder or the preset),
    ``setting`` the parameters that chose the fractions (e.g. ``data.val_fraction=0.2``), ``fix`` what to do.
    """
    fr = [float(f) for f in fractions]
    for cls, n in class_sizes.items():
        counts = split_counts(n, fr)
        empty = [name for name, f, c in zip(part_names, fr, counts, strict=True) if f > 0 and c == 0]
        if not empty:
            continue
        need = min_per_class(fr)
        at_least = f"at least {need}" if need is not None else f"more than {MAX_SEARCHED_CLASS_SIZE}"
        raise DatasetFormatError(
            f"{source}: class {cls!r} has {n} image{'s' if n != 1 else ''}, too few to split by {setting}: "
            f"{' and '.join(empty)} would get none of it; {at_least} images per class are needed for these "
            f"fractions. Fix: {fix}"
        )


def resize_uint8(images: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (N, C, H, W) to ``size`` (H, W) with area averaging (exact block mean for integer
    down-scaling such as STL-10's 96 -> 32), rounding back to uint8."""
    x = torch.as_tensor(np.asarray(images))
    if tuple(x.shape[-2:]) == tuple(size):
        return x.numpy().copy()
    y = F.interpolate(x.float(), size=tuple(size), mode="area")
    return y.round().clamp_(0, 255).to(torch.uint8).numpy()
