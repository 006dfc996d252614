"""`ray job submit` on a real two-node local cluster, everything on the real local S3 server."""

from __future__ import annotations

import json
import re

import pytest

from common import schema
from infra import cluster_demo, local_cluster, local_s3
from infra.local_cluster import LocalCluster

pytestmark = pytest.mark.slow

SETTINGS = cluster_demo.Settings(classes=3, train_per_class=20, val_per_class=3)


@pytest.fixture(scope="module")
def cluster(s3_server):
    with LocalCluster(workers=1, cpus=2, env=s3_server.env()) as c:
        yield c


# What looks like trouble in a log: a level, a traceback, a C++ error line, a colour code.
ALARMING = re.compile(r"\b(WARNING|ERROR|Error|Traceback|Deprecat)|^\[[^]]* E \d+|\x1b\[")
# ... except the raylet's note that many worker processes started at once, which these 2-CPU
# nodes give when a training starts its controller, worker and data actors together (the
# threshold is 4 x the node's CPUs)
STARTUP_NOTE = re.compile(r"^\(raylet\) WARNING: \d+ PYTHON worker processes have been started")


# `ray job submit`'s own lines: "<date> <time>\tINFO cli.py:42 -- ..." (also sdk.py, ERR, and
# its notes on packaging --working-dir)
SUBMIT_CLIENT = re.compile(r"^\S+ \S+\t\w+ (cli|sdk|working_dir|packaging)\.py:\d+ -- ")


def driver_lines(output: str) -> list[str]:
    """The job's own output within `ray job submit`'s: after "Running entrypoint", without the
    submitting client's lines."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint"))
    return [line for line in lines[start + 1:] if line.strip() and not SUBMIT_CLIENT.match(line)]


def test_three_jobs_submitted_to_a_cluster_write_everything_to_s3(cluster, bucket, s3_server):
    root = f"{bucket}/cluster"
    cluster_demo.upload_sample(root, SETTINGS)
    logs = {}
    seconds = cluster_demo.submit_all(cluster, root, logs)
    assert list(seconds) == ["ingest", "train", "attack"]
    for name, output in logs.items():  # `ray job logs` of a successful run reads cleanly
        lines = driver_lines(output)
        assert 3 <= len(lines) <= 40, (name, lines)
        alarming = [line for line in lines
                    if ALARMING.search(line) and not STARTUP_NOTE.match(line)]
        assert not alarming, (name, alarming)
    client = local_s3.client(s3_server)
    m = cluster_demo.read_manifests(client, bucket.removeprefix("s3://"), "cluster/")
    counts = m["ingest"][schema.M_COUNTS]
    assert counts["train"]["written"] == 3 * 20 and counts["val"]["written"] == 3 * 3
    for split in ("train", "val"):
        assert counts[split]["seen"] == counts[split]["written"] + counts[split]["quarantined"]
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket.removeprefix("s3://"), Prefix="cluster/") for o in page.get("Contents", [])]
    assert "cluster/model/weights.npz" in keys
    # two workers, one on each node (DDP over gloo between them), learned the classes
    final = m["train"][schema.M_FINAL]
    assert final["val_top1"] >= 0.5 and m["train"][schema.M_CONFIG]["num_workers"] == 2
    assert any(k.startswith("cluster/fooling/pairs/") and k.endswith(".parquet") for k in keys)
    assert all("AWS_SECRET" not in json.dumps(v) for v in m.values())  # no secrets in manifests


def test_a_bad_argument_fails_the_submission_with_the_jobs_one_line_error(cluster, bucket):
    rc, output, _ = cluster.submit(["python", "-m", "pipelines.ingest", "--source",
                                    f"{bucket}/no-such-prefix", "--output", f"{bucket}/x"])
    assert rc != 0
    lines = output.splitlines()
    started = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint"))
    failed = next(i for i, line in enumerate(lines) if "ERR cli.py" in line and i > started)
    job_log = [line for line in lines[started + 1:failed] if line.strip()]
    assert job_log[-1] == f"error: {bucket}/no-such-prefix does not exist"


def test_what_cannot_listen_on_localhost_only_is_rays_cpp_servers(cluster, bucket):
    """Every listener of the cluster's processes is on 127.0.0.1, except those Ray 2.60 binds
    beyond it with no option (infra/local_cluster.py names them), which the token guards."""
    rc, _, _ = cluster.submit(["python", "-c", "print('ok')"])  # a driver and a job supervisor
    assert rc == 0
    found = cluster.listeners()
    assert any(name == "gcs_server" for _, _, name in found)
    assert any(host == "127.0.0.1" and port == cluster.dashboard_port for host, port, _ in found)
    open_ = sorted({(name, host) for host, _, name in found if host != "127.0.0.1"})
    assert [n for n, _ in open_ if not n.startswith(local_cluster.ALL_INTERFACES)] == [], open_
