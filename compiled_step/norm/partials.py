"""Phase A: partial norms, compiled. Nothing is written to the grads.

Two forms of the same math:

* ``partial_of_buffer``: one sharding group's flat grad buffer (every grad of the group, end to end in
  whole rows, zeros in the padding), one call per group whatever the number of tensors. FusedStep
  uses it: the grads live in its persistent buffers.
* ``partial_of_list``: a fixed-length list of grads wherever they are (one call per bucket), for
  the functional API, which norms and clips the user's own grads in place;
  ``add_partial_of_list`` combines it into a group's partial, for grads FusedStep reads where
  another framework keeps them (external grads, ``planning.py``).

Both scale the partial by the group's factor ``s`` (PP/EP scaling, ``grad_scale``), i.e. they return
the partial of ``s * g`` without multiplying any grad.
"""

from __future__ import annotations

import torch


def _scaled(kind: str, p, partial: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The partial of ``scale * g`` from the partial of ``g``."""
    magnitude = scale.abs()
    if kind == "sum":
        return partial * (magnitude if p == 1.0 else magnitude * magnitude)
    if kind == "max":
        return partial * magnitude
    return torch.stack([partial[0] * magnitude, partial[1]])


def _terms(kind: str, p, g: torch.Tensor):
    """(max, scaled sum) or the plain sum/max of one tensor, in float64."""
    if kind == "sum":
        x = g.double()
        return (x.square() if p == 2.0 else x.abs()).sum()
    if kind == "max":
        return g.abs().amax().double()  # NaN propagates
    a = g.double().abs()
    m = a.amax()
    safe_m = torch.where(m > 0, m, torch.ones_like(m))
    return m, (a / safe_m).pow(p).sum()


def partial_of_buffer(
    grads: torch.Tensor,  # [rows, ROW] a group's grads, end to end, zeros elsewhere; any float dtype
    scale: torch.Tensor,  # [] float64: the group's grad scale
    order: torch.Tensor,  # [] float64: the norm order p (read by the scaled kind only)
    out: torch.Tensor,  # [2] float64: written with the scaled partial ([value, 0] for sum and max)
    kind: str,  # graph constant: "sum", "max" or "scaled"
    p: float,  # graph constant: 1.0 or 2.0 for "sum", inf for "max" (the scaled kind reads ``order``)
) -> None:
    if kind == "scaled":
        m, s = _terms(kind, order, grads)
        partial = torch.stack([m, s])
    else:
        partial = _terms(kind, p, grads).reshape(1)
    partial = _scaled(kind, p, partial, scale)
    if kind != "scaled":  # a second, zero column: every partial row is 16 bytes
        partial = torch.cat([partial, torch.zeros_like(partial)])
    out.copy_(partial)


def partial_of_list(
    grads: list[torch.Tensor],  # B x [n_i] grads (non-empty), any float dtype
    order: torch.Tensor,  # [] float64: the norm order p (read by the scaled kind only)
    kind: str,  # graph constant
    p: float,  # graph constant
) -> torch.Tensor:  # [w] float64: the unscaled partial of the bucket
    from compiled_step.norm.kinds import combine_scaled

    if kind == "scaled":
        pairs = [_terms(kind, order, g) for g in grads]
        return combine_scaled(torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs]), order)
    terms = torch.stack([_terms(kind, p, g) for g in grads])
    return (terms.sum() if kind == "sum" else terms.amax()).reshape(1)


def add_partial_of_list(
    grads: list[torch.Tensor],  # B x [n_i] grads read where they are (external grads), any float dtype
    scale: torch.Tensor,  # [] float64: the group's grad scale
    order: torch.Tensor,  # [] float64: the norm order p (read by the scaled kind only)
    out: torch.Tensor,  # [2] float64: the group's partial so far; combined with this bucket's in place
    kind: str,  # graph constant
    p: float,  # graph constant
) -> None:
    from compiled_step.norm.kinds import combine

    partial = _scaled(kind, p, partial_of_list(grads, order, kind, p), scale)
    if kind != "scaled":
        partial = torch.cat([partial, torch.zeros_like(partial)])
    out.copy_(combine(kind, torch.stack([out, partial]), order if kind == "scaled" else p))


def scale_partial(kind: str, p, partial: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Eager form of the scaling, for the functional API."""
    return partial if scale is None else _scaled(kind, p, partial, scale)
