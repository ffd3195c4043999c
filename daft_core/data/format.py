"""The one on-disk dataset format every pipeline step reads.

Images are decoded once (by ``prepare_data``) and stored as uint8 ``.npy`` arrays plus int64 labels, so later
steps never touch JPEGs, pickles or fonts again. A ``manifest.json`` records counts, shapes and sha256 hashes
so a truncated or tampered file is caught on load instead of silently training on garbage, and its digest
gives a cheap, stable identity for lineage.

Layout::

    root/manifest.json
    root/id_train/{images.npy,labels.npy}
    root/id_val/{images.npy,labels.npy}
    root/id_test/{images.npy,labels.npy}
    root/ood/<name>/{images.npy,labels.npy}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daft_core.atomic import atomic_dir
from daft_core.errors import DatasetFormatError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ID_SPLITS = ("id_train", "id_val", "id_test")
_SET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FIX_HINT = "Rebuild the dataset (rerun the prepare_data step, e.g. `dvc repro prepare_data`)."


def validate_set_name(name: str) -> str:
    """OOD names become directory names, so only a safe single path component is allowed."""
    if not isinstance(name, str) or not _SET_NAME_RE.match(name) or name in (".", ".."):
        raise DatasetFormatError(
            f"invalid set name {name!r}: use 1-64 characters from [A-Za-z0-9._-], starting with a letter "
            "or digit (it becomes a directory name under ood/)"
        )
    return name


@dataclass
class ImageSet:
    """One split: uint8 images (N, C, H, W) with C in {1, 3}, int64 labels indexing ``class_names``."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        where = f"ImageSet {self.name!r}"
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise DatasetFormatError(f"{where}: images and labels must be torch.Tensor")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] not in (1, 3):
            raise DatasetFormatError(
                f"{where}: images must be uint8 of shape (N, C, H, W) with C in {{1, 3}}, got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DatasetFormatError(
                f"{where}: labels must be int64 of shape (N,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DatasetFormatError(
                f"{where}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        self.class_names = list(self.class_names)
        if not self.class_names or not all(isinstance(c, str) and c for c in self.class_names):
            raise DatasetFormatError(f"{where}: class_names must be a non-empty list of non-empty strings")
        if len(set(self.class_names)) != len(self.class_names):
            raise DatasetFormatError(f"{where}: duplicate class names in {self.class_names}")
        if self.labels.numel():
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(self.class_names):
                raise DatasetFormatError(
                    f"{where}: labels must lie in [0, {len(self.class_names) - 1}], found [{lo}, {hi}]"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, idx: torch.Tensor | np.ndarray | Sequence[int], name: str | None = None) -> ImageSet:
        """A new set with the rows ``idx`` (index tensor/array/list or boolean mask), same class list."""
        index = torch.as_tensor(np.asarray(idx))
        if index.dtype != torch.bool:
            index = index.to(torch.int64)
        return ImageSet(
            name=self.name if name is None else name,
            images=self.images[index].contiguous(),
            labels=self.labels[index].contiguous(),
            class_names=list(self.class_names),
        )

    def class_counts(self) -> list[int]:
        """Images per class, indexed like ``class_names`` (used for stratification checks and meta)."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    @classmethod
    def from_numpy(
        cls, name: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
    ) -> ImageSet:
        """Wrap numpy arrays (copied to contiguous uint8 / int64) as an ImageSet."""
        return cls(
            name=name,
            images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
            labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            class_names=list(class_names),
        )


@dataclass
class DatasetBundle:
    """ID train/val/test plus named OOD sets that all share the ID class list and image shape.

    OOD sets may cover only some classes (STL-10 has no frog), but their labels always index the ID list,
    so one head scores every set. The ID test set is for reporting only, never for model selection.
    """

    train: ImageSet
    val: ImageSet
    test: ImageSet
    ood: dict[str, ImageSet] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr, expected in zip(("train", "val", "test"), ID_SPLITS, strict=True):
            s = getattr(self, attr)
            if not isinstance(s, ImageSet):
                raise DatasetFormatError(f"DatasetBundle.{attr} must be an ImageSet, got {type(s).__name__}")
            if s.name != expected:
                raise DatasetFormatError(f"DatasetBundle.{attr} must be named {expected!r}, got {s.name!r}")
        if len(self.train) == 0:
            raise DatasetFormatError("DatasetBundle: id_train is empty")
        if not isinstance(self.ood, dict):
            raise DatasetFormatError("DatasetBundle.ood must be a dict name -> ImageSet")
        if not isinstance(self.meta, dict):
            raise DatasetFormatError("DatasetBundle.meta must be a dict")
        ref_classes, ref_shape = self.train.class_names, self.train.image_shape
        for key, s in self.all_sets().items():
            if key.startswith("ood/"):
                validate_set_name(key[4:])
                if not isinstance(s, ImageSet) or s.name != key[4:]:
                    raise DatasetFormatError(
                        f"DatasetBundle.ood[{key[4:]!r}] must be an ImageSet with that name"
                    )
            if s.class_names != ref_classes:
                raise DatasetFormatError(
                    f"set {s.name!r} has class_names {s.class_names}, expected the ID list {ref_classes} "
                    "(OOD labels must index the ID class list)"
                )
            if s.image_shape != ref_shape:
                raise DatasetFormatError(
                    f"set {s.name!r} has image shape {s.image_shape}, expected {ref_shape} like id_train"
                )

    @property
    def class_names(self) -> list[str]:
        return list(self.train.class_names)

    def all_sets(self) -> dict[str, ImageSet]:
        """Every set keyed by its directory under the bundle root (``id_train`` ... ``ood/<name>``)."""
        out = {"id_train": self.train, "id_val": self.val, "id_test": self.test}
        out.update({f"ood/{k}": v for k, v in self.ood.items()})
        return out


# ----------------------------------------------------------------------------------------------- disk


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_bundle(bundle: DatasetBundle, tmp: Path) -> None:
    try:
        meta_json = json.loads(json.dumps(bundle.meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(f"DatasetBundle.meta must be JSON-serialisable: {e}") from e
    splits: dict[str, Any] = {}
    for key, s in bundle.all_sets().items():
        d = tmp / key
        d.mkdir(parents=True)
        files = {}
        for fname, arr in (("images.npy", s.images), ("labels.npy", s.labels)):
            _save_npy(d / fname, arr.detach().cpu().contiguous().numpy())
            files[fname] = {"sha256": _sha256(d / fname), "bytes": (d / fname).stat().st_size}
        splits[key] = {
            "count": len(s),
            "shape": list(s.images.shape),
            "class_counts": s.class_counts(),
            "files": files,
        }
    manifest = {
        "format_version": FORMAT_VERSION,
        "class_names": bundle.class_names,
        "image_shape": list(bundle.train.image_shape),
        "ood_names": list(bundle.ood),
        "meta": meta_json,
        "splits": splits,
    }
    with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_bundle(bundle: DatasetBundle, root: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``bundle`` to ``root`` atomically and return the manifest.

    Everything goes into a sibling temp dir first and is renamed into place, so readers (and a crashed
    run) see either the old complete bundle or the new complete one, never half files. An existing ``root``
    is replaced only if it is empty or a previous bundle (has a manifest) -- never an unrelated directory.
    """
    if not isinstance(bundle, DatasetBundle):
        raise TypeError(f"save_bundle expects a DatasetBundle, got {type(bundle).__name__}")
    for s in bundle.all_sets().values():  # fields may have been mutated since construction
        if isinstance(s, ImageSet):
            s.__post_init__()
    bundle.__post_init__()
    root = Path(root).absolute()
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory; refusing to replace it")
        if any(root.iterdir()) and not (root / MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"{root} is a non-empty directory without {MANIFEST_NAME}; refusing to replace it "
                "(choose an empty or new output directory)"
            )
    with atomic_dir(root) as tmp:
        _write_bundle(bundle, tmp)
    with open(root / MANIFEST_NAME, encoding="utf-8") as f:
        return json.load(f)


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and sanity-check ``root/manifest.json`` (no array files are read)."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: dataset directory does not exist. {_FIX_HINT}")
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: missing manifest (not a dataset bundle, or a partial copy). {_FIX_HINT}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"{path}: unreadable manifest ({e}). {_FIX_HINT}") from e
    if not isinstance(manifest, dict):
        raise DatasetFormatError(f"{path}: manifest must be a JSON object. {_FIX_HINT}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION}). {_FIX_HINT}"
        )
    for key, typ in (("class_names", list), ("meta", dict), ("splits", dict), ("ood_names", list)):
        if not isinstance(manifest.get(key), typ):
            raise DatasetFormatError(f"{path}: field {key!r} missing or not a {typ.__name__}. {_FIX_HINT}")
    missing = [s for s in ID_SPLITS if s not in manifest["splits"]]
    if missing:
        raise DatasetFormatError(f"{path}: splits {missing} missing from the manifest. {_FIX_HINT}")
    for name in manifest["ood_names"]:
        try:
            validate_set_name(name)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{path}: {e}. {_FIX_HINT}") from None
        if f"ood/{name}" not in manifest["splits"]:
            raise DatasetFormatError(f"{path}: OOD set {name!r} listed but has no split entry. {_FIX_HINT}")
    return manifest


def _load_array(path: Path, entry: dict[str, Any], verify: bool) -> np.ndarray:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file missing. {_FIX_HINT}")
    info = entry.get("files", {}).get(path.name)
    if not isinstance(info, dict) or "sha256" not in info:
        raise DatasetFormatError(f"{path}: no sha256 recorded in the manifest. {_FIX_HINT}")
    if verify:
        actual = _sha256(path)
        if actual != info["sha256"]:
            raise DatasetFormatError(
                f"{path}: sha256 mismatch (manifest {info['sha256'][:12]}..., file {actual[:12]}...): "
                f"the file was modified or truncated. {_FIX_HINT}"
            )
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetFormatError(f"{path}: not a readable .npy array ({e}). {_FIX_HINT}") from e


def _load_set(root: Path, key: str, entry: Any, class_names: list[str], verify: bool) -> ImageSet:
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{root / MANIFEST_NAME}: split {key!r} entry malformed. {_FIX_HINT}")
    images = _load_array(root / key / "images.npy", entry, verify)
    labels = _load_array(root / key / "labels.npy", entry, verify)
    img_path, lab_path = root / key / "images.npy", root / key / "labels.npy"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DatasetFormatError(
            f"{img_path}: expected uint8 (N, C, H, W) with C in {{1, 3}}, got {images.dtype} {images.shape}. "
            f"{_FIX_HINT}"
        )
    if list(images.shape) != list(entry.get("shape", [])):
        raise DatasetFormatError(
            f"{img_path}: shape {list(images.shape)} does not match the manifest's {entry.get('shape')}. "
            f"{_FIX_HINT}"
        )
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise DatasetFormatError(
            f"{lab_path}: expected int64 (N,), got {labels.dtype} {labels.shape}. {_FIX_HINT}"
        )
    if labels.shape[0] != images.shape[0] or labels.shape[0] != entry.get("count"):
        raise DatasetFormatError(
            f"{lab_path}: {labels.shape[0]} labels, {images.shape[0]} images, manifest count "
            f"{entry.get('count')} -- they must agree. {_FIX_HINT}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DatasetFormatError(
            f"{lab_path}: labels out of range [{labels.min()}, {labels.max()}] for {len(class_names)} "
            f"classes. {_FIX_HINT}"
        )
    name = key[4:] if key.startswith("ood/") else key
    return ImageSet(name, torch.from_numpy(images), torch.from_numpy(labels), list(class_names))


def load_bundle(root: str | os.PathLike[str], verify_hashes: bool = True) -> DatasetBundle:
    """Read and validate a bundle written by :func:`save_bundle`; raises :class:`DatasetFormatError`."""
    root = Path(root)
    manifest = read_manifest(root)
    class_names = manifest["class_names"]
    sets = {
        key: _load_set(root, key, manifest["splits"][key], class_names, verify_hashes)
        for key in (*ID_SPLITS, *(f"ood/{n}" for n in manifest["ood_names"]))
    }
    try:
        return DatasetBundle(
            train=sets["id_train"],
            val=sets["id_val"],
            test=sets["id_test"],
            ood={k[4:]: v for k, v in sets.items() if k.startswith("ood/")},
            meta=manifest["meta"],
        )
    except DatasetFormatError as e:
        raise DatasetFormatError(f"{root / MANIFEST_NAME}: {e}. {_FIX_HINT}") from None


def bundle_digest(root: str | os.PathLike[str]) -> str:
    """A stable sha256 identifying the bundle's content, for lineage tags.

    Computed from the manifest's canonical JSON without ``meta``: format version, class names, OOD names
    and every split's count, shape and file hashes. So it is cheap (reads only the manifest), independent
    of file timestamps, JSON whitespace and where the source files lived (paths in ``meta``), and changes
    whenever any pixel or label does. It trusts the manifest; :func:`load_bundle` verifies the files.
    """
    manifest = read_manifest(root)
    content = {k: v for k, v in manifest.items() if k != "meta"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
