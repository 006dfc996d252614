"""The output lifecycle (common/lifecycle.py) without Ray: overlap, identity, overwrite, resume."""

from __future__ import annotations

import json
import math
import os

import pytest

from common import lifecycle, schema, storage
from common.errors import ConfigError
from tests.trees import tree_digest


def output(uri, settings=None, inputs=None, kind="train", owns=("weights.npz", "checkpoints")):
    return lifecycle.Output(str(uri), kind, owns=owns, inputs=inputs or {},
                            identity={"settings": settings or {"reg": 0.1}})


@pytest.mark.parametrize("out, src, where", [
    ("d", "d", "is"), ("d/sub", "d", "is inside"), ("d", "d/sub", "contains"),
    ("d/", "./d", "is"),
])
def test_an_output_overlapping_an_input_is_refused(tmp_path, out, src, where):
    os.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"the output .* {where} the data"):
        lifecycle.refuse_overlap(out, {"data": src})


def test_overlap_sees_through_symlinks_and_s3_prefixes(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ConfigError, match="is inside"):
        lifecycle.refuse_overlap(str(tmp_path / "link" / "out"), {"data": str(tmp_path / "real")})
    with pytest.raises(ConfigError, match="contains"):
        lifecycle.refuse_overlap("s3://b/x", {"model": "s3://b/x/model/"})
    lifecycle.refuse_overlap("s3://b/x2", {"model": "s3://b/x"})  # a sibling, not inside
    lifecycle.refuse_overlap(str(tmp_path / "a"), {"data": str(tmp_path / "ab"), "none": None})


def test_fresh_output_records_its_identity_first(tmp_path):
    out = output(tmp_path / "m")
    assert out.prepare(overwrite=False) is False
    record = json.loads((tmp_path / "m" / lifecycle.IDENTITY_FILE).read_text())
    assert record == {"kind": "train", "settings": {"reg": 0.1},
                      "owns": ["checkpoints", "weights.npz"]}


def test_same_identity_resumes_other_settings_are_refused(tmp_path):
    output(tmp_path, {"reg": 1.0}).prepare(False)
    (tmp_path / "checkpoints").mkdir()
    assert output(tmp_path, {"reg": 1.0}).prepare(False) is True  # resumes: nothing cleared
    assert (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"other settings or inputs \(reg: 1.0 -> 2.0\)"):
        output(tmp_path, {"reg": 2.0}).prepare(False)
    assert output(tmp_path, {"reg": 1.0}).prepare(False, resumable=False) is False
    assert not (tmp_path / "checkpoints").exists()  # a job that cannot resume starts again


def test_files_without_a_record_are_refused_even_with_overwrite(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch-0002").mkdir()
    before = tree_digest(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds checkpoints without _identity.json"):
            output(tmp_path).prepare(overwrite)
    assert tree_digest(tmp_path) == before and os.listdir(tmp_path) == ["checkpoints"]


def test_another_jobs_output_is_refused_even_with_overwrite(tmp_path):
    storage.write_manifest(str(tmp_path), {"kind": "ingest"})
    (tmp_path / "train").mkdir()
    before = tree_digest(tmp_path)
    with pytest.raises(ConfigError, match="holds a ingest output .*replaces only a train output"):
        output(tmp_path).prepare(True)
    assert tree_digest(tmp_path) == before


def test_overwrite_removes_only_what_the_record_lists_and_the_job_writes(tmp_path, caplog):
    first = output(tmp_path, owns=("weights.npz", "checkpoints", "old.png"))
    first.prepare(False)
    for name in ("weights.npz", "old.png", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "x").write_text("x")
    first.finish({"kind": "train", "n": 1})
    assert not (tmp_path / lifecycle.LEASE_FILE).exists()  # released by finish
    with pytest.raises(ConfigError, match="already holds a finished train output.*--overwrite"):
        output(tmp_path).prepare(False)
    output(tmp_path, {"reg": 5.0}).prepare(True)  # a job that no longer writes old.png
    assert sorted(os.listdir(tmp_path)) == [lifecycle.IDENTITY_FILE, lifecycle.LEASE_FILE,
                                            "notes.txt", "old.png"]
    assert "lists old.png as written: not names a train job writes, so they stay" in caplog.text


def test_a_record_naming_paths_outside_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious").write_text("keep")
    (out / lifecycle.IDENTITY_FILE).write_text(json.dumps(
        {"kind": "train", "owns": ["../precious"], "settings": {"reg": 0.1}}))
    with pytest.raises(ConfigError, match="not names inside the output"):
        output(out).prepare(True)
    assert (tmp_path / "precious").read_text() == "keep"


def test_the_manifest_is_written_last_with_finite_numbers_only(tmp_path):
    out = output(tmp_path)
    out.prepare(False)
    with pytest.raises(ValueError, match=r"manifest.final.val_loss is nan"):
        out.finish({"kind": "train", "final": {"val_loss": math.nan}})
    with pytest.raises(ValueError, match=r"manifest.W\[1\] is inf"):
        out.finish({"kind": "train", "W": [1.0, math.inf]})
    assert not (tmp_path / storage.MANIFEST).exists()
    m = out.finish({"kind": "train", "n": 3})
    assert storage.read_manifest(str(tmp_path))[schema.M_IDENTITY] == m[schema.M_IDENTITY]


def test_absolute_uris(tmp_path):
    os.chdir(tmp_path)
    assert lifecycle.absolute("x/y") == os.path.join(os.path.realpath(tmp_path), "x", "y")
    assert lifecycle.absolute("s3://b/p/") == "s3://b/p"


def test_overwrite_never_removes_a_name_the_job_does_not_write(tmp_path, caplog):
    """A record is not trusted for names the job itself does not write: --overwrite removes only
    the intersection of its ``owns`` with the job's, and says what it left."""
    out = output(tmp_path)
    out.prepare(False)
    (tmp_path / "weights.npz").write_text("w")
    (tmp_path / "notes.txt").write_text("the user's own")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("x")
    out.finish({"kind": "train"})
    identity = tmp_path / lifecycle.IDENTITY_FILE
    record = json.loads(identity.read_text())
    identity.write_text(json.dumps({**record, "owns": record["owns"] + ["notes.txt", "mine"]}))
    with caplog.at_level("INFO", logger="common.lifecycle"):
        output(tmp_path, {"reg": 5.0}).prepare(True)
    assert (tmp_path / "notes.txt").read_text() == "the user's own"
    assert (tmp_path / "mine" / "x").read_text() == "x"
    assert not (tmp_path / "weights.npz").exists()
    assert "mine, notes.txt" in caplog.text


def test_a_run_refused_by_its_ready_check_leaves_no_claim_and_no_file(tmp_path):
    def no_gpu():
        raise ConfigError("--use-gpu was given but the Ray cluster has no GPU")

    with pytest.raises(ConfigError, match="no GPU"):
        output(tmp_path / "m").prepare(False, ready=no_gpu)
    assert os.listdir(tmp_path / "m") == []
    assert output(tmp_path / "m").prepare(False) is False  # nothing held it


def test_the_claim_is_held_from_prepare_to_finish(tmp_path):
    out = output(tmp_path)
    out.prepare(False)
    claim = json.loads((tmp_path / lifecycle.LEASE_FILE).read_text())
    assert set(claim) == {"host", "pid", "started", "token", "expires"}
    assert claim["pid"] == os.getpid() and claim["token"] == out.claim.token
    out.finish({"kind": "train"})
    assert not (tmp_path / lifecycle.LEASE_FILE).exists()


def test_a_second_run_in_the_same_process_takes_its_claim_back(tmp_path):
    """A run that failed after prepare (a test calling the job again, a notebook) leaves the
    process holding the claim: the next run there takes it back; the first can no longer
    finish."""
    first = output(tmp_path)
    first.prepare(False)
    second = output(tmp_path)
    assert second.prepare(False) is True
    with pytest.raises(ConfigError, match="not writing the manifest .* this run's claim on it "
                                          f"lapsed and pid {os.getpid()} on "):
        first.finish({"kind": "train"})
    second.finish({"kind": "train"})
    assert not (tmp_path / lifecycle.LEASE_FILE).exists()


def test_a_job_never_names_the_lifecycles_own_files(tmp_path):
    for name in lifecycle.OWN_NAMES:
        with pytest.raises(ValueError, match="the lifecycle's own files"):
            output(tmp_path, owns=("weights.npz", name))


def test_an_output_under_a_file_is_refused_as_unwritable(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write"):
        output(tmp_path / "file" / "m").prepare(False)
