"""Find the images of an ImageNet source tree and their labels, as people actually have it.

Layouts read (local or s3://, through pyarrow.fs):
- ``<root>/train/<wnid>/*``: class folders.
- ``<root>/val/<wnid>/*`` (class folders) or ``<root>/val/*`` (flat) labelled by
  ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``, WNID first) at the root or in
  val/.
- Kaggle's ``<root>/ILSVRC/Data/CLS-LOC/{train,val}`` is found by itself.
- ImageNet's tarballs, read in place (pipelines/tars.py) when the split has no folder:
  ``<root>/ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class inside: a class folder) and
  ``<root>/ILSVRC2012_img_val.tar`` (flat), labelled by ``LOC_val_solution.csv`` or by the devkit
  ``ILSVRC2012_devkit_t12.tar.gz`` (pipelines/devkit.py). A row's ``source`` is then the path
  inside the tar, e.g. ``ILSVRC2012_img_train.tar/n01440764.tar/n01440764_10026.JPEG``.
- ``LOC_synset_mapping.txt`` (``<wnid> <names>``) gives the class list and names when present
  (else the devkit's, when it is read); otherwise the class list is the training class folders
  (or the validation labels).

Labels are the index of the WNID in sorted order (ImageNet's standard 0..999). Every file under
train/ and val/ is accounted for: it is listed for decoding or quarantined here with its reason.

Local trees are walked here rather than by pyarrow's recursive selector, which follows symbolic
links blindly (``ln -s .. loop`` in a class folder is followed ~40 levels deep). The walk follows
links, since real ImageNet trees are assembled from them, but enters each real directory once
(by st_dev/st_ino) and lists each real file once; the plain tree is walked before anything reached
through a link, so a link never takes a file away from the folder that really holds it. What it
skips becomes a quarantine row: a dangling or looping link, a folder already listed, a second
path to the same file, something that is not a regular file (a FIFO, a socket), a folder it may
not read, and a name that is not valid UTF-8 (stored with the bad bytes written as ``\\xNN``,
since such a name cannot be a string faithfully). S3 has no links; its listing is pyarrow's.

``image_id`` (the file stem) is unique per split: when two files share a stem, both are
quarantined if their labels differ, and the later ones (in source order) if they agree.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import posixpath
import stat
from collections import defaultdict, deque
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from common import schema, storage
from common.errors import ConfigError
from pipelines import devkit, tars

VAL_CSV = "LOC_val_solution.csv"
SYNSETS = "LOC_synset_mapping.txt"
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC"

# ImageNet's tarballs, read in place when a split has no folder (pipelines/tars.py)
TARS = {"train": tars.TRAIN_TAR, "val": tars.VAL_TAR}
# Where an image inside a tarball lies: the tar's path under the root and the byte range there;
# null for a plain file. The listing's own columns: they never reach the output.
ARCHIVE, OFFSET, LENGTH = "_archive", "_offset", "_length"
FILES_SCHEMA = pa.schema(
    [
        pa.field(schema.SOURCE, pa.string()),
        pa.field(schema.IMAGE_ID, pa.string()),
        pa.field(schema.WNID, pa.string()),
        pa.field(schema.LABEL, pa.int16()),
    ]
)
LISTING_SCHEMA = pa.schema([*FILES_SCHEMA, pa.field(ARCHIVE, pa.string()),
                            pa.field(OFFSET, pa.int64()), pa.field(LENGTH, pa.int64())])


@dataclass(frozen=True)
class Listing:
    """What a source holds: the class list, and per split the files to decode."""

    root: str  # URI the ``source`` paths are relative to
    classes: list[str]  # WNIDs in label order
    class_names: list[str] | None
    files: dict[str, pa.Table]  # split -> LISTING_SCHEMA rows, sorted by source
    quarantine: list[dict]  # {source, split, reason} for files that never reach the decoder


def _escaped(rel: bytes) -> str:
    """A path as text; bytes that are not UTF-8 are written as \\xNN."""
    return rel.decode("utf-8", "backslashreplace")


def _link_reason(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "dangling symlink"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return f"unreadable: {e.strerror}"


def walk_local(top: str, name: str = ".") -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files under a local folder, following links, each real file and folder once.

    Returns ``(files, skipped)``: paths relative to ``top`` ('/'-separated, sorted), and
    ``(path, reason)`` for every entry met that is not listed. Nothing else is dropped. Reasons
    that name another path name it under ``name``, what the caller calls ``top``.
    """

    def shown(rel: bytes) -> str:
        return f"{name}/{_escaped(rel)}" if rel else name

    top_b = os.fsencode(top)
    st = os.stat(top_b)
    entered = {(st.st_dev, st.st_ino): b""}  # real folders -> the path they were listed at
    plain, linked = deque([(top_b, b"")]), deque()
    found: dict[tuple, list[tuple[bool, bytes]]] = defaultdict(list)  # real file -> its paths
    skipped: list[tuple[bytes, str]] = []
    while plain or linked:
        via_link = not plain
        path, rel = (plain or linked).popleft()
        if via_link:  # a linked folder: entered only if its real folder was not already
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            if key in entered:
                skipped.append((rel, f"folder already listed as {shown(entered[key])}"))
                continue
            entered[key] = rel
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel, f"unreadable folder: {e.strerror}"))
            continue
        for entry in entries:
            sub = rel + b"/" + entry.name if rel else entry.name
            link = entry.is_symlink()
            try:
                st = entry.stat()  # follows links
            except OSError as e:
                skipped.append((sub, _link_reason(e)))
                continue
            if stat.S_ISDIR(st.st_mode):
                if link or via_link:
                    linked.append((entry.path, sub))
                else:
                    entered[(st.st_dev, st.st_ino)] = sub
                    plain.append((entry.path, sub))
            elif stat.S_ISREG(st.st_mode):
                found[(st.st_dev, st.st_ino)].append((link or via_link, sub))
            else:
                skipped.append((sub, "not a regular file"))
    files = []
    for paths in found.values():  # a file's own path wins over one through a link
        (_, first), *others = sorted(paths)
        files.append(first)
        skipped += [(p, f"same file as {shown(first)}") for _, p in others]
    listed = []
    for rel in files:
        try:
            listed.append(rel.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append((rel, "file name is not valid UTF-8"))
    return sorted(listed), sorted((_escaped(p), why) for p, why in skipped)


def _list_files(fs: pafs.FileSystem, path: str,
                name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(files, skipped) under a split folder, relative to it; see walk_local."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return [], []
    if isinstance(fs, pafs.LocalFileSystem):
        return walk_local(path, name)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    cut = len(path.rstrip("/")) + 1
    return sorted(i.path[cut:] for i in infos if i.type == pafs.FileType.File), []


def _list_tar(fs: pafs.FileSystem, path: str, name: str
              ) -> tuple[list[str], list[tuple[str, str]], dict[str, tuple[int, int]]]:
    """(members, skipped, {member: (offset, length)}) of a tarball, like _list_files' answer."""
    with fs.open_input_file(path) as f:
        members, problem = tars.index(f, f.size())
    files = sorted(m.name for m in members if m.problem is None)
    skipped = [(m.name, m.problem) for m in members if m.problem is not None]
    if problem:
        skipped.append(("", problem))  # the archive itself: what follows the damage is lost
    return files, skipped, {m.name: (m.offset, m.size) for m in members}


def _read_text(fs: pafs.FileSystem, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{posixpath.basename(path)} line {line}: not UTF-8 text "
                          f"(byte 0x{data[e.start]:02x})") from None


def read_synsets(text: str) -> dict[str, str]:
    """``<wnid> <names>`` lines -> {wnid: names}."""
    out = {}
    for line in text.splitlines():
        wnid, _, names = line.strip().partition(" ")
        if wnid:
            out[wnid] = names.strip()
    return out


@dataclass(frozen=True)
class ValLabels:
    """LOC_val_solution.csv read: labels, and the ids it labels twice with different WNIDs."""

    labels: dict[str, str]  # image_id -> wnid
    conflicts: dict[str, str]  # image_id -> quarantine reason
    origin: str = VAL_CSV  # the file the labels come from, named in quarantine reasons


def read_val_csv(text: str) -> ValLabels:
    """Kaggle's LOC_val_solution.csv: the WNID is the first token of PredictionString.

    A row without an ImageId or a WNID raises ConfigError naming the line; an ImageId labelled
    twice the same way counts once, labelled two ways it is a conflict (its image is quarantined).
    """
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
        raise ConfigError(f"{VAL_CSV} must have the columns ImageId,PredictionString")
    labels: dict[str, str] = {}
    lines: dict[str, int] = {}
    conflicts: dict[str, str] = {}
    for r in rows:
        line = rows.line_num
        image_id = (r["ImageId"] or "").strip()
        tokens = (r["PredictionString"] or "").split()
        if not image_id or not tokens:
            raise ConfigError(f"{VAL_CSV} line {line}: needs an ImageId and a PredictionString "
                              f"starting with a WNID")
        if image_id in labels and labels[image_id] != tokens[0]:
            conflicts[image_id] = (f"conflicting labels in {VAL_CSV}: {labels[image_id]} "
                                   f"(line {lines[image_id]}) and {tokens[0]} (line {line})")
        elif image_id not in labels:
            labels[image_id], lines[image_id] = tokens[0], line
    return ValLabels({k: v for k, v in labels.items() if k not in conflicts}, conflicts)


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _is(fs: pafs.FileSystem, path: str, kind: pafs.FileType) -> bool:
    return fs.get_file_info(path).type == kind


def _image_root(fs: pafs.FileSystem, root: str) -> str:
    kaggle = f"{root}/{KAGGLE_IMAGES}"
    return kaggle if fs.get_file_info(kaggle).type == pafs.FileType.Directory else root


def _folder(rel: str) -> str | None:
    """The class folder of a path relative to its split folder (None: directly in the split)."""
    return rel.split("/", 1)[0] if "/" in rel else None


def unique_ids(rows: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Keep rows whose image_id is unique; (kept rows, (source, reason) of the others).

    Copies that agree on the label keep the first (in source order); copies that disagree are
    all quarantined: which one is right cannot be told.
    """
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_id[r[schema.IMAGE_ID]].append(r)
    kept, dropped = [], []
    for image_id, group in by_id.items():
        group = sorted(group, key=lambda r: r[schema.SOURCE])
        if len({r[schema.WNID] for r in group}) > 1:
            for r in group:
                others = ", ".join(o[schema.SOURCE] for o in group if o is not r)
                dropped.append((r[schema.SOURCE], f"image_id {image_id!r} has conflicting "
                                                  f"labels (also at {others})"))
            continue
        kept.append(group[0])
        dropped += [(r[schema.SOURCE], f"duplicate image_id {image_id!r} "
                                       f"(kept {group[0][schema.SOURCE]})") for r in group[1:]]
    return sorted(kept, key=lambda r: r[schema.SOURCE]), dropped


def scan(source: str, splits: tuple[str, ...], limit_per_class: int | None = None) -> Listing:
    """List the source's files per split with labels; raises ConfigError when nothing is usable."""
    storage.check_readable(source)
    fs, root = storage.filesystem(source)
    images = _image_root(fs, root)
    split_prefix = {s: f"{images}/{s}"[len(root) + 1:] for s in splits}
    in_tar = {s for s in splits if s in TARS and _is(fs, f"{root}/{TARS[s]}", pafs.FileType.File)
              and not _is(fs, f"{images}/{s}", pafs.FileType.Directory)}
    listed, ranges = {}, {}
    for s in splits:
        if s in in_tar:
            split_prefix[s] = TARS[s]
            *listed[s], ranges[s] = _list_tar(fs, f"{root}/{TARS[s]}", TARS[s])
        else:
            listed[s] = _list_files(fs, f"{images}/{s}", split_prefix[s])

    def folder_of(split: str, rel: str) -> str | None:  # an inner <wnid>.tar is a class folder
        folder = _folder(rel)
        return folder.removesuffix(".tar") if folder and split in in_tar else folder
    by_split = {s: [r for r in listed[s][0] if posixpath.basename(r) != VAL_CSV] for s in splits}
    synsets_text = _read_text(fs, f"{root}/{SYNSETS}")
    names = read_synsets(synsets_text) if synsets_text else None

    val_labels = None
    if "val" in splits and by_split["val"]:
        if any(folder_of("val", r) is None for r in by_split["val"]):
            text = _read_text(fs, f"{root}/{VAL_CSV}") or _read_text(fs, f"{images}/val/{VAL_CSV}")
            if text is not None:
                val_labels = read_val_csv(text)
            elif _is(fs, f"{root}/{devkit.DEVKIT}", pafs.FileType.File):
                with fs.open_input_stream(f"{root}/{devkit.DEVKIT}") as f:
                    labels, devkit_names = devkit.read_devkit(f.read())
                val_labels = ValLabels(labels, {}, devkit.GROUND_TRUTH)
                names = names or devkit_names
            else:
                raise ConfigError(
                    f"{source}: the validation images lie flat but no {VAL_CSV} (at the root or "
                    f"in val/) or {devkit.DEVKIT} (at the root) with their labels was found"
                )

    if names:
        classes = sorted(names)
    else:
        found = {folder_of("train", r) for r in by_split.get("train", [])}
        if not found - {None}:
            found = {folder_of("val", r) for r in by_split.get("val", [])}
            found |= set(val_labels.labels.values() if val_labels else ())
        classes = sorted(found - {None})
    if not classes or not any(by_split.values()):
        raise ConfigError(
            f"no images found in {source}: expected train/<wnid>/ folders and/or val/, or "
            f"{TARS['train']} and/or {TARS['val']} (splits asked for: {','.join(splits)})"
        )
    index = {w: i for i, w in enumerate(classes)}
    files, quarantine = {}, []
    for split, rels in by_split.items():
        def bad(rel: str, why: str, split: str = split) -> dict:
            where = f"{split_prefix[split]}/{rel}" if rel else split_prefix[split]
            return {schema.SOURCE: where, schema.SPLIT: split, schema.REASON: why}

        quarantine.extend(bad(rel, why) for rel, why in listed[split][1])
        candidates = []
        for rel in rels:
            folder = folder_of(split, rel)
            if folder is not None:
                wnid, why = folder, f"class folder {folder!r} is not a known class"
            elif split == "val" and val_labels is not None:
                wnid = val_labels.labels.get(_stem(rel))
                why = val_labels.conflicts.get(_stem(rel)) or (
                    f"no label in {val_labels.origin}" if wnid is None
                    else f"label {wnid!r} is not a known class")
            else:
                wnid, why = None, "not inside a class folder"
            if wnid not in index:
                quarantine.append(bad(rel, why))
                continue
            offset, length = ranges[split][rel] if split in in_tar else (None, None)
            candidates.append({schema.SOURCE: f"{split_prefix[split]}/{rel}",
                               schema.IMAGE_ID: _stem(rel), schema.WNID: wnid,
                               schema.LABEL: index[wnid], OFFSET: offset, LENGTH: length,
                               ARCHIVE: split_prefix[split] if split in in_tar else None})
        kept, dropped = unique_ids(candidates)
        quarantine.extend({schema.SOURCE: src, schema.SPLIT: split, schema.REASON: why}
                          for src, why in dropped)
        per_class: dict[str, int] = defaultdict(int)
        rows = []
        for row in kept:
            if limit_per_class is not None and per_class[row[schema.WNID]] >= limit_per_class:
                continue
            per_class[row[schema.WNID]] += 1
            rows.append(row)
        files[split] = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    class_names = [names.get(w, "") for w in classes] if names else None
    return Listing(source.rstrip("/"), classes, class_names, files, quarantine)
