"""Fooling throughput: this job and its attack math vs torchattacks' targeted FGSM and BIM.

    python -m benchmarks.attack [--classes 1000] [--images 16] [--targets 256] [--cpus 2]
    python -m benchmarks.attack --data out/imagenet64 --model out/model      # a trained model
    python -m benchmarks.attack --exact [--classes 10] [--photos]     # exact vs sign, iterative, LP
    python -m benchmarks.attack --exact --photos --backends numba,torch  # exact's two searches

On the same model and the same (image, target) pairs, in one run:
- ours, per core: attacks.Sign / Template / Iterative in this process on one thread: every pair
  gets the smallest step that fools it, verified on the stored uint8 image;
- ours, the job: ``attacks.fool.run`` on Ray with --cpus workers, images kept and written;
- torchattacks (run per batch as its README shows: ``FGSM(model, eps)``, ``BIM(model, eps,
  alpha=1/255, steps=0)``, ``set_mode_targeted_by_label``), one thread, two ways:
  - one budget: the L-inf budget at which ours fools every pair it fools (so the library has its
    best chance of equal success); its perturbation is the whole budget;
  - per pair: the budget swept 1, 2, 3, ... levels, each pair kept at its first success: the
    same smallest-step product as ours, which is what equal perturbations take.
Prints pairs per second, the ratios, the success rates and median L-inf, and the extrapolation
of the per-core rates to 50,000 images x 1,000 targets. ``--device cuda`` measures on a GPU.

``--exact`` measures instead, in one run on one thread: pairs per CPU second (the same on a busy
machine) of ``exact``, ``sign`` and ``iterative`` on the same pairs (each warmed up once, then
the median of ``--repeats`` runs taken in turns), the LP solver (scipy's
HiGHS, benchmarks/lp.py) per pair on a sample of them, whether exact's certificate stays below
the LP optimum and its stored step within one level above it, the distribution of the gap
``linf - bound_linf``, and the extrapolation to 50,000 x 1,000 pairs. ``--photos``: the 10-class
model fitted on photograph crops (benchmarks/attack_models.py) instead of the sample. With
``--device cuda`` the three run on the GPU, timed by the wall clock (synchronized), in batches of
``--batch`` pairs, and the extrapolation is to GPU-hours. ``--backends numba,torch`` runs exact
once per search backend (attacks/methods/search.py), in turns with the others, and compares
them on the same pairs: the stored strengths, and the pairs each proves minimal.

Without --data/--model it generates the project's sample data (pipelines/sample.py) with
--classes classes and uses the class-mean linear classifier (the heavily regularized limit of a
softmax: W[k] ~ mean of class k minus the mean image), fitted in closed form.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import numpy as np
import ray
import torch

from attacks import fool, parts
from attacks.methods.base import pairs
from attacks.methods.exact import Exact
from attacks.methods.iterative import Iterative
from attacks.methods.linear import LinearModel, measure
from attacks.methods.search import BACKENDS, backend_for
from attacks.methods.sign import Sign
from attacks.methods.template import Template
from common import dataset, heap, schema, storage
from common.model import read_model, write_weights
from pipelines import ingest, sample

FULL_PAIRS = 50_000 * 1_000
LIB_BATCH = 256  # pairs per torchattacks call


def build_inputs(tmp: str, classes: int) -> tuple[str, str]:
    """The sample data ingested, and the class-mean model written as training would."""
    src, data, model = (os.path.join(tmp, d) for d in ("src", "data", "model"))
    sample.generate(sample.Settings(output=src, kind="shapes", classes=classes,
                                    train_per_class=2,
                                    val_per_class=1, oddities=False))
    ingest.run(ingest.Settings(source=src, output=data))
    X, y = load(data, "train")[:2]
    mu, var = X.mean(0), X.var()
    M = np.stack([X[y == k].mean(0) for k in range(classes)]) - mu
    W = M / (10 * var)  # the temperature only sets how peaked the softmax is
    b = -(W @ mu) - (M * W).sum(1) / 2
    write_weights(model, W, b, dataset.open_ingest(data)[schema.M_CLASSES])
    storage.write_manifest(model, {schema.M_KIND: "train"})
    return data, model


def load(data: str, split: str):
    """A split's images (N, D) float64 and labels, in the order of their ids (the files' order
    follows the ingest's writes, so without it each run would pick other images)."""
    import pyarrow.parquet as pq

    m = dataset.open_ingest(data)
    t = pq.ParquetDataset(dataset.split_files(data, m, split)).read().sort_by(schema.IMAGE_ID)
    X = np.frombuffer(b"".join(t.column(schema.IMAGE).to_pylist()), np.uint8)
    return X.reshape(t.num_rows, -1).astype(np.float64), t.column(schema.LABEL).to_numpy()


class LinearNet(torch.nn.Module):
    """The model as torchattacks wants it: images (N, 3, H, W) in [0, 1]."""

    def __init__(self, W: np.ndarray, b: np.ndarray):
        super().__init__()
        self.lin = torch.nn.Linear(W.shape[1], W.shape[0])
        self.lin.weight.data, self.lin.bias.data = torch.tensor(W), torch.tensor(b)
        self.lin.requires_grad_(False)

    def forward(self, x):
        return self.lin((x * 255).permute(0, 2, 3, 1).reshape(len(x), -1))


def ours(model, attack, X, targets, batch: int = fool.CPU_BATCH,
         clock=time.perf_counter) -> dict:
    """Our attack over the pairs in batches of about ``batch`` pairs, as the job's workers do;
    ``clock``: wall time, or ``time.process_time`` for pairs per CPU second (one thread: what
    one core gives however busy the machine is)."""
    targets = targets.to(X.device)
    step = max(1, batch // len(targets))
    out = {"ok": [], "linf": [], "strength": [], "bound": []}
    seconds = 0.0
    for i in range(0, len(X), step):
        Xi = X[i:i + step]
        t0 = clock()
        f = attack(model)(Xi, model.scores(Xi), targets)
        seconds += clock() - t0
        n, t = pairs(len(Xi), targets)
        m = measure(Xi[n], f.images, f.scores, t)
        out["ok"].append(m["fooled_pred"] == t)
        out["linf"].append(m["linf"])
        out["strength"].append(f.strength)
        out["bound"].append(f.bound if f.bound is not None else torch.zeros_like(f.strength))
    out = {k: torch.cat(v).cpu() for k, v in out.items()}
    return {**out, "rate": len(out["ok"]) / seconds}


def synced() -> float:
    """The wall clock once the GPU's queued work is done: what a GPU run's pairs really took."""
    torch.cuda.synchronize()
    return time.perf_counter()


def library(net, model, make, X, targets, shape, keep=None) -> dict:
    """One library attack over the pairs in batches; ``keep`` limits it to some pairs."""
    n, t = pairs(len(X), targets)
    rows = torch.arange(len(t)) if keep is None else keep
    adv, seconds = [], 0.0
    for i in range(0, len(rows), LIB_BATCH):
        r = rows[i:i + LIB_BATCH]
        x = X[n[r]].float().div(255).view(len(r), *shape).permute(0, 3, 1, 2)
        atk = make()
        atk.set_mode_targeted_by_label(quiet=True)
        t0 = time.perf_counter()
        out = atk(x, t[r])
        seconds += time.perf_counter() - t0
        adv.append((out.permute(0, 2, 3, 1).reshape(len(r), -1) * 255).round().to(torch.uint8))
    adv = torch.cat(adv)
    m = measure(X[n[rows]], adv, model.scores(adv), t[rows])
    return {"rate": len(rows) / seconds, "ok": m["fooled_pred"] == t[rows], "linf": m["linf"]}


def per_pair(net, model, make, X, targets, shape, keep, top: int) -> dict:
    """A library attack swept over budgets 1..top (``make(eps)``); each pair stops at its first
    success, found by re-scoring: the smallest-budget product, as ours makes it."""
    left, linf = keep.clone(), torch.full((len(keep),), float("nan"))
    where = {int(p): i for i, p in enumerate(keep)}
    t0 = time.perf_counter()
    for eps in range(1, top + 1):
        if len(left) == 0:
            break
        r = library(net, model, lambda e=eps: make(e), X, targets, shape, left)
        for p, ok, li in zip(left.tolist(), r["ok"].tolist(), r["linf"].tolist()):
            if ok:
                linf[where[p]] = li
        left = left[~r["ok"]]
    seconds = time.perf_counter() - t0
    ok = ~torch.isnan(linf)
    return {"rate": len(keep) / seconds, "ok": ok, "linf": torch.nan_to_num(linf)}


def job_rate(data: str, model: str, out: str, method: str, images: int, targets, cpus):
    """The job's pairs per second end to end (Ray start-up of its actors included), and per
    worker while working (pairs over the parts' summed seconds: reading, attacking, writing)."""
    cfg = fool.Settings(data=data, model=model, output=out, methods=(method,), overwrite=True,
                        limit_images=images, targets=tuple(str(t) for t in targets),
                        num_workers=cpus)
    m = fool.run(cfg)
    busy = sum(mk.seconds for mk in parts.read_markers(out, parts.done_keys(out)))
    n = m[schema.M_COUNTS]["pairs"]
    return n, n / m[schema.M_TIMINGS]["attack_s"], n / busy


def best_budget(net, model, X, targets, shape, keep, eps_ours) -> int:
    """The single FGSM budget that fools the most pairs of the subset, among our eps quantiles."""
    import torchattacks

    budgets = sorted({int(np.quantile(eps_ours, q)) for q in (0.5, 0.75, 0.9, 1.0)})
    rates = [library(net, model, lambda e=e: torchattacks.FGSM(net, eps=e / 255), X, targets,
                     shape, keep)["ok"].float().mean() for e in budgets]
    return budgets[int(np.argmax(rates))]


def median(r, keep=None) -> float:
    ok = r["ok"] if keep is None else r["ok"][keep]
    linf = r["linf"] if keep is None else r["linf"][keep]
    return float(linf[ok].float().median()) if ok.any() else float("nan")


def report(name, r, keep=None) -> str:
    ok = r["ok"] if keep is None else r["ok"][keep]
    return (f"{name:44s} {r['rate']:9.1f} pairs/s  success {ok.float().mean():6.1%}  "
            f"median linf {median(r, keep):5.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classes", type=int, default=1000, help="classes of the generated sample")
    p.add_argument("--images", type=int, default=16, help="validation images attacked")
    p.add_argument("--targets", type=int, default=256, help="targets per image (spread evenly)")
    p.add_argument("--library-pairs", type=int, default=512,
                   help="pairs of the per-pair FGSM sweep; a quarter of it for the iterative runs")
    p.add_argument("--job-images", type=int, default=64, help="images of the job runs")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray workers for the job")
    p.add_argument("--device", default="cpu", help="cpu or cuda for the in-process rates")
    p.add_argument("--data", help="an ingest output to use instead of the sample")
    p.add_argument("--model", help="a training output to use instead of the class-mean model")
    p.add_argument("--exact", action="store_true", help="exact vs sign, iterative and the LP")
    p.add_argument("--photos", action="store_true", help="with --exact: the photo-crop model")
    p.add_argument("--lp-pairs", type=int, default=12,
                   help="pairs solved by the LP (--exact; 0: none)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each method (--exact), alternating; the median is shown")
    p.add_argument("--backends", default=None,
                   help=f"exact's search backends, comma-separated ({', '.join(BACKENDS)}; "
                        "--exact; default: the device's)")
    p.add_argument("--batch", type=int, default=fool.CPU_BATCH,
                   help="pairs per attack call (--exact), as the job's --pairs-per-batch")
    p.add_argument("--fresh-memory", action="store_true",
                   help="glibc's default heap (large blocks mapped afresh) instead of the "
                        "workers' reuse of freed memory (common/heap.py)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be positive, got {args.repeats}")
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU on this machine")
    args.backends = args.backends.split(",") if args.backends else [None]
    for name in args.backends:
        try:
            backend_for(args.device, name)
        except ValueError as e:
            p.error(f"--backends: {e}")
    torch.set_num_threads(1)
    if not args.fresh_memory:
        heap.reuse_freed_memory()  # as the job's workers do
    if args.exact and args.photos:
        from benchmarks.attack_models import photo_model

        W, b, X = photo_model()
        return exact_report(args, W, b, X)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        data, model_dir = (args.data, args.model) if args.data else build_inputs(tmp, args.classes)
        if args.exact:
            m = read_model(model_dir)
            W, b = m.W, m.b
            exact_report(args, W, b, load(data, "val")[0].astype(np.uint8))
        else:
            run_all(args, data, model_dir, tmp)
    ray.shutdown()


def run_all(args, data: str, model_dir: str, tmp: str) -> None:
    m = read_model(model_dir)
    W, b = m.W, m.b
    shape = tuple(dataset.open_ingest(data)[schema.M_IMAGE_SHAPE])
    C = len(b)
    targets = torch.tensor(np.linspace(0, C - 1, min(args.targets, C)).round().astype(int))
    Xv = torch.from_numpy(load(data, "val")[0][:args.images].astype(np.uint8))
    model = LinearModel(W, b, args.device, LinearModel(W, b).facts(targets.tolist()))
    X = Xv.to(args.device)
    n_pairs = len(X) * len(targets)
    keep = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(0))[:args.library_pairs]
    it_images = max(1, args.library_pairs // 4 // len(targets))
    keep_it = keep[keep < it_images * len(targets)][:max(1, args.library_pairs // 16)]
    import torchattacks

    print(f"model: {C} classes, {W.shape[1]} inputs; pairs: {len(X)} images x {len(targets)} "
          f"targets = {n_pairs}; subsets: {len(keep)} pairs (FGSM per pair), "
          f"{it_images * len(targets)} pairs (iterative, {len(keep_it)} of them swept); "
          f"device {args.device}, 1 thread")
    res = {m.name: ours(model, m, X, targets) for m in (Template, Sign)}
    res["iterative"] = ours(model, Iterative, X[:it_images], targets)
    net = LinearNet(W, b).to(args.device)
    eps_sign = res["sign"]["strength"][res["sign"]["ok"]].cpu().numpy()
    top, top_it = int(eps_sign.max()), int(res["iterative"]["strength"].max())
    one = best_budget(net, model, X, targets, shape, keep, eps_sign)
    lib = {"fgsm": library(net, model, lambda: torchattacks.FGSM(net, eps=one / 255), X, targets,
                           shape),
           "fgsm_pp": per_pair(net, model, lambda e: torchattacks.FGSM(net, eps=e / 255), X,
                               targets, shape, keep, top),
           "bim_pp": per_pair(net, model, lambda e: torchattacks.BIM(net, eps=e / 255,
                                                                     alpha=1 / 255, steps=0),
                              X[:it_images], targets, shape, keep_it, top_it),
           "bim": library(net, model, lambda: torchattacks.BIM(net, eps=top_it / 255,
                                                                alpha=1 / 255, steps=0),
                          X[:it_images], targets, shape)}
    job = {m: job_rate(data, model_dir, os.path.join(tmp, f"job-{m}"), m, k, targets.tolist(),
                       args.cpus)
           for m, k in (("sign", args.job_images), ("iterative", max(1, args.job_images // 8)))}
    print(report("ours template (per core)", res["template"]))
    print(report("ours sign (per core)", res["sign"]))
    print(report(f"torchattacks FGSM, best one budget eps={one}", lib["fgsm"]))
    print(report("ours sign on the per-pair subset", res["sign"], keep))
    print(report("torchattacks FGSM swept per pair", lib["fgsm_pp"]))
    print(report("ours iterative (per core)", res["iterative"]))
    print(report(f"torchattacks BIM, one budget eps={top_it}", lib["bim"]))
    print(report("ours iterative on the per-pair subset", res["iterative"], keep_it))
    print(report("torchattacks BIM swept per pair", lib["bim_pp"]))
    for m, (n, rate, busy) in job.items():
        print(f"ours {m} job, {n} pairs, images written: {rate:8.1f} pairs/s end to end "
              f"({args.cpus} workers, start-up included), {busy:8.1f} pairs/s per busy worker")
    print(f"sign / FGSM one budget      = {res['sign']['rate'] / lib['fgsm']['rate']:6.1f}x "
          "per core")
    print(f"sign / FGSM swept per pair  = {res['sign']['rate'] / lib['fgsm_pp']['rate']:6.1f}x "
          "per core (goal >= 20x, equal perturbations)")
    print(f"iterative / BIM one budget  = {res['iterative']['rate'] / lib['bim']['rate']:6.1f}x "
          "per core")
    print(f"iterative / BIM per pair    = {res['iterative']['rate'] / lib['bim_pp']['rate']:6.1f}x "
          "per core")
    for m in ("template", "sign", "iterative"):
        hours = FULL_PAIRS / res[m]["rate"] / 3600
        print(f"50,000 x 1,000 {m:9s}: {hours:8.1f} core-hours at {res[m]['rate']:.0f} "
              "pairs/s/core")


def exact_report(args, W: np.ndarray, b: np.ndarray, X_all: np.ndarray) -> None:
    """exact vs sign vs iterative (pairs/s, one thread, same pairs), the LP per pair on a sample,
    the certificate against the LP, the gap linf - bound_linf, and the full-run extrapolation."""
    from benchmarks.lp import lp_minimum

    C, gpu = len(b), args.device != "cpu"
    targets = torch.tensor(np.linspace(0, C - 1, min(args.targets, C)).round().astype(int))
    X = torch.from_numpy(X_all[:args.images].copy()).to(args.device)
    model = LinearModel(W, b, args.device, LinearModel(W, b).facts(targets.tolist()))
    it_images = max(1, len(X) // 4)
    unit = "GPU" if gpu else "core"
    print(f"model: {C} classes, {W.shape[1]} inputs; pairs: {len(X)} images x {len(targets)} "
          f"targets = {len(X) * len(targets)} ({it_images * len(targets)} for iterative); "
          + (f"{torch.cuda.get_device_name()}, by the wall clock" if gpu else
             "cpu, 1 thread; rates per CPU second")
          + f", batches of {args.batch} pairs, median of {args.repeats} runs; load average "
          f"{os.getloadavg()[0]:.1f}")
    cpu = time.process_time
    clock = synced if gpu else cpu
    searches = [name or backend_for(args.device).name for name in args.backends]
    keys = ["exact"] + [f"exact {name}" for name in searches[1:]]  # the first: "exact"
    methods = {"sign": Sign, **{k: functools.partial(Exact, backend=name)
                                for k, name in zip(keys, searches)}, "iterative": Iterative}
    # kernels compiled, the allocator's pool (GPU) or the heap (CPU) grown before anything is
    # timed: the first call of a method in a process ran up to 2x slower
    for m in methods.values():
        ours(model, m, X[:max(1, args.batch // len(targets))], targets, args.batch)
    runs = {k: [] for k in methods}
    for _ in range(args.repeats):  # alternating, so that a slow spell of the machine hits all
        for k, m in methods.items():
            runs[k].append(ours(model, m, X if k != "iterative" else X[:it_images], targets,
                                args.batch, clock))
    res = {k: {**v[-1], "rate": float(np.median([r["rate"] for r in v]))}
           for k, v in runs.items()}
    n, t = pairs(len(X), targets)
    n, t, X = n.cpu(), t.cpu(), X.cpu()
    bound = res["exact"]["bound"].numpy()
    moved = (model.scores(X.to(args.device)).argmax(1).cpu()[n] != t).numpy()
    gap = (res["exact"]["linf"].numpy() - bound)[moved]
    sign_ok = res["sign"]["ok"].numpy()
    above = (res["exact"]["linf"].numpy() > res["sign"]["linf"].numpy()) & sign_ok
    for name in ("exact", "sign", "iterative"):
        label = f"exact, {searches[0]} search" if name == "exact" and len(keys) > 1 else name
        print(report(f"ours {label} (per {unit})", res[name]), flush=True)
    for key, name in zip(keys[1:], searches[1:]):
        print(report(f"ours exact, {name} search (per {unit})", res[key]))
        compare_searches(res["exact"], res[key], moved, searches[0], name)
    print(f"exact / sign = {res['exact']['rate'] / res['sign']['rate']:.2f}x pairs/s (goal >= "
          f"0.33), exact / iterative = {res['exact']['rate'] / res['iterative']['rate']:.2f}x "
          "(goal > 1)")
    q = np.quantile(gap, [0.5, 0.9, 0.99, 1.0])
    print(f"gap linf - bound_linf over {moved.sum()} pairs that move: median {q[0]:.2f}, 90% "
          f"{q[1]:.2f}, 99% {q[2]:.2f}, max {q[3]:.2f}; < 1 level (minimal, proved) "
          f"{np.mean(gap < 1):.1%}, <= 1 level {np.mean(gap <= 1):.1%}")
    print(f"exact above sign on {above.sum()} pairs; success exact "
          f"{res['exact']['ok'].float().mean():.1%}, sign {sign_ok.mean():.1%}")
    for m in ("exact", "sign", "iterative"):
        hours = FULL_PAIRS / res[m]["rate"] / 3600
        print(f"50,000 x 1,000 {m:9s}: {hours:8.2f} {unit}-hours at {res[m]['rate']:.0f} "
              f"pairs/s/{unit}")
    if args.lp_pairs < 1:
        return
    rng = np.random.default_rng(0)
    sample = rng.choice(np.flatnonzero(moved), min(args.lp_pairs, moved.sum()), replace=False)
    t0, lp = cpu(), []
    for i in sample:
        lp.append(lp_minimum(W, b, X[n[i]].numpy(), int(t[i])))
    lp_rate = len(sample) / (cpu() - t0)
    lp = np.array(lp)
    cert, linf = bound[sample], res["exact"]["linf"].numpy()[sample]
    print(f"{'LP solver, scipy HiGHS (per core)':44s} {lp_rate:9.3f} pairs/s  "
          f"({len(sample)} pairs)")
    print(f"exact / LP = {res['exact']['rate'] / lp_rate:.0f}x pairs/s (goal >= 10)")
    print(f"against the LP on {len(sample)} pairs: certificate - LP max {np.max(cert - lp):+.2e} "
          f"(must be <= 0), stored linf - LP: median {np.median(linf - lp):.2f}, "
          f"max {np.max(linf - lp):.2f}, within one level {np.mean(linf - lp <= 1):.0%}")
    print(f"50,000 x 1,000 LP solver: {FULL_PAIRS / lp_rate / 3600:8.0f} core-hours")


def compare_searches(a: dict, b: dict, moved: np.ndarray, name_a: str, name_b: str) -> None:
    """exact with two search backends on the same pairs: the stored strengths, the pairs each
    proves minimal (linf - bound_linf < 1) of those that move, and the rates."""
    d = (a["strength"] - b["strength"]).numpy()
    proved_a, proved_b = ((r["linf"].double() - r["bound"].double() < 1).numpy()[moved]
                          for r in (a, b))
    print(f"exact {name_a} vs {name_b} on the same {len(d)} pairs: strengths differ on "
          f"{np.sum(d != 0)} (max {np.abs(d).max():.0f} levels; {name_a} lower on "
          f"{np.sum(d < 0)}, higher on {np.sum(d > 0)}); proved minimal of the {moved.sum()} "
          f"that move: {name_a} {proved_a.sum()}, {name_b} {proved_b.sum()}, not the same pairs "
          f"on {np.sum(proved_a != proved_b)}; {name_a} / {name_b} = "
          f"{a['rate'] / b['rate']:.2f}x pairs/s")


if __name__ == "__main__":
    main()
