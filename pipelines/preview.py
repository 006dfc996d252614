"""Print what an ingest wrote, reading it back with pyarrow alone.

    python -m pipelines.preview --data out/imagenet64 [--preview preview.png]

Refuses an output without manifest.json. Reads the quarantine table and the first rows of each
split back from Parquet, and can save a picture of a few images per class.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from common import cli, dataset, schema, storage

SHOW_QUARANTINED = 20  # rows listed one by one; the rest are counted by reason


@dataclass(frozen=True)
class Settings:
    data: str = field(metadata={"help": "an ingest output: local path or s3://"})
    preview: str | None = field(
        default=None, metadata={"help": "also save a PNG of a few images per class here"}
    )
    per_class: int = field(default=8, metadata={"help": "images per class in the preview"})


def read_table(data: str, rel: str, columns: list[str] | None = None):
    fs, path = storage.filesystem(storage.join(data, rel))
    return pq.read_table(path, filesystem=fs, columns=columns)


def describe(data: str) -> str:
    """A few lines on an ingest output: counts, quarantine reasons, files, pixel statistics."""
    m = dataset.open_ingest(data)
    lines = [f"{data}: {len(m[schema.M_CLASSES])} classes, images {m[schema.M_IMAGE_SHAPE]}"]
    for split, c in m[schema.M_COUNTS].items():
        lines.append(f"  {split:5s}: seen {c['seen']}, written {c['written']}, "
                     f"quarantined {c['quarantined']}")
    files = m[schema.M_FILES]
    lines.append(f"  files: {len(files)}, {sum(f['bytes'] for f in files) / 2**20:.1f} MiB")
    if m.get(schema.M_PIXEL_MEAN):
        lines.append(f"  train pixel mean {m[schema.M_PIXEL_MEAN]}, std {m[schema.M_PIXEL_STD]}")
    reasons: Counter = Counter()
    for f in files:
        if not f["path"].startswith(schema.QUARANTINE_DIR):
            continue
        table = read_table(data, f["path"], [schema.SPLIT, schema.SOURCE, schema.REASON])
        for split, source, reason in zip(*(c.to_pylist() for c in table.columns)):
            if sum(reasons.values()) < SHOW_QUARANTINED:
                lines.append(f"  quarantined [{split}] {source}: {reason}")
            reasons[reason.split(":")[0]] += 1
    if reasons:
        lines.append("  quarantine reasons: " + ", ".join(f"{k} ({v})" for k, v in reasons.items()))
    lines.append(f"  took {m[schema.M_TIMINGS]['total_s']} s")
    return "\n".join(lines)


def preview(data: str, out: str, per_class: int = 8) -> None:
    """Save a grid of the first ``per_class`` training (else validation) images of each class."""
    m = dataset.open_ingest(data)
    h, w, _ = m[schema.M_IMAGE_SHAPE]
    rels = [f["path"] for f in m[schema.M_FILES] if f["path"].startswith(("train/", "val/"))]
    table = read_table(data, rels[0], [schema.LABEL, schema.IMAGE])
    n_classes = len(m[schema.M_CLASSES])
    sheet = Image.new("RGB", (per_class * w, n_classes * h), (255, 255, 255))
    filled = Counter()
    for label, image in zip(table.column(schema.LABEL).to_pylist(),
                            table.column(schema.IMAGE).to_pylist()):
        if filled[label] < per_class:
            tile = Image.fromarray(np.frombuffer(image, np.uint8).reshape(h, w, 3))
            sheet.paste(tile, (filled[label] * w, label * h))
            filled[label] += 1
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    storage.write_bytes(out, buf.getvalue())


def run(cfg: Settings) -> None:
    print(describe(cfg.data))
    if cfg.preview:
        preview(cfg.data, cfg.preview, cfg.per_class)
        print(f"  preview: {cfg.preview}")


def main(argv=None) -> None:
    cli.main(Settings, run, argv, __doc__, uses_ray=False)


if __name__ == "__main__":
    main()
