"""Small synthetic bundles shared by the data tests."""

from __future__ import annotations

import pytest
import torch

from daft_core.data import DatasetBundle, ImageSet

CLASSES = ["a", "b", "c"]


def make_set(name: str, n: int, seed: int, shape: tuple[int, int, int] = (1, 8, 8), classes=None) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    classes = classes or CLASSES
    return ImageSet(
        name=name,
        images=torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
        labels=torch.arange(n, dtype=torch.int64) % len(classes),
        class_names=list(classes),
    )


def make_bundle(seed: int = 0) -> DatasetBundle:
    return DatasetBundle(
        train=make_set("id_train", 12, seed),
        val=make_set("id_val", 6, seed + 1),
        test=make_set("id_test", 6, seed + 2),
        ood={
            "shifted": make_set("shifted", 5, seed + 3),
            "other-set.v1": make_set("other-set.v1", 3, seed + 4),
        },
        meta={"preset": "synthetic", "seed": seed, "nested": {"x": [1, 2]}},
    )


@pytest.fixture
def bundle() -> DatasetBundle:
    return make_bundle()


def assert_sets_equal(a: ImageSet, b: ImageSet) -> None:
    assert a.name == b.name
    assert a.class_names == b.class_names
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.labels.dtype == torch.int64


def assert_bundles_equal(a: DatasetBundle, b: DatasetBundle) -> None:
    assert set(a.all_sets()) == set(b.all_sets())
    for k in a.all_sets():
        assert_sets_equal(a.all_sets()[k], b.all_sets()[k])
    assert a.meta == b.meta
