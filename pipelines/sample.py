"""Generate a small ImageNet look-alike in the real ILSVRC2012 layout, deterministically.

    python -m pipelines.sample --output data/sample       # or --output s3://bucket/sample
    python -m pipelines.sample --output data/shapes --kind shapes --classes 100

writes
    train/<wnid>/<wnid>_<n>.JPEG          class folders, ImageNet-sized JPEGs (quality ~90)
    val/ILSVRC2012_val_<8 digits>.JPEG    one flat folder
    LOC_val_solution.csv                  ImageId,PredictionString (Kaggle format, WNID first)
    LOC_synset_mapping.txt                "<wnid> <names>" per line
    sample.json                           what was planted where, for tests and the curious

--kind photos (the default): up to ten classes, each a real photograph that scikit-image,
scikit-learn or matplotlib ships (a cat, an espresso, a rocket, Grace Hopper in uniform, ...), each
image a random crop of it, flipped at random, at an ImageNet size.
--kind shapes: any number of classes, each a background colour, a shape, a colour and a position
of its own, with per-image jitter and noise.
Either way the oddities of real ImageNet are planted too (CMYK and grayscale JPEGs, a PNG named
.JPEG, plus an RGBA PNG), and hostile files that the ingest job must quarantine: an empty file, a
truncated JPEG, random bytes, a text file, an image declaring an enormous size, and a validation
image without a label.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from common import cli, storage
from common.errors import ConfigError
from pipelines import photos

log = logging.getLogger(__name__)

# Ten real WNIDs (the Imagenette classes), so that the sample reads like ImageNet.
CLASSES = [
    ("n01440764", "tench, Tinca tinca"),
    ("n02102040", "English springer, English springer spaniel"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw, chainsaw"),
    ("n03028079", "church, church building"),
    ("n03394916", "French horn, horn"),
    ("n03417042", "garbage truck, dustcart"),
    ("n03425413", "gas pump, gasoline pump, petrol pump, island dispenser"),
    ("n03445777", "golf ball"),
    ("n03888257", "parachute, chute"),
]
SIZES = [(500, 375), (500, 333), (375, 500), (500, 500), (400, 300), (640, 480), (333, 500)]
SHAPES = ("ellipse", "rectangle", "triangle", "cross")
# (class, image) -> the odd format that training image is stored in, as ImageNet has a few
PLANTED = {(0, 0): "cmyk", (0, 1): "cmyk", (1, 0): "gray", (1, 1): "gray", (2, 0): "png",
           (3, 0): "rgba_png"}


@dataclass(frozen=True)
class Settings:
    output: str = field(metadata={"help": "folder to write the sample into: local path or s3://"})
    kind: str = field(default="photos", metadata={
        "help": "photos: crops of ten real photographs, one a class; shapes: a coloured shape a "
                "class, any number of classes", "choices": ("photos", "shapes")})
    classes: int = field(default=10, metadata={"help": "number of classes (photos: at most 10)"})
    train_per_class: int = field(default=300, metadata={"help": "training images per class"})
    val_per_class: int = field(default=50, metadata={"help": "validation images per class"})
    seed: int = field(default=0, metadata={"help": "seed: the same seed gives the same bytes"})
    oddities: bool = field(default=True, metadata={"help": "plant odd and hostile files"})
    num_workers: int = field(default=os.cpu_count() or 1, metadata={
        "help": "processes that draw the images"})

    RENAMED = {"out": "output", "workers": "num_workers"}  # the old names, refused in one line


def class_list(n: int, kind: str = "shapes") -> list[tuple[str, str]]:
    if kind == "photos":
        return [(p.wnid, p.name) for p in photos.PHOTOS[:n]]
    extra = [(f"n9{k:08d}", f"synthetic class {k}") for k in range(len(CLASSES), n)]
    return (CLASSES + extra)[:n]


def _style(seed: int, k: int) -> dict:
    """The look of class k: what a linear model can learn."""
    rng = np.random.default_rng([seed, 7919, k])
    hue = (k * 0.618034) % 1.0  # golden-ratio hues spread the background colours apart
    hsv = Image.new("HSV", (1, 1), (int(hue * 255), 110, 170))
    bg = np.array(hsv.convert("RGB").getpixel((0, 0)))
    fg = 255 - bg if k % 2 else rng.integers(0, 256, 3)
    return {
        "bg": bg.astype(float),
        "fg": tuple(int(v) for v in fg),
        "shape": SHAPES[k % len(SHAPES)],
        "center": rng.uniform(0.3, 0.7, 2),
        "radius": rng.uniform(0.18, 0.3),
    }


def draw(style: dict, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of a class: gradient background, the class's shape with jitter, noise."""
    w, h = SIZES[rng.integers(len(SIZES))]
    ramp = np.linspace(-30, 30, h)[:, None, None] * rng.uniform(-1, 1)
    bg = np.clip(style["bg"] * rng.uniform(0.75, 1.2) + ramp, 0, 255)
    pixels = np.broadcast_to(bg, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(pixels)
    cx, cy = (style["center"] + rng.normal(0, 0.06, 2)) * (w, h)
    r = style["radius"] * rng.uniform(0.8, 1.25) * min(w, h)
    box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    pen = ImageDraw.Draw(img)
    fg = tuple(int(np.clip(c * rng.uniform(0.8, 1.2), 0, 255)) for c in style["fg"])
    if style["shape"] == "ellipse":
        pen.ellipse(box, fill=fg)
    elif style["shape"] == "rectangle":
        pen.rectangle(box, fill=fg)
    elif style["shape"] == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        t = r / 3
        pen.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fg)
        pen.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fg)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), box


def encode(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """Image bytes as ImageNet has them: mostly RGB JPEG, sometimes CMYK, grayscale or PNG."""
    buf = io.BytesIO()
    if kind == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "gray":
        img.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "png":
        img.save(buf, "PNG")
    elif kind == "rgba_png":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(img.size))
        rgba.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def bomb_png(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny valid-looking PNG header that declares an enormous image."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def painter(cfg: Settings, k: int) -> Callable[[np.random.Generator], tuple[Image.Image, tuple]]:
    """Class k's image maker: a random generator in, (image, its object's box) out."""
    if cfg.kind == "photos":
        photo = photos.load(k)
        return lambda rng: photos.crop(photo, rng, SIZES)
    style = _style(cfg.seed, k)
    return lambda rng: draw(style, rng)


def _odd_kind(k: int, i: int, oddities: bool) -> str:
    """Which format image i of class k is stored in (a fixed handful are odd)."""
    return PLANTED.get((k, i), "jpeg") if oddities else "jpeg"


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _make_class(args: tuple) -> list[dict]:
    """Draw and write the train and val images of one class; returns the val records."""
    cfg, k, wnid, val_ids = args
    paint = painter(cfg, k)
    for i in range(cfg.train_per_class):
        rng = np.random.default_rng([cfg.seed, 0, k, i])
        img, _ = paint(rng)
        kind = _odd_kind(k, i, cfg.oddities)
        _write(os.path.join(cfg.output, "train", wnid, f"{wnid}_{i}.JPEG"), encode(img, kind, rng))
    records = []
    for i, image_id in enumerate(val_ids):
        rng = np.random.default_rng([cfg.seed, 1, k, i])
        img, box = paint(rng)
        kind = "gray" if cfg.oddities and k == 0 and i == 0 else "jpeg"
        _write(os.path.join(cfg.output, "val", f"{image_id}.JPEG"), encode(img, kind, rng))
        records.append({"image_id": image_id, "wnid": wnid, "box": box})
    return records


def _plant_hostile(cfg: Settings, classes: list[tuple[str, str]], n_val: int) -> list[dict]:
    """Files the ingest must quarantine; returns their records (path, why)."""
    rng = np.random.default_rng([cfg.seed, 2])
    wnid = classes[0][0]
    jpeg = encode(painter(cfg, 0)(rng)[0], "jpeg", rng)
    files = {
        f"train/{wnid}/{wnid}_empty.JPEG": (b"", "empty"),
        f"train/{wnid}/{wnid}_truncated.JPEG": (jpeg[: len(jpeg) * 2 // 5], "truncated"),
        f"train/{wnid}/{wnid}_random.JPEG": (rng.bytes(5000), "random bytes"),
        f"train/{wnid}/{wnid}_text.JPEG": (b"This is not an image.\n" * 20, "text"),
        f"train/{wnid}/{wnid}_bomb.JPEG": (bomb_png(), "decompression bomb"),
        f"val/ILSVRC2012_val_{n_val + 1:08d}.JPEG": (jpeg[:3000], "truncated"),
        f"val/ILSVRC2012_val_{n_val + 2:08d}.JPEG": (rng.bytes(3000), "random bytes"),
        f"val/ILSVRC2012_val_{n_val + 3:08d}.JPEG": (jpeg, "unlabelled"),
    }
    for rel, (data, _) in files.items():
        _write(os.path.join(cfg.output, rel), data)
    return [{"path": rel, "why": why} for rel, (_, why) in files.items()]


def generate(cfg: Settings) -> dict:
    """Write the sample into ``cfg.output``; returns the description also saved as sample.json."""
    if cfg.classes < 1 or cfg.train_per_class < 0 or cfg.val_per_class < 0:
        raise ConfigError("--classes must be at least 1 and the image counts at least 0")
    if cfg.kind == "photos" and cfg.classes > len(photos.PHOTOS):
        raise ConfigError(f"--kind photos has {len(photos.PHOTOS)} classes, not {cfg.classes}: "
                          "use --kind shapes for more")
    classes = class_list(cfg.classes, cfg.kind)
    n_val = cfg.classes * cfg.val_per_class
    order = np.random.default_rng([cfg.seed, 3]).permutation(n_val)  # val ids interleave classes
    ids = [f"ILSVRC2012_val_{j + 1:08d}" for j in order]
    jobs = [(cfg, k, wnid, ids[k * cfg.val_per_class:(k + 1) * cfg.val_per_class])
            for k, (wnid, _) in enumerate(classes)]
    with ProcessPoolExecutor(max_workers=max(1, cfg.num_workers)) as pool:
        val = [r for records in pool.map(_make_class, jobs) for r in records]
    hostile = _plant_hostile(cfg, classes, n_val) if cfg.oddities else []
    labelled = val + [
        {"image_id": os.path.basename(h["path"])[:-5], "wnid": classes[0][0], "box": (0, 0, 9, 9)}
        for h in hostile if h["path"].startswith("val/") and h["why"] != "unlabelled"
    ]
    lines = ["ImageId,PredictionString"] + [
        f"{r['image_id']},{r['wnid']} {' '.join(map(str, r['box']))} "
        for r in sorted(labelled, key=lambda r: r["image_id"])
    ]
    _write(os.path.join(cfg.output, "LOC_val_solution.csv"), ("\n".join(lines) + "\n").encode())
    mapping = "".join(f"{w} {name}\n" for w, name in classes)
    _write(os.path.join(cfg.output, "LOC_synset_mapping.txt"), mapping.encode())
    odd = [
        {"path": f"train/{classes[k][0]}/{classes[k][0]}_{i}.JPEG", "kind": kind}
        for (k, i), kind in PLANTED.items()
        if cfg.oddities and k < cfg.classes and i < cfg.train_per_class
    ]
    if cfg.oddities and cfg.val_per_class:
        odd.append({"path": f"val/{ids[0]}.JPEG", "kind": "gray"})
    info = {
        "kind": cfg.kind,
        "classes": [w for w, _ in classes],
        "train_images": cfg.classes * cfg.train_per_class,
        "val_images": n_val,
        "odd": odd,
        "hostile": hostile,
        "seed": cfg.seed,
    }
    if cfg.kind == "photos":  # what each class was cut from
        info["photos"] = [{"wnid": p.wnid, "package": p.package, "file": p.file,
                           "sha256": photos.sha256(k)}
                          for k, p in enumerate(photos.PHOTOS[:cfg.classes])]
    _write(os.path.join(cfg.output, "sample.json"), json.dumps(info, indent=2).encode())
    return info


def run(cfg: Settings) -> None:
    storage.check_writable(cfg.output)  # before drawing anything
    if storage.is_s3(cfg.output):  # draw locally, then upload the tree
        with tempfile.TemporaryDirectory() as tmp:
            info = generate(dataclasses.replace(cfg, output=tmp))
            fs, path = storage.filesystem(cfg.output)
            pafs.copy_files(tmp, path, destination_filesystem=fs, use_threads=True)
    else:
        info = generate(cfg)
    log.info(
        "wrote %d training and %d validation images of %d classes (%s) to %s "
        "(%d odd formats, %d hostile files)",
        info["train_images"], info["val_images"], len(info["classes"]), cfg.kind, cfg.output,
        len(info["odd"]), len(info["hostile"]),
    )


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
