"""The three jobs on a real multi-node Ray cluster, submitted as a cluster user submits them.

    python -m infra.cluster_demo            # or: make cluster-demo

Starts the local S3 server (SeaweedFS) and a local two-node Ray cluster (`ray start --head` and a
worker with `ray start --address`, both on 127.0.0.1), uploads the sample data to S3, submits
ingest, train and attack with `ray job submit --working-dir . -- python -m ...`, reading from and
writing to S3 only, checks the outputs through boto3 and their manifests, prints how long each job
took, and stops everything it started.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from common import cli
from infra import local_s3
from infra.local_cluster import LocalCluster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    bucket: str = field(default="cluster-demo", metadata={"help": "bucket to create and use"})
    workers: int = field(default=1, metadata={"help": "worker nodes besides the head"})
    cpus: int = field(default=2, metadata={"help": "CPUs each node offers to Ray"})
    classes: int = field(default=4, metadata={"help": "sample classes"})
    train_per_class: int = field(default=40, metadata={"help": "sample training images per class"})
    val_per_class: int = field(default=5, metadata={"help": "sample validation images per class"})


def stages(root: str) -> list[tuple[str, list[str]]]:
    """The jobs in order: (name, the command `ray job submit` runs), all on S3 under ``root``."""
    return [
        ("ingest", ["python", "-m", "pipelines.ingest", "--source", f"{root}/sample",
                    "--output", f"{root}/imagenet64"]),
        ("train", ["python", "-m", "training.train", "--data", f"{root}/imagenet64",
                   "--output", f"{root}/model", "--num-workers", "2", "--epochs", "2",
                   "--batch-size", "16"]),
        ("attack", ["python", "-m", "attacks.fool", "--data", f"{root}/imagenet64",
                    "--model", f"{root}/model", "--output", f"{root}/fooling"]),
    ]


def submit_all(cluster: LocalCluster, root: str, logs: dict | None = None) -> dict[str, float]:
    """Submit every stage; a failing one raises with the end of its log. Returns seconds each;
    ``logs``, when given, receives each stage's output."""
    seconds = {}
    for name, command in stages(root):
        rc, output, took = cluster.submit(command)
        if logs is not None:
            logs[name] = output
        if rc != 0:
            tail = "\n".join(output.splitlines()[-40:])
            raise RuntimeError(f"job {name} failed (exit {rc}):\n{tail}")
        seconds[name] = round(took, 1)
        log.info("%s: done in %.1f s", name, took)
    return seconds


def read_manifests(client, bucket: str, prefix: str) -> dict[str, dict]:
    """Each stage's manifest.json, read through boto3 (what an analyst's tools would use)."""
    out = {}
    for name, sub in (("ingest", "imagenet64"), ("train", "model"), ("attack", "fooling")):
        body = client.get_object(Bucket=bucket, Key=f"{prefix}{sub}/manifest.json")["Body"]
        out[name] = json.loads(body.read())
    return out


def upload_sample(root: str, cfg: Settings) -> None:
    from pipelines import sample

    sample.main(["--output", f"{root}/sample", "--classes", str(cfg.classes),
                 "--train-per-class", str(cfg.train_per_class),
                 "--val-per-class", str(cfg.val_per_class)])


def run(cfg: Settings) -> dict:
    """Everything, for the command line: this process takes the local S3 server's environment."""
    with tempfile.TemporaryDirectory(prefix="cluster-demo-") as tmp:
        server = local_s3.start(tmp)
        try:
            os.environ.update(server.env())
            local_s3.create_bucket(server, cfg.bucket)
            root = f"s3://{cfg.bucket}/demo"
            upload_sample(root, cfg)
            with LocalCluster(cfg.workers, cfg.cpus, env=server.env()) as cluster:
                seconds = submit_all(cluster, root)
            manifests = read_manifests(local_s3.client(server), cfg.bucket, "demo/")
        finally:
            server.stop()
    return {"seconds": seconds, "manifests": manifests}


def main(argv=None) -> None:
    cfg = cli.parse(Settings, argv, __doc__)
    cli.setup_logging()
    t = time.monotonic()
    result = run(cfg)
    counts = result["manifests"]["ingest"]["counts"]
    print(f"ingested: {json.dumps(counts)}")
    for name, took in result["seconds"].items():
        print(f"{name:7s} {took:6.1f} s")
    print(f"total   {time.monotonic() - t:6.1f} s (with cluster and S3 start-up)")


if __name__ == "__main__":
    main()
