"""The offline default preset: real digits as ID, printed and corrupted digits as OOD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daft_core.data import load_preset
from daft_core.data.corruptions import CORRUPTIONS, corrupt_set
from daft_core.data.digits import counts_to_uint8, load_digits_arrays
from daft_core.data.printed import (
    available_digit_fonts,
    bitmap_to_counts,
    normalize_bitmap,
    render_printed_digits,
)


@pytest.fixture(scope="module")
def digits():
    return load_preset("digits", seed=0)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def test_counts_and_splits(digits):
    n = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(n) == 1797
    assert abs(n[0] / 1797 - 0.6) < 0.01 and abs(n[1] / 1797 - 0.2) < 0.01 and abs(n[2] / 1797 - 0.2) < 0.01
    assert digits.class_names == [str(d) for d in range(10)]
    assert digits.train.image_shape == (1, 8, 8)
    assert set(digits.ood) == {"printed", "corrupted"}
    assert digits.meta["preset"] == "digits" and digits.meta["seed"] == 0


def test_stratified(digits):
    _, labels = load_digits_arrays()
    total = np.bincount(labels, minlength=10)
    for ds, frac in ((digits.train, 0.6), (digits.val, 0.2), (digits.test, 0.2)):
        counts = np.array(ds.class_counts())
        assert np.all(np.abs(counts - frac * total) <= 1), (ds.name, counts)


def test_splits_are_disjoint_and_cover_everything(digits):
    # some digit images are exact duplicates, so compare the index bookkeeping via a multiset of rows
    images, _ = load_digits_arrays()
    all_rows = sorted(r.tobytes() for r in images)
    split_rows = sorted(
        r.numpy().tobytes() for ds in (digits.train, digits.val, digits.test) for r in ds.images
    )
    assert split_rows == all_rows
    leaked = _rows(digits.test.images) & (_rows(digits.train.images) | _rows(digits.val.images))
    dup = len(images) - len({r.tobytes() for r in images})
    assert len(leaked) <= dup  # only genuinely duplicated images can appear on both sides


def test_values_use_the_uint8_scaling(digits):
    allowed = set(counts_to_uint8(np.arange(17)).tolist())
    for ds in (digits.train, digits.ood["printed"]):
        assert set(torch.unique(ds.images).tolist()) <= allowed
    assert counts_to_uint8(np.array([0, 8, 16])).tolist() == [0, 128, 255]


def test_deterministic_and_seed_dependent(digits):
    same = load_preset("digits", seed=0, printed_per_class=5)
    other = load_preset("digits", seed=1, printed_per_class=5)
    assert torch.equal(same.train.images, digits.train.images)
    assert torch.equal(same.test.labels, digits.test.labels)
    assert torch.equal(same.ood["corrupted"].images, digits.ood["corrupted"].images)
    assert not torch.equal(other.train.images, digits.train.images)
    assert not torch.equal(other.ood["printed"].images, same.ood["printed"].images)


def test_block_count_transform_on_hand_made_bitmap():
    bm = np.zeros((1, 32, 32), dtype=bool)
    bm[0, 0:4, 0:4] = True  # full block -> 16
    bm[0, 4, 4] = True  # one pixel in block (1, 1)
    bm[0, 28:32, 30:32] = True  # half of the last block -> 8
    counts = bitmap_to_counts(bm)
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[0, 0], expected[1, 1], expected[7, 7] = 16, 1, 8
    assert counts.shape == (1, 8, 8) and np.array_equal(counts[0], expected)
    assert bitmap_to_counts(np.ones((2, 32, 32))).max() == 16


def test_normalize_bitmap_fits_and_centres():
    glyph = np.zeros((100, 60), dtype=bool)
    glyph[10:90, 20:40] = True  # 80 tall x 20 wide bar
    out = normalize_bitmap(glyph, 32)
    ys, xs = np.nonzero(out)
    assert ys.min() == 0 and ys.max() == 31  # height fills the box
    assert xs.max() - xs.min() + 1 == 8  # aspect kept: 20/80 * 32
    assert xs.min() == 12  # centred
    shifted = normalize_bitmap(glyph, 32, shift=(5, -3))
    assert np.nonzero(shifted)[1].min() == 9 and np.nonzero(shifted)[0].min() == 0  # dy clipped inside


def test_printed_set():
    assert len(available_digit_fonts()) >= 5
    ds, info = render_printed_digits(seed=3, n_per_class=4)
    again, _ = render_printed_digits(seed=3, n_per_class=4)
    assert len(ds) == 40 and ds.class_counts() == [4] * 10 and ds.image_shape == (1, 8, 8)
    assert torch.equal(ds.images, again.images)
    counts = np.floor(ds.images.numpy().astype(np.float64) * 16 / 255 + 0.5)  # invert the scaling
    assert np.array_equal(counts_to_uint8(counts), ds.images.numpy())
    assert counts.min() >= 0 and counts.max() <= 16
    assert counts.reshape(40, -1).sum(1).min() > 0  # no blank digits
    assert info["fonts"] and info["n_per_class"] == 4


def test_printed_size_default(digits):
    assert len(digits.ood["printed"]) == 600
    assert digits.ood["printed"].class_counts() == [60] * 10


def test_corrupted_differs_but_keeps_labels(digits):
    c = digits.ood["corrupted"]
    assert torch.equal(c.labels, digits.test.labels)
    diff = (c.images != digits.test.images).flatten(1).any(1)
    assert diff.float().mean() > 0.9


def test_each_corruption_kind():
    ds = load_preset("digits", seed=0, printed=False).test.subset(range(40), name="id_test")
    sets = corrupt_set(ds, seed=0, mode="both", severity=5)
    assert set(sets) == {"corrupted", *(f"corrupted-{k}" for k in CORRUPTIONS)}
    for name, s in sets.items():
        assert s.images.shape == ds.images.shape and s.images.dtype == torch.uint8
        assert torch.equal(s.labels, ds.labels)
        assert not torch.equal(s.images, ds.images), name
    again = corrupt_set(ds, seed=0, mode="per_kind", severity=5)
    assert all(torch.equal(again[k].images, sets[k].images) for k in again)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_set(ds, 0, kinds=["fog"])


def test_direct_csv_read_matches_sklearn_loader(monkeypatch):
    from sklearn.datasets import load_digits

    import daft_core.data.digits as digits

    images, labels = load_digits_arrays()
    d = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.uint8
    assert np.array_equal(images[:, 0], counts_to_uint8(d.images))
    assert np.array_equal(labels, d.target)
    monkeypatch.setattr(digits, "_sklearn_digits_file", lambda: None)  # the fallback path agrees
    images2, labels2 = load_digits_arrays()
    assert np.array_equal(images, images2) and np.array_equal(labels, labels2)
