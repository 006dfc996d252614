"""The photographs of the sample (``pipelines.sample --kind photos``): one real photograph a class,
read from the files that scikit-image, scikit-learn and matplotlib ship inside their packages.

    >>> photo = load(k)                     # (H, W, 3) uint8, class k's photograph
    >>> img, box = crop(photo, rng, sizes)  # a crop of it at one of ``sizes``, flipped at random

Nothing is downloaded: each file is read from the installed package's folder (the packages are
not imported). Each image of a class is a random region of its photograph (half of the largest
region of the target's aspect up to all of it), flipped left-right half the time, scaled to an
ImageNet size with a small change of brightness. Sources and licences: docs/ingest.md.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.errors import ConfigError


@dataclass(frozen=True)
class Photo:
    wnid: str  # ILSVRC-2012's WNID where one of its classes fits; else one in n99..., unused
    name: str  # the class's name, as LOC_synset_mapping.txt gives it
    package: str  # the installed package that ships the file
    file: str  # the file's path inside the package's folder


PHOTOS = [  # in WNID order, as ILSVRC numbers its classes
    Photo("n02123045", "tabby, tabby cat", "skimage", "data/chelsea.png"),
    Photo("n03763968", "military uniform", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    Photo("n03773504", "missile", "skimage", "data/rocket.jpg"),
    Photo("n03877845", "palace", "sklearn", "datasets/images/china.jpg"),
    Photo("n07920052", "espresso", "skimage", "data/coffee.png"),
    Photo("n99000001", "astronaut", "skimage", "data/astronaut.png"),
    Photo("n99000002", "dahlia", "sklearn", "datasets/images/flower.jpg"),
    Photo("n99000003", "deep field, Hubble", "skimage", "data/hubble_deep_field.jpg"),
    Photo("n99000004", "colonic glands, micrograph", "skimage", "data/ihc.png"),
    Photo("n99000005", "retina, fundus photograph", "skimage", "data/retina.jpg"),
]
INSTALL = "pip install scikit-image scikit-learn matplotlib"


def path(p: Photo) -> str:
    """Where the installed package keeps the photograph."""
    spec = importlib.util.find_spec(p.package)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the photographs come with their packages, and {p.package} is not "
                          f"installed: {INSTALL} (or --kind shapes)")
    full = os.path.join(spec.submodule_search_locations[0], p.file)
    if not os.path.exists(full):
        raise ConfigError(f"{p.package} has no {p.file} (another version?): {INSTALL}")
    return full


@functools.cache
def load(k: int) -> np.ndarray:
    """Class k's photograph, (H, W, 3) uint8 RGB."""
    with Image.open(path(PHOTOS[k])) as img:
        return np.asarray(img.convert("RGB"))


def sha256(k: int) -> str:
    """The photograph's file's sha256: what the sample records it was made from."""
    with open(path(PHOTOS[k]), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def crop(photo: np.ndarray, rng: np.random.Generator, sizes: list[tuple[int, int]]
         ) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of the class: a region of the photograph at one of ``sizes`` (width, height),
    and its box (the whole image: the photograph's subject fills it)."""
    w, h = sizes[rng.integers(len(sizes))]
    H, W = photo.shape[:2]
    scale = rng.uniform(0.5, 1.0)
    rh = max(1, int(min(H, W * h / w) * scale))
    rw = max(1, min(W, int(rh * w / h)))
    y, x = rng.integers(0, H - rh + 1), rng.integers(0, W - rw + 1)
    img = Image.fromarray(photo[y:y + rh, x:x + rw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    gain = rng.uniform(0.85, 1.15)
    pixels = np.clip(np.asarray(img, np.float32) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), (0, 0, w - 1, h - 1)
