"""How partial norms are accumulated and combined for a ``norm_type``.

A partial norm is a float64 vector whose meaning depends on the kind:

* ``sum`` (p = 1 or 2): ``[Σ|g|^p]``, accumulated in one fp64 pass;
* ``max`` (p = inf): ``[max|g|]``;
* ``scaled`` (any other finite p): ``[M, S]`` with ``Σ|g|^p = M^p · S`` where ``M`` is the max, so that
  neither huge nor tiny grads overflow or underflow fp64 for large p (NeMo scales by the max too).

Everything here is pure tensor math, used inside the compiled graphs and by the eager collectives.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6); NeMo Automodel inherits it.
CLIP_EPS = 1e-6


class NormKind(NamedTuple):
    kind: str  # "sum", "max" or "scaled"
    p: float

    @staticmethod
    def of(norm_type: float) -> "NormKind":
        if math.isinf(norm_type):
            return NormKind("max", math.inf)
        if norm_type in (1.0, 2.0):
            return NormKind("sum", float(norm_type))
        return NormKind("scaled", float(norm_type))

    @property
    def partial_width(self) -> int:
        """Length of a partial-norm vector: 1, or 2 (max, scaled sum) for the scaled kind."""
        return 2 if self.kind == "scaled" else 1


def combine_scaled(
    maxes: torch.Tensor,  # [k] float64 per-part maxima M_i
    sums: torch.Tensor,  # [k] float64 per-part scaled sums S_i = Σ(|g|/M_i)^p
    p: torch.Tensor | float,  # norm order
) -> torch.Tensor:  # [2] float64: (M, S) of the union, M = max M_i
    top = maxes.amax()
    safe_top = torch.where(top > 0, top, torch.ones_like(top))
    weights = torch.where(maxes > 0, (maxes / safe_top).pow(p), torch.zeros_like(maxes))
    return torch.stack([top, (weights * sums).sum()])


def combine(
    kind: str,  # NormKind.kind
    partials: torch.Tensor,  # [k, w] float64 partials of disjoint gradient sets
    p: torch.Tensor | float,  # norm order (used by the scaled kind)
) -> torch.Tensor:  # [w] float64: the partial of their union
    if kind == "sum":
        return partials.sum(0)
    if kind == "max":
        return partials.amax(0)
    return combine_scaled(partials[:, 0], partials[:, 1], p)


def total_from(
    kind: str,  # NormKind.kind
    partial: torch.Tensor,  # [w] float64, fully reduced
    p: torch.Tensor | float,  # norm order
) -> torch.Tensor:  # [] float64: the total norm
    if kind == "sum":
        return partial[0].sqrt() if p == 2.0 else partial[0]
    if kind == "max":
        return partial[0]
    return partial[0] * partial[1].pow(1.0 / p)
