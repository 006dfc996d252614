"""Check the training job's default hyperparameters on real images, not only the generated sample.

    python -m benchmarks.train_defaults [--epochs 10] [--keep out/defaults]

Makes three small datasets in the ImageNet layout, ingests them (pipelines.ingest) and trains each
with the job's defaults (training.train, only --data and --output given):
- photos: scikit-learn's two real photographs (china.jpg, flower.jpg), each cut into 2 x 2 regions;
  a class is a region, an image a random square crop of it (80 px up to the region's side) with
  brightness jitter and noise: 8 classes, 300 training and 60 validation images each;
- photo-grid: the same photographs cut into 5 x 10 cells each: 100 classes of overlapping,
  similar-looking crops, 100 + 20 images each (closer to ImageNet's many similar classes);
- digits: scikit-learn's real 8 x 8 handwritten digits (1797), upscaled to 64 x 64 RGB, 10 classes;
- sample: the generated look-alike (pipelines.sample), 10 classes, 300 + 50 images each.
Prints, per dataset, the initial loss against ln(C) and the final validation top-1 and top-5
against chance. Needs scikit-learn (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

import numpy as np
import ray
from PIL import Image

from common import schema
from pipelines import ingest, sample
from training import train


def _save(root: str, split: str, label: int, i: int, pixels: np.ndarray) -> None:
    folder = os.path.join(root, split, f"n{9_000_000 + label:08d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, f"{label}_{i}.JPEG"), quality=92)


def photo_regions(root: str, rows: int, cols: int, n_train: int, n_val: int, seed: int = 0) -> None:
    """Classes are the rows x cols cells of each photograph; images are jittered crops."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    label = 0
    for photo in load_sample_images().images:
        H, W = photo.shape[:2]
        h, w = H // rows, W // cols
        for r in range(rows):
            for c in range(cols):
                for split, n in (("train", n_train), ("val", n_val)):
                    for i in range(n):
                        s = int(rng.integers(min(h, w, 160) // 2, min(h, w) + 1))
                        y = r * h + int(rng.integers(0, h - s + 1))
                        x = c * w + int(rng.integers(0, w - s + 1))
                        crop = photo[y:y + s, x:x + s] * rng.uniform(0.8, 1.2)
                        crop = crop + rng.normal(0, 8, crop.shape)
                        _save(root, split, label, i, np.clip(crop, 0, 255).astype(np.uint8))
                label += 1


def digits(root: str, n_val: int = 300, seed: int = 0) -> None:
    """The 8 x 8 digits (0..16 gray levels) upscaled to 64 x 64 RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    for j, k in enumerate(order):
        px = Image.fromarray((d.images[k] * (255 / 16)).astype(np.uint8))
        rgb = np.asarray(px.resize((64, 64), Image.BILINEAR).convert("RGB"))
        _save(root, "val" if j < n_val else "train", int(d.target[k]), j, rgb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=None, help="override the default epochs")
    p.add_argument("--keep", default=None, help="folder to keep the data and models in")
    args = p.parse_args()
    makers = {
        "photos": lambda out: photo_regions(out, 2, 2, 300, 60),
        "photo-grid": lambda out: photo_regions(out, 5, 10, 100, 20, seed=1),
        "digits": digits,
        "sample": lambda out: sample.generate(sample.Settings(output=out, kind="shapes",
                                                                    oddities=False)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        ray.init(include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = []
        for name, make in makers.items():
            src, data = os.path.join(root, name, "src"), os.path.join(root, name, "data")
            make(src)
            ingest.run(ingest.Settings(source=src, output=data, overwrite=True))
            extra = {"epochs": args.epochs} if args.epochs else {}
            m = train.run(train.Settings(data=data, output=os.path.join(root, name, "model"),
                                         overwrite=True, **extra))
            results.append((name, m))
        ray.shutdown()
    cfg = results[0][1][schema.M_CONFIG]
    print(f"\ndefaults: {cfg['optimizer']} lr {cfg['lr']:g} ({cfg['schedule']}), "
          f"reg {cfg['reg']:g}, init std {cfg['init_std']:g}, batch {cfg['batch_size']}, "
          f"{cfg['epochs']} epochs")
    print("| data | classes | train rows | initial loss (ln C) | val top-1 (chance) | val top-5 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in results:
        C, final = len(m[schema.M_CLASSES]), m[schema.M_FINAL]
        print(f"| {name} | {C} | {final['train_rows']} | {m[schema.M_INITIAL_LOSS]:.3f} "
              f"({math.log(C):.3f}) | {final['val_top1']:.1%} ({1 / C:.1%}) | "
              f"{final['val_top5']:.1%} |")


if __name__ == "__main__":
    main()
