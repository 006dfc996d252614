"""ImageNet's own validation labels: the ILSVRC2012 devkit (ILSVRC2012_devkit_t12.tar.gz).

The devkit holds ``data/ILSVRC2012_validation_ground_truth.txt`` (line i: the ILSVRC2012_ID,
1..1000, of ILSVRC2012_val_<i, 8 digits>) and ``data/meta.mat`` (MATLAB 5: the ``synsets`` struct
array, whose entries with ILSVRC2012_ID 1..1000 give each ID's WNID and words). meta.mat is read
with scipy.io.loadmat: parsing MATLAB's struct arrays by hand would be a second, untested reader.

    labels, names = read_devkit(open("ILSVRC2012_devkit_t12.tar.gz", "rb").read())
    labels["ILSVRC2012_val_00000001"]   # 'n01751748'
"""

from __future__ import annotations

import io
import tarfile

from common.errors import ConfigError

DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"


def _members(data: bytes) -> dict[str, bytes]:
    """The ground truth and meta.mat from the devkit's bytes, by base name."""
    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if info.isfile() and base in (GROUND_TRUTH, META) and "/data/" in f"/{info.name}":
                    found[base] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConfigError(f"{DEVKIT}: not a readable tar.gz: {e}") from None
    missing = {GROUND_TRUTH, META} - set(found)
    if missing:
        raise ConfigError(f"{DEVKIT} lacks data/{' and data/'.join(sorted(missing))}")
    return found


def read_meta(data: bytes) -> dict[int, tuple[str, str]]:
    """meta.mat's synsets: {ILSVRC2012_ID: (WNID, words)} for the 1000 classes."""
    from scipy.io import loadmat  # the only user of scipy: imported when a devkit is read

    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids = [int(i) for i in synsets["ILSVRC2012_ID"]]
        rows = zip(ids, synsets["WNID"], synsets["words"])
        return {i: (str(w), str(words)) for i, w, words in rows if 1 <= i <= 1000}
    except Exception as e:  # noqa: BLE001 - any parser failure is a property of the file
        raise ConfigError(f"{META} in {DEVKIT}: no readable synsets table: {e}") from None


def read_devkit(data: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """({val image_id: WNID}, {WNID: words}) from the devkit's bytes."""
    found = _members(data)
    meta = read_meta(found[META])
    labels = {}
    for line, text in enumerate(found[GROUND_TRUTH].decode("ascii", "replace").splitlines(), 1):
        text = text.strip()
        if not text.isdigit() or int(text) not in meta:
            raise ConfigError(f"{GROUND_TRUTH} line {line}: {text!r} is not an ILSVRC2012_ID "
                              f"of {META}")
        labels[f"ILSVRC2012_val_{line:08d}"] = meta[int(text)][0]
    return labels, dict(meta.values())
