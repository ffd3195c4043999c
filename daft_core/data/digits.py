"""The offline default ID data: scikit-learn's real handwritten digits (UCI optdigits test part).

Each 8x8 image counts the set pixels of a 32x32 binary bitmap in 4x4 blocks (values 0-16). We store them
as uint8 0-255 (``round(x * 255 / 16)``) so every preset shares one image convention; :mod:`.printed`
builds its OOD images with the very same transform.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from .format import ImageSet
from .splits import check_split_sizes, rng_for, stratified_split

DIGIT_CLASSES = [str(d) for d in range(10)]
NUM_DIGITS_IMAGES = 1797


def counts_to_uint8(counts: np.ndarray) -> np.ndarray:
    """Map 4x4-block counts 0..16 to uint8 0..255 (round half up), the storage convention of digit sets."""
    c = np.asarray(counts, dtype=np.float64)
    if c.size and (c.min() < 0 or c.max() > 16):
        raise ValueError(f"block counts must lie in 0..16, got [{c.min()}, {c.max()}]")
    return np.floor(c * 255.0 / 16.0 + 0.5).astype(np.uint8)


def _sklearn_digits_file() -> Path | None:
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 (N, 1, 8, 8) and int64 labels, in scikit-learn's order (ships offline).

    Reads the CSV that scikit-learn ships (the same file ``sklearn.datasets.load_digits`` parses) directly,
    because importing scikit-learn costs seconds on a busy machine; falls back to ``load_digits``.
    """
    path = _sklearn_digits_file()
    if path is not None:
        data = np.loadtxt(path, delimiter=",")
        counts, target = data[:, :-1], data[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        counts, target = d.data, d.target
    if counts.shape != (NUM_DIGITS_IMAGES, 64):
        raise RuntimeError(
            f"unexpected scikit-learn digits data: shape {counts.shape} (from {path or 'load_digits'})"
        )
    images = counts_to_uint8(np.rint(counts)).reshape(-1, 1, 8, 8)
    return images, target.astype(np.int64)


def digits_id_splits(
    seed: int, fractions: tuple[float, float, float]
) -> tuple[ImageSet, ImageSet, ImageSet, dict[str, Any]]:
    """Stratified train/val/test of the real digits; the split depends only on ``seed`` and ``fractions``."""
    images, labels = load_digits_arrays()
    tr, va, te = (float(f) for f in fractions)
    check_split_sizes(  # before splitting: every split needs every class
        {c: int((labels == i).sum()) for i, c in enumerate(DIGIT_CLASSES)},
        fractions,
        ("id_train", "id_val", "id_test"),
        source="digits preset",
        setting=(
            f"data.val_fraction={va:g} and data.test_fraction={te:g} (id_train keeps {tr:g}, "
            f"id_val {va:g}, id_test {te:g})"
        ),
        fix="lower data.val_fraction and/or data.test_fraction (the digits preset has a fixed size)",
    )
    idx = stratified_split(labels, fractions, rng_for(seed, "digits/id_split"))
    sets = [
        ImageSet.from_numpy(name, images[i], labels[i], DIGIT_CLASSES)
        for name, i in zip(("id_train", "id_val", "id_test"), idx, strict=True)
    ]
    info = {
        "source": "sklearn.datasets.load_digits (UCI optdigits, 8x8 block counts 0-16 scaled to 0-255)",
        "fractions": list(fractions),
        "total": len(labels),
    }
    return sets[0], sets[1], sets[2], info
