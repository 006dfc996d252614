"""The targeted fast gradient sign step: x + eps * sign(grad log p_t(x)).

Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples" (ICLR 2015),
targeted form: step towards the target class along the sign of the gradient of its log-probability.
For a linear softmax model that gradient is ``W[t] - p(x) @ W``.
"""

from __future__ import annotations

import torch

from attacks.methods.base import CERT_RTOL, Fooled, StepAttack

LEVELS = 256
MAX_ROUNDS = LEVELS  # each round rules out one eps at least: the search always ends
# The histogram sums up to D float32 terms per bin: its worst-case relative error, for D = 12288
SUM_RTOL = 12288 * 2.0**-24


class Sign(StepAttack):
    r"""Targeted FGSM with the smallest integer eps in 1..255: ``clip(x + eps * d, 0, 255)``.

    Distance measure: L-inf; eps in pixel levels. Value range: uint8 pixels 0..255 in and out
    (an integer step of a sign vector needs no rounding).

    The eps is the smallest that works, exactly, clipping included. Per pixel the stored step is
    ``d_i min(eps, room_i)`` (room: the levels left before 0 or 255), so the margin of t over one
    rival r, ``(s_t - s_r) + sum_i (W[t] - W[r])_i d_i min(eps, room_i)``, is known for all 256 eps
    at once from a 256-bin histogram of ``(W[t] - W[r])_i d_i`` over room: one pass over the pixels,
    no scoring. The first eps that no known rival rules out is scored; if another class still wins,
    it joins the rivals and the next candidate follows. Every eps below the answer is ruled out.

    Shape:
        - X: (N, D) uint8, S: (N, C) float32 scores of X, targets: (T,) int64.
        - output: ``Fooled`` with images (N*T, D) uint8, image-major.

    Examples::
        >>> attack = Sign(model)
        >>> fooled = attack(X, model.scores(X), torch.tensor([3, 7]))
    """

    name = "sign"
    res = 1
    softmax_confidence = True  # a confidence P means p_t >= P (exact.py: each margin)

    def direction(self, X, S, targets):
        """d (P, D) int8 = sign(W[t] - p @ W), built image x target without gathers; g = W d."""
        pbar = self.model.mean_template(S)  # (N, D): one product per image, shared by targets
        d = torch.sign(self.model.W[targets][None] - pbar[:, None]).to(torch.int8)
        d = d.view(-1, self.model.D)
        return d, self.model.estimate(d)  # g (P, C): W d, the guess of where to look first

    def image_at(self, x, d, k):
        return (x.to(torch.int16) + k.to(torch.int16)[:, None] * d).clamp_(0, 255).to(torch.uint8)

    def search(self, x, d, s, g, t, k0) -> Fooled:
        P, dev = len(t), t.device
        room = torch.where(d > 0, 255 - x.to(torch.int16), x.to(torch.int16)).long()  # (P, D)
        st = {"open": torch.ones(P, LEVELS, dtype=torch.bool, device=dev),  # eps not ruled out
              "expsum": torch.zeros(P, LEVELS, dtype=torch.float64, device=dev),
              "tried": torch.zeros(P, self.model.C, dtype=torch.bool, device=dev)}
        st["open"][:, 0] = False
        st["tried"][torch.arange(P, device=dev), t] = True
        strength = torch.zeros(P, device=dev)
        lin = s + (k0.clamp(max=self.kmax).float())[:, None] * g  # the linear model's rival at k0
        self.rule_out(st, None, d, room, s, t, _strongest(lin, st["tried"]))
        # the first round scores every pair (no gathers); pairs the model already put in the
        # target class keep their original image
        images, scores, live = self.first_round(st, x, d, room, s, t, strength)
        for _ in range(MAX_ROUNDS):
            if len(live) == 0:
                break
            none = ~st["open"][live].any(1)  # every eps ruled out: keep the strongest try
            eps = torch.where(none, self.kmax, st["open"][live].int().argmax(1))
            xi = self.image_at(x[live], d[live], eps)
            Si = self.model.scores(xi)
            ok = self.passes(Si, t[live]) | none
            images[live[ok]], scores[live[ok]] = xi[ok], Si[ok]
            strength[live[ok]] = eps[ok].float()
            live, eps, Si = live[~ok], eps[~ok], Si[~ok]
            st["open"][live, eps] = False
            self.rule_out(st, live, d, room, s, t, _strongest(Si, st["tried"][live]))
        return Fooled(images, scores, strength)

    def first_round(self, st, x, d, room, s, t, strength):
        """Score every pair's first candidate; returns images, scores and the pairs still open."""
        done = self.passes(s, t)
        none = ~st["open"].any(1)
        eps = torch.where(none | done, self.kmax, st["open"].int().argmax(1))
        images = self.image_at(x, d, eps)
        scores = self.model.scores(images)
        ok = self.passes(scores, t) | none
        images[done], scores[done] = x[done], s[done]
        strength[ok & ~done] = eps[ok & ~done].float()
        live = (~ok & ~done).nonzero()[:, 0]
        st["open"][live, eps[live]] = False
        self.rule_out(st, live, d, room, s, t, _strongest(scores[live], st["tried"][live]))
        return images, scores, live

    def rule_out(self, st, idx, d, room, s, t, rival) -> None:
        """Close every eps at which ``rival`` surely beats t (or keeps p_t below the confidence).

        idx: the pairs (rows of d, room, s, t) that ``rival`` belongs to; None for all of them.
        """
        if idx is not None and len(idx) == 0:
            return
        rows = slice(None) if idx is None else idx
        ti = t[rows]
        st["tried"][torch.arange(len(t), device=t.device) if idx is None else idx, rival] = True
        c = (self.model.W[ti] - self.model.W[rival]) * d[rows]  # (P', D)
        A = torch.zeros(len(ti), LEVELS, device=c.device).scatter_add_(1, room[rows], c).double()
        h = torch.arange(LEVELS, dtype=torch.float64, device=c.device)
        below = torch.cumsum(A * h, 1) - A * h  # sum over room < eps of c_i room_i
        above = A.sum(1, keepdim=True) - (torch.cumsum(A, 1) - A)  # sum over room >= eps of c_i
        si = s[rows].gather(1, ti[:, None]).double()
        sr = s[rows].gather(1, rival[:, None]).double()
        m = si - sr + below + h * above  # (P', 256): the margin of t over the rival at each eps
        l1 = self.model.fact("dist_l1")[ti, rival].double()[:, None]  # >= sum_i |c_i|
        tol = CERT_RTOL * (si.abs() + sr.abs() + h * l1) + SUM_RTOL * h * l1 + 1e-6
        floor = 0.0 if self.softmax_confidence else self.margin  # the margin form's goal
        st["open"][rows] &= m - floor > -tol
        if self.confidence is not None and self.softmax_confidence:
            # p_t <= 1 / (1 + sum over rivals of exp(-margin))
            st["expsum"][rows] += torch.exp(-(m + tol).clamp(min=-700))
            limit = (1 - self.confidence) / self.confidence
            st["open"][rows] &= st["expsum"][rows] <= limit * (1 + 1e-6)


def _strongest(S: torch.Tensor, tried: torch.Tensor) -> torch.Tensor:
    """The highest-scoring class not yet tried (not the target), per row."""
    return S.masked_fill(tried, -float("inf")).argmax(1)
