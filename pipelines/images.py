"""Decode one image file and resize it to a small RGB square: the pixels of the ingest job.

Pillow, simplejpeg and numpy, no Ray. ``to_pixels`` returns (size, size, 3) uint8 in row-major HWC
order, or raises ``BadImage`` with a one-line reason that the job stores in its quarantine table.
Pillow opens only the raster formats in ``PILLOW_FORMATS``: an EPS or a PDF, whatever its name, is
"not an image", and no external program ever runs.

    >>> pixels, (w, h) = to_pixels(open("n01440764_10026.JPEG", "rb").read(), size=64)
    >>> pixels.shape, pixels.dtype
    ((64, 64, 3), dtype('uint8'))

Resize modes:
- ``squash`` (default): the whole image to size x size with a box filter, ignoring the aspect ratio,
  as the Downsampled-ImageNet datasets did (Chrabaszcz et al. 2017).
- ``crop``: the central square (side = the shorter side), then the box filter.

With ``draft=True`` (the default) a JPEG is decoded at a reduced scale by libjpeg-turbo's DCT
scaling, about twice as fast as a full decode. Baseline and progressive YCbCr and grayscale JPEGs,
nearly all of ImageNet, take the fast path: simplejpeg, with any of libjpeg-turbo's 16 scales
(n/8), the smallest that keeps both sides at least DRAFT_MARGIN x the output size, then a Hamming
filter over exactly the decoded image's share of the picture. Everything else (CMYK, PNG, the odd
formats, anything simplejpeg refuses) goes through Pillow, with its ``draft`` (scales 1/2, 1/4,
1/8) and the same filter. tests/test_images.py states and checks, on real photographs, how close
both stay to a full decode + the box filter; ``draft=False`` is exactly that full decode.

Why not the box filter after scaled decoding: a scaled IDCT keeps detail up to the smaller image's
limit, so a box filter over 1-2 of its pixels lets that detail alias, while the box filter over
5-8 full-size pixels averages it away. On photos (benchmarks/photos.py) the Hamming filter at 1.5x
lands at a mean difference of 1.4 levels from full decode + box (the box at 1x: 3.6), and the share
of the picture matters: a side of 333 pixels at 1/4 decodes to 84 rows, the last one a quarter
real.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

RESIZE_MODES = ("squash", "crop")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold; ImageNet's largest is ~12M
# Scaled decoding keeps both sides >= DRAFT_MARGIN x the output size. Measured on 1,000 photo
# JPEGs, against full decode + box: margin 1.0 gives a mean difference of 1.9 levels but 4.6 at
# worst; 1.5 gives 1.4 and 3.5, about 15% slower to decode.
DRAFT_MARGIN = 1.5
DRAFT_FILTER = Image.Resampling.HAMMING  # after scaled decoding; see the module docstring
FAST_COLORSPACES = ("YCbCr", "Gray")  # what simplejpeg decodes as Pillow would; CMYK/YCCK: Pillow
# The only formats Pillow may open: the rasters image datasets hold (JPEG's opener takes MPO too).
# Anything else, EPS above all (Pillow hands it to Ghostscript, an external program), is refused.
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
WHITE = (255, 255, 255)


Decoded = tuple[Image.Image, float, tuple[int, int]]  # RGB image, its scale, full (W, H)


class BadImage(ValueError):
    """A file that cannot become an image; the message is the quarantine reason."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image: unrecognized or disallowed file format") from None
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


def _scale(full: tuple[int, int], decoded: tuple[int, int]) -> float:
    """The DCT scale n/8 that made the decoded (w, h) of a full-size (W, H); sides round up."""
    (W, H), (w, h) = full, decoded
    for n in range(1, 17):
        if math.ceil(W * n / 8) == w and math.ceil(H * n / 8) == h:
            return n / 8
    raise ValueError(f"{W}x{H} cannot decode to {w}x{h} at any scale n/8")


def fast_jpeg(data: bytes, size: int, max_pixels: int = MAX_PIXELS) -> Decoded | None:
    """simplejpeg's scaled decode of a YCbCr or grayscale JPEG: (RGB image, scale, (W, H)).

    None for anything else, or anything simplejpeg refuses (truncated, corrupt, over the size
    limit): Pillow then decodes it or names the reason.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        H, W, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in FAST_COLORSPACES or not 0 < W * H <= max_pixels:
            return None
        side = math.ceil(size * DRAFT_MARGIN)  # never above the full size: no upscaled decode
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=min(side, H), min_width=min(side, W))
        return Image.fromarray(arr), _scale((W, H), (arr.shape[1], arr.shape[0])), (W, H)
    except Exception:  # noqa: BLE001 - Pillow decides what is wrong with the file
        return None


def _pillow(data: bytes, size: int, draft: bool, max_pixels: int) -> Decoded:
    """Pillow's decode, reduced with ``draft`` for JPEGs: (RGB image, scale, (W, H))."""
    img = _open(data, max_pixels)
    orig = img.size
    try:
        if draft and img.format == "JPEG":
            side = math.ceil(size * DRAFT_MARGIN)
            img.draft("RGB", (side, side))
        img.load()
        return _to_rgb(img), _scale(orig, img.size), orig
    except BadImage:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data: a property of the file
        raise BadImage(f"corrupt or truncated image data: {type(e).__name__}: {e}") from None


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
    fast = fast_jpeg(data, size, max_pixels) if draft else None
    img, scale, (W, H) = fast or _pillow(data, size, draft, max_pixels)
    box = (0, 0, W, H)  # in full-size pixels
    if resize == "crop":
        side = min(W, H)
        left, top = (W - side) // 2, (H - side) // 2
        box = (left, top, left + side, top + side)
    box = tuple(v * scale for v in box)  # the same part of the picture in the decoded image
    out = img.resize((size, size), Image.Resampling.BOX if scale == 1 else DRAFT_FILTER, box=box)
    return np.asarray(out, dtype=np.uint8), (W, H)
