"""The training job: its pieces without Ray, then real Ray Train runs on the ingested sample.

The slow tests share one trained model (module scope) and compare every other run against it:
same seed, data and workers must give the same weights, whether resumed or read from S3.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from common import dataset, schema, storage
from common.errors import ConfigError
from common.model import read_model, write_weights
from tests.trees import tree_digest
from training import batches, softmax, train, weights

SMALL = {"epochs": 2, "batch_size": 16}  # 48 training rows: 3 steps an epoch


# --- without Ray ---------------------------------------------------------------------------------


def test_pixels_reads_arrow_buffers_exactly():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (7, 12), dtype=np.uint8)
    arr = pa.array([r.tobytes() for r in rows], pa.binary())
    np.testing.assert_array_equal(dataset.pixels(arr, 12), rows)
    np.testing.assert_array_equal(dataset.pixels(arr.slice(2, 4), 12), rows[2:6])  # offsets
    chunked = pa.chunked_array([arr.slice(0, 3), arr.slice(3)]).cast(pa.large_binary())
    np.testing.assert_array_equal(dataset.pixels(chunked, 12), rows)
    bad = pa.array([b"x" * 12, b"y" * 11], pa.binary())
    with pytest.raises(ConfigError, match=r"image 'b' in f.parquet is 11 bytes, not the 12 "
                                          r"bytes every image of the data has \(\[2, 2, 3\]\)"):
        dataset.pixels(bad, 12, ["a", "b"], "f.parquet", [2, 2, 3])
    with pytest.raises(ConfigError, match="image 'b' .* null"):
        dataset.pixels(pa.array([b"x" * 12, None], pa.binary()), 12, pa.array(["a", "b"]))


def test_cache_draws_every_row_once_per_epoch():
    cache = batches.Cache.allocate(4, 3, torch.device("cpu"))  # grows past its first guess
    X = torch.arange(30, dtype=torch.uint8).reshape(10, 3)
    for i in range(0, 10, 4):
        cache.append(X[i:i + 4], torch.arange(i, min(i + 4, 10)))
    assert cache.n == 10
    seen = [y for _, yb in cache.batches(4, seed=1) for y in yb.tolist()]
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    for Xb, yb in cache.batches(3, seed=1):
        assert torch.equal(Xb, X[yb])  # rows keep their labels
    again = [y for _, yb in cache.batches(4, seed=1) for y in yb.tolist()]
    other = [y for _, yb in cache.batches(4, seed=2) for y in yb.tolist()]
    assert again == seen and other != seen
    cache.truncate(6)
    assert [y for _, yb in cache.batches(4) for y in yb.tolist()] == list(range(6))


def test_epoch_seeds_differ_by_epoch_and_rank_only():
    seeds = {batches.epoch_seed(0, e, r) for e in range(5) for r in range(3)}
    assert len(seeds) == 15 and batches.epoch_seed(0, 1, 2) == batches.epoch_seed(0, 1, 2)


def test_weights_round_trip(tmp_path):
    W = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    b = np.arange(3, dtype=np.float32)
    entry = write_weights(str(tmp_path), W, b, ["a", "b", "c"])
    data = (tmp_path / schema.WEIGHTS_FILE).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # what analysts do
        assert z[schema.W_KEY].dtype == np.float32 and list(z[schema.CLASSES_KEY]) == list("abc")
    with pytest.raises(ConfigError, match="manifest"):  # no manifest: not a complete model
        read_model(str(tmp_path))
    storage.write_manifest(str(tmp_path), {"kind": "train"})
    m = read_model(str(tmp_path))
    assert np.array_equal(m.W, W) and np.array_equal(m.b, b) and m.classes == ["a", "b", "c"]
    assert m.sha256 == entry["sha256"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_are_data_not_code():
    state = {"model": {"weight": torch.ones(2, 3)}, "epoch": 1, "history": [{"a": 1.0}]}
    back = weights.read_checkpoint(weights.checkpoint_bytes(state))
    assert torch.equal(back["model"]["weight"], state["model"]["weight"]) and back["epoch"] == 1
    with pytest.raises(pickle.UnpicklingError):
        weights.read_checkpoint(weights.checkpoint_bytes({"evil": _Payload()}))


@pytest.fixture(scope="module")
def fake_ingest(tmp_path_factory) -> str:
    """A minimal complete ingest output for configuration checks (never trained on)."""
    out = tmp_path_factory.mktemp("fake-ingest")
    for split in schema.SPLITS:
        (out / split).mkdir()
        row = {schema.IMAGE_ID: ["x"], schema.LABEL: [0], schema.WNID: ["n1"],
               schema.IMAGE: [b"\0" * 12], schema.SOURCE: ["x.JPEG"], schema.ORIG_WIDTH: [2],
               schema.ORIG_HEIGHT: [2]}
        pq.write_table(pa.Table.from_pydict(row, schema=schema.IMAGES_SCHEMA),
                       out / split / "part-00000.parquet")
    storage.write_manifest(str(out), {
        schema.M_KIND: "ingest", schema.M_CLASSES: ["n1"], schema.M_IMAGE_SHAPE: [2, 2, 3],
        schema.M_COUNTS: {s: {"written": 1} for s in schema.SPLITS},
        schema.M_PIXEL_MEAN: [1.0] * 3, schema.M_PIXEL_STD: [1.0] * 3,
        schema.M_FILES: [{"path": f"{s}/part-00000.parquet"} for s in schema.SPLITS]})
    return str(out)


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "--epochs must be positive"),
    ({"lr": -1.0}, "--lr must be positive"),
    ({"reg": -0.1}, "--reg"),
    ({"momentum": 1.0}, "--momentum"),
    ({"robust_eps": 256.0}, "--robust-eps"),
    ({"robust_eps": float("nan")}, "--robust-eps"),
    ({"num_workers": 3}, "multiple of --num-workers"),
    ({"optimizer": "lbfgs"}, "unknown --optimizer"),
])
def test_bad_settings_fail_before_ray(fake_ingest, tmp_path, change, message):
    cfg = train.Settings(data=fake_ingest, output=str(tmp_path / "m"), **change)
    with pytest.raises(ConfigError, match=message):
        train.check(cfg)


def test_data_without_manifest_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no manifest.json"):
        train.run(train.Settings(data=str(tmp_path), output=str(tmp_path / "m")))


def test_unwritable_output_is_refused(fake_ingest, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write"):
        train.run(train.Settings(data=fake_ingest, output=str(tmp_path / "file" / "m")))


def test_unfinished_run_with_other_settings_is_refused(fake_ingest, tmp_path):
    out = str(tmp_path / "m")
    train.output(train.Settings(data=fake_ingest, output=out, reg=1.0)).prepare(False)
    with pytest.raises(ConfigError, match="reg: 1.0 -> 2.0"):
        train.output(train.Settings(data=fake_ingest, output=out, reg=2.0)).prepare(False)
    # settings that do not change the model may differ: the run resumes
    assert train.output(train.Settings(data=fake_ingest, output=out, reg=1.0,
                                       num_workers=2)).prepare(False)


# --- with Ray ------------------------------------------------------------------------------------


def _val_rows(data: str) -> tuple[np.ndarray, np.ndarray]:
    """The validation split read with pyarrow alone: (N, D) uint8 pixels and labels."""
    m = dataset.open_ingest(data)
    table = pa.concat_tables([pq.read_table(u, columns=[schema.IMAGE, schema.LABEL])
                              for u in dataset.split_files(data, m, "val")])
    X = np.stack([np.frombuffer(b, np.uint8) for b in table.column(schema.IMAGE).to_pylist()])
    return X, table.column(schema.LABEL).to_numpy().astype(np.int64)


def _weights(out: str) -> tuple[np.ndarray, np.ndarray]:
    m = read_model(out)
    return m.W, m.b


@pytest.fixture(scope="module")
def trained(ingested, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("model"))
    return out, train.run(train.Settings(data=ingested, output=out, **SMALL))


def _footer_readers() -> int:
    """Actors of Ray Data's Parquet footer reader started in this Ray session so far."""
    import ray

    return sum(a.get("ActorClassName") == "FooterReader"
               for a in ray._private.state.actors().values())


@pytest.mark.slow
def test_a_read_lists_its_files_with_one_footer_reader_unless_the_user_asks(ingested,
                                                                            monkeypatch):
    """Ray Data would start 32 footer-reading actors (32 processes) to list each split's files,
    every epoch; training's reads start one, or as many as RAY_DATA_PARQUET_FOOTER_NUM_ACTORS
    says, and leave the environment as it was."""
    name = train.FOOTER_READERS[0]
    monkeypatch.delenv(name, raising=False)
    for wanted, env in ((1, None), (3, "3")):
        if env:
            monkeypatch.setenv(name, env)
        before = _footer_readers()
        ds = train._datasets(train.Settings(data=ingested, output="unused"),
                             dataset.open_ingest(ingested))
        assert len(ds["val"].take_all()) == len(_val_rows(ingested)[1])
        assert _footer_readers() - before == wanted
        assert os.environ.get(name) == env


@pytest.mark.slow
def test_training_beats_chance(trained):
    _, m = trained
    C = len(m[schema.M_CLASSES])
    assert m[schema.M_FINAL]["val_top1"] >= 0.6 > 1 / C  # chance is 25%
    assert m[schema.M_INITIAL_LOSS] == pytest.approx(math.log(C), abs=0.1)
    assert m[schema.M_FINAL]["train_loss"] < m[schema.M_INITIAL_LOSS]


@pytest.mark.slow
def test_folded_weights_predict_like_the_checkpoint(trained, ingested):
    out, m = trained
    X, y = _val_rows(ingested)
    path = os.path.join(out, schema.CHECKPOINTS_DIR, f"epoch-{SMALL['epochs']:04d}",
                        schema.CHECKPOINT_FILE)
    state = torch.load(path, weights_only=True)
    model = torch.nn.Linear(X.shape[1], len(m[schema.M_CLASSES]))
    model.load_state_dict(state["model"])
    shift, scale = softmax.channel_stats(m[schema.M_PIXEL_MEAN], m[schema.M_PIXEL_STD], X.shape[1])
    with torch.no_grad():
        want = model(softmax.normalize(torch.from_numpy(X), shift, scale)).numpy()
    W, b = _weights(out)
    got = X.astype(np.float32) @ W.T + b  # DESIGN.md: scores on raw 0..255 HWC pixels
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.mean(got.argmax(1) == y) == pytest.approx(m[schema.M_FINAL]["val_top1"])


@pytest.mark.slow
def test_outputs_are_complete(trained):
    out, m = trained
    history = json.loads(open(os.path.join(out, schema.METRICS_FILE)).read())["history"]
    assert [r["epoch"] for r in history] == list(range(1, SMALL["epochs"] + 1))
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "train_top1", "train_top5"):
        assert all(key in r for r in history)
    for f in m[schema.M_FILES]:
        data = open(os.path.join(out, f["path"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
    assert Image.open(os.path.join(out, schema.TEMPLATES_FILE)).format == "PNG"
    for epoch in range(1, SMALL["epochs"] + 1):  # one checkpoint per epoch, plain data
        path = os.path.join(out, schema.CHECKPOINTS_DIR, f"epoch-{epoch:04d}",
                            schema.CHECKPOINT_FILE)
        assert torch.load(path, weights_only=True)["epoch"] == epoch
    with pytest.raises(ConfigError, match="already holds a finished train output"):
        train.run(train.Settings(data=m[schema.M_DATA], output=out, **SMALL))


def _metrics(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, schema.METRICS_FILE)))


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_on_s3(trained, ingested, bucket):
    """A worker dies in epoch 2 of a run on S3 (SeaweedFS); Ray Train restarts it from the epoch 1
    checkpoint, and the run ends with the same weights as the uninterrupted local one:
    storage, recovery and determinism in one."""
    data = f"{bucket}/train-test/imagenet64"
    fs, path = storage.filesystem(data)
    pafs.copy_files(ingested, path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    model = f"{bucket}/train-test/model"
    m = train.run(train.Settings(data=data, output=model, max_failures=1, **SMALL),
                  fail_at_epoch=2)
    assert m[schema.M_FINAL]["epoch"] == SMALL["epochs"]
    assert _metrics(model)["resumed_after"] == [1]  # the failure happened, and was recovered
    W, b = _weights(model)
    W0, b0 = _weights(trained[0])
    assert np.array_equal(W, W0) and np.array_equal(b, b0)


@pytest.mark.slow
def test_rerun_resumes_an_unfinished_run(trained, ingested, tmp_path):
    """An output whose driver died after the last checkpoint, before writing the model files:
    rerunning finishes it from the checkpoints instead of training again."""
    out = str(tmp_path / "model")
    shutil.copytree(trained[0], out)
    for name in (storage.MANIFEST, schema.WEIGHTS_FILE, schema.METRICS_FILE):
        os.remove(os.path.join(out, name))
    m = train.run(train.Settings(data=ingested, output=out, **SMALL))
    # the same rows, timings included: nothing was trained again
    assert _metrics(out)["history"] == _metrics(trained[0])["history"]
    W, b = _weights(out)
    W0, b0 = _weights(trained[0])
    assert np.array_equal(W, W0) and np.array_equal(b, b0) and m[schema.M_FINAL]["epoch"] == 2



gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_without_a_gpu_writes_nothing(ingested, tmp_path):
    """Refused in one line once Ray is up, before the output's identity is written."""
    out = tmp_path / "t"
    with pytest.raises(ConfigError, match="^--use-gpu needs 1 GPU, one per worker; the cluster "
                                          "has 0$"):
        train.run(train.Settings(data=ingested, output=str(out), use_gpu=True, **SMALL))
    assert os.listdir(out) == []  # the folder that the write probe made, and nothing in it


@gpu
def test_cache_lives_on_the_gpu():
    device = torch.device("cuda")
    assert batches.fits(2**20, device) and not batches.fits(2**50, device)
    cache = batches.Cache.allocate(8, 3, device)
    cache.append(torch.ones(5, 3, dtype=torch.uint8), torch.arange(5))
    X, y = next(cache.batches(4, seed=0))
    assert X.is_cuda and y.is_cuda and len(y) == 4


@gpu
@pytest.mark.slow
def test_training_on_the_gpu_caches_and_beats_chance(ingested, tmp_path):
    m = train.run(train.Settings(data=ingested, output=str(tmp_path), use_gpu=True, **SMALL))
    assert m[schema.M_FINAL]["val_top1"] >= 0.6
    state = torch.load(os.path.join(str(tmp_path), schema.CHECKPOINTS_DIR, "epoch-0002",
                                    schema.CHECKPOINT_FILE), weights_only=True)
    assert state["model"]["weight"].device.type == "cpu"


# --- the output lifecycle, bad data and divergence -------------------------------------------


@pytest.mark.parametrize("inside", [False, True])
def test_output_at_or_inside_the_data_is_refused_and_the_data_untouched(fake_ingest, tmp_path,
                                                                        inside):
    data = str(tmp_path / "data")
    shutil.copytree(fake_ingest, data)
    before = tree_digest(data)
    out = os.path.join(data, "model") if inside else data
    with pytest.raises(ConfigError, match="choose an output apart from the job's inputs"):
        train.run(train.Settings(data=data, output=out, overwrite=True))
    assert tree_digest(data) == before


def test_foreign_checkpoints_are_never_adopted(fake_ingest, tmp_path):
    """Another run's checkpoints without this job's identity record: refused, even with
    --overwrite (they are not this job's to delete), before Ray starts."""
    out = tmp_path / "m"
    (out / schema.CHECKPOINTS_DIR / "epoch-0002").mkdir(parents=True)
    (out / schema.CHECKPOINTS_DIR / "epoch-0002" / schema.CHECKPOINT_FILE).write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds checkpoints without _identity.json"):
            train.run(train.Settings(data=fake_ingest, output=str(out), overwrite=overwrite))
    assert sorted(os.listdir(out)) == [schema.CHECKPOINTS_DIR]


def test_a_rerun_on_other_data_is_refused(fake_ingest, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(fake_ingest, other)
    m = storage.read_manifest(other)
    storage.write_manifest(other, {**m, schema.M_CREATED: "another ingest"})
    out = str(tmp_path / "m")
    train.output(train.Settings(data=fake_ingest, output=out)).prepare(False)
    with pytest.raises(ConfigError, match="inputs.data.manifest_sha256"):
        train.output(train.Settings(data=other, output=out)).prepare(False)


@pytest.mark.slow
def test_an_image_of_the_wrong_length_is_named_with_its_file(ingested, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(ingested, data)
    m = dataset.open_ingest(data)
    path = dataset.split_files(data, m, "train")[0]
    table = pq.read_table(path)
    images = table.column(schema.IMAGE).to_pylist()
    images[5] = images[5][:-3]  # not the first row: the up-front check reads only that one
    table = table.set_column(table.schema.get_field_index(schema.IMAGE), schema.IMAGE,
                             pa.array(images, pa.binary()))
    pq.write_table(table, path)
    bad_id = table.column(schema.IMAGE_ID)[5].as_py()
    with pytest.raises(ConfigError) as e:
        train.run(train.Settings(data=data, output=str(tmp_path / "m"), max_failures=0,
                                 **SMALL))
    assert f"image {bad_id!r} in " in str(e.value) and "part-" in str(e.value)
    assert "12285 bytes, not the 12288 bytes" in str(e.value) and "\n" not in str(e.value)
