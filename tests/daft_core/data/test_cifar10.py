"""The cifar10 preset on tiny files written in the real on-disk formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from daft_core.data import load_preset
from daft_core.data.cifar10 import CIFAR10_CLASSES, CIFAR10C_CORRUPTIONS, MissingDataError, read_stl10


def _write_cifar(root: Path, per_batch: int = 10) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in (np.arange(per_batch) + i) % 10],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{j}.png".encode() for j in range(per_batch)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f, protocol=2)


def _write_stl(root: Path) -> np.ndarray:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    y = np.arange(1, 11, dtype=np.uint8)  # one image per STL class, 1-indexed
    hwc = np.zeros((10, 96, 96, 3), dtype=np.uint8)
    for i in range(10):
        hwc[i, :48, :, 0] = 200 + i  # top half of the red channel is bright
    # STL-10 stores each channel column-major: (N, C, W, H)
    hwc.transpose(0, 3, 2, 1).tofile(d / "test_X.bin")
    y.tofile(d / "test_y.bin")
    return hwc


def _write_cifar101(root: Path) -> None:
    d = root / "CIFAR-10.1"
    d.mkdir(parents=True)
    np.save(d / "cifar10.1_v6_data.npy", np.full((4, 32, 32, 3), 7, dtype=np.uint8))
    np.save(d / "cifar10.1_v6_labels.npy", np.array([0, 1, 2, 3], dtype=np.int64))


def _write_cifar10c(root: Path, per: int = 6, corruptions=("fog", "snow")) -> None:
    d = root / "CIFAR-10-C"
    d.mkdir(parents=True)
    np.save(d / "labels.npy", np.tile(np.arange(per) % 10, 5).astype(np.uint8))
    for c in corruptions:
        x = np.repeat(np.arange(1, 6, dtype=np.uint8), per)[:, None, None, None] * np.ones(
            (1, 32, 32, 3), np.uint8
        )
        np.save(d / f"{c}.npy", x)  # pixel value == severity


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    _write_cifar(tmp_path)
    _write_stl(tmp_path)
    _write_cifar101(tmp_path)
    _write_cifar10c(tmp_path)
    return tmp_path


def test_cifar10_preset(cifar_root):
    b = load_preset(
        "cifar10",
        root=cifar_root,
        seed=0,
        val_fraction=0.2,
        cifar10c_corruptions=["fog", "snow"],
        cifar10c_severities=[2, 5],
        cifar10c_max_per_corruption=4,
    )
    assert b.class_names == CIFAR10_CLASSES
    assert len(b.train) + len(b.val) == 50 and len(b.val) == 10 and b.val.class_counts() == [1] * 10
    assert len(b.test) == 10 and b.train.image_shape == (3, 32, 32)
    assert set(b.ood) == {"stl10", "cifar10.1", "cifar10c-s2", "cifar10c-s5"}
    assert len(b.ood["cifar10.1"]) == 4 and int(b.ood["cifar10.1"].images.max()) == 7
    c5 = b.ood["cifar10c-s5"]
    assert len(c5) == 8 and set(torch.unique(c5.images).tolist()) == {5}
    assert set(torch.unique(b.ood["cifar10c-s2"].images).tolist()) == {2}
    again = load_preset("cifar10", root=cifar_root, seed=0, val_fraction=0.2, ood_sets=["cifar10.1"])
    assert torch.equal(again.val.images, b.val.images)


def test_cifar_pixel_layout(cifar_root):
    b = load_preset("cifar10", root=cifar_root, ood_sets=[])
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(b.test.images[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))


def test_stl10_drops_monkey_maps_labels_and_orientation(cifar_root):
    ds, info = read_stl10(cifar_root / "stl10_binary")
    names = [CIFAR10_CLASSES[i] for i in ds.labels.tolist()]
    assert names == ["airplane", "bird", "automobile", "cat", "deer", "dog", "horse", "ship", "truck"]
    assert info["dropped_monkey"] == 1 and "frog" not in names
    assert ds.image_shape == (3, 32, 32)
    img = ds.images[0].numpy()
    assert img[0, :16].min() == 200 and img[0, 16:].max() == 0  # top half bright: rows are rows
    assert ds.images[-1, 0, 0, 0] == 209  # the truck (STL label 10)


def test_cifar10c_per_corruption(cifar_root):
    b = load_preset(
        "cifar10",
        root=cifar_root,
        ood_sets=["cifar10c"],
        cifar10c_corruptions=["snow"],
        cifar10c_severities=[1],
        cifar10c_mode="per_corruption",
        cifar10c_max_per_corruption=None,
    )
    assert list(b.ood) == ["cifar10c-snow-s1"] and len(b.ood["cifar10c-snow-s1"]) == 6


def test_missing_files_are_explained(tmp_path, cifar_root):
    with pytest.raises(MissingDataError, match=r"cifar-10-batches-py/batches\.meta.*cs\.toronto\.edu") as e:
        load_preset("cifar10", root=tmp_path / "empty")
    msg = str(e.value)
    assert "stl10_binary/test_X.bin" in msg and "cifar10.1_v6_labels.npy" in msg and "frost.npy" in msg
    with pytest.raises(MissingDataError, match=r"CIFAR-10-C/gaussian_noise\.npy.*zenodo"):
        load_preset("cifar10", root=cifar_root)  # the default corruption list needs every file
    (cifar_root / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(MissingDataError, match=r"stl10_binary/test_y\.bin"):
        load_preset("cifar10", root=cifar_root, ood_sets=["stl10"])
    with pytest.raises(ValueError, match="needs root"):
        load_preset("cifar10")
    assert len(CIFAR10C_CORRUPTIONS) == 15


def test_malicious_pickle_is_refused(cifar_root):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(cifar_root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ValueError, match="disallowed global"):
        load_preset("cifar10", root=cifar_root, ood_sets=[])
