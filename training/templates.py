"""Every class's weights drawn as a picture, as in "Breaking Linear Classifiers on ImageNet".

Row W[c] (D = H*W*3 weights on HWC pixels) is reshaped to an H x W x 3 image and stretched to
0..255 on its own (min -> 0, max -> 255), which is how the blog shows its templates. The classes
are laid out in a grid, each titled with its name.

    >>> png = render(W, (64, 64, 3), ["tench", "goldfish"])     # PNG bytes
"""

from __future__ import annotations

import io
import math

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # no pyplot: no global state, no backend to pick

CELL_INCHES = 1.3  # size of one class's picture and its title in the grid
MAX_TITLE = 18  # characters of a class name shown under its picture


def to_images(W: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """W (C, D) -> uint8 pictures (C, H, W, 3), each row stretched to 0..255 on its own."""
    W = np.asarray(W, dtype=np.float64).reshape(len(W), *shape)
    lo = W.min(axis=(1, 2, 3), keepdims=True)
    span = W.max(axis=(1, 2, 3), keepdims=True) - lo
    scaled = (W - lo) / np.where(span > 0, span, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


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


def render(W: np.ndarray, shape: tuple[int, int, int], names: list[str],
           title: str | None = None) -> bytes:
    """PNG bytes of all C templates in a grid of about sqrt(C) columns, titled with names."""
    if len(names) != len(W):
        raise ValueError(f"{len(W)} templates but {len(names)} names")
    images = to_images(W, shape)
    C, H, Wd = len(images), shape[0], shape[1]
    cols = max(1, math.ceil(math.sqrt(C)))
    rows = math.ceil(C / cols)
    pad, label = max(2, Wd // 16), max(4, H // 4)
    top = 0.4 if title else 0.0
    fig = Figure(figsize=(cols * CELL_INCHES, rows * CELL_INCHES * (H + label) / H + top))
    ax = fig.add_axes((0, 0, 1, 1 - top / fig.get_figheight()))
    ax.imshow(mosaic(images, cols, pad, label), interpolation="nearest", aspect="auto")
    ax.axis("off")
    # one Axes with text labels: fast even for 1000 classes (1000 subplots take minutes)
    for k, name in enumerate(names):
        r, c = divmod(k, cols)
        ax.text(c * (Wd + pad) + Wd / 2, r * (H + label) + H + label / 2, short_name(name),
                ha="center", va="center", fontsize=6.5)
    if title:
        fig.suptitle(title, y=1 - 0.1 / fig.get_figheight(), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
