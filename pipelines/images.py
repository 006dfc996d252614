"""Decode one image file and resize it to a small RGB square: the pixels of the ingest job.

Pure Pillow and numpy. ``to_pixels`` returns (size, size, 3) uint8 in row-major HWC order, or
raises ``BadImage`` with a one-line reason that the job stores in its quarantine table.

    >>> pixels, (w, h) = to_pixels(open("n01440764_10026.JPEG", "rb").read(), size=64)
    >>> pixels.shape, pixels.dtype
    ((64, 64, 3), dtype('uint8'))

Resize modes:
- ``squash`` (default): the whole image to size x size with a box filter, ignoring the aspect ratio,
  as the Downsampled-ImageNet datasets did (Chrabaszcz et al. 2017).
- ``crop``: the central square (side = the shorter side), then the box filter.

With ``draft=True`` a JPEG is decoded at a reduced scale by libjpeg's DCT scaling (1/2, 1/4 or 1/8),
never below the output size, which is several times faster than a full
decode; tests/test_images.py states and checks how close it stays to full decode + the same resize.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

RESIZE_MODES = ("squash", "crop")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold; ImageNet's largest is ~12M
DRAFT_MARGIN = 1  # decode JPEGs at no less than the output size, then the box filter
WHITE = (255, 255, 255)


class BadImage(ValueError):
    """A file that cannot become an image; the message is the quarantine reason."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image: unrecognized file format") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a property of the file
        raise BadImage(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"invalid declared size {w}x{h}")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: declared {w}x{h} pixels, over the limit {max_pixels}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """CMYK, grayscale, palette, 16-bit and alpha images to RGB; transparency over white."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the top 8 bits rather than clipping everything above 255
        arr = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    return img.convert("RGB")


def to_pixels(
    data: bytes,
    size: int = 64,
    resize: str = "squash",
    draft: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize: returns ((size, size, 3) uint8 HWC, (orig_width, orig_height))."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; choose from {RESIZE_MODES}")
    img = _open(data, max_pixels)
    orig = img.size
    try:
        if draft and img.format == "JPEG":
            img.draft("RGB", (size * DRAFT_MARGIN, size * DRAFT_MARGIN))
        img.load()
        img = _to_rgb(img)
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data: a property of the file
        raise BadImage(f"corrupt or truncated image data: {type(e).__name__}: {e}") from None
    w, h = img.size
    box = (0, 0, w, h)
    if resize == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
    out = img.resize((size, size), Image.Resampling.BOX, box=box)
    return np.asarray(out, dtype=np.uint8), orig
