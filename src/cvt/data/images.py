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
_FLOAT_SLACK = 1e-3  # float pixels this far outside 0..1 are rounding, clipped to it
# modes whose pixel values Image.reduce may average: it refuses I;16, would average palette indices, and
# premultiplies alpha (LA, RGBA), which blackens transparent pixels whose colour the RGB copy keeps
_AVERAGEABLE_MODES = ("L", "RGB", "CMYK", "I", "F")
# the reduced decode stops at this multiple of the caller's size and leaves the rest to its antialiased
# resize, as Pillow's thumbnail(reducing_gap=2) does (reducing to the size itself was 4-19 levels off)
_REDUCING_GAP = 2
# the DCT scales a JPEG decoder offers
_JPEG_SCALES = (8, 4, 2)
# images up to this size (48 MB as RGB) are decoded in full even with a min_side, as the evaluation's
# data sets decode them, so `cvt predict` gives their logits exactly (a reduced decode moved a 12 MP
# photo's logits by ~3 % of their spread); a larger one is reduced, and a JPEG whose sides no DCT
# scale divides is scaled anyway, its last row and column of pixels covering part of a block
_FULL_DECODE_MAX_PIXELS = 4096 * 4096


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit grayscale keeps its top 8 bits (PIL would clip at 255),
    float images are read as 0..1 (:func:`_check_pixel_range` has refused values outside)."""
    if img.mode in _WIDE_INT_MODES:
        # PIL's own I;16 → RGB conversion clips at 255, which turns most 16-bit images white
        values = np.asarray(img)  # (H, W) uint16 or int32 holding 0..65535
        img = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)  # (H, W), 0..1 up to rounding
        img = Image.fromarray(np.clip(values * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    # RGBA/LA/P-with-transparency: alpha is dropped, as torchvision's default loader does
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_pixel_range(img: Image.Image, path: Path) -> None:
    """Raise :class:`DataError` naming ``path`` for pixels :func:`_to_rgb` cannot map to 8 bits: a 32-bit
    integer image (mode ``I``) outside 0..65535, a float one (``F``) outside 0..1 (beyond
    :data:`_FLOAT_SLACK`) or with NaN. Clipping them would give a white or black image without a word
    (a 32-bit depth map, floats in 0..255)."""
    if img.mode == "I":
        kind, expected, low, high = "integer", "0..65535", 0.0, 65535.0
    elif img.mode == "F":
        kind, expected, low, high = "float", "0..1", -_FLOAT_SLACK, 1.0 + _FLOAT_SLACK
    else:
        return  # 8-bit and 16-bit modes hold nothing else
    values = np.asarray(img)  # (H, W) int32 or float32
    if img.mode == "F" and np.isnan(values).any():
        raise DataError(f"cannot read image {path}: it has NaN pixels; save it without them")
    least, most = float(values.min()), float(values.max())
    if least < low or most > high:
        raise DataError(
            f"cannot read image {path}: its {kind} pixels range {least:g}..{most:g}, outside the "
            f"{expected} this reader maps to 8 bits; save it as an 8-bit or 16-bit image"
        )


def _divides(factor: int, size: tuple[int, int]) -> bool:
    """Whether ``factor`` divides both sides: reduced by it, the image keeps its exact aspect ratio and
    pixel grid (a partial last pixel changes the aspect, and the eval resize's size and crop with it)."""
    return size[0] % factor == 0 and size[1] % factor == 0


def load_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Read an image file as an upright 8-bit RGB PIL image.

    Applies the EXIF orientation, converts grayscale / RGBA / palette / CMYK / 16-bit images to RGB.
    With ``min_side``, an image of over 4096×4096 pixels is decoded at reduced size (JPEG ``draft``:
    DCT scaling, so a 10,000×10,000 JPEG never exists in memory at full size) and box-reduced by an
    integer factor, its shorter side staying at least twice ``min_side``; smaller ones are decoded in
    full, exactly as without it. The factors divide both sides, so the reduced image has the exact
    aspect ratio and pixel grid of the original and the caller's resize gives from it nearly what it
    gives from the full image; a JPEG whose sides no DCT scale divides is scaled anyway (memory first:
    the geometry is then off by a fraction of a pixel, its last row and column covering part of a
    block).
    Raises :class:`~cvt.errors.DataError` naming the file when it is missing, empty, not an image,
    truncated or corrupt.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"cannot read image {path}: the file is empty (0 bytes)")
        with Image.open(path) as img:
            reduces = bool(min_side) and img.size[0] * img.size[1] > _FULL_DECODE_MAX_PIXELS
            if reduces and img.format == "JPEG":
                scales = [s for s in _JPEG_SCALES if s * _REDUCING_GAP * min_side <= min(img.size)]
                chosen = [s for s in scales if _divides(s, img.size)] or scales[:1]  # memory first
                if chosen:  # draft picks the largest scale keeping both sides >= the size asked
                    img.draft("RGB", (img.size[0] // chosen[0], img.size[1] // chosen[0]))
            img.load()  # decode now so a truncated or corrupt file fails here, naming the path
            img = ImageOps.exif_transpose(img)
            _check_pixel_range(img, path)  # before the reduce, whose averages could bring it into range
            most = min(img.size) // (_REDUCING_GAP * min_side) if reduces else 1
            factor = next((f for f in range(most, 1, -1) if _divides(f, img.size)), 1)
            if factor >= 2:
                if img.mode not in _AVERAGEABLE_MODES:
                    img = _to_rgb(img)  # alpha dropped first; palette indices, 1-bit pixels not averaged
                img = img.reduce(factor)  # box filter, before the RGB copy: cheap and alias-free
            return _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"cannot read image {path}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # UnidentifiedImageError (not an image), "image file is truncated", broken chunks …
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
