"""Data checks before work: each bad image tree (or data/model mismatch) is one DatasetFormatError naming
the folder, file or class and the fix, raised before anything is decoded or written."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from daft_core.data import DatasetBundle, ImageSet, load_preset
from daft_core.data.checks import check_labels_fit
from daft_core.data.cifar10 import CIFAR10_CLASSES
from daft_core.data.imagefolder import ImageTooLargeError
from daft_core.errors import DatasetFormatError

ROOT = Path(__file__).resolve().parents[2]


def write_images(folder: Path, counts: dict[str, int], size: int = 8) -> None:
    """`folder/<class>/<i>.png`, `counts[class]` tiny RGB PNGs each."""
    rng = np.random.default_rng(len(str(folder)))
    for cls, n in counts.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / cls / f"{i}.png")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A valid imagefolder root: 2 classes, 3 training and 1 test image each."""
    root = tmp_path / "data"
    write_images(root / "id_train", {"cat": 3, "dog": 3})
    write_images(root / "id_test", {"cat": 1, "dog": 1})
    return root


def load(root: Path, **kw):
    return load_preset("imagefolder", root=root, image_size=8, val_fraction=0.34, **kw)


def test_the_valid_tree_loads(tree: Path) -> None:
    b = load(tree)
    assert b.class_names == ["cat", "dog"] and b.val.class_counts() == [1, 1]


# -- empty class folders, a single class, classes missing from a split --------------------------------


@pytest.mark.parametrize("split", ["id_train", "id_test"])
def test_empty_class_folder_is_named(tree: Path, split: str) -> None:
    empty = tree / split / "eel"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")  # no image files: still empty
    with pytest.raises(DatasetFormatError, match="holds no image files") as err:
        load(tree)
    assert str(empty) in str(err.value)


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "id_train", {"cat": 4})
    write_images(tmp_path / "id_test", {"cat": 1})
    with pytest.raises(DatasetFormatError, match="at least 2") as err:
        load(tmp_path)
    assert str(tmp_path / "id_train") in str(err.value)


@pytest.mark.parametrize("split", ["id_val", "id_test"])
def test_an_id_class_missing_from_val_or_test_is_named(tree: Path, split: str) -> None:
    if split == "id_val":
        write_images(tree / "id_val", {"cat": 1})
    else:
        (tree / "id_test" / "dog" / "0.png").unlink()
        (tree / "id_test" / "dog").rmdir()
    with pytest.raises(DatasetFormatError) as err:
        load(tree)
    msg = str(err.value)
    assert split in msg and "'dog'" in msg and str(tree / split) in msg


def test_a_test_class_not_in_train_is_named(tree: Path) -> None:
    write_images(tree / "id_test", {"fox": 1})
    with pytest.raises(DatasetFormatError, match=r"\['fox'\]") as err:
        load(tree)
    assert "id_test" in str(err.value)


def test_every_image_of_a_class_skipped_is_named(tree: Path) -> None:
    for f in (tree / "id_train" / "dog").iterdir():
        f.write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match="'dog'") as err:
        load(tree, on_bad_image="skip")
    assert str(tree / "id_train" / "dog") in str(err.value)


# -- too few images for the requested fractions ---------------------------------------------------------


def test_one_image_per_class_cannot_give_a_val_split(tmp_path: Path) -> None:
    write_images(tmp_path / "id_train", {"cat": 1, "dog": 1})
    write_images(tmp_path / "id_test", {"cat": 1, "dog": 1})
    with pytest.raises(DatasetFormatError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert "data.val_fraction" in msg and "at least 2 images per class" in msg and "'cat'" in msg


def test_digits_fractions_that_leave_no_training_images() -> None:
    with pytest.raises(DatasetFormatError) as err:
        load_preset("digits", fractions=(0.001, 0.5, 0.499), printed=False, corruptions=None)
    msg = str(err.value)
    assert "data.val_fraction" in msg and "data.test_fraction" in msg and "id_train would get none" in msg


def test_cifar10_val_fraction_too_large(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        batch = {
            b"labels": [int(v) for v in (np.arange(10) + i) % 10],
            b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
        }
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [c.encode() for c in CIFAR10_CLASSES]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    assert len(load_preset("cifar10", root=tmp_path, ood_sets=[], val_fraction=0.2).val) == 10
    with pytest.raises(DatasetFormatError, match=r"data\.val_fraction=0\.95") as err:
        load_preset("cifar10", root=tmp_path, ood_sets=[], val_fraction=0.95)
    assert "id_train would get none" in str(err.value)


# -- symlinks -----------------------------------------------------------------------------------------------


def test_symlinks_outside_the_root_are_refused_unless_allowed(tree: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "elsewhere", {"cat": 1, "dog": 2})
    link = tree / "id_train" / "cat" / "linked.png"
    os.symlink(tmp_path / "elsewhere" / "cat" / "0.png", link)
    with pytest.raises(DatasetFormatError, match="follow_symlinks") as err:
        load(tree)
    assert str(link) in str(err.value)
    assert len(load(tree, follow_symlinks=True).train) + 2 == 7  # 4 cats + 3 dogs, 2 carved to val

    link.unlink()
    class_link = tree / "id_test" / "dog"  # a whole class folder linked from outside
    for f in class_link.iterdir():
        f.unlink()
    class_link.rmdir()
    os.symlink(tmp_path / "elsewhere" / "dog", class_link)
    with pytest.raises(DatasetFormatError, match="follow_symlinks") as err:
        load(tree)
    assert str(class_link) in str(err.value)
    assert load(tree, follow_symlinks=True).test.class_counts() == [1, 2]


def test_a_split_folder_linked_from_outside_the_root_is_refused(tree: Path, tmp_path: Path) -> None:
    (tree / "id_test").rename(tmp_path / "moved_test")
    os.symlink(tmp_path / "moved_test", tree / "id_test")
    with pytest.raises(DatasetFormatError, match="follow_symlinks") as err:
        load(tree)
    assert str(tree / "id_test") in str(err.value)
    assert len(load(tree, follow_symlinks=True).test) == 2


def test_symlinks_inside_the_root_are_fine(tree: Path) -> None:
    os.symlink(tree / "id_train" / "dog" / "0.png", tree / "id_train" / "cat" / "alias.png")
    os.symlink(tree / "id_train" / "dog", tree / "id_train" / "cat" / "sub")  # a folder link, followed
    b = load(tree)
    assert b.train.class_counts()[0] + b.val.class_counts()[0] == 3 + 1 + 3


def test_an_extra_ood_folder_linking_out_is_refused(tree: Path, tmp_path: Path) -> None:
    write_images(tmp_path / "elsewhere", {"cat": 1})
    write_images(tree / "sketch", {"dog": 1})
    os.symlink(tmp_path / "elsewhere" / "cat", tree / "sketch" / "cat")
    with pytest.raises(DatasetFormatError, match="follow_symlinks"):
        load(tree, extra_ood={"sketch": tree / "sketch"})


# -- pixel limit -------------------------------------------------------------------------------------------


def test_images_above_max_pixels_are_named_before_decoding(tree: Path) -> None:
    big = tree / "id_test" / "cat" / "big.png"
    Image.new("RGB", (12, 12)).save(big)  # 144 pixels
    with pytest.raises(ImageTooLargeError, match=r"data\.max_pixels=100") as err:
        load(tree, max_pixels=100)  # 100 < 144 <= 2 * 100: our header check
    assert str(big) in str(err.value)
    with pytest.raises(ImageTooLargeError, match=r"data\.max_pixels=64") as err:
        load(tree, max_pixels=64, on_bad_image="skip")  # 144 > 2 * 64: PIL's bomb check; never skipped
    assert str(big) in str(err.value)
    assert Image.MAX_IMAGE_PIXELS not in (64, 100)  # PIL's global limit restored
    assert len(load(tree, max_pixels=144).test) == 3


def test_the_step_prints_one_error_line_and_writes_nothing(tree: Path, tmp_path: Path) -> None:
    (tree / "id_train" / "eel").mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"pipeline": {"tracking": False}, "data": {"preset": "imagefolder", "root": str(tree)}}
        )
    )
    out = tmp_path / "prepared"
    proc = subprocess.run(
        [sys.executable, "-m", "components.prepare_data", "--params", str(params), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0])  # one line, last, no traceback
    assert str(tree / "id_train" / "eel") in errors[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]  # no output, no temp dir


# -- labels against the model's outputs ----------------------------------------------------------------


def _set(name: str, classes: list[str], n: int = 4) -> ImageSet:
    return ImageSet(name, torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.arange(n) % len(classes), classes)


def test_labels_must_fit_the_model() -> None:
    classes = [str(i) for i in range(10)]
    bundle = DatasetBundle(_set("id_train", classes, 10), _set("id_val", classes), _set("id_test", classes))
    check_labels_fit(10, bundle, "models/pretrained/model.pt")  # fits
    with pytest.raises(DatasetFormatError) as err:
        check_labels_fit(3, bundle, "models/pretrained/model.pt", data_where="data/prepared")
    msg = str(err.value)
    assert "has 10 classes" in msg and "models/pretrained/model.pt has 3 outputs" in msg
    assert "data/prepared" in msg and "rebuild" in msg
    with pytest.raises(DatasetFormatError, match="'id_val'"):
        check_labels_fit(10, {"id_val": _set("id_val", ["a", "b"])}, "m.pt")
    with pytest.raises(DatasetFormatError, match="3 outputs"):
        check_labels_fit(3, [_set("ood", classes)], "m.pt")
