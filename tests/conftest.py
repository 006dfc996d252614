"""Shared fixtures: one local S3 server, one local Ray and one small sample for the whole run;
every test that uses the Ray is marked slow.

The S3 environment is set before Ray starts, so that Ray's workers inherit it as a cluster's would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra import local_s3
from pipelines import ingest, sample

TEST_BUCKET = "test-bucket"


def pytest_collection_modifyitems(items):
    """Every test that starts the session's Ray (directly or through a fixture that needs it:
    ingested, attacked_sweep, ...) is marked slow, so ``-m "not slow"`` never starts Ray."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = local_s3.start(str(tmp_path_factory.mktemp("local-s3")))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    local_s3.create_bucket(server, TEST_BUCKET)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def bucket(s3_server) -> str:
    """``s3://test-bucket`` on the local server; tests write under prefixes of their own."""
    return f"s3://{TEST_BUCKET}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small ImageNet look-alike with every planted oddity and hostile file."""
    out = tmp_path_factory.mktemp("sample")
    sample.generate(sample.Settings(output=str(out), kind="shapes", classes=4, train_per_class=12,
                                    val_per_class=4, num_workers=2))
    return out


@pytest.fixture(scope="session")
def ingested(sample_dir, ray_local, tmp_path_factory) -> str:
    """The sample ingested to a local folder with default settings (read-only for tests)."""
    out = str(tmp_path_factory.mktemp("ingested"))
    ingest.run(ingest.Settings(source=str(sample_dir), output=out))
    return out


@pytest.fixture(scope="session")
def attacked_sweep(ingested, tmp_path_factory) -> dict:
    """Two models in a sweep's layout, each attacked by the frontier job with images kept
    (tests/sweeps.py): what the frontier and transfer tests read (read-only for tests)."""
    from tests.sweeps import attack_sweep

    return attack_sweep(ingested, str(tmp_path_factory.mktemp("attacked-sweep")))


@pytest.fixture(scope="session")
def model_dir(ingested, tmp_path_factory) -> str:
    """A model fitted with numpy on the ingested sample (tests/attacked.py; read-only)."""
    from tests.attacked import fit_model

    return fit_model(ingested, str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="session")
def attacked(ingested, model_dir, tmp_path_factory):
    """(settings, manifest) of the attack job run once on that model with every method, for
    every test that only reads an attack output (tests/attacked.py; read-only for tests)."""
    from tests.attacked import attack

    return attack(ingested, model_dir, str(tmp_path_factory.mktemp("fooling")))

