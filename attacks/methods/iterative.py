"""Repeated targeted sign steps of one pixel level inside a growing L-inf ball.

Kurakin, Goodfellow and Bengio, "Adversarial Examples in the Physical World" (2016), the basic
iterative method, targeted: ``x <- clip(proj_ball(x + 1 * sign(grad log p_t(x))), 0, 255)``.
"""

from __future__ import annotations

import torch

from attacks.methods.base import Attack, Fooled, pairs

STEPS_PER_LEVEL = 2  # steps taken at each ball radius before it grows by one level
COMPACT_AT = 0.75  # rows of finished pairs are dropped once fewer than this fraction still walk


class Iterative(Attack):
    r"""Basic iterative method, targeted, one pixel level per step, until the target wins.

    Distance measure: L-inf. Value range: uint8 pixels 0..255 in and out (integer steps, no
    rounding). The ball's radius starts at the certified L-inf bound (no smaller ball holds a
    fooling image; until then the radius is the step count) and grows by one level every
    ``STEPS_PER_LEVEL`` steps; each pair stops at the first step whose image is predicted as the
    target (with the confidence, if given). The strength is the radius then; the gradient is
    recomputed every step, so the perturbation is usually smaller than one sign step's.
    Every iterate is scored in float32, so the reported scores are those of the stored image;
    the direction's ``p @ W`` is a bfloat16 product where the hardware is fast at it (GPUs, CPUs
    with AMX), so iterates can differ in a few pixels between such machines and others.

    Shape:
        - X: (N, D) uint8, S: (N, C) float32 scores of X, targets: (T,) int64.
        - output: ``Fooled`` with images (N*T, D) uint8, image-major.

    Examples::
        >>> attack = Iterative(model)
        >>> fooled = attack(X, model.scores(X), torch.tensor([3, 7]))
    """

    name = "iterative"

    def __call__(self, X, S, targets):
        n, t = pairs(len(X), targets)
        return self.walk(X[n], S[n], t)

    def walk(self, x0, s0, t) -> Fooled:
        """The pairs (x0 (P, D) uint8, its scores s0 (P, C), target t (P,)), each its own."""
        images, scores = x0.clone(), s0.clone()
        strength = torch.zeros(len(t), device=t.device)
        bound, _ = self.model.bounds(s0, t, self.margin)
        live = (~self.passes(s0, t)).nonzero()[:, 0]  # the pairs still walking, and their state:
        x = x0[live].float()
        st = {"id": live, "Wt": self.model.W[t[live]], "s0": s0[live], "S": s0[live],
              "t": t[live], "start": torch.ceil(bound[live].double()).clamp(1, 255).long(),
              "delta": torch.zeros_like(x), "low": -x, "high": 255 - x}  # delta in [-x, 255 - x]
        walking = torch.ones_like(st["t"], dtype=torch.bool)
        for step in range(1, 255 * STEPS_PER_LEVEL + 2):
            self.step(st, radius_at(step, st["start"]))
            stop = walking & (self.passes(st["S"], st["t"]) | (step >= radius_steps(st["start"])))
            if stop.any():
                self.record(st, stop, x0, images, scores, strength, radius_at(step, st["start"]))
                walking &= ~stop
            if walking.sum() < COMPACT_AT * len(walking):  # drop finished rows now and then
                st = {k: v[walking] for k, v in st.items()}
                walking = walking[walking]
            if len(walking) == 0:
                break
        if len(walking):  # out of steps: keep the last try
            last = torch.full_like(st["start"], 255)
            self.record(st, walking, x0, images, scores, strength, last)
        return Fooled(images, scores, strength)

    def step(self, st: dict, radius: torch.Tensor) -> None:
        """One sign step of one level on every live pair, kept in the ball and in 0..255."""
        grad = st["Wt"] - self.model.mean_template(st["S"], fast=True)  # grad log p_t, (P, D)
        r = radius[:, None].float()
        delta = (st["delta"] + torch.sign(grad)).clamp_(-r, r)
        st["delta"] = torch.minimum(torch.maximum(delta, st["low"]), st["high"])
        st["S"] = torch.addmm(st["s0"], st["delta"], self.model.W.T)  # scores of x + delta

    @staticmethod
    def record(st, stop, x0, images, scores, strength, radius) -> None:
        ids = st["id"][stop]
        images[ids] = (x0[ids].float() + st["delta"][stop]).to(torch.uint8)
        scores[ids], strength[ids] = st["S"][stop], radius[stop].float()


def radius_at(step: int, start: torch.Tensor) -> torch.Tensor:
    """Ball radius at a step: the step count up to ``start``, then one more every few steps."""
    grown = start + (step - start + STEPS_PER_LEVEL - 1).clamp(min=0) // STEPS_PER_LEVEL
    return torch.minimum(torch.full_like(start, step), grown).clamp(max=255)


def radius_steps(start: torch.Tensor) -> torch.Tensor:
    """The step at which the radius reaches 255, plus the steps spent there."""
    return start + STEPS_PER_LEVEL * (255 - start) + STEPS_PER_LEVEL - 1
