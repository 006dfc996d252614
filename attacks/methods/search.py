"""The exact attack's dual search: one interface, two backends, chosen once per device
(docs/exact.md).

    >>> search = backend_for(model.device)            # numba on a CPU, torch elsewhere
    >>> lam, r, slope = search.search_weights(prob, lam, calls=8)
    >>> lam, h, eps, g, r = search.newton(prob, lam, eps, steps=8, until_feasible=True)

``TorchBackend`` (search_torch.py) runs the steps batched over pairs, what a GPU runs;
``NumbaBackend`` (search_numba.py) runs the same iteration fused per pair in compiled loops,
about twice as fast on CPUs. Both take the search's numbers in one ``Constants`` (problem.py).

Only torch (and the backends' numba) here: no Ray, no storage.
"""

from __future__ import annotations

from typing import Protocol

import torch

from attacks.methods.problem import Constants, Problem
from attacks.methods.search_numba import NumbaBackend
from attacks.methods.search_torch import TorchBackend

BACKENDS = ("numba", "torch")


class Backend(Protocol):
    """The dual search's steps for one chunk of pairs (Problem), P pairs, K rivals, D pixels.

    - ``g(prob, lam)``: ``sum_k lam_k (W[t] - W[k])`` (P, D) float32 for lam (P, K) float64.
    - ``root(prob, g, lq)``: the root in eps of ``lq + sum_j |g_j| min(eps, R_j)`` (P,) float64
      (inf where t cannot win within 255), in g's precision: the certificate's.
    - ``search_weights(prob, lam, calls)``: SMO from lam, ``calls`` root evaluations per pair at
      most; returns the best weights (P, K), their root r (P,), h's slope in eps there (P,).
    - ``newton(prob, lam, eps, steps, until_feasible)``: Newton's method on h(., eps) from lam;
      returns the weights (P, K), h there (P,), eps (P,) (moved up where h < 0 and
      ``until_feasible``), and the weights' g (P, D) float32 and root (P,).
    """

    name: str
    c: Constants

    def g(self, prob: Problem, lam: torch.Tensor) -> torch.Tensor: ...

    def root(self, prob: Problem, g: torch.Tensor, lq: torch.Tensor) -> torch.Tensor: ...

    def search_weights(self, prob: Problem, lam: torch.Tensor, calls: int) -> tuple: ...

    def newton(self, prob: Problem, lam: torch.Tensor, eps: torch.Tensor, steps: int,
               until_feasible: bool = False) -> tuple: ...


def backend_for(device: torch.device | str, name: str | None = None,
                c: Constants | None = None) -> Backend:
    """The search for tensors on ``device``: ``name`` (one of BACKENDS) if given, else numba
    on a CPU and torch elsewhere. The numba backend reads CPU memory only."""
    device = torch.device(device)
    if name is None:
        name = "numba" if device.type == "cpu" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown search backend {name!r}: one of {', '.join(BACKENDS)}")
    if name == "numba" and device.type != "cpu":
        raise ValueError(f"the numba search runs on CPUs only, not on {device}")
    return (NumbaBackend if name == "numba" else TorchBackend)(c)
