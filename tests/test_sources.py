"""Finding images and labels in ImageNet's layouts (pipelines/sources.py). Real files, no Ray."""

from __future__ import annotations

import csv
import os
import shutil
import tempfile

import pytest

from common import schema
from common.errors import ConfigError
from pipelines import sources


def val_csv_labels(root) -> dict[str, str]:
    """Read the Kaggle CSV independently: image id -> first token of PredictionString."""
    with open(os.path.join(root, sources.VAL_CSV), newline="") as f:
        return {row[0]: row[1].split()[0] for row in list(csv.reader(f))[1:]}


def files_under(root, split) -> int:
    return sum(len(files) for _, _, files in os.walk(os.path.join(root, split)))


def test_sample_layout_is_fully_accounted_for(sample_dir):
    listing = sources.scan(str(sample_dir), ("train", "val"))
    mapping = [line.split()[0] for line in open(sample_dir / sources.SYNSETS)]
    assert listing.classes == sorted(mapping)
    assert listing.class_names[0] == "tench, Tinca tinca"
    for split in ("train", "val"):
        listed = listing.files[split].num_rows
        quarantined = sum(q[schema.SPLIT] == split for q in listing.quarantine)
        assert listed + quarantined == files_under(sample_dir, split)


def test_flat_val_labels_come_from_the_csv(sample_dir):
    listing = sources.scan(str(sample_dir), ("val",))
    expected = val_csv_labels(sample_dir)
    rows = listing.files["val"].to_pylist()
    assert rows and all(r[schema.WNID] == expected[r[schema.IMAGE_ID]] for r in rows)
    assert all(r[schema.LABEL] == listing.classes.index(r[schema.WNID]) for r in rows)
    unlabelled = [q for q in listing.quarantine if q[schema.SPLIT] == "val"]
    assert [q[schema.REASON] for q in unlabelled] == [f"no label in {sources.VAL_CSV}"]
    assert os.path.basename(unlabelled[0][schema.SOURCE])[:-5] not in expected


def test_train_labels_are_sorted_wnid_indices(sample_dir):
    listing = sources.scan(str(sample_dir), ("train",))
    for row in listing.files["train"].to_pylist():
        assert row[schema.SOURCE] == f"train/{row[schema.WNID]}/{row[schema.IMAGE_ID]}.JPEG"
        assert row[schema.LABEL] == sorted(listing.classes).index(row[schema.WNID])


def test_limit_per_class(sample_dir):
    listing = sources.scan(str(sample_dir), ("train",), limit_per_class=3)
    labels = listing.files["train"].column(schema.LABEL).to_pylist()
    assert sorted(labels) == sorted(list(range(4)) * 3)


def test_class_folder_val_and_no_mapping(tmp_path, sample_dir):
    """val/<wnid>/ folders, no synset file: classes come from the training folders."""
    root = tmp_path / "root"
    shutil.copytree(sample_dir / "train", root / "train")
    wnid = sorted(os.listdir(root / "train"))[1]
    os.makedirs(root / "val" / wnid)
    shutil.copy(root / "train" / wnid / f"{wnid}_3.JPEG", root / "val" / wnid / "v1.JPEG")
    os.makedirs(root / "val" / "n00000000")
    shutil.copy(root / "train" / wnid / f"{wnid}_4.JPEG", root / "val" / "n00000000" / "v2.JPEG")
    listing = sources.scan(str(root), ("train", "val"))
    assert listing.class_names is None
    assert listing.classes == sorted(os.listdir(sample_dir / "train"))
    assert listing.files["val"].to_pylist()[0][schema.LABEL] == 1
    assert [q[schema.REASON] for q in listing.quarantine] == [
        "class folder 'n00000000' is not a known class"
    ]


def test_kaggle_layout_is_found(tmp_path, sample_dir):
    root = tmp_path / "kaggle"
    shutil.copytree(sample_dir / "train", root / sources.KAGGLE_IMAGES / "train")
    shutil.copy(sample_dir / sources.SYNSETS, root / sources.SYNSETS)
    listing = sources.scan(str(root), ("train",))
    assert listing.files["train"].num_rows > 0
    assert listing.files["train"].to_pylist()[0][schema.SOURCE].startswith(sources.KAGGLE_IMAGES)


def test_flat_val_without_labels_fails_fast(tmp_path, sample_dir):
    shutil.copytree(sample_dir / "val", tmp_path / "val")
    with pytest.raises(ConfigError, match="no LOC_val_solution.csv"):
        sources.scan(str(tmp_path), ("val",))


def test_source_without_images_fails_fast(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        sources.scan(str(tmp_path), ("train", "val"))
    with pytest.raises(ConfigError, match="does not exist"):
        sources.scan(str(tmp_path / "missing"), ("train",))


# Hostile trees: links, loops, names and label files that listing must survive, every entry met
# ending up either listed or quarantined with its reason. Files hold bytes, not images: listing
# never decodes.

def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def reasons(listing) -> dict[str, str]:
    return {q[schema.SOURCE]: q[schema.REASON] for q in listing.quarantine}


def entries_under(top) -> int:
    """Every name under a folder, not following links, minus real folders: what listing meets."""
    return sum(len(files) + sum(os.path.islink(os.path.join(d, s)) for s in dirs)
               for d, dirs, files in os.walk(top))


def test_a_symlink_loop_is_entered_once(tmp_path):
    for n in range(40):
        touch(tmp_path / "train" / "n01" / f"a{n}.JPEG")
        touch(tmp_path / "train" / "n02" / f"b{n}.JPEG")
    os.symlink("..", tmp_path / "train" / "n01" / "loop")
    listing = sources.scan(str(tmp_path), ("train",))
    rows = listing.files["train"].to_pylist()
    assert len(rows) == 80
    assert all(r[schema.WNID] == r[schema.SOURCE].split("/")[1] for r in rows)
    assert reasons(listing) == {"train/n01/loop": "folder already listed as train"}
    assert len(rows) + len(listing.quarantine) == entries_under(tmp_path / "train")


def test_links_are_followed_but_never_take_a_file_from_its_own_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere / "n03" / "c1.JPEG")
    touch(tmp_path / "root" / "train" / "n02" / "b1.JPEG")
    touch(tmp_path / "root" / "train" / "n01" / "a1.JPEG")
    train = tmp_path / "root" / "train"
    os.symlink(elsewhere / "n03", train / "n03")  # a class folder kept on another disk
    os.symlink("../n02", train / "n01" / "alias")  # sorts before n02: must not claim it
    os.symlink("../n02/b1.JPEG", train / "n01" / "b1-link.JPEG")  # same file twice
    os.symlink("missing.JPEG", train / "n01" / "dangling.JPEG")
    os.symlink("self.JPEG", train / "n01" / "self.JPEG")
    listing = sources.scan(str(tmp_path / "root"), ("train",))
    rows = {r[schema.SOURCE]: r[schema.WNID] for r in listing.files["train"].to_pylist()}
    assert rows == {"train/n01/a1.JPEG": "n01", "train/n02/b1.JPEG": "n02",
                    "train/n03/c1.JPEG": "n03"}
    assert reasons(listing) == {
        "train/n01/alias": "folder already listed as train/n02",
        "train/n01/b1-link.JPEG": "same file as train/n02/b1.JPEG",
        "train/n01/dangling.JPEG": "dangling symlink",
        "train/n01/self.JPEG": "symlink loop",
    }
    assert len(rows) + len(listing.quarantine) == entries_under(train)


def test_special_files_and_undecodable_names_are_quarantined(tmp_path):
    train = tmp_path / "train"
    touch(train / "n01" / "a.JPEG")
    os.mkfifo(train / "n01" / "fifo.JPEG")  # opening it would block the decoder forever
    touch(os.fsencode(train / "n01") + b"/caf\xe9.JPEG")  # Latin-1 name, not UTF-8
    listing = sources.scan(str(tmp_path), ("train",))
    assert listing.files["train"].column(schema.SOURCE).to_pylist() == ["train/n01/a.JPEG"]
    assert reasons(listing) == {"train/n01/fifo.JPEG": "not a regular file",
                                "train/n01/caf\\xe9.JPEG": "file name is not valid UTF-8"}


def test_image_id_is_unique_per_split(tmp_path):
    touch(tmp_path / "train" / "n01" / "x.JPEG")
    touch(tmp_path / "train" / "n02" / "x.JPEG", b"y")  # same stem, another class
    touch(tmp_path / "train" / "n01" / "y.JPEG")
    touch(tmp_path / "train" / "n01" / "y.png", b"y")  # same stem, same class
    listing = sources.scan(str(tmp_path), ("train",))
    assert listing.files["train"].column(schema.SOURCE).to_pylist() == ["train/n01/y.JPEG"]
    assert reasons(listing) == {
        "train/n01/x.JPEG": "image_id 'x' has conflicting labels (also at train/n02/x.JPEG)",
        "train/n02/x.JPEG": "image_id 'x' has conflicting labels (also at train/n01/x.JPEG)",
        "train/n01/y.png": "duplicate image_id 'y' (kept train/n01/y.JPEG)",
    }


def flat_val(root, csv_bytes: bytes, ids=("v1", "v2", "v3")):
    for i in ids:
        touch(root / "val" / f"{i}.JPEG")
    (root / sources.VAL_CSV).write_bytes(csv_bytes)


def test_val_csv_conflicts_quarantine_and_agreeing_duplicates_count_once(tmp_path):
    flat_val(tmp_path, b"ImageId,PredictionString\nv1,n01 1 2 3 4\nv2,n02 1 2 3 4\n"
                       b"v1,n01 5 6 7 8\nv2,n03 1 2 3 4\nv3,n01\n")
    listing = sources.scan(str(tmp_path), ("val",))
    assert listing.files["val"].column(schema.IMAGE_ID).to_pylist() == ["v1", "v3"]
    assert reasons(listing) == {"val/v2.JPEG": f"conflicting labels in {sources.VAL_CSV}: n02 "
                                               "(line 3) and n03 (line 5)"}


@pytest.mark.parametrize("body, message", [
    (b"v1,n01\nv2,   \nv3,n01\n", "LOC_val_solution.csv line 3: needs an ImageId"),
    (b"v1,n01\nv2,n01\n\xff3,n01\n", "LOC_val_solution.csv line 4: not UTF-8 text \\(byte 0xff"),
    (b"v1,n01\n,n02\n", "LOC_val_solution.csv line 3: needs an ImageId"),
])
def test_a_malformed_val_csv_is_one_line_naming_the_line(tmp_path, body, message):
    flat_val(tmp_path, b"ImageId,PredictionString\n" + body)
    with pytest.raises(ConfigError, match=message) as e:
        sources.scan(str(tmp_path), ("val",))
    assert "\n" not in str(e.value)


def test_a_folder_that_may_not_be_read_is_quarantined_not_fatal():
    """A class folder without read permission (chmod 000; as root, listed as user nobody, since
    root reads anything) is one quarantine row; the rest of the tree is listed."""
    with tempfile.TemporaryDirectory() as tmp:  # not under pytest's 0700 folders
        os.chmod(tmp, 0o755)
        for rel in ("train/n01/a.JPEG", "train/n02/b.JPEG"):
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), mode=0o755, exist_ok=True)
            touch(os.path.join(tmp, rel))
        os.chmod(os.path.join(tmp, "train/n02"), 0)
        if os.geteuid() == 0:
            os.seteuid(65534)
        try:
            listing = sources.scan(tmp, ("train",))
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
    assert listing.files["train"].column(schema.SOURCE).to_pylist() == ["train/n01/a.JPEG"]
    assert reasons(listing) == {"train/n02": "unreadable folder: Permission denied"}
