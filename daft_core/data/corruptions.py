"""Common corruptions (in the spirit of CIFAR-10-C) for building covariate-shift OOD sets offline.

Each function maps uint8 (N, C, H, W) to uint8 of the same shape at a severity 1-5, drawing randomness only
from the generator passed in, so a corrupted set is a pure function of (images, seed). Parameters are
chosen for small images (the 8x8 digits): e.g. a one-pixel shift is already a strong corruption there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .format import ImageSet
from .splits import rng_for

_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # fraction of the 0-255 range
_BLUR_SIGMA = (0.4, 0.55, 0.7, 0.9, 1.2)  # pixels
_CONTRAST = (0.6, 0.5, 0.4, 0.3, 0.2)  # factor towards the per-image mean
_IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of pixels set to 0 or 255
_SHIFT = (1, 1, 2, 2, 3)  # max |dx|, |dy| in pixels (at least one is non-zero)


def _check(x: np.ndarray, severity: int) -> np.ndarray:
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W), got {x.dtype} {x.shape}")
    return x


def _to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive i.i.d. Gaussian noise."""
    x = _check(x, severity)
    return _to_uint8(x + rng.normal(0.0, _NOISE_STD[severity - 1] * 255.0, size=x.shape))


def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (deterministic; ``rng`` unused)."""
    x = _check(x, severity)
    sigma = _BLUR_SIGMA[severity - 1]
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    y = x.astype(np.float64)
    for axis in (2, 3):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        yp = np.pad(y, pad, mode="reflect" if x.shape[axis] > radius else "edge")
        n = x.shape[axis]
        y = sum(k[i] * np.take(yp, np.arange(i, i + n), axis=axis) for i in range(len(k)))
    return _to_uint8(y)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pull every pixel towards its image's mean (deterministic; ``rng`` unused)."""
    x = _check(x, severity)
    c = _CONTRAST[severity - 1]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8((x - mean) * c + mean)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper: a fraction of pixels (all channels together) set to 0 or 255."""
    x = _check(x, severity).copy()
    n, _, h, w = x.shape
    hit = rng.random((n, 1, h, w)) < _IMPULSE[severity - 1]
    salt = rng.random((n, 1, h, w)) < 0.5
    hit_c = np.broadcast_to(hit, x.shape)
    x[hit_c] = np.broadcast_to(np.where(salt, 255, 0).astype(np.uint8), x.shape)[hit_c]
    return x


def shift(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each image by a random non-zero (dy, dx), filling with zeros (the background)."""
    x = _check(x, severity)
    m = _SHIFT[severity - 1]
    out = np.zeros_like(x)
    _, _, h, w = x.shape
    for i in range(x.shape[0]):
        dy = dx = 0
        while dy == 0 and dx == 0:
            dy, dx = (int(v) for v in rng.integers(-m, m + 1, size=2))
        src = x[i, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        out[i, :, max(0, dy) : max(0, dy) + src.shape[1], max(0, dx) : max(0, dx) + src.shape[2]] = src
    return out


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "contrast": contrast,
    "impulse": impulse_noise,
    "shift": shift,
}


def corrupt_set(
    ds: ImageSet,
    seed: int,
    *,
    kinds: Sequence[str] = tuple(CORRUPTIONS),
    severity: int = 3,
    mode: str = "combined",
) -> dict[str, ImageSet]:
    """Corrupted copies of ``ds`` (same order, same labels).

    ``mode="combined"`` gives one set ``corrupted`` in which the kinds are spread evenly over the images
    (a seeded, class-independent assignment); ``"per_kind"`` gives ``corrupted-<kind>`` for every kind
    (each image corrupted by that kind); ``"both"`` gives all of them.
    """
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown corruption kinds {unknown}; choose from {sorted(CORRUPTIONS)}")
    if mode not in ("combined", "per_kind", "both"):
        raise ValueError(f"mode must be 'combined', 'per_kind' or 'both', got {mode!r}")
    x = ds.images.numpy()
    out: dict[str, ImageSet] = {}
    if mode in ("combined", "both"):
        rng = rng_for(seed, "corrupted/assign")
        assign = rng.permutation(np.arange(len(ds)) % len(kinds))
        y = x.copy()
        for j, kind in enumerate(kinds):
            sel = np.flatnonzero(assign == j)
            if len(sel):
                y[sel] = CORRUPTIONS[kind](x[sel], severity, rng_for(seed, f"corrupted/{kind}"))
        out["corrupted"] = ImageSet.from_numpy("corrupted", y, ds.labels.numpy(), ds.class_names)
    if mode in ("per_kind", "both"):
        for kind in kinds:
            y = CORRUPTIONS[kind](x, severity, rng_for(seed, f"corrupted-{kind}"))
            name = f"corrupted-{kind}"
            out[name] = ImageSet.from_numpy(name, y, ds.labels.numpy(), ds.class_names)
    return out
