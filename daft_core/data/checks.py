"""Checks that data fits what is about to use it, run before any work; each raises a one-line
:class:`DatasetFormatError` naming the set (and folder or model) and the fix.

- :func:`check_labels_fit`: a dataset's classes against a model's outputs (a step calls it after loading
  both, so a 10-class dataset never meets a 3-output head and scores silently wrong).
- :func:`check_min_classes`: at least two ID classes (one class trains to "val accuracy 1.0").
- :func:`check_id_coverage`: every ID class has examples in id_train, id_val and id_test (OOD sets may
  cover a subset).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from daft_core.errors import DatasetFormatError

from .format import DatasetBundle, ImageSet

MIN_CLASSES = 2


def _preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _sets(
    data: DatasetBundle | ImageSet | Mapping[str, ImageSet] | Iterable[ImageSet],
) -> dict[str, ImageSet]:
    if isinstance(data, DatasetBundle):
        return data.all_sets()
    if isinstance(data, ImageSet):
        return {data.name: data}
    if isinstance(data, Mapping):
        return dict(data)
    return {s.name: s for s in data}


def check_labels_fit(
    num_classes: int,
    data: DatasetBundle | ImageSet | Mapping[str, ImageSet] | Iterable[ImageSet],
    where: str,
    *,
    data_where: str | None = None,
) -> None:
    """Raise :class:`DatasetFormatError` unless every set in ``data`` has exactly ``num_classes`` classes
    (and labels below it): the model's head scores ``num_classes`` outputs against these labels.

    ``where`` names the model (its path, e.g. ``models/pretrained/model.pt``); ``data_where`` the dataset
    (e.g. ``data/prepared``) for the message. ``data`` is a bundle, one set, a name -> set mapping (what
    ``evaluate`` takes) or an iterable of sets.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DatasetFormatError(
            f"the model at {where} reports {num_classes!r} outputs; expected a positive int"
        )
    source = f"the dataset at {data_where}" if data_where else "the dataset"
    fix = (
        "the model was built for other data: rebuild it from this dataset (rerun the steps after "
        "prepare_data, e.g. `dvc repro`) or point the step at the dataset it was trained on"
    )
    for key, s in _sets(data).items():
        n = len(s.class_names)
        if n != num_classes:
            raise DatasetFormatError(
                f"{source} (set {key!r}) has {n} classes {_preview(s.class_names)} but the model at {where} "
                f"has {num_classes} outputs; {fix}"
            )
        if len(s) and int(s.labels.max()) >= num_classes:  # ImageSet already bounds labels by its classes
            raise DatasetFormatError(
                f"{source} (set {key!r}) has label {int(s.labels.max())} but the model at {where} has "
                f"{num_classes} outputs (labels 0..{num_classes - 1}); {fix}"
            )


def check_min_classes(class_names: Sequence[str], source: str) -> None:
    """At least :data:`MIN_CLASSES` ID classes; ``source`` names where they came from (a folder)."""
    if len(class_names) < MIN_CLASSES:
        raise DatasetFormatError(
            f"{source} has {len(class_names)} class{'es' if len(class_names) != 1 else ''} "
            f"{list(class_names)}; classification needs at least {MIN_CLASSES} (one class trains to a "
            "meaningless val accuracy of 1.0): add a <class>/ folder of images per class"
        )


def check_id_coverage(bundle: DatasetBundle, folders: Mapping[str, str] | None = None) -> None:
    """Every ID class must have examples in id_train, id_val and id_test; ``folders`` (split -> folder)
    names where each split came from in the message. OOD sets may cover a subset of the classes."""
    folders = folders or {}
    train_counts = bundle.train.class_counts()
    for split in (bundle.train, bundle.val, bundle.test):
        counts = split.class_counts()
        missing = [c for c, n in zip(split.class_names, counts, strict=True) if n == 0]
        if not missing:
            continue
        where = f"{split.name} ({folders[split.name]})" if split.name in folders else split.name
        if split is bundle.train:
            raise DatasetFormatError(
                f"{where} has no usable images of class {missing[0]!r}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; every ID class needs "
                "training images (were they all skipped as undecodable?): add readable images or remove "
                "the class folder"
            )
        had = train_counts[split.class_names.index(missing[0])]
        more = f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else ""
        raise DatasetFormatError(
            f"{where} has no images of class {missing[0]!r}{more}, which id_train "
            f"has ({had} images); every ID class needs {split.name} images or its accuracy is silently "
            f"computed without it: add a {missing[0]}/ folder of images there, or remove the class from "
            "id_train"
        )


__all__ = ["MIN_CLASSES", "check_id_coverage", "check_labels_fit", "check_min_classes"]
