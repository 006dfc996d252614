"""The exact minimal L-inf fooling distance of a linear classifier, from a general LP solver.

The oracle of attacks/methods/exact.py: an independent formulation, solved by scipy's HiGHS in
float64.
For an image x0 (D,) in 0..255, a target t and margins ``q_k = s_t - s_k - margin`` (k != t),
``value(eps)`` is the LP

    maximize z  over (delta, z)
    subject to  (W[t] - W[k]) . delta - z >= -q_k          for every k != t
                max(-eps, -x0_j) <= delta_j <= min(eps, 255 - x0_j)

the best worst-case margin within the L-inf ball; it is concave and nondecreasing in eps, so the
minimal distance ``eps*`` is its root. ``lp_minimum`` finds it by Newton's method from below, the
slope at eps coming from the LP's duals lambda (Danskin: ``sum_j |g_j| [room_j > eps]``,
``g = sum_k lambda_k (W[t] - W[k])``); from below, each step stays below the root.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

NEWTON_STEPS = 30
ROWS = 32  # rivals in the first LP, and the most added per round of constraint generation


def _problem(W, b, x0, t, margin):
    W, b, x0 = (np.asarray(v, np.float64) for v in (W, b, x0))
    rivals = np.array([k for k in range(len(W)) if k != t])
    s = W @ x0 + b
    return W[t] - W[rivals], s[t] - s[rivals] - margin, x0, rivals


def value(W, b, x0, t, eps: float, margin: float = 0.0) -> tuple[float, np.ndarray]:
    """(max over the ball of the smallest margin, the rivals' duals) at L-inf radius eps.

    Constraint generation, exact for the full problem: the LP over the ROWS rivals with the
    smallest margins, then every rival checked at its solution; the ones it loses to join, until
    none does (with 1,000 classes a handful of rounds instead of one dense 999-row LP)."""
    A, q, x0, _ = _problem(W, b, x0, t, margin)
    D = len(x0)
    cost = np.zeros(D + 1)
    cost[-1] = -1.0
    bounds = np.stack([np.maximum(-x0, -eps), np.minimum(255 - x0, eps)], 1)
    bounds = [*map(tuple, bounds), (None, None)]
    rows = np.argsort(q / np.abs(A).sum(1).clip(1e-300))[:ROWS]
    while True:
        A_ub = np.hstack([-A[rows], np.ones((len(rows), 1))])
        r = linprog(cost, A_ub=A_ub, b_ub=q[rows], bounds=bounds, method="highs")
        if r.status != 0:
            raise RuntimeError(f"HiGHS failed: {r.message}")
        z, delta = -r.fun, r.x[:-1]
        short = np.flatnonzero(q + A @ delta < z - 1e-9 * max(1.0, abs(z)))
        short = np.setdiff1d(short, rows)
        if len(short) == 0:
            duals = np.zeros(len(q))
            duals[rows] = -r.ineqlin.marginals
            return z, duals
        rows = np.concatenate([rows, short[np.argsort(q[short] + A[short] @ delta)][:ROWS]])


def lp_minimum(W, b, x0, t: int, margin: float = 0.0, tol: float = 1e-7) -> float:
    """The minimal L-inf distance eps* (pixel levels) at which t can win; inf if none in 0..255."""
    A, q, x0, _ = _problem(W, b, x0, t, margin)
    if q.min() >= 0:
        return 0.0
    eps = (np.maximum(0, -q) / np.abs(A).sum(1)).max()  # Hoelder: a start below the root
    for _ in range(NEWTON_STEPS):
        v, lam = value(W, b, x0, t, eps, margin)
        if v >= -tol * max(1.0, np.abs(q).max()):
            return eps
        g = lam @ A
        room = np.where(g > 0, 255 - x0, x0)
        slope = np.abs(g)[room > eps].sum()
        if slope <= 0 or eps >= 255:
            return float("inf")
        eps = min(255.0, eps - v / slope)
    raise RuntimeError("Newton's method did not converge")
