"""The minimal L2 step's dual, solved per pair in compiled loops (numba): docs/exact_l2.md.

For a pair (x uint8 (D,), target t), rivals k with rows ``a_k = W[t] - W[k]`` and margins
``q_k = s_t - s_k - m`` (score units), the primal is

    min 0.5 ||d||^2   s.t.  q_k + a_k . d >= 0 (every rival),  -x <= d <= 255 - x

and for weights lam >= 0, with ``g = sum_k lam_k a_k`` and ``d(lam) = clip(g, -x, 255 - x)``,

    F(lam) = lam . q + sum_j (g_j d_j - d_j^2 / 2) = -phi(lam)        (phi: the dual function)

is convex and piecewise quadratic, with gradient ``M_k = q_k + a_k . d(lam)`` (the margins of
d(lam)) and generalized Hessian ``sum over the pixels inside their box of a_j a_j^T``
(``a_j`` (K,): pixel j's column of the rows). ``solve`` minimizes F over lam >= 0 per pair:

1. ``_nnqp``: without the box, F is the quadratic ``lam . q + lam^T G lam / 2`` with
   ``G_kl = a_k . a_l`` from the Gram matrix ``W W^T``: Lawson and Hanson's active set over all
   C - 1 rivals at O(C K) a check, no pixel read.
2. ``_newton``: projected Newton steps on F over the rivals so far (the box's clipped pixels
   taken off G's curvature), Armijo backtracking along the projected path; rivals that the
   step may lose to join (``_grow``).
3. ``_repair``: the step rounded to integers, then pixels moved one level at a time, in order
   of margin gained per unit of ``||z||^2`` added, until every rival's margin clears ``tau``.

Rows of W are read by index (search_numba's ``_combine`` and ``_margins``), never stored.
Only numpy and numba here: no Ray, no storage.
"""

from __future__ import annotations

import numba
import numpy as np

from attacks.methods.search_numba import _combine, _margins, _solve

BINS = 256  # _repair's ratio bins: 16 per octave below the best pixel's ratio
DAMP = 1e-9  # Newton's Hessian damping, relative to its mean diagonal
ARMIJO = 1e-4  # the sufficient decrease that a Newton step must make
HALVINGS = 40  # backtracking steps at most
NOISE = 1e-6  # F's rounding, relative to the size of its terms (g is summed in float32)
GROW_CHECK = 8  # rivals outside the set whose margins _grow checks exactly per round


@numba.njit(cache=True, error_model="numpy")
def _gram(gram, t, k, r):
    """a_k . a_r from the Gram matrix of W's rows."""
    return gram[t, t] - gram[t, k] - gram[t, r] + gram[k, r]


@numba.njit(cache=True, error_model="numpy")
def _unclipped(gram, t, q, k, riv, lam, K):
    """Rival k's margin at the unclipped step g = lam . A, ``q_k + a_k . g``, in levels (over
    ||a_k||: how far g is from k's boundary)."""
    v = q[k]
    for i in range(K):
        v += lam[i] * _gram(gram, t, k, riv[i])
    return v / np.sqrt(max(_gram(gram, t, k, k), 1e-300))


@numba.njit(cache=True, error_model="numpy")
def _nnqp(gram, t, q, riv, lam, member, tol):
    """Lawson-Hanson on ``min lam . q + lam^T G lam / 2, lam >= 0`` over all rivals: the
    unclipped problem. riv/lam: the passive set (filled from 0); returns its size K."""
    C, kcap = q.shape[0], riv.shape[0]
    K = 0
    for _ in range(4 * kcap):
        if K >= kcap:
            break
        best, bk = -tol, -1
        for k in range(C):
            if k == t or member[k]:
                continue
            v = _unclipped(gram, t, q, k, riv, lam, K)
            if v < best:
                best, bk = v, k
        if bk < 0:
            break
        riv[K], lam[K], member[bk] = bk, 0.0, True
        K += 1
        for _ in range(kcap):  # LH's inner loop: step back to the boundary, drop the zeros
            H = np.empty((K, K))
            rhs = np.empty(K)
            for a in range(K):
                rhs[a] = -q[riv[a]]
                for b in range(K):
                    H[a, b] = _gram(gram, t, riv[a], riv[b])
                H[a, a] *= 1.0 + 1e-12
            s = _solve(H, rhs)
            alpha, block = 1.0, -1
            for a in range(K):
                if s[a] <= 0.0:
                    step = lam[a] / (lam[a] - s[a]) if lam[a] > s[a] else 0.0
                    if step < alpha:
                        alpha, block = step, a
            for a in range(K):
                lam[a] = max(lam[a] + alpha * (s[a] - lam[a]), 0.0)
            if block < 0:
                break
            lam[block] = 0.0
            K = _drop_zeros(riv, lam, K, member)
            if K == 0:
                break
    return K


@numba.njit(cache=True, error_model="numpy")
def _drop_zeros(riv, lam, K, member):
    """Compacts the set to the rivals with weight; returns its size."""
    n = 0
    for a in range(K):
        if lam[a] > 0.0:
            riv[n], lam[n] = riv[a], lam[a]
            n += 1
        else:
            member[riv[a]] = False
    return n


@numba.njit(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
def _dual(W, rows, lam, q, x, g, d):
    """F(lam) (float64), with g = lam . A and d = clip(g, -x, 255 - x) (float32) filled in, and
    the size of F's terms (g is summed in float32: F is known to about 1e-7 of that)."""
    _combine(W, rows, lam, g)
    F, size = 0.0, 0.0
    for j in range(g.shape[0]):
        lo, hi = -np.float32(x[j]), np.float32(255.0) - np.float32(x[j])
        dj = min(max(g[j], lo), hi)
        d[j] = dj
        gd = np.float64(g[j]) * np.float64(dj)
        F += gd - 0.5 * np.float64(dj) * np.float64(dj)
        size += abs(gd)
    lq = 0.0
    for k in range(lam.shape[0]):
        lq += lam[k] * q[k]
    return F + lq, size + abs(lq)


@numba.njit(cache=True, error_model="numpy")
def _hessian(W, rows, gram, x, g, K):
    """G over the rivals less ``a_j a_j^T`` for every pixel clipped at d(lam), and ||g - d||."""
    t = rows[0]
    H = np.empty((K, K))
    for a in range(K):
        for b in range(K):
            H[a, b] = _gram(gram, t, rows[a + 1], rows[b + 1])
    col = np.empty(K)
    r2 = 0.0
    top = W[t]
    for j in range(g.shape[0]):
        lo, hi = -np.float32(x[j]), np.float32(255.0) - np.float32(x[j])
        if lo <= g[j] <= hi:
            continue
        r = np.float64(g[j] - min(max(g[j], lo), hi))
        r2 += r * r
        for a in range(K):
            col[a] = np.float64(top[j]) - np.float64(W[rows[a + 1], j])
        for a in range(K):
            for b in range(K):
                H[a, b] -= col[a] * col[b]
    return H, np.sqrt(r2)


@numba.njit(cache=True, error_model="numpy")
def _grow(W, gram, q, rows, riv, lam, K, member, d, r_norm, dnorm, eps):
    """Rivals outside the set that d(lam) may lose to join it (weight 0); returns the new K.

    ``a_k . d = a_k . g - a_k . (g - d)``, the first from the Gram matrix (O(C K)), the second
    at most ``||a_k|| ||g - d||``: only rivals within that of failing can fail. The GROW_CHECK
    nearest of those get their exact margin (a row read each)."""
    t, C, kcap = rows[0], q.shape[0], riv.shape[0]
    cand = np.full(GROW_CHECK, -1)
    cval = np.full(GROW_CHECK, np.inf)
    for k in range(C):
        if k == t or member[k]:
            continue
        v = _unclipped(gram, t, q, k, riv, lam, K) - r_norm
        if v < eps * dnorm and v < cval[GROW_CHECK - 1]:
            i = GROW_CHECK - 1
            while i > 0 and cval[i - 1] > v:
                cand[i], cval[i] = cand[i - 1], cval[i - 1]
                i -= 1
            cand[i], cval[i] = k, v
    top = W[t]
    for i in range(GROW_CHECK):
        k = cand[i]
        if k < 0 or K >= kcap:
            break
        m = q[k]
        row = W[k]
        acc = np.float32(0.0)
        for j in range(d.shape[0]):
            acc += (top[j] - row[j]) * d[j]
        m += np.float64(acc)
        if m / np.sqrt(max(_gram(gram, t, k, k), 1e-300)) < -eps * dnorm:
            riv[K], lam[K], member[k] = k, 0.0, True
            rows[K + 1] = k
            K += 1
    return K


@numba.njit(cache=True, error_model="numpy")
def _newton(W, gram, t, q_all, x, riv, lam, K, member, steps, eps):
    """Projected Newton on F over lam >= 0 from lam, rivals joining; returns (K, converged,
    d (float32, D), g). Converged: ``lam . M <= eps ||d||^2`` (the duality gap) and no rival
    short by more than ``eps ||d||`` levels, ``M_k / ||a_k||``."""
    D, kcap = x.shape[0], riv.shape[0]
    rows = np.empty(kcap + 1, np.int64)
    qS, M = np.empty(kcap), np.empty(kcap)
    g, d = np.empty(D, np.float32), np.empty(D, np.float32)
    g2, d2 = np.empty(D, np.float32), np.empty(D, np.float32)
    trial = np.empty(kcap)
    rows[0] = t
    converged = False
    for _ in range(steps):
        for i in range(K):
            rows[i + 1], qS[i] = riv[i], q_all[riv[i]]
        F, size = _dual(W, rows[:K + 1], lam[:K], qS[:K], x, g, d)
        _margins(W, rows[:K + 1], d, qS[:K], M[:K])
        dn2 = 0.0
        for j in range(D):
            dn2 += np.float64(d[j]) * np.float64(d[j])
        dnorm = np.sqrt(dn2)
        gap, short = 0.0, 0.0
        for i in range(K):
            gap += lam[i] * M[i]
            norm = np.sqrt(max(_gram(gram, rows[0], riv[i], riv[i]), 1e-300))
            short = max(short, -M[i] / norm)
        H, r_norm = _hessian(W, rows[:K + 1], gram, x, g, K)
        if gap <= eps * dn2 + 1e-12 and short <= eps * dnorm + 1e-9:
            K1 = _grow(W, gram, q_all, rows, riv, lam, K, member, d, r_norm, dnorm, eps)
            if K1 == K:
                converged = True
                break
            K = K1
            continue
        p = _step(H, M[:K], lam[:K])
        alpha, moved = 1.0, False
        for _ in range(HALVINGS):
            dec = 0.0
            for i in range(K):
                trial[i] = max(lam[i] + alpha * p[i], 0.0)
                dec += M[i] * (trial[i] - lam[i])
            F2 = _dual(W, rows[:K + 1], trial[:K], qS[:K], x, g2, d2)[0]
            # a decrease below F's float32 noise cannot be seen: near the optimum, where
            # Newton's step is good, it is taken on the model's word
            if dec < 0 and F2 <= F + ARMIJO * dec + NOISE * size:
                lam[:K] = trial[:K]
                moved = True
                break
            alpha *= 0.5
        if not moved:
            break
    return K, converged, d, g


@numba.njit(cache=True, error_model="numpy")
def _step(H, M, lam):
    """The projected Newton direction: rivals without weight whose margin is positive are
    held at 0 (Bertsekas' binding set); on the others ``(H + damping) p = -M``."""
    K = M.shape[0]
    free = np.empty(K, np.bool_)
    diag = 0.0
    for a in range(K):
        free[a] = lam[a] > 0.0 or M[a] < 0.0
        diag += abs(H[a, a])
    damp = DAMP * diag / max(K, 1) + 1e-300
    A = np.eye(K)
    rhs = np.zeros(K)
    for a in range(K):
        if not free[a]:
            continue
        rhs[a] = -M[a]
        for b in range(K):
            if free[b]:
                A[a, b] = H[a, b]
        A[a, a] += damp
    return _solve(A, rhs)


@numba.njit(cache=True, error_model="numpy")
def _repair(W, rows, q, G, x, g, d, tau, z, rounds):
    """z = rint(d) (integers in the box), then, while some rival's margin ``M_k = q_k + a_k .
    z`` is below tau: c = A^T w, the least-norm continuous change that lifts every margin to
    tau (w >= 0 minimizes ``w^T G w / 2 - w . (tau - M)``, G = A A^T), and pixels move one
    level along sign(c_j), best ``|c_j| / (2 sign(c_j) (z_j - g_j) + 1)`` first (the margin
    gained per unit that the move adds to the Lagrangian ``||z||^2 / 2 - lam . M(z)`` at the
    weights found, twice; 16 bins per octave; a pixel never moves back), until every margin
    clears tau or the moves
    made c's gain ``w . (tau - M)`` (then w is made again, from the new margins). Returns
    whether they all clear."""
    D, K = d.shape[0], q.shape[0]
    M, need = np.empty(K), np.empty(K)
    c, ratio = np.empty(D, np.float32), np.empty(D)
    order, counts = np.empty(D, np.int64), np.zeros(BINS + 2, np.int64)
    bins = np.empty(D, np.int64)
    way = np.zeros(D, np.float32)  # the direction a pixel moved in: never back (no cycles)
    top = W[rows[0]]
    for j in range(D):
        z[j] = np.rint(d[j])
    for _ in range(rounds):
        _margins(W, rows, z, q, M)
        short = False
        for k in range(K):
            need[k] = tau - M[k]
            short |= M[k] < tau
        if not short:
            return True
        w = _nnls(G, need)
        _combine(W, rows, w, c)
        goal = 0.0  # c . (the round's moves) = w . (their margin gains): w . need covers it
        for k in range(K):
            goal += w[k] * need[k]
        best = 0.0
        for j in range(D):
            ratio[j] = 0.0
            s = np.float32(1.0) if c[j] > 0 else np.float32(-1.0)
            room = np.float32(255.0) - np.float32(x[j]) if s > 0 else np.float32(x[j])
            if c[j] == 0 or s * z[j] >= room or way[j] == -s:
                continue
            cost = 2.0 * s * (z[j] - g[j]) + 1.0
            ratio[j] = abs(c[j]) / cost if cost > 0 else np.inf
            if cost > 0:
                best = max(best, ratio[j])
        counts[:] = 0
        for j in range(D):
            bins[j] = _bin(ratio[j], best)
            counts[bins[j]] += 1
        for b in range(1, BINS + 2):
            counts[b] += counts[b - 1]
        for j in range(D - 1, -1, -1):  # a stable counting sort, best bins first
            counts[bins[j]] -= 1
            order[counts[bins[j]]] = j
        gained = 0.0
        for i in range(D):
            j = order[i]
            if not ratio[j] > 0:  # no move left (NaN included)
                break
            s = np.float32(1.0) if c[j] > 0 else np.float32(-1.0)
            z[j] += s
            way[j] = s
            gained += abs(c[j])
            clear = True
            for k in range(K):
                M[k] += s * (np.float64(top[j]) - np.float64(W[rows[k + 1], j]))
                clear &= M[k] >= tau
            if clear or gained >= goal:
                break
    _margins(W, rows, z, q, M)
    for k in range(K):
        if M[k] < tau:
            return False
    return True


@numba.njit(cache=True, error_model="numpy")
def _nnls(G, need):
    """w >= 0 minimizing ``w^T G w / 2 - w . need`` (Lawson and Hanson's active set)."""
    K = need.shape[0]
    w, s = np.zeros(K), np.zeros(K)
    free = np.zeros(K, np.bool_)
    scale = 0.0
    for a in range(K):
        scale = max(scale, abs(need[a]))
    for _ in range(3 * K):
        best, j = 1e-12 * scale, -1
        for a in range(K):
            grad = need[a]
            for b in range(K):
                grad -= G[a, b] * w[b]
            if not free[a] and grad > best:
                best, j = grad, a
        if j < 0:
            break
        free[j] = True
        for _ in range(K):
            A = np.eye(K)
            rhs = np.zeros(K)
            for a in range(K):
                if free[a]:
                    rhs[a] = need[a]
                    for b in range(K):
                        if free[b]:
                            A[a, b] = G[a, b] * (1.0 + 1e-12 * (a == b))
            s = _solve(A, rhs)
            alpha, block = 1.0, -1
            for a in range(K):
                if free[a] and s[a] <= 0.0:
                    step = w[a] / (w[a] - s[a]) if w[a] > s[a] else 0.0
                    if step < alpha:
                        alpha, block = step, a
            for a in range(K):
                w[a] = max(w[a] + alpha * (s[a] - w[a]), 0.0) if free[a] else 0.0
            if block < 0:
                break
            w[block], free[block] = 0.0, False
    return w


@numba.njit(cache=True, error_model="numpy")
def _bin(r, best):
    """_repair's bin of a ratio: 0 for a free move, then 16 per octave below the best, the
    last for no move at all."""
    if r == np.inf:
        return 0
    if not r > 0:
        return BINS + 1
    octaves = 16.0 * np.log2(best / r)
    if not octaves < BINS - 1:  # far below the best (an overflow to inf included)
        return BINS
    return 1 + max(int(octaves), 0)


@numba.njit(cache=True, error_model="numpy")
def solve(W, gram, T, X, Q, RIV, LAM, KS, TAU, todo, Z, DC, flags, steps, eps, rounds):
    """Every pair in ``todo``: the unclipped active set where it has no rivals yet (KS 0), the
    projected Newton steps from its weights, and the repair of the rounded step at tau.

    W (C, D) float32, gram (C, C) float64, T (P,) targets, X (P, D) uint8, Q (P, C) float64
    margins q; per pair, in place: RIV (P, KCAP) rivals and LAM their weights (the first KS),
    Z (P, D) float32 the integer step, DC (P, D) float32 the continuous step d(lam), flags
    (P,): 1 where Newton converged, + 2 where the repair cleared every rival by TAU."""
    C = Q.shape[1]
    member = np.zeros(C, np.bool_)
    for i in range(todo.shape[0]):
        p = todo[i]
        t, K = T[p], KS[p]
        riv, lam, q = RIV[p], LAM[p], Q[p]
        member[:] = False
        for a in range(K):
            member[riv[a]] = True
        if K == 0:
            K = _nnqp(gram, t, q, riv, lam, member, eps)
        if K == 0:  # no rival ahead in the scores' float64: the nearest one, to have a set
            k = 1 if t == 0 else 0
            for j in range(C):
                if j != t and q[j] < q[k]:
                    k = j
            riv[0], lam[0], member[k], K = k, 0.0, True, 1
        K, converged, d, g = _newton(W, gram, t, q, X[p], riv, lam, K, member, steps, eps)
        KS[p] = K
        DC[p] = d
        rows = np.empty(K + 1, np.int64)
        qS, G = np.empty(K), np.empty((K, K))
        rows[0] = t
        for a in range(K):
            rows[a + 1], qS[a] = riv[a], q[riv[a]]
            for b in range(K):
                G[a, b] = _gram(gram, t, riv[a], riv[b])
        ok = _repair(W, rows, qS, G, X[p], g, d, TAU[p], Z[p], rounds)
        flags[p] = (1 if converged else 0) + (2 if ok else 0)


@numba.njit(cache=True, error_model="numpy")
def dual_values(W, T, X, RIV, LAM, KS, bias):
    """phi(lam) for every pair in float64, from W's float32 entries taken as exact numbers, and
    a bound on its rounding error (docs/exact_l2.md, section 5); bias (P,) holds
    ``sum_k lam_k (b_t - b_k - m)``. Sums run in order, so each is off by at most n u times
    the sum of its terms' magnitudes (u = 2^-53); g's entries by at most (K + 1) u times
    ``sum_k lam_k |a_kj|``, which moves phi by 255 times as much at most (|x_j + d_j| <= 255)."""
    P, D = X.shape
    u = 2.0**-53
    phi, err = np.empty(P), np.empty(P)
    g, absg = np.empty(D), np.empty(D)
    for p in range(P):
        t, K = T[p], KS[p]
        total = 0.0
        for a in range(K):
            total += LAM[p, a]
        for j in range(D):
            g[j] = total * np.float64(W[t, j])
            absg[j] = total * abs(np.float64(W[t, j]))
        for a in range(K):
            lk = LAM[p, a]
            if lk > 0.0:
                row = W[RIV[p, a]]
                for j in range(D):
                    g[j] -= lk * np.float64(row[j])
                    absg[j] += lk * abs(np.float64(row[j]))
        gx, gd, dd, mag, spread = 0.0, 0.0, 0.0, 0.0, 0.0
        for j in range(D):
            xj = np.float64(X[p, j])
            dj = min(max(g[j], -xj), 255.0 - xj)
            gx += g[j] * xj
            gd += g[j] * dj
            dd += 0.5 * dj * dj
            mag += abs(g[j] * xj) + abs(g[j] * dj) + 0.5 * dj * dj
            spread += absg[j]
        phi[p] = -(bias[p] + gx + gd - dd)
        err[p] = (D + K + 4) * u * (abs(bias[p]) + mag) + 255.0 * (K + 1) * u * spread
    return phi, err
