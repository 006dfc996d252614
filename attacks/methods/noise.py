"""Random-noise starting images, as in the blog's "same process but starting with a random image".

    >>> X = noise_images(4, seed=0, shape=(64, 64, 3))   # (4, 12288) uint8, the same for a seed

Image i depends only on (seed, i): a run with more images starts with the same first ones.
"""

from __future__ import annotations

import numpy as np

NOISE_PREFIX = "noise-"


def noise_images(count: int, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """(count, prod(shape)) uint8 images of uniform noise in 0..255."""
    D = int(np.prod(shape))
    out = np.empty((count, D), np.uint8)
    for i in range(count):
        out[i] = np.random.default_rng([seed, i]).integers(0, 256, D, dtype=np.uint8)
    return out


def noise_ids(count: int) -> list[str]:
    return [f"{NOISE_PREFIX}{i:05d}" for i in range(count)]
