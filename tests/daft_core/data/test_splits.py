from __future__ import annotations

import numpy as np
import pytest

from daft_core.data.digits import digits_id_splits
from daft_core.data.splits import resize_uint8, rng_for, stratified_split


def test_stratified_split_partitions_indices():
    labels = np.repeat(np.arange(4), [10, 7, 3, 31])
    parts = stratified_split(labels, (0.6, 0.2, 0.2), rng_for(0, "t"))
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(labels)))  # disjoint and complete
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted
    for c, n in enumerate([10, 7, 3, 31]):
        got = [int((labels[p] == c).sum()) for p in parts]
        assert sum(got) == n and all(g >= 1 for g in got)  # every split sees every class
        assert abs(got[0] - 0.6 * n) <= 1.0
    again = stratified_split(labels, (0.6, 0.2, 0.2), rng_for(0, "t"))
    other = stratified_split(labels, (0.6, 0.2, 0.2), rng_for(1, "t"))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.2), rng_for(0, "t"))


def test_digits_test_indices_disjoint_from_train_and_val(monkeypatch):
    # give every image a unique id in its pixels so disjointness is checked by identity, not by content
    import daft_core.data.digits as digits

    n = digits.NUM_DIGITS_IMAGES
    _, labels = digits.load_digits_arrays()
    ids = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    ids[:, 0, 0, 0], ids[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    monkeypatch.setattr(digits, "load_digits_arrays", lambda: (ids, labels))
    tr, va, te, _ = digits_id_splits(0, (0.6, 0.2, 0.2))

    def key(ds):
        x = ds.images.numpy()
        return set((x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 0, 1].astype(int)).tolist())

    assert not key(te) & (key(tr) | key(va)) and not key(tr) & key(va)
    assert len(key(tr) | key(va) | key(te)) == n


def test_resize_uint8_block_mean():
    x = np.arange(36, dtype=np.uint8).reshape(1, 1, 6, 6)
    y = resize_uint8(x, (2, 2))
    assert y.shape == (1, 1, 2, 2) and y.dtype == np.uint8
    assert y[0, 0, 0, 0] == round(x[0, 0, :3, :3].mean())
    assert np.array_equal(resize_uint8(x, (6, 6)), x)
