"""Contact sheets in the blog's style: original | amplified perturbation | fooling image.

    >>> png = contact_sheet(examples, class_names, (64, 64, 3), "sign: validation images")
    >>> png = strip(example, class_names, (64, 64, 3))     # one pair, pixels kept exactly

Each row is one (image, target) pair, labelled with class names and probabilities: the model's
class for the original and its probability, the perturbation stretched to the full grey range
(its L-inf in the label), and the stored fooling image with the target's probability.
Contact sheets are drawn on a matplotlib Figure (no pyplot, no display needed), imported when
one is drawn: ``strip`` (what report.show draws) needs Pillow only.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from common.templates import fit, font
from common.templates import short_name as short  # one shortener for every picture

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110  # the charts' resolution: a 9-inch figure about 1,000 pixels wide
SCALE = 4  # strip(): each pixel drawn SCALE x SCALE, so the panels hold the pixels exactly
GAP, TEXT = 12, 16  # strip(): pixels between panels; label text size



def to_png(fig: Figure) -> bytes:
    """A matplotlib Figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def amplify(original: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """The perturbation as an image: 0 is mid-grey, the largest change reaches black or white."""
    delta = stored.astype(np.float64) - original.astype(np.float64)
    scale = max(np.abs(delta).max(), 1e-9)
    return np.clip(127.5 + 127.5 * delta / scale, 0, 255).astype(np.uint8)


def contact_sheet(examples: list[dict], class_names: list[str], shape, title: str) -> bytes:
    """A PNG of rows (original | perturbation x amplification | fooling image).

    ``examples``: dicts with ``original`` and ``stored`` (D,) uint8, ``pred``, ``p_pred``,
    ``target``, ``p_target``, ``fooled_pred``, ``linf``, ``strength``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to pick

    rows = max(len(examples), 1)
    fig = Figure(figsize=(6.0, 2.0 * rows + 0.4))
    axes = fig.subplots(rows, 3, squeeze=False)
    for ax_row, ex in zip(axes, examples):
        fooled = ex["fooled_pred"] == ex["target"]
        panels = [
            (ex["original"], f"{short(class_names[ex['pred']])}\np={ex['p_pred']:.2f}"),
            (amplify(ex["original"], ex["stored"]), f"perturbation\nlinf={ex['linf']:.0f}"),
            (ex["stored"], f"{short(class_names[ex['target']])}\np={ex['p_target']:.2f}"
                           + ("" if fooled else " (not fooled)")),
        ]
        for ax, (pixels, label) in zip(ax_row, panels):
            ax.imshow(np.asarray(pixels, np.uint8).reshape(shape), interpolation="nearest")
            ax.set_title(label, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    height = 2.0 * rows + 0.4
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def png(pixels: np.ndarray, shape) -> bytes:
    """A (D,) uint8 image as PNG bytes at its own size."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8).reshape(shape)).save(buf, format="PNG")
    return buf.getvalue()


def labels(ex: dict, class_names: list[str]) -> list[str]:
    """The three panels' captions: the original's class and probability, the perturbation's size
    and amplification, the fooling image's target and probability."""
    fooled = ex["fooled_pred"] == ex["target"]
    return [f"{short(class_names[ex['pred']])} {ex['p_pred']:.0%}",
            f"L-inf {ex['linf']:.0f} (×{amplification(ex):.0f})",
            f"{short(class_names[ex['target']])} {ex['p_target']:.0%}"
            + ("" if fooled else " (not fooled)")]


def amplification(ex: dict) -> float:
    """How much ``amplify`` stretched the change: 127.5 / its largest magnitude."""
    delta = np.abs(ex["stored"].astype(np.int16) - ex["original"].astype(np.int16))
    return 127.5 / max(int(delta.max()), 1)


def panel_box(i: int, shape) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of panel i (0 original, 1 perturbation, 2 fooling) in strip()."""
    h, w = shape[0] * SCALE, shape[1] * SCALE
    left = GAP + i * (w + GAP)
    return left, GAP, left + w, GAP + h


def strip(ex: dict, class_names: list[str], shape, title: str = "") -> bytes:
    """PNG of one pair in the blog's layout, each panel its pixels at SCALE x SCALE (no
    resampling: the fooling panel is the stored image), captioned underneath, titled below."""
    h, w = shape[0] * SCALE, shape[1] * SCALE
    width, height = GAP + 3 * (w + GAP), GAP + h + 3 * TEXT + 2 * GAP
    page = Image.new("RGB", (width, height), "white")
    draw, face = ImageDraw.Draw(page), font(TEXT)
    panels = (ex["original"], amplify(ex["original"], ex["stored"]), ex["stored"])
    for i, (pixels, label) in enumerate(zip(panels, labels(ex, class_names))):
        left, top, right, bottom = panel_box(i, shape)
        big = np.asarray(pixels, np.uint8).reshape(shape).repeat(SCALE, 0).repeat(SCALE, 1)
        page.paste(Image.fromarray(big), (left, top))
        draw.text(((left + right) / 2, bottom + 4 + TEXT / 2), fit(draw, label, face, w),
                  anchor="mm", fill="black", font=face)
    if title:
        draw.text((width / 2, height - GAP - TEXT / 2), fit(draw, title, font(TEXT - 2), width),
                  anchor="mm", fill="#555", font=font(TEXT - 2))
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return buf.getvalue()
