"""The regularization sweep: one Ray Tune trial per strength, each a full training, one table."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pyarrow.fs as pafs
import pytest

from common import schema, storage
from common.errors import ConfigError
from common.model import read_model
from common.sweep import SweepRow, read_sweep
from tests.trees import every_file
from training import sweep


def test_trial_settings_carry_the_sweep_flags(tmp_path):
    cfg = sweep.Settings(data="data", output=str(tmp_path), reg=(0.5,), epochs=3, lr=0.1,
                         num_workers=2, cpus_per_worker=0.5)
    one = sweep.train_settings(cfg, 0.5)
    assert one.reg == 0.5 and one.epochs == 3 and one.lr == 0.1 and one.num_workers == 2
    assert one.output == os.path.join(str(tmp_path), "reg=0.5") and one.robust_eps == 0
    assert one.data == os.path.abspath("data")  # Tune runs trials in folders of their own
    robust = sweep.train_settings(cfg, 0.5, 8.0)
    assert robust.robust_eps == 8.0 and robust.output.endswith("reg=0.5_eps=8")


def test_the_grid_is_every_pair_once():
    cfg = sweep.Settings(data="d", output="o", reg=(1.0, 0.1), robust_eps=(8.0, 0.0))
    assert sweep.grid(cfg) == [(0.1, 0.0), (0.1, 8.0), (1.0, 0.0), (1.0, 8.0)]
    assert len({sweep.trial_name(*pair) for pair in sweep.grid(cfg)}) == 4


def test_markdown_has_a_row_per_setting():
    rows = [SweepRow(reg=r, robust_eps=0.0, val_top1=0.5, val_top5=1.0, val_loss=1.0,
                     train_loss=0.9, train_top1=0.6, w_norm=2.0, w_pixels_norm=0.1, epochs=1,
                     median_sign_eps=7.0, model="m") for r in (1e-4, 100.0)]
    lines = sweep.markdown(rows).strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 0.0001 |") and "50.0%" in lines[3]


def test_bad_reg_lists_fail_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="distinct"):
        sweep.run(sweep.Settings(data=str(tmp_path), output=str(tmp_path), reg=(1.0, 1.0)))
    with pytest.raises(ConfigError, match=">= 0"):
        sweep.run(sweep.Settings(data=str(tmp_path), output=str(tmp_path), reg=(-1.0,)))
    with pytest.raises(ConfigError, match="--robust-eps must list distinct"):
        sweep.run(sweep.Settings(data=str(tmp_path), output=str(tmp_path), robust_eps=(2.0, 2.0)))


@pytest.mark.slow
def test_a_diverging_sweep_is_one_line_and_publishes_nothing(ingested, tmp_path):
    out = tmp_path / "sweep"
    """The training (training.train in a Tune trial) stops in its first epoch with nothing
    published, and the sweep says so in one line."""
    with pytest.raises(ConfigError, match=r"1 of 1 trainings failed; the first: training "
                                          r"diverged in epoch 1: .*lower --lr") as e:
        sweep.run(sweep.Settings(data=ingested, output=str(out), reg=(1.0,), epochs=1,
                                 batch_size=16, cpus_per_worker=0.5, lr=1e30))
    assert "\n" not in str(e.value)
    assert not (out / storage.MANIFEST).exists() and not (out / "sweep.parquet").exists()
    trial = out / sweep.trial_name(1.0)
    assert not set(os.listdir(trial)) & {storage.MANIFEST, schema.WEIGHTS_FILE,
                                         schema.METRICS_FILE}
    assert not (trial / schema.CHECKPOINTS_DIR / "epoch-0001").exists()


@pytest.mark.slow
def test_every_job_on_s3_and_no_credential_in_any_log_output_or_object(
        sample_dir, s3_server, bucket, ray_local, capfd, caplog):
    """Every job with AWS credentials in the environment against the real local S3 server (the
    sweep with two robust radii, its table checked), then a search for the access key and the
    secret in: the Ray session folder (runtime_env agent, raylet, GCS, workers' logs), what the
    jobs printed, and every object they wrote."""
    import ray

    from attacks import fool
    from pipelines import ingest
    from report import build as report

    caplog.set_level(logging.INFO, logger="training.sweep")  # the sweep's own lines
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key  # set as a user would
    root = f"{bucket}/secrets-{os.getpid()}"
    data, swept, fooled = (f"{root}/{p}" for p in ("data", "sweep", "fooling"))
    ingest.run(ingest.Settings(source=str(sample_dir), output=data))
    # the sweep is the one job that runs training.train, as Tune trials: its model is the attack's
    radii = (0.0, 16.0)
    # cached shards on CPU: the path a GPU takes by default, and quick for tiny data
    sweep.run(sweep.Settings(data=data, output=swept, reg=(1e-4,), robust_eps=radii, epochs=2,
                             batch_size=16, cpus_per_worker=0.5, cache=True))
    fool.run(fool.Settings(data=data, model=sweep.trial_output(swept, 1e-4), output=fooled,
                           targets=("0", "1"), methods=("sign",), limit_images=4))
    report.run(report.Settings(results=fooled, output=f"{root}/report", sweep=swept))
    _check_sweep_table(swept, radii, caplog)

    secrets = [s3_server.secret_key.encode(), s3_server.access_key.encode()]
    printed = capfd.readouterr()
    session = ray._private.worker._global_node.get_session_dir_path()
    fs, path = storage.filesystem(root)
    objects = [i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File]
    assert len(objects) > 20 and any("runtime_env" in p for p in every_file(session))
    leaks = [p for p in every_file(session) if any(s in open(p, "rb").read() for s in secrets)]
    leaks += [o for o in objects if any(s in fs.open_input_stream(o).read() for s in secrets)]
    leaks += [n for n, text in (("stdout", printed.out), ("stderr", printed.err))
              if any(s.decode() in text for s in secrets)]
    assert leaks == []


def _check_sweep_table(out: str, radii: tuple[float, ...], caplog) -> None:
    """One row, one complete model per setting; the robust model harder to fool."""
    table = read_sweep(out)
    assert [(r.reg, r.robust_eps) for r in table] == [(1e-4, e) for e in radii]
    md = storage.read_bytes(storage.join(out, f"{sweep.TABLE}.md")).decode().strip().splitlines()
    assert len(md) == 2 + len(radii)
    for row in table:  # each training has its own complete model
        m = storage.read_manifest(row.model, "model")
        W = read_model(row.model).W
        assert m[schema.M_CONFIG]["reg"] == row.reg
        assert m[schema.M_CONFIG]["robust_eps"] == row.robust_eps
        assert row.w_pixels_norm == pytest.approx(float(np.linalg.norm(W)), rel=1e-5)
        assert storage.exists(storage.join(row.model, schema.TEMPLATES_FILE))
    plain, robust = table
    # the robust loss is the certified worst case: above the plain loss; and the model is
    # harder to fool (measured: median sign eps 22.5 against 21; same seed, same weights on CPU)
    assert robust.train_loss > plain.train_loss + 0.5
    assert robust.median_sign_eps > plain.median_sign_eps
    # each model's median sign strength over the first validation images (the trade-off itself
    # needs trained-to-convergence models: tests/test_fooling.py checks it on fitted ones)
    assert all(0 < r.median_sign_eps <= 255 for r in table)
    assert storage.read_manifest(out, "sweep")[schema.M_KIND] == "sweep"
    # each finished model was announced on the driver, through the sweep's progress
    done = [r.getMessage() for r in caplog.records if r.name == "training.sweep"
            and re.fullmatch(r".+: val top-1 [\d.]+% after \d+ epochs", r.getMessage())]
    announced = sorted(d.split(": val top-1")[0] for d in done)
    assert announced == sorted(r.model for r in table), done
