"""Find the images of an ImageNet source tree and their labels, as people actually have it.

Layouts read (local or s3://, through pyarrow.fs):
- ``<root>/train/<wnid>/*``: class folders.
- ``<root>/val/<wnid>/*`` (class folders) or ``<root>/val/*`` (flat) labelled by
  ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``, WNID first) at the root or in
  val/.
- Kaggle's ``<root>/ILSVRC/Data/CLS-LOC/{train,val}`` is found by itself.
- ``LOC_synset_mapping.txt`` (``<wnid> <names>``) gives the class list and names when present;
  otherwise the class list is the training class folders (or the validation labels).

Labels are the index of the WNID in sorted order (ImageNet's standard 0..999). Every file under
train/ and val/ is accounted for: it is listed for decoding or quarantined here with its reason.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from common import schema, storage
from common.errors import ConfigError

VAL_CSV = "LOC_val_solution.csv"
SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC"

FILES_SCHEMA = pa.schema(
    [
        pa.field(schema.SOURCE, pa.string()),
        pa.field(schema.IMAGE_ID, pa.string()),
        pa.field(schema.WNID, pa.string()),
        pa.field(schema.LABEL, pa.int16()),
    ]
)


@dataclass(frozen=True)
class Listing:
    """What a source holds: the class list, and per split the files to decode."""

    root: str  # URI the ``source`` paths are relative to
    classes: list[str]  # WNIDs in label order
    class_names: list[str] | None
    files: dict[str, pa.Table]  # split -> FILES_SCHEMA rows, sorted by source
    quarantine: list[dict]  # {source, split, reason} for files that never reach the decoder


def _list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8-sig")


def read_synsets(text: str) -> dict[str, str]:
    """``<wnid> <names>`` lines -> {wnid: names}."""
    out = {}
    for line in text.splitlines():
        wnid, _, names = line.strip().partition(" ")
        if wnid:
            out[wnid] = names.strip()
    return out


def read_val_csv(text: str) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv -> {image_id: wnid} (the first token of PredictionString)."""
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
        raise ConfigError(f"{VAL_CSV} must have the columns ImageId,PredictionString")
    return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows if r["PredictionString"]}


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _image_root(fs: pafs.FileSystem, root: str) -> str:
    kaggle = f"{root}/{KAGGLE_IMAGES}"
    return kaggle if fs.get_file_info(kaggle).type == pafs.FileType.Directory else root


def scan(source: str, splits: tuple[str, ...], limit_per_class: int | None = None) -> Listing:
    """List the source's files per split with labels; raises ConfigError when nothing is usable."""
    storage.check_readable(source)
    fs, root = storage.filesystem(source)
    images = _image_root(fs, root)
    by_split = {s: _list_files(fs, f"{images}/{s}") for s in splits}
    synsets_text = _read_text(fs, f"{root}/{SYNSETS}")
    names = read_synsets(synsets_text) if synsets_text else None

    def folder_of(split: str, info: pafs.FileInfo) -> str | None:
        rel = info.path[len(f"{images}/{split}/"):]
        return rel.split("/", 1)[0] if "/" in rel else None

    val_labels = None
    if "val" in splits and by_split["val"]:
        flat = any(folder_of("val", i) is None for i in by_split["val"])
        if flat:
            text = _read_text(fs, f"{root}/{VAL_CSV}") or _read_text(fs, f"{images}/val/{VAL_CSV}")
            if text is None:
                raise ConfigError(
                    f"{source}: val/ holds images directly but no {VAL_CSV} with their labels was "
                    f"found at the root or in val/"
                )
            val_labels = read_val_csv(text)

    if names:
        classes = sorted(names)
    else:
        found = {folder_of("train", i) for i in by_split.get("train", [])}
        if not found - {None}:
            found = {folder_of("val", i) for i in by_split.get("val", [])}
            found |= set((val_labels or {}).values())
        classes = sorted(found - {None})
    if not classes or not any(by_split.values()):
        raise ConfigError(
            f"no images found in {source}: expected train/<wnid>/ folders and/or val/ "
            f"(splits asked for: {','.join(splits)})"
        )
    index = {w: i for i, w in enumerate(classes)}
    prefix = f"{root}/"
    files, quarantine = {}, []
    for split, infos in by_split.items():
        rows: dict[str, list] = defaultdict(list)
        per_class: dict[str, int] = defaultdict(int)
        for info in infos:
            rel = info.path[len(prefix):]
            if posixpath.basename(rel) == VAL_CSV:
                continue
            folder = folder_of(split, info)
            if folder is not None:
                wnid, why = folder, f"class folder {folder!r} is not a known class"
            elif split == "val" and val_labels is not None:
                wnid = val_labels.get(_stem(rel))
                why = (f"no label in {VAL_CSV}" if wnid is None
                       else f"label {wnid!r} is not a known class")
            else:
                wnid, why = None, "not inside a class folder"
            if wnid not in index:
                quarantine.append({schema.SOURCE: rel, schema.SPLIT: split, schema.REASON: why})
                continue
            if limit_per_class is not None and per_class[wnid] >= limit_per_class:
                continue
            per_class[wnid] += 1
            rows[schema.SOURCE].append(rel)
            rows[schema.IMAGE_ID].append(_stem(rel))
            rows[schema.WNID].append(wnid)
            rows[schema.LABEL].append(index[wnid])
        files[split] = pa.Table.from_pydict(
            {f.name: rows[f.name] for f in FILES_SCHEMA}, schema=FILES_SCHEMA
        )
    class_names = [names.get(w, "") for w in classes] if names else None
    return Listing(source.rstrip("/"), classes, class_names, files, quarantine)
