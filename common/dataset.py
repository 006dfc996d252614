"""Reading the ingest job's output: the one place that knows how its manifest lists its files.

    >>> m = open_ingest("s3://bucket/imagenet64")      # refuses an output without manifest.json
    >>> paths = split_files("s3://bucket/imagenet64", m, "val")   # URIs of the val Parquet files
"""

from __future__ import annotations

from common import schema, storage
from common.errors import ConfigError


def open_ingest(data: str) -> dict:
    """The manifest of a complete ingest output, or one clear ConfigError."""
    m = storage.read_manifest(data, "ingest output")
    if m.get(schema.M_KIND) != "ingest":
        raise ConfigError(f"{data} is not an ingest output (its manifest says {m.get('kind')!r})")
    return m


def split_files(data: str, manifest: dict, split: str) -> list[str]:
    """URIs of the Parquet files of one split, as the manifest lists them."""
    files = [storage.join(data, f["path"]) for f in manifest[schema.M_FILES]
             if f["path"].startswith(f"{split}/")]
    if not files:
        raise ConfigError(f"{data} has no {split!r} images (ingested splits: "
                          f"{', '.join(manifest[schema.M_COUNTS])})")
    return files


def num_features(manifest: dict) -> int:
    """D = H * W * 3 of the ingested images."""
    h, w, c = manifest[schema.M_IMAGE_SHAPE]
    return h * w * c
