"""Contact sheets in the blog's style: original | amplified perturbation | fooling image.

    >>> png = contact_sheet(examples, class_names, (64, 64, 3), "sign: validation images")

Each row is one (image, target) pair, labelled with class names and probabilities: the model's
class for the original and its probability, the perturbation stretched to the full grey range
(its L-inf in the label), and the stored fooling image with the target's probability.
Drawn on a matplotlib Figure (no pyplot, no display needed).
"""

from __future__ import annotations

import io

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # no pyplot: no global state, no backend to pick

from training.templates import short_name as short  # noqa: E402  one shortener for every picture


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
            ax.set_title(label, fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    height = 2.0 * rows + 0.4
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
