"""User image folders and extra OOD sets, with a few PNGs written on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daft_core.data import load_bundle, load_preset, save_bundle
from daft_core.data.imagefolder import BadImageError, decode_image


def _write_folder(root: Path, counts: dict[str, int], seed: int, size=(20, 12), mode="RGB") -> None:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")


@pytest.fixture
def folders(tmp_path) -> Path:
    _write_folder(tmp_path / "id_train", {"cat": 6, "dog": 6, "eel": 5}, 0)
    _write_folder(tmp_path / "id_test", {"cat": 2, "dog": 2, "eel": 2}, 1, mode="L")
    _write_folder(tmp_path / "ood" / "sketch", {"cat": 2, "dog": 1}, 2, size=(40, 40))
    (tmp_path / "id_train" / "cat" / "notes.txt").write_text("not an image")  # ignored
    return tmp_path


def test_imagefolder_from_root(folders, tmp_path):
    b = load_preset("imagefolder", root=folders, seed=0, image_size=16, val_fraction=0.2)
    assert b.class_names == ["cat", "dog", "eel"]
    assert len(b.train) == 14 and b.val.class_counts() == [1, 1, 1]
    assert b.train.image_shape == (3, 16, 16) and b.test.image_shape == (3, 16, 16)
    assert list(b.ood) == ["sketch"] and b.ood["sketch"].class_counts() == [2, 1, 0]
    assert b.meta["skipped_images"] == 0
    again = load_preset("imagefolder", root=folders, seed=0, image_size=16, val_fraction=0.2)
    assert torch.equal(again.val.images, b.val.images)
    save_bundle(b, tmp_path / "out")
    assert len(load_bundle(tmp_path / "out").ood["sketch"]) == 3


def test_explicit_val_grayscale_and_resize_modes(folders):
    b = load_preset(
        "imagefolder",
        id_train=folders / "id_train",
        id_val=folders / "id_test",
        id_test=folders / "id_test",
        ood={"s": folders / "ood" / "sketch"},
        image_size=8,
        grayscale=True,
        resize="stretch",
    )
    assert len(b.train) == 17 and len(b.val) == 6 and b.train.image_shape == (1, 8, 8)
    img = folders / "id_train" / "cat" / "0.png"  # 20 wide x 12 tall
    for mode in ("center_crop", "stretch", "pad"):
        assert decode_image(img, (10, 10), False, mode).shape == (3, 10, 10)
    padded = decode_image(img, (10, 10), True, "pad")
    assert padded[0, 0].max() == 0 and padded[0, -1].max() == 0  # black bars above/below


def test_corrupt_image_is_named_or_skipped(folders):
    bad = folders / "id_train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        load_preset("imagefolder", root=folders, image_size=8)
    b = load_preset("imagefolder", root=folders, image_size=8, on_bad_image="skip")
    assert b.meta["skipped_images"] == 1
    assert b.meta["id"]["id_train"]["skipped_files"] == [str(bad)]
    assert len(b.train) + len(b.val) == 17


def test_ood_with_extra_class_is_an_error(folders):
    _write_folder(folders / "ood" / "sketch", {"fox": 1}, 3)
    with pytest.raises(ValueError, match=r"\['fox'\]"):
        load_preset("imagefolder", root=folders, image_size=8)


def test_missing_required_dirs(tmp_path):
    with pytest.raises(ValueError, match="id_train and id_test"):
        load_preset("imagefolder")
    with pytest.raises(FileNotFoundError, match="id_train"):
        load_preset("imagefolder", root=tmp_path)


def test_extra_ood_on_digits(folders):
    _write_folder(folders / "mine", {"0": 2, "7": 1}, 4, size=(30, 30))
    b = load_preset("digits", printed=False, corruptions=None, extra_ood={"mine": folders / "mine"})
    assert set(b.ood) == {"mine"}
    assert b.ood["mine"].image_shape == (1, 8, 8)
    assert b.ood["mine"].labels.tolist() == [0, 0, 7]
    (folders / "mine" / "7" / "junk.png").write_bytes(b"nope")
    b = load_preset(
        "digits", printed=False, corruptions=None, extra_ood={"mine": folders / "mine"}, on_bad_image="skip"
    )
    assert len(b.ood["mine"]) == 3 and b.meta["skipped_images"] == 1
    with pytest.raises(ValueError, match="not ID classes"):
        load_preset("digits", printed=False, corruptions=None, extra_ood={"bad": folders / "ood" / "sketch"})


def test_unknown_preset():
    with pytest.raises(ValueError, match="available"):
        load_preset("imagenet")
