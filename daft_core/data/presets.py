"""Named dataset recipes: ``load_preset(name, ...) -> DatasetBundle`` (what ``prepare_data`` calls).

- ``digits`` (offline default): ID = scikit-learn's 1,797 real handwritten 8x8 digits, stratified into
  train/val/test; OOD = ``printed`` (font-rendered digits, optdigits preprocessing) and ``corrupted``
  (the ID test images under noise/blur/contrast/impulse/shift).
- ``imagefolder``: the user's ``id_train`` / optional ``id_val`` / ``id_test`` / OOD directories.
- ``cifar10``: CIFAR-10 (ID) with STL-10, CIFAR-10.1 and CIFAR-10-C as OOD, from local files only.

Every preset accepts ``extra_ood={"name": dir}`` for more OOD sets read from ``<dir>/<class>/<image>``
folders, stored at the preset's image size and channel count. ID val is carved from ID train where not
given; the ID test set is never used for model selection (that is what val is for).

Checks run before the work (:mod:`.checks`, :mod:`.imagefolder`, :func:`.splits.check_split_sizes`), each a
one-line :class:`DatasetFormatError` naming the folder/file and the fix: empty class folders, fewer than two
classes, an ID class missing from id_val/id_test, a val/test class not in id_train, too few images per class
for the requested fractions, symlinks leaving the data folder (unless ``follow_symlinks``), images above
``max_pixels``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from daft_core.errors import DatasetFormatError

from .checks import check_id_coverage, check_min_classes
from .format import DatasetBundle, ImageSet, validate_set_name
from .imagefolder import DEFAULT_MAX_PIXELS
from .splits import check_split_sizes, rng_for, stratified_split

PathLike = str | os.PathLike[str]
# options every preset takes for its extra_ood folders (imagefolder also uses them for its own folders)
FOLDER_OPTIONS = ("resize", "on_bad_image", "follow_symlinks", "max_pixels")


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _val_split_sizes(class_sizes: dict[str, int], val_fraction: float, source: str, fix: str) -> None:
    check_split_sizes(
        class_sizes,
        (1 - val_fraction, val_fraction),
        ("id_train", "id_val"),
        source=source,
        setting=f"data.val_fraction={val_fraction:g} (id_val carved from id_train)",
        fix=fix,
    )


def _carve_val(
    train: ImageSet,
    val_fraction: float,
    seed: int,
    *,
    source: str = "id_train",
    fix: str = "lower data.val_fraction or add images to that class",
) -> tuple[ImageSet, ImageSet]:
    """Stratified, seeded train/val split of a training set (val never overlaps train); every class must
    be able to give both parts an image (else a :class:`DatasetFormatError` naming the class and the need)."""
    _check_val_fraction(val_fraction)
    sizes = dict(zip(train.class_names, train.class_counts(), strict=True))
    _val_split_sizes(sizes, val_fraction, source, fix)
    tr, va = stratified_split(
        train.labels.numpy(), (1 - val_fraction, val_fraction), rng_for(seed, "val_split")
    )
    return train.subset(tr, "id_train"), train.subset(va, "id_val")


def _add_extra_ood(
    bundle: DatasetBundle,
    extra_ood: Mapping[str, PathLike],
    *,
    resize: str,
    on_bad_image: str,
    follow_symlinks: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    from .imagefolder import read_image_folder

    c, h, w = bundle.train.image_shape
    infos = bundle.meta.setdefault("ood", {})
    for name, path in extra_ood.items():
        validate_set_name(name)
        if name in bundle.ood:
            raise ValueError(f"extra_ood name {name!r} clashes with the preset's OOD set of that name")
        ds, info = read_image_folder(
            path,
            name,
            bundle.class_names,
            image_size=(h, w),
            grayscale=c == 1,
            resize=resize,
            on_bad_image=on_bad_image,
            follow_symlinks=follow_symlinks,
            max_pixels=max_pixels,
        )
        bundle.ood[name] = ds
        infos[name] = {"source": "extra_ood image folder", **info}


def build_digits(
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    printed: bool = True,
    printed_per_class: int = 60,
    corruptions: str | None = "combined",
    corruption_kinds: Sequence[str] | None = None,
    corruption_severity: int = 3,
) -> DatasetBundle:
    """Real handwritten digits as ID; ``printed`` and ``corrupted`` OOD sets, all deterministic in ``seed``.

    ``fractions`` = (train, val, test). ``corruptions``: "combined" (one set ``corrupted``), "per_kind"
    (``corrupted-<kind>``), "both", or None for none.
    """
    from .corruptions import CORRUPTIONS, corrupt_set
    from .digits import digits_id_splits
    from .printed import render_printed_digits

    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {list(fractions)}")
    train, val, test, id_info = digits_id_splits(seed, tuple(float(f) for f in fractions))  # type: ignore[arg-type]
    ood: dict[str, ImageSet] = {}
    ood_info: dict[str, Any] = {}
    if printed:
        ds, info = render_printed_digits(seed, n_per_class=printed_per_class)
        ood["printed"], ood_info["printed"] = ds, info
    if corruptions is not None:
        kinds = tuple(corruption_kinds) if corruption_kinds is not None else tuple(CORRUPTIONS)
        for name, ds in corrupt_set(
            test, seed, kinds=kinds, severity=corruption_severity, mode=corruptions
        ).items():
            ood[name] = ds
            ood_info[name] = {
                "description": "ID test images under common corruptions (same order and labels as id_test)",
                "kinds": list(kinds) if name == "corrupted" else [name.split("-", 1)[1]],
                "severity": corruption_severity,
            }
    meta = {
        "preset": "digits",
        "seed": seed,
        "id": id_info,
        "ood": ood_info,
        "test_used_for_selection": False,
    }
    return DatasetBundle(train=train, val=val, test=test, ood=ood, meta=meta)


def build_imagefolder(
    *,
    seed: int = 0,
    root: PathLike | None = None,
    id_train: PathLike | None = None,
    id_val: PathLike | None = None,
    id_test: PathLike | None = None,
    ood: Mapping[str, PathLike] | None = None,
    image_size: int = 64,
    grayscale: bool = False,
    resize: str = "center_crop",
    on_bad_image: str = "error",
    val_fraction: float = 0.1,
    follow_symlinks: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DatasetBundle:
    """The user's folders. With ``root``, defaults are ``root/id_train``, ``root/id_val`` (if present),
    ``root/id_test`` and every ``root/ood/<name>``; explicit arguments override them.

    Every folder is scanned and checked before any image is decoded (see the module docstring). Symlinks
    must stay inside ``root`` (for a folder under it; otherwise inside that folder) unless
    ``follow_symlinks``; ``max_pixels`` bounds each image (read from its header).
    """
    from .imagefolder import check_known_classes, list_classes, read_image_folder, scan_image_folder

    base = Path(root) if root is not None else None
    if id_train is None and base is not None:
        id_train = base / "id_train"
    if id_test is None and base is not None:
        id_test = base / "id_test"
    if id_val is None and base is not None and (base / "id_val").is_dir():
        id_val = base / "id_val"
    if ood is None and base is not None and (base / "ood").is_dir():
        ood = {n: base / "ood" / n for n in list_classes(base / "ood")}
    if id_train is None or id_test is None:
        raise ValueError(
            "imagefolder preset needs id_train and id_test directories (or root= containing them)"
        )
    if id_val is None:
        _check_val_fraction(val_fraction)

    # -- checks before work: scan every folder, decode nothing yet
    def scan(folder: PathLike, name: str) -> dict[str, list[Path]]:
        return scan_image_folder(
            folder, name, boundary=_boundary(folder, base), follow_symlinks=follow_symlinks
        )

    folders: dict[str, PathLike] = {"id_train": id_train, "id_test": id_test}
    if id_val is not None:
        folders["id_val"] = id_val
    for name in ood or {}:
        validate_set_name(name)
    found = {"id_train": scan(id_train, "id_train")}
    classes = sorted(found["id_train"])
    if not classes:
        raise DatasetFormatError(
            f"{id_train}: no class sub-folders found "
            "(expected id_train/<class>/<image>, one folder per class)"
        )
    check_min_classes(classes, f"{id_train} (id_train)")
    for split in ("id_val", "id_test"):
        if split not in folders:
            continue
        found[split] = scan(folders[split], split)
        check_known_classes(folders[split], split, found[split], classes)
        missing = [c for c in classes if c not in found[split]]
        if missing:
            raise DatasetFormatError(
                f"{folders[split]} ({split}) has no {missing[0]!r} class folder"
                f"{f' (nor {missing[1:6]})' if len(missing) > 1 else ''}, but id_train has that class; "
                f"every ID class needs {split} images or its accuracy silently leaves the class out: add "
                f"{Path(folders[split]) / missing[0]}/ with images, or remove the class from id_train"
            )
    for name, path in (ood or {}).items():
        found[f"ood/{name}"] = scan(path, name)
        check_known_classes(path, name, found[f"ood/{name}"], classes)
    val_fix = (
        "add images to that class, give an id_val folder (data.root/id_val or data.id_val), or change "
        "data.val_fraction"
    )
    if id_val is None:
        sizes = {c: len(files) for c, files in found["id_train"].items()}
        _val_split_sizes(sizes, val_fraction, f"{id_train} (id_train)", val_fix)

    # -- the work
    opts = {
        "image_size": image_size,
        "grayscale": grayscale,
        "resize": resize,
        "on_bad_image": on_bad_image,
        "max_pixels": max_pixels,
    }
    infos: dict[str, Any] = {}
    train, infos["id_train"] = read_image_folder(
        id_train, "id_train", classes, files=found["id_train"], **opts
    )
    emptied = [c for c, n in zip(classes, train.class_counts(), strict=True) if n == 0]
    if emptied:
        raise DatasetFormatError(
            f"{Path(id_train) / emptied[0]} (id_train): every image of class {emptied[0]!r} was skipped as "
            "undecodable (on_bad_image: skip); replace the broken files or remove the class folder"
        )
    if id_val is not None:
        val, infos["id_val"] = read_image_folder(id_val, "id_val", classes, files=found["id_val"], **opts)
    else:
        train, val = _carve_val(train, val_fraction, seed, source=f"{id_train} (id_train)", fix=val_fix)
        infos["id_val"] = {"carved_from": "id_train", "val_fraction": val_fraction, "count": len(val)}
    test, infos["id_test"] = read_image_folder(id_test, "id_test", classes, files=found["id_test"], **opts)
    ood_sets: dict[str, ImageSet] = {}
    ood_info: dict[str, Any] = {}
    for name, path in (ood or {}).items():
        ood_sets[name], ood_info[name] = read_image_folder(
            path, name, classes, files=found[f"ood/{name}"], **opts
        )
    skipped = sum(i.get("skipped", 0) for i in (*infos.values(), *ood_info.values()))
    meta = {
        "preset": "imagefolder",
        "seed": seed,
        "id": {**infos, "image_size": image_size, "grayscale": grayscale, "resize": resize},
        "ood": ood_info,
        "skipped_images": skipped,
        "test_used_for_selection": False,
    }
    bundle = DatasetBundle(train=train, val=val, test=test, ood=ood_sets, meta=meta)
    check_id_coverage(bundle, {k: str(v) for k, v in folders.items()})  # after skipped files, too
    return bundle


def _boundary(folder: PathLike, base: Path | None) -> Path:
    """The data folder symlinks under ``folder`` must stay in: ``base`` (data.root) when ``folder`` is
    written below it, else ``folder`` itself (judged on the paths as written, before links are resolved)."""
    if base is not None:
        written, root = Path(os.path.abspath(folder)), Path(os.path.abspath(base))
        if written == root or root in written.parents:
            return root
    return Path(folder)


def build_cifar10(
    *,
    seed: int = 0,
    root: PathLike | None = None,
    cifar10_dir: PathLike | None = None,
    stl10_dir: PathLike | None = None,
    cifar101_dir: PathLike | None = None,
    cifar10c_dir: PathLike | None = None,
    val_fraction: float = 0.1,
    ood_sets: Sequence[str] = ("stl10", "cifar10.1", "cifar10c"),
    cifar101_version: str = "v6",
    cifar10c_corruptions: Sequence[str] | None = None,
    cifar10c_severities: Sequence[int] = (5,),
    cifar10c_mode: str = "combined",
    cifar10c_max_per_corruption: int | None = 1000,
) -> DatasetBundle:
    """CIFAR-10 train (minus a stratified val) / test as ID; STL-10 test (no monkeys, 96 -> 32),
    CIFAR-10.1 and CIFAR-10-C as OOD. Files come from ``root`` (see :mod:`.cifar10`); nothing is downloaded.
    """
    from .cifar10 import (
        CIFAR10C_CORRUPTIONS,
        find_cifar101_dir,
        read_cifar10,
        read_cifar10c,
        read_cifar101,
        read_stl10,
        require_files,
    )

    base = Path(root) if root is not None else None
    if base is None and cifar10_dir is None:
        raise ValueError(
            "cifar10 preset needs root= (a directory holding cifar-10-batches-py/ etc.) or cifar10_dir="
        )
    unknown = [s for s in ood_sets if s not in ("stl10", "cifar10.1", "cifar10c")]
    if unknown:
        raise ValueError(f"unknown cifar10 OOD sets {unknown}; choose from stl10, cifar10.1, cifar10c")

    def where(explicit: PathLike | None, default: Callable[[Path], Path]) -> Path:
        if explicit is not None:
            return Path(explicit)
        assert base is not None
        return default(base)

    c10 = where(cifar10_dir, lambda b: b / "cifar-10-batches-py")
    stl = where(stl10_dir, lambda b: b / "stl10_binary") if "stl10" in ood_sets else None
    c101 = where(cifar101_dir, find_cifar101_dir) if "cifar10.1" in ood_sets else None
    c10c = where(cifar10c_dir, lambda b: b / "CIFAR-10-C") if "cifar10c" in ood_sets else None
    corruptions = tuple(cifar10c_corruptions) if cifar10c_corruptions is not None else CIFAR10C_CORRUPTIONS
    expected = [(c10 / f, "cifar10") for f in ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)))]
    expected.append((c10 / "test_batch", "cifar10"))
    if stl is not None:
        expected += [(stl / "test_X.bin", "stl10"), (stl / "test_y.bin", "stl10")]
    if c101 is not None:
        expected += [
            (c101 / f"cifar10.1_{cifar101_version}_{k}.npy", "cifar10.1") for k in ("data", "labels")
        ]
    if c10c is not None:
        expected += [(c10c / f"{c}.npy", "cifar10c") for c in ("labels", *corruptions)]
    require_files(expected)  # fail fast, naming every missing file, before decoding anything
    train_x, train_y, test_x, test_y, classes = read_cifar10(c10)
    full = ImageSet.from_numpy("id_train", train_x, train_y, classes)
    train, val = _carve_val(full, val_fraction, seed, source=f"{c10} (cifar10 train batches)")
    test = ImageSet.from_numpy("id_test", test_x, test_y, classes)
    ood: dict[str, ImageSet] = {}
    ood_info: dict[str, Any] = {}
    if stl is not None:
        ood["stl10"], ood_info["stl10"] = read_stl10(stl)
    if c101 is not None:
        ood["cifar10.1"], ood_info["cifar10.1"] = read_cifar101(c101, cifar101_version)
    if c10c is not None:
        sets, info = read_cifar10c(
            c10c,
            corruptions,
            tuple(cifar10c_severities),
            mode=cifar10c_mode,
            max_per_corruption=cifar10c_max_per_corruption,
            rng=rng_for(seed, "cifar10c/subset"),
        )
        ood.update(sets)
        ood_info.update({name: info for name in sets})
    meta = {
        "preset": "cifar10",
        "seed": seed,
        "id": {"path": str(c10), "val_fraction": val_fraction, "val_carved_from": "cifar10 train batches"},
        "ood": ood_info,
        "test_used_for_selection": False,
    }
    return DatasetBundle(train=train, val=val, test=test, ood=ood, meta=meta)


PRESETS: dict[str, Callable[..., DatasetBundle]] = {
    "digits": build_digits,
    "imagefolder": build_imagefolder,
    "cifar10": build_cifar10,
}


def load_preset(
    name: str,
    *,
    seed: int = 0,
    root: PathLike | None = None,
    extra_ood: Mapping[str, PathLike] | None = None,
    **kwargs: Any,
) -> DatasetBundle:
    """Build the named preset in memory (deterministic in ``seed``); save it with ``save_bundle``.

    ``root`` is where a preset's files live (unused by ``digits``, which ships with scikit-learn).
    ``kwargs`` go to the preset's builder (``build_<name>``); unknown ones raise TypeError. ``resize``,
    ``on_bad_image``, ``follow_symlinks`` and ``max_pixels`` (see :mod:`.imagefolder`) also apply to
    ``extra_ood`` folders, for every preset; those folders are scanned and checked before the preset is built.
    """
    from .imagefolder import scan_image_folder

    if name not in PRESETS:
        raise ValueError(f"unknown dataset preset {name!r}; available: {sorted(PRESETS)}")
    folder_opts = {
        "resize": kwargs.get("resize", "center_crop"),
        "on_bad_image": kwargs.get("on_bad_image", "error"),
        "follow_symlinks": kwargs.get("follow_symlinks", False),
        "max_pixels": kwargs.get("max_pixels", DEFAULT_MAX_PIXELS),
    }
    if name != "imagefolder":  # only meaningful for the extra_ood folders there
        kwargs = {k: v for k, v in kwargs.items() if k not in FOLDER_OPTIONS}
    for ood_name, path in (extra_ood or {}).items():  # checks before work: structure and symlinks
        validate_set_name(ood_name)
        scan_image_folder(path, ood_name, follow_symlinks=folder_opts["follow_symlinks"])
    if name == "digits":
        bundle = build_digits(seed=seed, **kwargs)  # ships with scikit-learn: root is not needed
    else:
        bundle = PRESETS[name](seed=seed, root=root, **kwargs)
    if extra_ood:
        _add_extra_ood(bundle, extra_ood, **folder_opts)
        skipped = sum(bundle.meta["ood"][n].get("skipped", 0) for n in extra_ood)
        bundle.meta["skipped_images"] = bundle.meta.get("skipped_images", 0) + skipped
    bundle.__post_init__()
    check_id_coverage(bundle)
    return bundle


def available_presets() -> list[str]:
    return sorted(PRESETS)


__all__ = [
    "PRESETS",
    "available_presets",
    "build_cifar10",
    "build_digits",
    "build_imagefolder",
    "load_preset",
]
