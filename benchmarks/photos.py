"""Real photographs as ImageNet-sized JPEGs, for the decode tests and the ingest benchmark.

    from benchmarks import photos
    data = photos.jpeg(np.random.default_rng(0))      # one JPEG's bytes
    photos.tree("data/photos", classes=10, per_class=1000, workers=2)   # train/<wnid>/*.JPEG

scikit-learn ships two real photographs (china.jpg, flower.jpg, 640 x 427). Each JPEG here is a
random region of one of them (a quarter of the photo up to all of it), scaled to one of ImageNet's
common sizes (500 x 375 and its kin; a tenth of them larger, up to 1024 px, as ImageNet has), saved
at quality 75-95 with libjpeg's usual 4:2:0 chroma subsampling; one in ten is progressive, one in
fifty grayscale, as ImageNet has some of both. Needs scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

# ImageNet's most common sizes (width, height), and some of its larger ones
SIZES = [(500, 375), (500, 333), (375, 500), (500, 500), (333, 500), (500, 400), (400, 300)]
PHOTOS = ("china.jpg", "flower.jpg")
LARGE = [(640, 480), (800, 600), (1024, 768), (768, 1024)]


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    # read straight from scikit-learn's package folder: importing sklearn.datasets (what
    # load_sample_images needs) takes seconds, the two files take milliseconds
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise RuntimeError("the photographs come with scikit-learn: pip install scikit-learn")
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "images")
    return tuple(np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"))
                 for name in PHOTOS)


def jpeg(rng: np.random.Generator) -> bytes:
    """One distinct photo JPEG of an ImageNet size."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    H, W = photo.shape[:2]
    sizes = LARGE if rng.random() < 0.1 else SIZES
    w, h = sizes[rng.integers(len(sizes))]
    # a region of the photo's aspect close to the target's, a quarter of the photo up to all of it
    scale = rng.uniform(0.5, 1.0)
    rh = int(min(H, W * h / w) * scale)
    rw = int(min(W, rh * w / h))
    y, x = rng.integers(0, H - rh + 1), rng.integers(0, W - rw + 1)
    img = Image.fromarray(photo[y:y + rh, x:x + rw]).resize((w, h), Image.Resampling.LANCZOS)
    if rng.random() < 0.02:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(75, 96)), progressive=bool(rng.random() < 0.1))
    return buf.getvalue()


def write_class(root: str, k: int, per_class: int, seed: int = 0) -> list[str]:
    """Write class k's ``<root>/train/<wnid>/<wnid>_<i>.JPEG`` (local); returns their paths."""
    rng = np.random.default_rng([seed, k])
    wnid = f"n{9_000_000 + k:08d}"
    os.makedirs(os.path.join(root, "train", wnid), exist_ok=True)
    paths = []
    for i in range(per_class):
        path = os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG")
        with open(path, "wb") as f:
            f.write(jpeg(rng))
        paths.append(path)
    return paths


def tree(root: str, classes: int, per_class: int, seed: int = 0, workers: int = 1) -> list[str]:
    """Write ``classes`` class folders of photo JPEGs under ``<root>/train``; returns the paths."""
    with ProcessPoolExecutor(workers) as pool:
        done = pool.map(write_class, [root] * classes, range(classes), [per_class] * classes,
                        [seed] * classes)
        return [p for paths in done for p in paths]
