"""OOD set ``printed``: machine-printed digits, converted exactly like the UCI handwritten ones.

Digits 0-9 are rendered with the TrueType fonts that ship inside matplotlib (DejaVu, STIX, Computer
Modern; nothing is downloaded) at a random size, stroke weight, aspect and small rotation, binarised, and
then go through the optdigits preprocessing: the glyph's bounding box is scaled (aspect kept) to fit a
32x32 box and centred (NIST-style normalisation, plus a small position jitter), and the 8x8 image counts the
set pixels in each non-overlapping 4x4 block (0-16), stored with the same uint8 scaling as the ID digits.
Same classes, same pixel statistics pipeline, different "writer": a clean domain shift.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from .digits import DIGIT_CLASSES, counts_to_uint8
from .format import ImageSet
from .splits import rng_for

# Fonts whose digit glyphs are ordinary lining figures (cmmi10 has old-style ones, cmsy/cmex and the STIX
# size/non-unicode variants have none); each candidate is still checked by rendering.
_FONT_PATTERNS = (
    "DejaVuSans*.ttf",
    "DejaVuSerif*.ttf",
    "STIXGeneral*.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)


def bitmap_to_counts(bitmaps: np.ndarray) -> np.ndarray:
    """(N, 32, 32) binary bitmaps -> (N, 8, 8) counts of set pixels per non-overlapping 4x4 block (0..16)."""
    b = np.asarray(bitmaps)
    if b.ndim != 3 or b.shape[1:] != (32, 32):
        raise ValueError(f"expected (N, 32, 32) bitmaps, got {b.shape}")
    return (b != 0).reshape(-1, 8, 4, 8, 4).sum(axis=(2, 4)).astype(np.uint8)


def normalize_bitmap(
    binary: np.ndarray, size: int = 32, *, aspect: float = 1.0, shift: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Scale the set pixels' bounding box to fit ``size`` x ``size`` (aspect kept, then widened by
    ``aspect``), centre it, move it by ``shift`` = (dy, dx) as far as it stays inside, and return bool."""
    from PIL import Image

    ys, xs = np.nonzero(binary)
    if len(ys) == 0:
        raise ValueError("empty bitmap: nothing to normalise")
    crop = np.asarray(binary[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], dtype=np.uint8) * 255
    h, w = crop.shape
    w_eff = w * aspect
    scale = size / max(h, w_eff)
    new_h = min(size, max(1, round(h * scale)))
    new_w = min(size, max(1, round(w_eff * scale)))
    small = np.asarray(Image.fromarray(crop).resize((new_w, new_h), Image.Resampling.BOX)) >= 128
    out = np.zeros((size, size), dtype=bool)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    top = int(np.clip(top + shift[0], 0, size - new_h))
    left = int(np.clip(left + shift[1], 0, size - new_w))
    out[top : top + new_h, left : left + new_w] = small
    return out


def _matplotlib_ttf_dir() -> Path:
    """matplotlib's bundled font folder, found without importing matplotlib (slow) when possible."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        ttf = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
        if ttf.is_dir():
            return ttf
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=1)
def available_digit_fonts() -> tuple[str, ...]:
    """matplotlib's bundled .ttf files that render ten distinct, non-empty digits (sorted paths)."""
    ttf_dir = _matplotlib_ttf_dir()
    candidates = sorted({p for pat in _FONT_PATTERNS for p in ttf_dir.glob(pat) if "Display" not in p.name})
    good = []
    for path in candidates:
        try:
            glyphs = [_render_glyph(str(path), 40, str(d), 0.0, 0).tobytes() for d in range(10)]
        except (OSError, ValueError):
            continue
        if len(set(glyphs)) == 10:
            good.append(str(path))
    if not good:
        raise RuntimeError(f"no usable digit fonts found in {ttf_dir} (is matplotlib installed completely?)")
    return tuple(good)


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _render_glyph(font_path: str, size: int, text: str, angle: float, stroke: int) -> np.ndarray:
    """Render ``text`` white on black, rotate by ``angle`` degrees and binarise at 50 %."""
    from PIL import Image, ImageDraw

    canvas = 3 * size
    img = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(img).text(
        (canvas / 2, canvas / 2),
        text,
        font=_font(font_path, size),
        fill=255,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    binary = np.asarray(img) >= 128
    if not binary.any():
        raise ValueError(f"{font_path}: glyph {text!r} rendered empty")
    return binary


def render_printed_digits(
    seed: int = 0,
    *,
    n_per_class: int = 60,
    size_range: tuple[int, int] = (20, 64),
    max_rotation: float = 10.0,
    max_shift: int = 2,
    aspect_range: tuple[float, float] = (0.85, 1.15),
    name: str = "printed",
) -> tuple[ImageSet, dict[str, Any]]:
    """Build the ``printed`` OOD set: ``n_per_class`` images per digit, deterministic in ``seed``.

    Fonts are cycled in a seeded order so each font appears about equally often per class; size, stroke
    weight, aspect, rotation (degrees) and shift (in 32x32 pixels) are drawn uniformly per image.
    """
    if n_per_class <= 0:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    fonts = available_digit_fonts()
    rng = rng_for(seed, "printed")
    bitmaps, labels = [], []
    for digit in range(10):
        reps = -(-n_per_class // len(fonts))
        font_order = np.concatenate([rng.permutation(len(fonts)) for _ in range(reps)])[:n_per_class]
        for f in font_order:
            size = int(rng.integers(size_range[0], size_range[1] + 1))
            stroke = int(rng.integers(0, size // 20 + 1))
            angle = float(rng.uniform(-max_rotation, max_rotation))
            aspect = float(rng.uniform(*aspect_range))
            shift = (
                int(rng.integers(-max_shift, max_shift + 1)),
                int(rng.integers(-max_shift, max_shift + 1)),
            )
            glyph = _render_glyph(fonts[f], size, str(digit), angle, stroke)
            bitmaps.append(normalize_bitmap(glyph, 32, aspect=aspect, shift=shift))
            labels.append(digit)
    counts = bitmap_to_counts(np.stack(bitmaps))
    images = counts_to_uint8(counts)[:, None]
    info = {
        "description": "digits rendered from matplotlib's bundled fonts, optdigits preprocessing "
        "(32x32 normalised bitmap -> 8x8 counts of 4x4 blocks)",
        "n_per_class": n_per_class,
        "fonts": [Path(p).name for p in fonts],
        "size_range": list(size_range),
        "max_rotation": max_rotation,
        "max_shift": max_shift,
        "aspect_range": list(aspect_range),
    }
    return ImageSet.from_numpy(name, images, np.asarray(labels, dtype=np.int64), DIGIT_CLASSES), info
