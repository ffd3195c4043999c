"""Read the user's own ``<dir>/<class>/<image>`` folders into uint8 ImageSets.

Images are decoded once with PIL (EXIF orientation applied), converted to RGB (or L with
``grayscale=True``; transparency is dropped), and brought to ``image_size`` x ``image_size``:
``resize="center_crop"`` (default) scales the shorter side to ``image_size`` and crops the centre, like
torchvision's Resize + CenterCrop; ``"stretch"`` resizes both sides ignoring aspect; ``"pad"`` fits the
longer side and pads with black. Resampling is bicubic with antialiasing (PIL's default reducer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .format import ImageSet

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
RESIZE_MODES = ("center_crop", "stretch", "pad")


class BadImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


def list_classes(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the non-hidden sub-directories: the class names of an image folder."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {d} does not exist or is not a directory")
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(directory: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """(file, class) for every image file under ``directory/<class>/`` (recursively), sorted by path."""
    out = []
    for cls in list_classes(directory):
        for root, dirs, files in os.walk(Path(directory) / cls):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for f in sorted(files):
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS:
                    out.append((Path(root) / f, cls))
    return out


def decode_image(
    path: str | os.PathLike[str], image_size: tuple[int, int], grayscale: bool, resize: str
) -> np.ndarray:
    """Decode one file to uint8 (C, H, W); raises :class:`BadImageError` naming the file if it can't."""
    from PIL import Image, ImageOps

    h, w = image_size
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = im.convert("L" if grayscale else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    if resize == "stretch":
        im = im.resize((w, h), Image.Resampling.BICUBIC)
    elif resize == "center_crop":
        scale = max(w / im.width, h / im.height)
        nw, nh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - w) // 2, (nh - h) // 2
        im = im.crop((left, top, left + w, top + h))
    elif resize == "pad":
        scale = min(w / im.width, h / im.height)
        nw, nh = max(1, round(im.width * scale)), max(1, round(im.height * scale))
        canvas = Image.new(im.mode, (w, h), 0)
        canvas.paste(im.resize((nw, nh), Image.Resampling.BICUBIC), ((w - nw) // 2, (h - nh) // 2))
        im = canvas
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(
    directory: str | os.PathLike[str],
    name: str,
    class_names: Sequence[str],
    *,
    image_size: int | tuple[int, int] = 64,
    grayscale: bool = False,
    resize: str = "center_crop",
    on_bad_image: str = "error",
) -> tuple[ImageSet, dict[str, Any]]:
    """Read ``directory/<class>/*`` with labels indexing ``class_names`` (the ID list).

    A class folder not in ``class_names`` is an error naming the extra classes (OOD sets may cover a
    subset, never more). ``on_bad_image="skip"`` skips undecodable files and reports them in the returned
    info (``skipped``, ``skipped_files``); ``"error"`` raises :class:`BadImageError` naming the file.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    directory = Path(directory)
    extra = sorted(set(list_classes(directory)) - set(class_names))
    if extra:
        raise ValueError(
            f"{directory} (set {name!r}) has class folders {extra} that are not ID classes "
            f"{list(class_names)}; "
            "OOD/val/test folders may only use the ID class names (rename or remove those folders)"
        )
    index = {c: i for i, c in enumerate(class_names)}
    images, labels, skipped = [], [], []
    for path, cls in list_images(directory):
        try:
            images.append(decode_image(path, size, grayscale, resize))
        except BadImageError:
            if on_bad_image == "error":
                raise
            skipped.append(str(path))
            log.warning("skipping undecodable image %s", path)
            continue
        labels.append(index[cls])
    if not images:
        raise ValueError(f"{directory} (set {name!r}): no readable images found under <class>/ sub-folders")
    ds = ImageSet.from_numpy(name, np.stack(images), np.asarray(labels, dtype=np.int64), class_names)
    info = {"path": str(directory), "count": len(ds), "skipped": len(skipped), "skipped_files": skipped[:100]}
    return ds, info
