"""Index ImageNet's tarballs without extracting them: where each image's bytes lie.

ImageNet ships ILSVRC2012_img_train.tar (one ``<wnid>.tar`` per class inside, each holding that
class's flat JPEGs) and ILSVRC2012_img_val.tar (50,000 flat JPEGs). ``index`` walks the tar
headers of such a file through pyarrow (local or s3://, where each header is a small ranged read)
and returns every regular member with its absolute byte range in the outer file; the inner
per-class tars are walked the same way, inside their own byte range. Decoding then reads a
member's bytes with one ranged read (pipelines/ingest.py), never the archive whole.

A damaged archive is reported, not raised: the members whose bytes lie wholly inside it are kept,
the one cut short is a ``Member`` with a ``problem``, and an unreadable header ends the walk with
the reason the caller quarantines.

``pack`` does the opposite, for tests and benchmarks: a local folder layout (train/<wnid>/,
flat val/) into the tarballs as image-net.org ships them.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"


@dataclass(frozen=True)
class Member:
    """One image inside an archive: its path there and its bytes' range in the outer file."""

    name: str  # e.g. "n01440764.tar/n01440764_10026.JPEG" or "ILSVRC2012_val_00000001.JPEG"
    offset: int  # first byte of the data in the outer tar file
    size: int
    problem: str | None = None  # why it cannot be read (a quarantine reason), else None


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of a seekable file."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(end - self.pos)
        self.pos += len(data)
        return data


def _walk(f, start: int, size: int, prefix: str, nested: bool) -> tuple[list[Member], str | None]:
    """Members of the tar in bytes [start, start + size) of f; inner .tar members walked too."""
    members: list[Member] = []
    try:
        with tarfile.open(fileobj=_Window(f, start, size), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name, offset = prefix + info.name, start + info.offset_data
                there = min(info.size, size - info.offset_data)  # bytes present in the file
                if nested and info.name.endswith(".tar"):  # what is there of it is walked
                    inner, problem = _walk(f, offset, there, f"{name}/", nested=False)
                    members += inner
                    if problem:
                        members.append(Member(name, offset, info.size, problem))
                elif there < info.size:
                    where = prefix.rstrip("/") or "archive"
                    members.append(Member(name, offset, info.size, f"truncated tar ({where}): "
                                          f"{there} of this member's {info.size} bytes"))
                else:
                    members.append(Member(name, offset, info.size))
                if there < info.size:
                    break
    except (tarfile.TarError, EOFError, OSError) as e:
        where = prefix.rstrip("/") or "archive"
        return members, f"damaged tar ({where}) after {len(members)} members: {e}"
    return members, None


def index(f, size: int, nested: bool = True) -> tuple[list[Member], str | None]:
    """Every regular member of a tar file (seekable, ``size`` bytes), inner tars' members included.

    Returns ``(members, problem)``: ``problem`` is the reason the walk stopped early (an
    unreadable header), else None. Members cut short by the end of the file carry a ``problem``.
    """
    return _walk(f, 0, size, "", nested)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(folders: str, out: str, also: tuple[str, ...] = ()) -> None:
    """ImageNet's tarballs from a local train/<wnid>/ + flat val/ tree: a tar of <wnid>.tar files
    (sorted, as shipped) and a flat val tar; the files named in ``also`` are copied beside them."""
    os.makedirs(out, exist_ok=True)
    train, val = os.path.join(folders, "train"), os.path.join(folders, "val")
    if os.path.isdir(train):
        with tarfile.open(os.path.join(out, TRAIN_TAR), "w") as outer:
            for wnid in sorted(os.listdir(train)):
                buf = io.BytesIO()
                with tarfile.open(fileobj=buf, mode="w") as inner:
                    for name in sorted(os.listdir(os.path.join(train, wnid))):
                        with open(os.path.join(train, wnid, name), "rb") as f:
                            _add(inner, name, f.read())
                _add(outer, f"{wnid}.tar", buf.getvalue())
    if os.path.isdir(val):
        with tarfile.open(os.path.join(out, VAL_TAR), "w") as tar:
            for name in sorted(os.listdir(val)):
                with open(os.path.join(val, name), "rb") as f:
                    _add(tar, name, f.read())
    for name in also:
        shutil.copy(os.path.join(folders, name), os.path.join(out, name))
