"""Decoding one image file into an RGB PIL image, with errors that name the file.

Every path that reads images (the ImageFolder data set, ``cvt predict``, attention maps) goes
through :func:`load_image`, so they share the same handling of EXIF orientation, 16-bit and
alpha images, huge images and broken files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cvt.errors import DataError

# the extensions torchvision's ImageFolder accepts; other files in a class folder are ignored
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)  # fmt: skip

# integer modes PIL uses for 16-bit (and 32-bit) grayscale PNG/TIFF files
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# modes whose pixel values Image.reduce may average (it refuses I;16 and would average palette indices)
_AVERAGEABLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F")


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit grayscale keeps its top 8 bits (PIL would clip at 255)."""
    if img.mode in _WIDE_INT_MODES:
        # PIL's own I;16 → RGB conversion clips at 255, which turns most 16-bit images white
        values = np.asarray(img)  # (H, W) uint16 or int32 holding 0..65535
        img = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)  # float images: assume 0..1
        img = Image.fromarray(np.clip(values * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    # RGBA/LA/P-with-transparency: alpha is dropped, as torchvision's default loader does
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Read an image file as an upright 8-bit RGB PIL image.

    Applies the EXIF orientation, converts grayscale / RGBA / palette / CMYK / 16-bit images to RGB.
    With ``min_side``, a large image is decoded at reduced size (JPEG ``draft``: DCT scaling, so a
    10,000×10,000 JPEG never exists in memory at full size) and box-reduced by an integer factor so
    that its shorter side stays at least ``min_side`` — the caller's resize then sees few pixels.
    Raises :class:`~cvt.errors.DataError` naming the file when it is missing, empty, not an image,
    truncated or corrupt.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"cannot read image {path}: the file is empty (0 bytes)")
        with Image.open(path) as img:
            if min_side is not None and img.format == "JPEG":
                # picks the largest DCT scale 1/2..1/8 keeping both sides >= min_side (no full decode)
                img.draft("RGB", (min_side, min_side))
            img.load()  # decode now so a truncated or corrupt file fails here, naming the path
            img = ImageOps.exif_transpose(img)
            factor = min(img.size) // min_side if min_side else 1
            if factor >= 2:
                if img.mode not in _AVERAGEABLE_MODES:
                    img = _to_rgb(img)  # palette indices or 1-bit pixels cannot be averaged
                img = img.reduce(factor)  # box filter, before the RGB copy: cheap and alias-free
            return _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"cannot read image {path}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError (not an image), "image file is truncated", broken chunks …
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
