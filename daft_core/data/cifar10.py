"""Readers for CIFAR-10 and its standard OOD companions, from local files only (nothing is downloaded).

Expected under ``root`` (each location can be overridden):

- ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` -- CIFAR-10 python version
- ``stl10_binary/{test_X.bin,test_y.bin}`` -- STL-10 binary version (96x96, labels 1..10)
- ``CIFAR-10.1/cifar10.1_v6_{data,labels}.npy`` (or directly in ``root``) -- CIFAR-10.1 v6
- ``CIFAR-10-C/<corruption>.npy`` + ``CIFAR-10-C/labels.npy`` -- 5 severities x 10,000 images each
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .format import ImageSet
from .splits import resize_uint8

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# STL-10's class_names.txt, label k (1-indexed) is STL10_CLASSES[k - 1]; monkey (8) has no CIFAR class
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_STL_TO_CIFAR_NAME = {"car": "automobile"}
CIFAR10C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip

SOURCES = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract: cifar-10-batches-py/)",
    "stl10": "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (extract; it holds stl10_binary/)",
    "cifar10.1": "https://github.com/modestyachts/CIFAR-10.1 (datasets/cifar10.1_v6_{data,labels}.npy)",
    "cifar10c": "https://zenodo.org/record/2535967 (CIFAR-10-C.tar; extract to CIFAR-10-C/)",
}


class MissingDataError(FileNotFoundError):
    """A required local dataset file is absent; the message says where it is expected and where to get it."""


def _require(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise MissingDataError(
            f"{dataset}: expected file {path} is missing. Nothing is downloaded at run time: fetch it from "
            f"{SOURCES[dataset]} and place it there (or pass the directory explicitly)."
        )
    return path


def require_files(expected: Sequence[tuple[Path, str]]) -> None:
    """Check every expected file up front and name all missing ones at once (with where to get them)."""
    missing = [(p, d) for p, d in expected if not p.is_file()]
    if missing:
        lines = "\n".join(f"  - {p}  ({d}: {SOURCES[d]})" for p, d in missing)
        raise MissingDataError(
            f"{len(missing)} dataset file(s) missing; nothing is downloaded at run time, place them there "
            f"(or pass the directories explicitly):\n{lines}"
        )


class _CifarUnpickler(pickle.Unpickler):
    """Allows only what CIFAR's pickles contain (dicts, lists, bytes, numpy arrays), so a tampered file
    cannot execute code on load."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"disallowed global {module}.{name} in a CIFAR pickle")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python pickle ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in the CIFAR-10 pickle, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> uint8 (N, 3, 32, 32), int64 labels."""
    d = _unpickle(_require(path, "cifar10"))
    data, labels = np.asarray(d.get("data")), np.asarray(d.get("labels"), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected 'data' uint8 (N, 3072) and N 'labels', got {data.dtype} {data.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train_x, train_y, test_x, test_y, class_names) from ``cifar-10-batches-py``."""
    meta = _unpickle(_require(directory / "batches.meta", "cifar10"))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if names != CIFAR10_CLASSES:
        raise ValueError(
            f"{directory / 'batches.meta'}: label_names {names} are not CIFAR-10's {CIFAR10_CLASSES}"
        )
    parts = [read_cifar10_batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read_cifar10_batch(directory / "test_batch")
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return train_x, train_y, test_x, test_y, names


def read_stl10(directory: Path, split: str = "test", image_size: int = 32) -> tuple[ImageSet, dict[str, Any]]:
    """STL-10 binary ``<split>_X.bin``/``<split>_y.bin`` without monkeys, labels mapped to CIFAR-10's indices
    (car -> automobile), resized from 96 to ``image_size`` by area averaging."""
    xp = _require(directory / f"{split}_X.bin", "stl10")
    yp = _require(directory / f"{split}_y.bin", "stl10")
    raw = np.fromfile(xp, dtype=np.uint8)
    y = np.fromfile(yp, dtype=np.uint8).astype(np.int64)
    if raw.size != len(y) * 3 * 96 * 96:
        raise ValueError(f"{xp}: {raw.size} bytes do not hold {len(y)} images of 3x96x96 (see {yp})")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{yp}: STL-10 labels must be 1..10, found [{y.min()}, {y.max()}]")
    # stored column-major per channel: (N, C, W, H) -> (N, C, H, W)
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    as_cifar = [_STL_TO_CIFAR_NAME.get(n, n) for n in STL10_CLASSES]
    stl_to_cifar = np.array([CIFAR10_CLASSES.index(n) if n in CIFAR10_CLASSES else -1 for n in as_cifar])
    mapped = stl_to_cifar[y - 1]
    keep = mapped >= 0
    x = resize_uint8(x[keep], (image_size, image_size))
    ds = ImageSet.from_numpy("stl10", x, mapped[keep], CIFAR10_CLASSES)
    info = {"path": str(directory), "split": split, "dropped_monkey": int((~keep).sum()), "count": len(ds)}
    return ds, info


def read_cifar101(directory: Path, version: str = "v6") -> tuple[ImageSet, dict[str, Any]]:
    """CIFAR-10.1 (same classes and indices as CIFAR-10), NHWC uint8 -> NCHW."""
    dp = directory / f"cifar10.1_{version}_data.npy"
    lp = directory / f"cifar10.1_{version}_labels.npy"
    _require(dp, "cifar10.1")
    _require(lp, "cifar10.1")
    x, y = np.load(dp, allow_pickle=False), np.load(lp, allow_pickle=False).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise ValueError(f"{dp}: expected uint8 (N, 32, 32, 3) matching {lp}, got {x.dtype} {x.shape}")
    ds = ImageSet.from_numpy("cifar10.1", x.transpose(0, 3, 1, 2), y, CIFAR10_CLASSES)
    return ds, {"path": str(directory), "version": version, "count": len(ds)}


def read_cifar10c(
    directory: Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    *,
    mode: str = "combined",
    max_per_corruption: int | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, ImageSet], dict[str, Any]]:
    """CIFAR-10-C sets. Rows ``(s-1)*10000 : s*10000`` of ``<corruption>.npy`` hold severity ``s``.

    ``mode="combined"``: one set ``cifar10c-s<k>`` per severity, concatenating the corruptions;
    ``"per_corruption"``: ``cifar10c-<corruption>-s<k>``. ``max_per_corruption`` keeps a seeded random
    subset (the same image indices for every corruption) to bound the bundle's size.
    """
    if mode not in ("combined", "per_corruption"):
        raise ValueError(f"cifar10c mode must be 'combined' or 'per_corruption', got {mode!r}")
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad or not severities:
        raise ValueError(f"CIFAR-10-C severities must be in 1..5, got {list(severities)}")
    labels_all = np.load(_require(directory / "labels.npy", "cifar10c"), allow_pickle=False).astype(np.int64)
    if len(labels_all) % 5:
        raise ValueError(f"{directory / 'labels.npy'}: length {len(labels_all)} is not 5 severities x N")
    per = len(labels_all) // 5
    pick = np.arange(per)
    if max_per_corruption is not None and max_per_corruption < per:
        pick = np.sort((rng or np.random.default_rng(0)).choice(per, size=max_per_corruption, replace=False))
    out: dict[str, ImageSet] = {}
    for s in severities:
        rows = (s - 1) * per + pick
        xs, ys = [], []
        for c in corruptions:
            path = _require(directory / f"{c}.npy", "cifar10c")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype != np.uint8 or arr.shape[1:] != (32, 32, 3) or len(arr) != len(labels_all):
                raise ValueError(
                    f"{path}: expected uint8 ({len(labels_all)}, 32, 32, 3), got {arr.dtype} {arr.shape}"
                )
            x = np.ascontiguousarray(arr[rows].transpose(0, 3, 1, 2))
            if mode == "per_corruption":
                name = f"cifar10c-{c}-s{s}"
                out[name] = ImageSet.from_numpy(name, x, labels_all[rows], CIFAR10_CLASSES)
            else:
                xs.append(x)
                ys.append(labels_all[rows])
        if mode == "combined":
            name = f"cifar10c-s{s}"
            out[name] = ImageSet.from_numpy(name, np.concatenate(xs), np.concatenate(ys), CIFAR10_CLASSES)
    info = {
        "path": str(directory),
        "corruptions": list(corruptions),
        "severities": list(severities),
        "mode": mode,
        "per_corruption": len(pick),
    }
    return out, info


def find_cifar101_dir(root: Path) -> Path:
    """CIFAR-10.1 files may sit in ``root/CIFAR-10.1``, ``root/CIFAR-10.1/datasets`` or ``root`` itself."""
    for cand in (root / "CIFAR-10.1", root / "CIFAR-10.1" / "datasets", root):
        if any(cand.glob("cifar10.1_*_data.npy")):
            return cand
    return root / "CIFAR-10.1"
