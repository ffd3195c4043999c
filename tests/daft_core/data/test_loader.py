from __future__ import annotations

import pytest
import torch

from daft_core.data import iterate_batches, num_batches

from .conftest import make_set


def _collect(ds, **kw):
    batches = list(iterate_batches(ds, **kw))
    return batches, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_sequential_covers_all_in_order():
    ds = make_set("id_train", 10, 0)
    batches, x, y = _collect(ds, batch_size=4)
    assert [len(b[1]) for b in batches] == [4, 4, 2] == [4, 4, 2][: num_batches(10, 4)]
    assert torch.equal(x, ds.images) and torch.equal(y, ds.labels)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64


def test_shuffle_is_a_permutation_and_deterministic():
    ds = make_set("id_train", 23, 0)
    ds.labels = torch.arange(23) % 3
    ds.images[:, 0, 0, 0] = torch.arange(23, dtype=torch.uint8)  # row id in the first pixel
    _, x1, y1 = _collect(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    _, x2, _ = _collect(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    _, x3, _ = _collect(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4))
    ids = x1[:, 0, 0, 0].long()
    assert sorted(ids.tolist()) == list(range(23))  # every sample exactly once
    assert torch.equal(y1, ds.labels[ids])  # images and labels stay paired
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    assert ids.tolist() != list(range(23))


def test_drop_last_and_device():
    ds = make_set("id_train", 10, 0)
    batches, _, _ = _collect(ds, batch_size=4, drop_last=True, device="cpu")
    assert [len(b[1]) for b in batches] == [4, 4] and num_batches(10, 4, drop_last=True) == 2
    assert all(b[0].device.type == "cpu" for b in batches)
    assert list(iterate_batches(make_set("id_train", 3, 0), 4, drop_last=True)) == []


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(make_set("x", 3, 0), 0))
