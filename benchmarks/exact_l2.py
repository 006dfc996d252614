"""exact-l2 against exact (pairs per CPU second, the same pairs) and against Clarabel (the gap).

    python -m benchmarks.exact_l2 [--classes 1000] [--images 8] [--targets 64] [--qp-pairs 4]
    python -m benchmarks.exact_l2 --photos --images 40

On the same model and the same (image, target) pairs, in one run on one thread:
- ``exact-l2`` and ``exact`` (attacks/methods/exact_l2.py, exact.py), each warmed up once, then
  the median of ``--repeats`` runs taken in turns: pairs per CPU second (the same on a busy
  machine), and their ratio;
- exact-l2's stored images: the share that fools its target, the share whose L2 is within 1% of
  the certificate ``bound_l2`` (and within 1% or half a level per changed pixel), the
  quantiles of ``l2 / bound_l2 - 1``, and the pairs where its L2 is above exact's;
- Clarabel (an interior-point QP solver, float64) on ``--qp-pairs`` of them, with constraint
  generation (the nearest rivals first, then those its solution loses to): the certificate
  never above its optimum, the gap between them, and the stored L2 against it.

Without --data/--model it generates the project's sample data with --classes classes and the
class-mean linear classifier (benchmarks/attack.py ``build_inputs``); ``--photos``: the 10-class
softmax fitted on photograph crops (benchmarks/attack_models.py) and its held-out crops.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch

from attacks.methods.base import pairs
from attacks.methods.exact import Exact
from attacks.methods.exact_l2 import ExactL2
from attacks.methods.linear import LinearModel, measure
from benchmarks.attack import build_inputs, load, ours
from benchmarks.attack_models import photo_model
from common.model import read_model

ROWS = 32  # rivals in Clarabel's first QP, and the most added per round


def qp_minimum(W, b, x, t: int) -> float:
    """The minimal L2 distance at which t wins (Clarabel, float64), by constraint generation."""
    import clarabel
    import scipy.sparse as sp

    W, b, x = (np.asarray(v, np.float64) for v in (W, b, x))
    s = W @ x + b
    rivals = np.array([k for k in range(len(W)) if k != t])
    A, q = W[t] - W[rivals], s[t] - s[rivals]
    rows = np.argsort(q / np.linalg.norm(A, axis=1).clip(1e-300))[:ROWS]
    eye = sp.identity(len(x), format="csc")
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    while True:
        cons = sp.vstack([sp.csc_matrix(-A[rows]), eye, -eye]).tocsc()
        rhs = np.concatenate([q[rows], 255 - x, x])
        sol = clarabel.DefaultSolver(eye, np.zeros(len(x)), cons, rhs,
                                     [clarabel.NonnegativeConeT(len(rhs))], settings).solve()
        d = np.array(sol.x)
        short = np.setdiff1d(np.flatnonzero(q + A @ d < -1e-7 * max(1.0, np.abs(q).max())),
                             rows)
        if len(short) == 0:
            return math.sqrt(2 * sol.obj_val)
        rows = np.concatenate([rows, short[np.argsort(q[short] + A[short] @ d)][:ROWS]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--targets", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qp-pairs", type=int, default=4)
    p.add_argument("--photos", action="store_true",
                   help="the 10-class model fitted on photograph crops (attack_models.py)")
    p.add_argument("--data", help="an ingest output (with --model)")
    p.add_argument("--model", help="a model output (with --data)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.photos:
        W, b, X_all = photo_model()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            data, model_dir = ((args.data, args.model) if args.data else
                               build_inputs(tmp, args.classes))
            X_all = load(data, "val")[0].astype(np.uint8)
            m = read_model(model_dir)
        W, b = m.W, m.b
    C = len(b)
    targets = torch.tensor(np.linspace(0, C - 1, min(args.targets, C)).round().astype(int))
    X = torch.from_numpy(X_all[:args.images].copy())
    model = LinearModel(W, b, "cpu", LinearModel(W, b).facts(targets.tolist()))
    print(f"model: {C} classes, {W.shape[1]} inputs; pairs: {len(X)} images x {len(targets)} "
          f"targets = {len(X) * len(targets)}; cpu, 1 thread, rates per CPU second, median of "
          f"{args.repeats} runs")
    methods = {"exact-l2": ExactL2, "exact": Exact}
    for cls in methods.values():  # kernels loaded, the heap grown, before anything is timed
        ours(model, cls, X[:2], targets)
    runs = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, cls in methods.items():
            t0 = time.process_time()
            f = cls(model)(X, model.scores(X), targets)
            runs[k].append((len(f.strength) / (time.process_time() - t0), f))
    rate = {k: float(np.median([r for r, _ in v])) for k, v in runs.items()}
    mine, other = runs["exact-l2"][-1][1], runs["exact"][-1][1]
    n, t = pairs(len(X), targets)
    got, theirs = (measure(X[n], f.images, f.scores, t) for f in (mine, other))
    moved = (model.scores(X).argmax(1)[n] != t).numpy()
    l2, bound = got["l2"].double().numpy(), mine.bound_l2.double().numpy()
    changed = (mine.images != X[n]).sum(1).numpy()
    rel = l2[moved] / bound[moved] - 1
    near = ((l2 <= 1.01 * bound) | (l2 - bound <= 0.5 * np.sqrt(changed)))[moved]
    for k in methods:
        print(f"{k:9s} {rate[k]:9.1f} pairs/s")
    print(f"exact-l2 / exact = {rate['exact-l2'] / rate['exact']:.2f}x pairs/s (goal >= 1)")
    q = np.quantile(rel, [0.5, 0.99, 1.0])
    print(f"exact-l2 over the {moved.sum()} pairs that move: fooled "
          f"{(got['fooled_pred'] == t).double().mean():.1%}; l2 within 1% of bound_l2 "
          f"{np.mean(rel <= 0.01):.1%}, within 1% or half a level per changed pixel "
          f"{near.mean():.1%}; l2 / bound_l2 - 1: median {q[0]:.2e}, 99% {q[1]:.2e}, max "
          f"{q[2]:.2e}; median l2 {np.median(l2[moved]):.1f} (exact's "
          f"{np.median(theirs['l2'].numpy()[moved]):.1f}), above exact's on "
          f"{int((got['l2'] > theirs['l2']).sum())}")
    if args.qp_pairs < 1:
        return
    rng = np.random.default_rng(0)
    sample = rng.choice(np.flatnonzero(moved), min(args.qp_pairs, moved.sum()), replace=False)
    t0, opt = time.process_time(), []
    for i in sample:
        opt.append(qp_minimum(W, b, X[n[i]].numpy(), int(t[i])))
    qp_rate = len(sample) / (time.process_time() - t0)
    opt = np.array(opt)
    gap = bound[sample] / opt - 1
    print(f"Clarabel {qp_rate:.3f} pairs/s ({len(sample)} pairs); exact-l2 / Clarabel = "
          f"{rate['exact-l2'] / qp_rate:.0f}x; bound_l2 / optimum - 1: max {gap.max():+.2e} "
          f"(must be <= 0), min {gap.min():+.2e}; stored l2 / optimum - 1: max "
          f"{np.max(l2[sample] / opt - 1):.2e}")


if __name__ == "__main__":
    main()
