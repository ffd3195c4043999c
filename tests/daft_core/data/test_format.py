from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from daft_core.data import (
    DatasetBundle,
    DatasetFormatError,
    ImageSet,
    bundle_digest,
    load_bundle,
    save_bundle,
)
from daft_core.data import format as fmt

from .conftest import CLASSES, assert_bundles_equal, make_bundle, make_set


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir())


def _rewrite(root: Path, key: str, fname: str, arr: np.ndarray, update_manifest: bool = True) -> None:
    """Replace one array file; optionally fix its hash in the manifest so deeper checks are reached."""
    path = root / key / fname
    np.save(path, arr)
    if update_manifest:
        man = json.loads((root / "manifest.json").read_text())
        man["splits"][key]["files"][fname]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(man))


def test_round_trip_is_exact(tmp_path, bundle):
    manifest = save_bundle(bundle, tmp_path / "ds")
    loaded = load_bundle(tmp_path / "ds")
    assert_bundles_equal(bundle, loaded)
    assert list(loaded.ood) == ["shifted", "other-set.v1"]  # order kept
    assert manifest["format_version"] == fmt.FORMAT_VERSION
    assert manifest["class_names"] == CLASSES
    entry = manifest["splits"]["ood/shifted"]
    assert entry["count"] == 5 and entry["shape"] == [5, 1, 8, 8]
    sha = hashlib.sha256((tmp_path / "ds" / "ood" / "shifted" / "images.npy").read_bytes()).hexdigest()
    assert entry["files"]["images.npy"]["sha256"] == sha
    assert _siblings(tmp_path / "ds") == ["ds"]  # no temp dirs left behind


def test_overwrite_replaces_previous_bundle(tmp_path):
    root = tmp_path / "ds"
    save_bundle(make_bundle(0), root)
    save_bundle(make_bundle(7), root)
    assert_bundles_equal(make_bundle(7), load_bundle(root))
    assert _siblings(root) == ["ds"]


def test_failure_mid_write_leaves_nothing(tmp_path, bundle, monkeypatch):
    calls = {"n": 0}
    real_save = np.save

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fmt.np, "save", flaky_save)
    root = tmp_path / "ds"
    with pytest.raises(OSError, match="simulated"):
        save_bundle(bundle, root)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_write_keeps_old_bundle(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    save_bundle(make_bundle(0), root)
    real_save = np.save
    calls = {"n": 0}

    def flaky_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fmt.np, "save", flaky_save)
    with pytest.raises(OSError):
        save_bundle(make_bundle(5), root)
    assert_bundles_equal(make_bundle(0), load_bundle(root))
    assert _siblings(root) == ["ds"]


def test_invalid_meta_writes_nothing(tmp_path):
    b = make_bundle()
    b.meta["bad"] = object()
    with pytest.raises(DatasetFormatError, match="JSON"):
        save_bundle(b, tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_invalid_set_mutated_after_construction_writes_nothing(tmp_path):
    b = make_bundle()
    b.ood["../escape"] = make_set("../escape", 2, 0)
    with pytest.raises(DatasetFormatError, match="invalid set name"):
        save_bundle(b, tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_unrelated_directory(tmp_path, bundle):
    root = tmp_path / "precious"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="manifest"):
        save_bundle(bundle, root)
    assert (root / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_bundle(bundle, empty)  # an empty directory (e.g. a pre-created artifact path) is fine
    assert_bundles_equal(bundle, load_bundle(empty))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"images": torch.zeros(2, 1, 4, 4)}, "uint8"),
        ({"images": torch.zeros(2, 2, 4, 4, dtype=torch.uint8)}, "C in"),
        ({"images": torch.zeros(2, 4, 4, dtype=torch.uint8)}, "uint8"),
        ({"labels": torch.zeros(2, dtype=torch.int32)}, "int64"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, "2 images but 3 labels"),
        ({"labels": torch.tensor([0, 3])}, "labels must lie in"),
        ({"labels": torch.tensor([-1, 0])}, "labels must lie in"),
        ({"class_names": ["a", "a", "b"]}, "duplicate"),
        ({"class_names": []}, "non-empty"),
    ],
)
def test_imageset_validation(kwargs, match):
    base = {"name": "x", "images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "labels": torch.tensor([0, 1])}
    base["class_names"] = CLASSES
    base.update(kwargs)
    with pytest.raises(DatasetFormatError, match=match):
        ImageSet(**base)


def test_bundle_validation():
    tr, va, te = make_set("id_train", 4, 0), make_set("id_val", 4, 1), make_set("id_test", 4, 2)
    with pytest.raises(DatasetFormatError, match="must be named 'id_val'"):
        DatasetBundle(tr, make_set("val", 4, 1), te)
    with pytest.raises(DatasetFormatError, match="class_names"):
        DatasetBundle(tr, va, te, {"o": make_set("o", 2, 3, classes=["a", "b", "z"])})
    with pytest.raises(DatasetFormatError, match="image shape"):
        DatasetBundle(tr, va, te, {"o": make_set("o", 2, 3, shape=(3, 8, 8))})
    with pytest.raises(DatasetFormatError, match="with that name"):
        DatasetBundle(tr, va, te, {"o": make_set("p", 2, 3)})
    for bad in ("", "a/b", "..", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(DatasetFormatError, match="invalid set name"):
            DatasetBundle(tr, va, te, {bad: make_set(bad, 2, 3)})


def test_subset_and_counts(bundle):
    sub = bundle.train.subset([0, 3, 4], name="id_val")
    assert sub.name == "id_val" and len(sub) == 3
    assert torch.equal(sub.images[1], bundle.train.images[3])
    assert bundle.train.class_counts() == [4, 4, 4]
    mask = bundle.train.labels == 1
    assert bundle.train.subset(mask.numpy()).labels.tolist() == [1, 1, 1, 1]


# ------------------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path, bundle) -> Path:
    save_bundle(bundle, tmp_path / "ds")
    return tmp_path / "ds"


def test_missing_directory_and_manifest(tmp_path, saved):
    with pytest.raises(DatasetFormatError, match=r"does not exist.*prepare_data"):
        load_bundle(tmp_path / "nope")
    (saved / "manifest.json").unlink()
    with pytest.raises(DatasetFormatError, match=r"manifest\.json: missing manifest"):
        load_bundle(saved)


def test_unreadable_manifest(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="unreadable manifest"):
        load_bundle(saved)


def test_bad_format_version(saved):
    man = json.loads((saved / "manifest.json").read_text())
    man["format_version"] = 99
    (saved / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatasetFormatError, match="format_version 99"):
        load_bundle(saved)


def test_missing_split_in_manifest(saved):
    man = json.loads((saved / "manifest.json").read_text())
    del man["splits"]["id_val"]
    (saved / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatasetFormatError, match="id_val"):
        load_bundle(saved)


def test_tampered_file_hash_mismatch_names_file(saved):
    path = saved / "ood" / "shifted" / "images.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetFormatError, match=r"ood/shifted/images\.npy: sha256 mismatch"):
        load_bundle(saved)
    assert len(load_bundle(saved, verify_hashes=False).ood["shifted"]) == 5  # same shape, unverified


def test_missing_file(saved):
    (saved / "id_test" / "labels.npy").unlink()
    with pytest.raises(DatasetFormatError, match=r"id_test/labels\.npy: file missing"):
        load_bundle(saved)


def test_shape_mismatch(saved):
    _rewrite(saved, "id_val", "images.npy", np.zeros((6, 1, 4, 4), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match=r"id_val/images\.npy: shape \[6, 1, 4, 4\] does not match"):
        load_bundle(saved)


def test_wrong_dtype(saved):
    _rewrite(saved, "id_val", "images.npy", np.zeros((6, 1, 8, 8), dtype=np.float32))
    with pytest.raises(DatasetFormatError, match=r"id_val/images\.npy: expected uint8"):
        load_bundle(saved)


def test_label_out_of_range(saved):
    _rewrite(saved, "id_train", "labels.npy", np.full(12, 7, dtype=np.int64))
    with pytest.raises(DatasetFormatError, match=r"id_train/labels\.npy: labels out of range"):
        load_bundle(saved)


def test_count_mismatch(saved):
    _rewrite(saved, "id_train", "labels.npy", np.zeros(11, dtype=np.int64))
    with pytest.raises(DatasetFormatError, match=r"id_train/labels\.npy: 11 labels, 12 images"):
        load_bundle(saved)


def test_digest_is_stable_and_content_sensitive(tmp_path, bundle):
    save_bundle(bundle, tmp_path / "a")
    save_bundle(make_bundle(0), tmp_path / "b")
    save_bundle(make_bundle(1), tmp_path / "c")
    d = bundle_digest(tmp_path / "a")
    assert len(d) == 64 and d == bundle_digest(tmp_path / "b")
    assert d != bundle_digest(tmp_path / "c")
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    man["meta"]["source_path"] = "/elsewhere"  # provenance notes do not change the content identity
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(man))  # also different whitespace
    assert bundle_digest(tmp_path / "a") == d


def test_failed_swap_restores_old_bundle(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    save_bundle(make_bundle(0), root)
    real_replace = fmt.os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # 1: old bundle aside, 2: new bundle into place
            raise OSError("simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(fmt.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename"):
        save_bundle(make_bundle(5), root)
    monkeypatch.undo()
    assert_bundles_equal(make_bundle(0), load_bundle(root))
    assert _siblings(root) == ["ds"]
