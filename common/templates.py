"""Every class's weights drawn as a picture, as in "Breaking Linear Classifiers on ImageNet".

Row W[c] (D = H*W*3 weights on HWC pixels) is reshaped to an H x W x 3 image and stretched to
0..255 on its own (min -> 0, max -> 255), which is how the blog shows its templates. The classes
are laid out in a grid, each titled with its name.

    >>> png = render(W, (64, 64, 3), ["tench", "goldfish"])     # PNG bytes
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL, BIG = 128, 100  # a class's picture is about 128 pixels wide up to 100 classes, ...
SMALL_CELL = 64  # ... and about 64 beyond (a 1,000-class grid stays about 2,200 pixels wide)
MAX_TITLE = 18  # characters of a class name shown under its picture


def to_images(W: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """W (C, D) -> uint8 pictures (C, H, W, 3), each row stretched to 0..255 on its own."""
    W = np.asarray(W, dtype=np.float64).reshape(len(W), -1)
    lo, hi = W.min(axis=1, keepdims=True), W.max(axis=1, keepdims=True)
    scale = 255.0 / np.where(hi > lo, hi - lo, 1.0)
    out = np.empty(W.shape, np.uint8)
    for k in range(len(W)):  # a row at a time: no (C, D) float64 temporaries
        out[k] = np.rint((W[k] - lo[k]) * scale[k])
    return out.reshape(len(W), *shape)


def short_name(name: str) -> str:
    """The first of a synset's names (``"tench, Tinca tinca"`` -> ``"tench"``), shortened."""
    first = name.split(",")[0].strip()
    return first if len(first) <= MAX_TITLE else first[: MAX_TITLE - 1] + "…"


def mosaic(images: np.ndarray, cols: int, pad: int, label: int) -> np.ndarray:
    """Tile (C, H, W, 3) pictures into one image: ``pad`` white pixels between columns and
    ``label`` white pixels under each row for the titles."""
    C, H, W, _ = images.shape
    rows = math.ceil(C / cols)
    out = np.full((rows * (H + label), cols * (W + pad), 3), 255, np.uint8)
    for k in range(C):
        r, c = divmod(k, cols)
        out[r * (H + label): r * (H + label) + H, c * (W + pad): c * (W + pad) + W] = images[k]
    return out


def font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` pixels: matplotlib ships it, so no system font is needed (and it
    has the × and → that Pillow's own default font lacks)."""
    return ImageFont.truetype(_font_file(), size)


@functools.cache
def _font_file() -> str:
    """matplotlib's DejaVuSans.ttf, found without importing matplotlib (0.2 s)."""
    package = importlib.util.find_spec("matplotlib").submodule_search_locations[0]
    return os.path.join(package, "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")


def render(W: np.ndarray, shape: tuple[int, int, int], names: list[str],
           title: str | None = None) -> bytes:
    """PNG bytes of all C templates in a grid of about sqrt(C) columns, titled with names.

    Each pixel is drawn as a block of whole pixels (no smoothing), the block sized so that a
    class's picture is about CELL pixels wide, or SMALL_CELL beyond BIG classes; drawn with
    Pillow, a few seconds for 1,000 classes (most of it compressing the PNG).
    """
    if len(names) != len(W):
        raise ValueError(f"{len(W)} templates but {len(names)} names")
    scale = max(1, round((CELL if len(W) <= BIG else SMALL_CELL) / shape[1]))
    images = to_images(W, shape)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    C, H, Wd = images.shape[:3]
    cols = max(1, math.ceil(math.sqrt(C)))
    size = 13 if len(W) <= BIG else 9  # label text, pixels
    pad, label, top = max(4, Wd // 16), size + 6, 24 if title else 0
    grid = Image.fromarray(mosaic(images, cols, pad, label))
    page = Image.new("RGB", (grid.width, grid.height + top), "white")
    page.paste(grid, (0, top))
    draw, small = ImageDraw.Draw(page), font(size)
    for k, name in enumerate(names):
        r, c = divmod(k, cols)
        text = fit(draw, short_name(name), small, Wd + pad - 2)
        draw.text((c * (Wd + pad) + Wd / 2, top + r * (H + label) + H + label / 2), text,
                  fill="black", font=small, anchor="mm")
    if title:
        draw.text((page.width / 2, top / 2), title, fill="black", font=font(16), anchor="mm")
    buf = io.BytesIO()
    page.save(buf, format="PNG", compress_level=1)  # a third of the time, 1-10% larger
    return buf.getvalue()


def fit(draw: ImageDraw.ImageDraw, text: str, face, width: float) -> str:
    """``text``, cut with an ellipsis until it is at most ``width`` pixels wide."""
    while len(text) > 1 and draw.textlength(text, font=face) > width:
        text = text[:-2] + "…"
    return text
