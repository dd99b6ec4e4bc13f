"""Phase A with per-param partial norms (``param_norms=True``), compiled. Nothing is written to the grads.

The same read of the grads as ``partials.py``, reduced in two stages: parts of the flat grad buffer,
each within one param, to part partials, then the parts of each param to the param's partial. Every
param starts a row; its rows are cut into parts of ``PART_ROWS`` rows, largest first (a param of 300
rows: two parts of 128 rows, five of 8, four of 1), so no part is padded and no element is read twice
or masked. The layout (``health.ParamNormRows``) lists the first row of every part, one table per
size, and the param of every part. The group's partial is reduced from the part partials directly,
in one deterministic reduction, so the total norm, the clip coefficient and the update never depend
on the order of the per-param scatter (an atomic add, on a GPU and on the CPU).

Why parts of many rows (measured on the bench's 2-core CPU, float64 sums): Inductor's C++ kernel
reduces each output with a vectorised loop, then folds the accumulator vector's lanes with ATen's
``vec_reduce_all``, which has no SIMD form for float64 (a store, then one dependent add per lane, tens
of ns). Once per 256-element row that fold costs about as much as the row's loads: this call, reducing
every row, took 1.4-1.5x (one thread) and 1.3x (two threads) the time of the whole-buffer reduction of
``partials.py`` on the bench's headline layout, on the same buffer. With 128-row parts: 1.01-1.05x and
1.03x. The 8-row parts bound the folds of a param's remainder: on 100 params of random sizes, 1.2x
(2.2x reducing every row, 1.5x with 128-row parts and single rows only).

A partial row is ``[value, 0]`` (sum, max) or ``[max, scaled sum]`` (scaled kind), as in ``kinds.py``;
the group's and every param's are scaled by the group's grad scale ``s``: they are the partials of
``s * g``.
"""

from __future__ import annotations

import torch

from compiled_step.norm.kinds import combine, combine_scaled

# The part sizes in rows, largest first; the last is 1, so that any param's rows are cut exactly. 128 rows
# (32768 elements) make the fold under 1 % of a part's work; on the bench's GPT layout 64-row parts took
# about 1.5 % more and 256-row parts about the same (and fewer, larger parts would leave a GPU fewer
# programs to spread over its SMs: not measured, there is no GPU here).
PART_ROWS = (128, 8, 1)


def _scaled_rows(kind: str, p, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[k, 2]`` partials of ``g`` -> those of ``scale * g``."""
    magnitude = scale.abs()
    if kind == "sum":
        return rows * (magnitude if p == 1.0 else magnitude * magnitude)
    if kind == "max":
        return rows * magnitude
    return torch.stack([rows[:, 0] * magnitude, rows[:, 1]], dim=1)


def _segments(
    kind: str,
    order,  # the norm order p (a tensor for the scaled kind)
    maxes: torch.Tensor | None,  # [k] float64 per-part maxima (scaled kind), or None
    values: torch.Tensor,  # [k] float64 per-part sums (sum), maxima (max) or scaled sums (scaled)
    segment: torch.Tensor,  # [k] int64: the param each part belongs to
    n: int,  # params
) -> torch.Tensor:  # [n, 2] float64: each param's partial
    zeros = torch.zeros(n, dtype=torch.float64, device=values.device)
    if kind == "sum":
        return torch.stack([zeros.index_add(0, segment, values), zeros], dim=1)
    if kind == "max":
        return torch.stack([zeros.scatter_reduce(0, segment, values, "amax"), zeros], dim=1)
    top = zeros.scatter_reduce(0, segment, maxes, "amax")
    top_of_part = top[segment]
    safe_top = torch.where(top_of_part > 0, top_of_part, torch.ones_like(top_of_part))
    weights = torch.where(maxes > 0, (maxes / safe_top).pow(order), torch.zeros_like(maxes))
    return torch.stack([top, zeros.index_add(0, segment, weights * values)], dim=1)


def _part_terms(kind: str, p, parts: torch.Tensor, dims: tuple[int, ...]):
    """(maxima or None, values) of each part of ``parts`` (``[k, ...]``, reduced over ``dims``): float64
    ``[k]`` sums (sum), maxima (max) or (maxima, scaled sums) (scaled kind, which reads ``p`` as a tensor)."""
    if kind == "sum":
        x = parts.double()
        return None, (x.square() if p == 2.0 else x.abs()).sum(dims)
    if kind == "max":
        return None, parts.abs().amax(dims).double()  # NaN propagates
    a = parts.double().abs()
    top = a.amax(dims)
    safe = torch.where(top > 0, top, torch.ones_like(top)).reshape(top.shape + (1,) * len(dims))
    return top, (a / safe).pow(p).sum(dims)


def partials_of_buffer_by_param(
    grads: torch.Tensor,  # [rows, ROW] a group's grads, each param from a row start, zeros elsewhere
    part_rows: list[torch.Tensor],  # per size of PART_ROWS: [k_i] int32, the first row of each part of that size
    part_param: torch.Tensor,  # [sum k_i] int64: the param (0 <= i < n) of each part, the sizes' parts in order
    scale: torch.Tensor,  # [] float64: the group's grad scale
    order: torch.Tensor,  # [] float64: the norm order p (read by the scaled kind only)
    out: torch.Tensor,  # [2] float64: written with the group's scaled partial
    out_params: torch.Tensor,  # [n, 2] float64: written with each param's scaled partial
    kind: str,  # graph constant: "sum", "max" or "scaled"
    p: float,  # graph constant: 1.0 or 2.0 for "sum", inf for "max" (the scaled kind reads ``order``)
) -> None:
    norm_order = order if kind == "scaled" else p
    maxes, values = [], []
    for size, first in zip(PART_ROWS, part_rows):
        rows = first[:, None].long() + torch.arange(size, device=grads.device)  # [k_i, size]
        part_max, part_values = _part_terms(kind, norm_order, grads[rows], (1, 2))
        maxes.append(part_max)
        values.append(part_values)
    values = torch.cat(values)  # [sum k_i]: every part, in part_param's order
    n = out_params.shape[0]
    if kind == "scaled":
        maxes = torch.cat(maxes)
        group = combine_scaled(maxes, values, order)[None]
        per_param = _segments(kind, order, maxes, values, part_param, n)
    else:
        total = values.sum() if kind == "sum" else values.amax()
        group = torch.stack([total, torch.zeros_like(total)])[None]
        per_param = _segments(kind, p, None, values, part_param, n)
    out.copy_(_scaled_rows(kind, p, group, scale)[0])
    out_params.copy_(_scaled_rows(kind, p, per_param, scale))


def _tensor_terms(kind: str, p, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, scaled sum) of one tensor for the scaled kind; (value, 0) for sum and max; float64."""
    if kind == "sum":
        x = g.double()
        value = (x.square() if p == 2.0 else x.abs()).sum()
        return value, torch.zeros_like(value)
    if kind == "max":
        value = g.abs().amax().double()
        return value, torch.zeros_like(value)
    a = g.double().abs()
    m = a.amax()
    safe_m = torch.where(m > 0, m, torch.ones_like(m))
    return m, (a / safe_m).pow(p).sum()


def add_partials_of_list_by_param(
    grads: list[torch.Tensor],  # B x [n_i] grads read where they are (external grads), any float dtype
    scale: torch.Tensor,  # [] float64: the group's grad scale
    order: torch.Tensor,  # [] float64: the norm order p (read by the scaled kind only)
    out: torch.Tensor,  # [2] float64: the group's partial so far; combined with this bucket's in place
    out_params: torch.Tensor,  # [B, 2] float64: written with each grad's scaled partial
    kind: str,  # graph constant
    p: float,  # graph constant
) -> None:
    norm_order = order if kind == "scaled" else p
    terms = [_tensor_terms(kind, norm_order, g) for g in grads]
    per_param = torch.stack([torch.stack(pair) for pair in terms])  # [B, 2]
    if kind == "scaled":
        bucket = combine_scaled(per_param[:, 0], per_param[:, 1], order)
    else:
        bucket = combine(kind, per_param, p)
    bucket = _scaled_rows(kind, p, bucket[None], scale)[0]
    out.copy_(combine(kind, torch.stack([out, bucket]), norm_order))
    out_params.copy_(_scaled_rows(kind, p, per_param, scale))


def norms_of_rows(
    kind: str,
    rows: torch.Tensor,  # [k, 2] float64: fully reduced partials
    p,  # the norm order (a tensor for the scaled kind)
) -> torch.Tensor:  # [k] float64: the norm of each
    if kind == "sum":
        return rows[:, 0].sqrt() if p == 2.0 else rows[:, 0]
    if kind == "max":
        return rows[:, 0]
    return rows[:, 0] * rows[:, 1].pow(1.0 / p)
