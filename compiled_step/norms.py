"""Combining partial norms into the total norm, the clip coefficient and the finite flag.

Small eager tensor math between Phase A and Phase B (a handful of 0-d and [k] ops per step).
A partial norm is a float64 vector whose meaning depends on the ``NormKind``:

* ``sum``: ``[Σ|g|^p]``;   ``max``: ``[max|g|]``;   ``scaled``: ``[M, S]`` with ``Σ|g|^p = M^p · S``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.kernels import NormKind, combine_scaled

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6); the seed and NeMo inherit it.
CLIP_EPS = 1e-6


class NormResult(NamedTuple):
    """Outputs of the norm stage, all 0-d tensors on the norm device; nothing is read on the host."""

    total: torch.Tensor  # float64: the pre-clip total norm
    clip_coef: torch.Tensor  # float64: min(1, max_norm / (total + 1e-6)), or 1 without clipping
    finite: torch.Tensor  # bool: total is finite (the step is applied only then)


def combine(kind: NormKind, partials: torch.Tensor) -> torch.Tensor:
    """Combine ``[k, w]`` partials of disjoint gradient sets into one ``[w]`` partial."""
    if partials.shape[0] == 0:
        return partials.new_zeros((kind.partial_width,))
    if kind.kind == "sum":
        return partials.sum(0)
    if kind.kind == "max":
        return partials.amax(0)
    return combine_scaled(partials[:, 0], partials[:, 1], kind.p)


def apply_scale(kind: NormKind, partial: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The partial of ``scale * g`` given the partial of ``g`` (``scale`` is a float64 0-d tensor)."""
    if scale is None:
        return partial
    magnitude = scale.abs()
    if kind.kind == "sum":
        return partial * magnitude.pow(kind.p)
    if kind.kind == "max":
        return partial * magnitude
    return torch.stack([partial[0] * magnitude, partial[1]])


def finish(kind: NormKind, partial: torch.Tensor, max_norm: float | None) -> NormResult:
    """Total norm, clip coefficient and finite flag from the fully reduced ``[w]`` partial."""
    if kind.kind == "sum":
        total = partial[0].sqrt() if kind.p == 2.0 else partial[0]
    elif kind.kind == "max":
        total = partial[0]
    else:
        total = partial[0] * partial[1].pow(1.0 / kind.p)
    finite = torch.isfinite(total)
    if max_norm is None:
        clip_coef = torch.ones_like(total)
    else:
        clip_coef = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
    return NormResult(total, clip_coef, finite)
