"""Read the user's own ``<dir>/<class>/<image>`` folders into uint8 ImageSets.

Images are decoded once with PIL (EXIF orientation applied), converted to RGB (or L with
``grayscale=True``; transparency is dropped), and brought to ``image_size`` x ``image_size``:
``resize="center_crop"`` (default) scales the shorter side to ``image_size`` and crops the centre, like
torchvision's Resize + CenterCrop; ``"stretch"`` resizes both sides ignoring aspect; ``"pad"`` fits the
longer side and pads with black. Resampling is bicubic with antialiasing (PIL's default reducer).

Checked before any image is decoded (:func:`scan_image_folder`), each a :class:`DatasetFormatError` naming
the folder or file and the fix: a class folder without image files (it would become a phantom class), a
folder or file symlink that resolves outside the data folder (unless ``follow_symlinks``), a class folder
that is not an ID class. Each image's size is read from its header and one above ``max_pixels`` is refused
before decoding (:class:`ImageTooLargeError`; PIL's ``Image.MAX_IMAGE_PIXELS`` is set to the same limit so a
decompression bomb raises the same clean error).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from daft_core.errors import DatasetFormatError

from .format import ImageSet

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
RESIZE_MODES = ("center_crop", "stretch", "pad")
DEFAULT_MAX_PIXELS = 40_000_000  # width x height; ~ a 7700 x 5200 photo, 120 MB decoded as RGB


class BadImageError(DatasetFormatError):
    """An image file could not be decoded; the message names the file (``on_bad_image="skip"`` skips it)."""


class ImageTooLargeError(DatasetFormatError):
    """An image's header declares more pixels than ``max_pixels``; never skipped, the message names it."""


def _inside(path: Path, boundary: Path) -> bool:
    return path == boundary or boundary in path.parents


def _check_link(path: Path, boundary: Path, follow_symlinks: bool) -> None:
    """A symlink whose target lies outside ``boundary`` (resolved) is refused unless ``follow_symlinks``."""
    if follow_symlinks or not path.is_symlink():
        return
    target = path.resolve()
    if not _inside(target, boundary):
        raise DatasetFormatError(
            f"{path} is a symlink to {target}, outside the data folder {boundary}; refused because "
            "data.follow_symlinks is false: copy it into the folder, or set data.follow_symlinks: true "
            "if the link is intended"
        )


def scan_image_folder(
    directory: str | os.PathLike[str],
    name: str,
    *,
    boundary: str | os.PathLike[str] | None = None,
    follow_symlinks: bool = False,
) -> dict[str, list[Path]]:
    """class -> image files under ``directory/<class>/`` (recursively, sorted per folder), checked first.

    ``boundary`` is the data folder symlinks must stay inside (default: ``directory`` itself); with
    ``follow_symlinks`` they may point anywhere. Sub-folder symlinks inside a class are followed (each real
    folder once). Raises :class:`DatasetFormatError` naming the folder for a class folder that holds no
    image files, and for a symlink that leaves ``boundary``; ``FileNotFoundError`` for a missing folder.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {d} (set {name!r}) does not exist or is not a directory")
    bound = Path(boundary if boundary is not None else d).resolve()
    if not follow_symlinks and not _inside(d.resolve(), bound):
        raise DatasetFormatError(
            f"{d} (set {name!r}) resolves to {d.resolve()}, outside the data folder {bound} (a symlink); "
            "refused because data.follow_symlinks is false: move the folder in, or set "
            "data.follow_symlinks: true if the link is intended"
        )
    out: dict[str, list[Path]] = {}
    for cls in list_classes(d):
        top = d / cls
        _check_link(top, bound, follow_symlinks)
        files: list[Path] = []
        seen: set[Path] = set()
        stack = [top]
        while stack:
            folder = stack.pop()
            real = folder.resolve()
            if real in seen:  # a link back to a folder already read (or a cycle)
                continue
            seen.add(real)
            subdirs = []
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    _check_link(entry, bound, follow_symlinks)
                    subdirs.append(entry)
                elif entry.suffix.lower() in IMAGE_EXTENSIONS:
                    _check_link(entry, bound, follow_symlinks)
                    files.append(entry)
            stack.extend(reversed(subdirs))
        if not files:
            raise DatasetFormatError(
                f"class folder {top} (set {name!r}) holds no image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); an empty class folder would become a class with "
                "no examples: add images to it or remove the folder"
            )
        out[cls] = files  # os.walk's top-down order: a folder's files (sorted), then each sub-folder
    return out


def list_classes(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the non-hidden sub-directories: the class names of an image folder."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"image folder {d} does not exist or is not a directory")
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(
    directory: str | os.PathLike[str],
    *,
    boundary: str | os.PathLike[str] | None = None,
    follow_symlinks: bool = False,
) -> list[tuple[Path, str]]:
    """(file, class) for every image file under ``directory/<class>/`` (recursively; classes sorted, each
    folder's files sorted, then its sub-folders), after the checks of :func:`scan_image_folder`."""
    found = scan_image_folder(
        directory, Path(directory).name, boundary=boundary, follow_symlinks=follow_symlinks
    )
    return [(f, cls) for cls, files in found.items() for f in files]


@contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``max_pixels`` for the block (restored after), its warning
    silenced: :func:`decode_image` refuses anything above the limit itself, naming the file."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _too_large(path: Any, size: str, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{path}: image {size} is above data.max_pixels={max_pixels}; refused before decoding "
        "(a huge or malicious file would exhaust memory): downscale the image, remove it, or raise "
        "data.max_pixels"
    )


def decode_image(
    path: str | os.PathLike[str],
    image_size: tuple[int, int],
    grayscale: bool,
    resize: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one file to uint8 (C, H, W); raises :class:`BadImageError` naming the file if it can't, and
    :class:`ImageTooLargeError` (from the header, before decoding) if it has more than ``max_pixels``."""
    from PIL import Image, ImageOps

    h, w = image_size
    try:
        with pil_pixel_limit(max_pixels), Image.open(path) as im:
            width, height = im.size  # from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise _too_large(path, f"of {width} x {height} = {width * height} pixels", max_pixels)
            im.load()
            im = ImageOps.exif_transpose(im)
            im = im.convert("L" if grayscale else "RGB")
    except Image.DecompressionBombError as e:  # PIL's own check at open (twice the limit)
        raise _too_large(path, f"size ({e})", max_pixels) from e
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, DatasetFormatError):
            raise
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
    boundary: str | os.PathLike[str] | None = None,
    follow_symlinks: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    files: Mapping[str, list[Path]] | None = None,
) -> tuple[ImageSet, dict[str, Any]]:
    """Read ``directory/<class>/*`` with labels indexing ``class_names`` (the ID list).

    A class folder not in ``class_names`` is an error naming the extra classes (OOD sets may cover a
    subset, never more). ``on_bad_image="skip"`` skips undecodable files and reports them in the returned
    info (``skipped``, ``skipped_files``); ``"error"`` raises :class:`BadImageError` naming the file.
    ``boundary`` / ``follow_symlinks``: see :func:`scan_image_folder`; ``max_pixels``: see
    :func:`decode_image` (an over-limit image is an error even with ``on_bad_image="skip"``). ``files``:
    the result of :func:`scan_image_folder` when the caller has already scanned (and checked) the folder.
    """
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not isinstance(follow_symlinks, bool):
        raise ValueError(f"follow_symlinks must be a bool, got {follow_symlinks!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    directory = Path(directory)
    found = files
    if found is None:
        found = scan_image_folder(directory, name, boundary=boundary, follow_symlinks=follow_symlinks)
    check_known_classes(directory, name, found, class_names)
    index = {c: i for i, c in enumerate(class_names)}
    images, labels, skipped = [], [], []
    for path, cls in ((f, c) for c, files in found.items() for f in files):
        try:
            images.append(decode_image(path, size, grayscale, resize, max_pixels))
        except BadImageError:
            if on_bad_image == "error":
                raise
            skipped.append(str(path))
            log.warning("skipping undecodable image %s", path)
            continue
        labels.append(index[cls])
    if not images:
        raise DatasetFormatError(
            f"{directory} (set {name!r}): no readable images found under <class>/ sub-folders "
            "(expected <folder>/<class>/<image>)"
        )
    ds = ImageSet.from_numpy(name, np.stack(images), np.asarray(labels, dtype=np.int64), class_names)
    info = {"path": str(directory), "count": len(ds), "skipped": len(skipped), "skipped_files": skipped[:100]}
    return ds, info


def check_known_classes(
    directory: str | os.PathLike[str], name: str, found: Any, class_names: Sequence[str]
) -> None:
    """A class folder of a val/test/OOD set that id_train does not have is an error naming it."""
    extra = sorted(set(found) - set(class_names))
    if extra:
        raise DatasetFormatError(
            f"{directory} (set {name!r}) has class folders {extra} that are not ID classes "
            f"{list(class_names)} (the class folders of id_train); "
            "OOD/val/test folders may only use the ID class names (rename or remove those folders)"
        )
