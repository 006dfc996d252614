"""Ingest throughput: this job vs Ray's stock read_images + write_parquet vs a one-process floor.

    python -m benchmarks.ingest [--images 10000] [--cpus 2] [--repeat 2] [--sample]

On the same JPEGs, in one run: real photographs cut to ImageNet sizes (benchmarks/photos.py: 10
classes, 500 x 375 and similar, a tenth larger), or with ``--sample`` the generated look-alike
(pipelines/sample.py, without hostile files, which the stock reader cannot survive):
- floor: one process reading and decoding + resizing every file with this job's decoder: the
  per-core rate, times the CPUs given to Ray, is what perfect scaling would reach;
- stock: ``ray.data.read_images(size=(64, 64), mode="RGB")`` then ``write_parquet``;
- ingest: ``pipelines.ingest.run`` on the training split, and where its time went (listing, the
  Ray Data pipeline, the manifest);
- tars: the same job on the same images packed as ImageNet ships them (ILSVRC2012_img_train.tar
  of <wnid>.tar files), read without extracting;
- process: ``python -m pipelines.ingest`` as a whole process, Ray start-up included: its wall and
  CPU seconds, and its manifest's timings (Ray's start, listing, pipeline, decode phase).
Each Ray pipeline runs once on a small subset first, so worker start-up is not counted; stock and
ingest then alternate ``--repeat`` times, so that other load on the machine hits both alike.
Prints images per second and the ratios against the goals (>= 3x stock, >= 80% of floor x CPUs),
per wall second and per CPU second (every process of the pipeline counted); each ingest run's
decode phase, from its manifest (first batch's start to last batch's end, and the decode tasks'
CPU seconds); and where each ingest run's CPU went, by kind of process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import ray

from benchmarks import photos
from common import schema, storage
from pipelines import images, ingest, sample, tars

CLASSES = 10


def floor_rate(files: list[str], size: int) -> tuple[float, float]:
    """Images per second of one process: per CPU second (what one core gives when the process has
    it to itself) and per wall second (lower when other processes share the cores)."""
    t, c = time.perf_counter(), time.process_time()
    for path in files:
        with open(path, "rb") as f:
            images.to_pixels(f.read(), size)
    return len(files) / (time.process_time() - c), len(files) / (time.perf_counter() - t)


class CpuClock:
    """CPU seconds used by this process and all its descendants (Ray's raylet, workers, object
    store): on a machine shared with other work, images per CPU second is the fair measure."""

    def __init__(self):
        self.start = self._times()

    @staticmethod
    def _times() -> dict[int, tuple[str, float]]:
        """{pid: (name, CPU seconds)} of this process and its descendants, from Linux's /proc."""
        stats = {}
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)  # "pid (name) ..."
            except (OSError, IndexError, ValueError):
                continue
            fields = rest.split()
            # fields[1] is the parent pid; fields[11], fields[12]: user and system clock ticks
            stats[int(entry)] = (int(fields[1]), name, int(fields[11]) + int(fields[12]))
        tick = os.sysconf("SC_CLK_TCK")
        mine, grew = {os.getpid()}, True
        while grew:
            more = {pid for pid, (ppid, _, _) in stats.items() if ppid in mine} - mine
            mine |= more
            grew = bool(more)
        return {pid: (stats[pid][1], stats[pid][2] / tick) for pid in mine if pid in stats}

    def seconds(self) -> float:
        return sum(self.by_group().values())

    def by_group(self) -> dict[str, float]:
        """CPU seconds since the start by kind of process (GROUPS)."""
        out = dict.fromkeys(GROUPS, 0.0)
        for pid, (name, t) in self._times().items():
            before = self.start.get(pid, (name, 0.0))[1]
            out[_group(pid, name)] += t - before
        return out


# Where a pipeline's CPU goes, by process: Ray names its workers' processes ray::<task or
# actor> (Linux keeps 15 characters); Ray Data's own actors and the progress counter are
# ray::_<Class>, the node's agents ray::DashboardAgent and ray::RuntimeEnvAgent.
GROUPS = ("driver", "task workers", "Ray Data and progress actors", "Ray's services")
AGENTS = ("ray::Dashboard", "ray::RuntimeEnv")


def _group(pid: int, name: str) -> str:
    if pid == os.getpid():
        return "driver"
    if name.startswith("ray::_"):
        return "Ray Data and progress actors"
    if name.startswith("ray::") and not name.startswith(AGENTS):
        return "task workers"
    return "Ray's services"  # raylet, GCS, the agents, the dashboard, the log monitor


def stock_rate(train: str, out: str, size: int, n: int) -> float:
    t = time.perf_counter()
    ray.data.read_images(train, size=(size, size), mode="RGB").write_parquet(out)
    return n / (time.perf_counter() - t)


def ingest_run(src: str, out: str, limit: int | None = None) -> tuple[float, dict]:
    cfg = ingest.Settings(source=src, output=out, splits=("train",), limit_per_class=limit,
                          overwrite=True)
    t = time.perf_counter()
    manifest = ingest.run(cfg)
    return time.perf_counter() - t, manifest[schema.M_TIMINGS]


def process_seconds(src: str, out: str) -> tuple[float, float, dict]:
    """The job as a user runs it: a fresh Python process that starts its own local Ray. Returns
    its wall seconds, the CPU seconds of it and all its descendants (seen every 0.1 s: what a
    process spends after the last look before it exits is missed) and its manifest's timings."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    clock, used = CpuClock(), {}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.ingest", "--source", src,
                             "--output", out, "--splits", "train", "--overwrite"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        for pid, (name, cpu) in CpuClock._times().items():
            if pid != os.getpid():
                used[pid] = cpu - clock.start.get(pid, (name, 0.0))[1]
        time.sleep(0.1)
    seconds = time.perf_counter() - t
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return seconds, sum(used.values()), storage.read_manifest(out)[schema.M_TIMINGS]


def make_source(args, tmp: str) -> str:
    src = args.data or os.path.join(tmp, "src")
    if args.data:
        return src
    per_class = args.images // CLASSES
    if args.sample:
        sample.generate(sample.Settings(output=src, kind="shapes", classes=CLASSES,
                                        train_per_class=per_class,
                                        val_per_class=0, oddities=False))
    else:
        photos.tree(src, CLASSES, per_class, workers=os.cpu_count() or 1)
    return src


def decode_line(name: str, n: int, timings: dict, floor: float, ideal: float) -> str:
    """The decode phase of one ingest run against the floor: wall rate and decode tasks' CPU."""
    wall, cpu = timings["train_decode_s"], timings["train_decode_cpu_s"]
    return (f"  {name:7s}: {n / wall:7.1f} images/s over {wall:5.1f} s = "
            f"{n / wall / ideal:4.2f} of floor x CPUs; decode tasks {n / cpu:6.1f} images "
            f"per CPU second = {n / cpu / floor:4.2f} of the floor's")


def cpu_line(name: str, groups: dict, timings: dict, wall: float, cpus: int) -> str:
    """Where one ingest run's CPU went, decode tasks apart from the rest of the task workers."""
    decode = timings["train_decode_cpu_s"]
    parts = {"decode tasks": decode, "rest of task workers": groups["task workers"] - decode,
             **{k: v for k, v in groups.items() if k != "task workers"}}
    total = sum(groups.values())
    return (f"  {name:7s}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
            + f"; total {total:.1f} s = {total / (wall * cpus):.2f} of wall x CPUs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="training images, 10 classes")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for local Ray")
    p.add_argument("--repeat", type=int, default=2, help="alternating stock and ingest runs")
    p.add_argument("--sample", action="store_true", help="the generated sample, not photos")
    p.add_argument("--data", default=None, help="reuse a folder of train/<wnid>/ JPEGs")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(args, tmp)
        files = sorted(glob.glob(os.path.join(src, "train", "*", "*")))
        n = len(files)
        floor, floor_wall = floor_rate(files, 64)
        whole, whole_cpu, whole_timings = process_seconds(src, os.path.join(tmp, "process"))
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        # warm-up: start the workers of both pipelines on a few files
        warm = glob.glob(os.path.join(src, "train", "*"))[0]
        stock_rate(warm, os.path.join(tmp, "warm-stock"), 64, 1)
        ingest_run(src, os.path.join(tmp, "warm-ingest"), limit=5)
        tarred = os.path.join(tmp, "tars")
        tars.pack(src, tarred)
        stock, ours, tarry = [], [], []
        cpu = {"stock": [], "ours": [], "tar": []}  # images per CPU second of the whole run
        runs = []  # (name, timings, CPU seconds by process group, wall seconds) per ingest run
        for i in range(args.repeat):
            clock = CpuClock()
            stock.append(stock_rate(os.path.join(src, "train"), os.path.join(tmp, f"stock{i}"),
                                    64, n))
            cpu["stock"].append(n / clock.seconds())
            for name, source, rates in (("ours", src, ours), ("tar", tarred, tarry)):
                clock = CpuClock()
                seconds, timings = ingest_run(source, os.path.join(tmp, name))
                groups = clock.by_group()
                rates.append(n / seconds)
                cpu[name].append(n / sum(groups.values()))
                runs.append((f"{name} {i + 1}", timings, groups, seconds))
            print(f"run {i + 1}: stock {stock[-1]:.0f} images/s, ingest {ours[-1]:.0f} images/s "
                  f"({json.dumps(runs[-2][1])}), from the tar {tarry[-1]:.0f} images/s "
                  f"({json.dumps(runs[-1][1])})", flush=True)
        ray.shutdown()
    ideal = floor * args.cpus
    kind = "generated sample" if args.sample else "photo"
    print(f"images: {n} {kind} JPEGs ({n // CLASSES} per class), Ray CPUs: {args.cpus}, "
          f"load average {os.getloadavg()[1]:.1f} (5 min)")
    print(f"floor (1 process, decode+resize): {floor:8.1f} images per CPU second "
          f"({floor_wall:.1f} per wall second); x{args.cpus} CPUs = {ideal:.1f}")
    for name, rates in (("stock read_images+write_parquet", stock), ("pipelines.ingest", ours),
                        ("pipelines.ingest from the tar", tarry)):
        print(f"{name:32s}: {' '.join(f'{r:8.1f}' for r in rates)} images/s")
    rest = whole - whole_timings["total_s"]
    print(f"whole process python -m pipelines.ingest: {whole:.1f} s ({n / whole:.0f} images/s), "
          f"{whole_cpu:.1f} CPU seconds ({n / whole_cpu:.0f} images per CPU second): "
          f"Ray's start {whole_timings['ray_s']:.1f} s, listing {whole_timings['list_s']:.1f} s, "
          f"the pipeline {whole_timings['train_s']:.1f} s (decoding "
          f"{whole_timings['train_decode_s']:.1f} s), Python's start, imports and exit "
          f"(Ray's shutdown) {rest:.1f} s")
    ratios = [o / s for o, s in zip(ours, stock)]
    print(f"ingest / stock          = {' '.join(f'{r:5.2f}x' for r in ratios)}  (goal >= 3x)")
    print(f"ingest / (floor x CPUs) = {' '.join(f'{o / ideal:5.2f}' for o in ours)}"
          f"   (goal >= 0.80)")
    print(f"tar / folder ingest     = {' '.join(f'{t / o:5.2f}' for t, o in zip(tarry, ours))}")
    print("per CPU second (this process and Ray's, all cores; the floor's is per core):")
    for name, rates in cpu.items():
        print(f"  {name:6s}: {' '.join(f'{r:7.1f}' for r in rates)} images per CPU second, "
              f"{' '.join(f'{r / floor:5.2f}' for r in rates)} of the floor's")
    ratios = [o / s for o, s in zip(cpu["ours"], cpu["stock"])]
    print(f"ingest / stock per CPU second = {' '.join(f'{r:5.2f}x' for r in ratios)}")
    print("decode phase (first batch's start to last batch's end) of each ingest run:")
    for name, timings, _, _ in runs:
        print(decode_line(name, n, timings, floor, ideal))
    print("where each ingest run's CPU went (seconds; writes and Ray's task handling are the rest "
          "of the task workers):")
    for name, timings, groups, seconds in runs:
        print(cpu_line(name, groups, timings, seconds, args.cpus))


if __name__ == "__main__":
    main()
