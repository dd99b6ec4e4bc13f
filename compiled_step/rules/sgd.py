"""SGD (``torch.optim.SGD``), matching torch's single-tensor numerics.

torch's reference math per param::

    g = -g if maximize else g
    g = g + wd * p
    if momentum != 0:
        buf = g.clone() on the first step, else buf * momentum + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p = p + (-lr) * g

``momentum != 0`` changes the graph (it adds the momentum buffer); nesterov and the first-step rule
are selected per tensor with ``torch.where`` so they do not. The per-tensor counts are the
first-step flags: 1.0 until an update has been applied to the tensor's momentum buffer (FusedStep
creates the buffer as zeros in its arena, where torch would clone the grad), 0.0 after. The flag is
cleared in the update graph itself, so a skipped first step stays a first step.

Precision: bfloat16, float16 and float32 params are updated in float32 and rounded once on store;
float64 params in float64 throughout, as torch.optim's float64 step (``common.compute_dtype``), with
the per-tensor table in float64 (computed in float64 like torch's Python-float scalars).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.rules.common import (
    APPLY,
    ELEMENTWISE,
    GRAD_COEF,
    SCALE,
    SIGN,
    StateTensor,
    as_compute,
    check_range,
    compute_dtype,
    hyperparameter,
    like_param,
    reject_common_options,
    store_where,
    widening,
)

NAME = "sgd"
KIND = ELEMENTWISE
STEP_KEY = None  # torch's SGD keeps no step: the counts are FusedStep's own first-step flags (count_at_bind)

HP_COLUMNS = ("scale", "sign", "lr", "momentum", "dampening", "weight_decay", "nesterov")
_LR, _MOMENTUM, _DAMPENING, _WD, _NESTEROV = range(2, len(HP_COLUMNS))

TABLE_COLUMNS = ("apply", "grad_coef", "neg_lr", "weight_decay", "momentum", "one_minus_dampening", "nesterov",
                 "first")
_NEG_LR, _T_WD, _T_MOMENTUM, _ONE_MINUS_DAMPENING, _T_NESTEROV, _FIRST = range(2, 8)


STATE_KEYS = ("momentum_buffer",)
LOW_PRECISION_KEYS: tuple[str, ...] = ()  # state kept in the params' dtype only (state_dtypes.py)
STOCHASTIC_ROUNDING = False  # its updates round to nearest only (FusedStepConfig.stochastic_rounding)


class Variant(NamedTuple):
    """Structural options: each distinct value compiles its own update graphs."""

    momentum: bool


def variant(optimizer, group: dict) -> Variant:
    momentum = group["momentum"]
    return Variant(momentum=bool(momentum != 0) if not isinstance(momentum, torch.Tensor) else True)


def state_keys(var: Variant) -> tuple[str, ...]:
    """torch keeps SGD state only for the momentum buffer."""
    return STATE_KEYS if var.momentum else ()


def state_layout(var: Variant, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
    """The momentum buffer is shaped and typed like its param."""
    return like_param(state_keys(var), shape, dtype)


def count_at_bind(created: bool) -> float:
    """A momentum buffer FusedStep creates (zeros) is on its first step: 1.0, so the update takes the grad as
    the buffer, as torch clones it; an adopted buffer (torch's, a checkpoint's) is not: 0.0."""
    return 1.0 if created else 0.0


def group_values(optimizer: torch.optim.Optimizer, group: dict, where: str) -> list:
    """The group's hyperparameters in ``HP_COLUMNS[2:]`` order (see ``adam.group_values``)."""
    reject_common_options(group, type(optimizer).__name__)
    lr = hyperparameter(group["lr"], "lr", where)
    momentum = hyperparameter(group["momentum"], "momentum", where)
    dampening = hyperparameter(group["dampening"], "dampening", where)
    wd = hyperparameter(group["weight_decay"], "weight_decay", where)
    check_range(lr, "lr", where, low=0.0)
    check_range(momentum, "momentum", where, low=0.0)
    check_range(wd, "weight_decay", where, low=0.0)
    nesterov = bool(group["nesterov"])
    if nesterov and not isinstance(momentum, torch.Tensor) and not isinstance(dampening, torch.Tensor) and (
            momentum <= 0 or dampening != 0):
        raise ValueError(f"{where}: Nesterov momentum requires a momentum and zero dampening (torch.optim.SGD's "
                         "rule). Nothing was updated.")
    return [lr, momentum, dampening, wd, 1.0 if nesterov else 0.0]


def slot_table(
    hp: torch.Tensor,  # [S, len(HP_COLUMNS)] float64: each slot's group hyperparameters
    counts: torch.Tensor,  # [S] float32: 1.0 where the momentum buffer has never been updated
    apply: torch.Tensor,  # [S] bool: the tensor is updated this step
    coef: torch.Tensor,  # [] float64: the clip coefficient
    table: torch.Tensor,  # [S, K'] the table the result goes to, read for its dtype only (see norm/finish.py)
) -> torch.Tensor:  # [S, len(TABLE_COLUMNS)] in the table's dtype
    columns = [
        apply.double(),
        coef * hp[:, SCALE] * hp[:, SIGN],
        -hp[:, _LR],
        hp[:, _WD],
        hp[:, _MOMENTUM],
        1.0 - hp[:, _DAMPENING],
        hp[:, _NESTEROV],
        counts.double(),
    ]
    return torch.stack(columns, dim=1).to(table.dtype)


def advance(counts: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """First-step flags after the update: cleared where the update was applied."""
    return counts * (1.0 - apply)


def _math(p32, g_raw, buf32, col):
    """One SGD update in the params' compute precision (``*32``: float32, or float64 for float64 params; the
    names are the graphs' node names); ``col(k)`` is a 0-d value or a ``[rows, 1]`` column in that precision."""
    g = widening(p32.dtype)(g_raw) * col(GRAD_COEF) + col(_T_WD) * p32
    buf_new = None
    if buf32 is not None:
        buf_new = torch.where(col(_FIRST) != 0, g, buf32 * col(_T_MOMENTUM) + col(_ONE_MINUS_DAMPENING) * g)
        g = torch.where(col(_T_NESTEROV) != 0, g + col(_T_MOMENTUM) * buf_new, buf_new)
    return p32 + col(_NEG_LR) * g, buf_new


def update_flat(
    params: torch.Tensor,  # [R, ROW] a group's flat params (param dtype); mutated
    grads: torch.Tensor,  # [R, ROW] their grads, row for row; read only
    momentum_buffer: torch.Tensor | None,  # [R, ROW] momentum buffers, or None; mutated
    row_slot: torch.Tensor,  # [R] int32: which of the group's slots each row belongs to
    table: torch.Tensor,  # [Sf, len(TABLE_COLUMNS)] float32 or float64
    counts: torch.Tensor,  # [Sf] float32 first-step flags; mutated
) -> None:
    rows = as_compute(table[row_slot.long()], compute_dtype(params.dtype))
    widen = widening(params.dtype)
    p32 = widen(params)
    buf32 = widen(momentum_buffer) if momentum_buffer is not None else None
    p_new, buf_new = _math(p32, grads, buf32, lambda k: rows[:, k, None])
    keep = rows[:, APPLY, None] != 0
    store_where(keep, [(params, p_new, p32)] + ([(momentum_buffer, buf_new, buf32)] if buf32 is not None else []))
    counts.copy_(advance(counts, table[:, APPLY]))


def update_bucket(
    params: list[torch.Tensor],  # B x [n_i] param shards, flattened; mutated
    grads: list[torch.Tensor],  # B x [n_i] grads; read only
    momentum_buffer: list[torch.Tensor] | None,  # B x [n_i] momentum buffers, or None; mutated
    table: torch.Tensor,  # [B, len(TABLE_COLUMNS)] float32 or float64
    counts: torch.Tensor,  # [B] float32 first-step flags; mutated
    amax: torch.Tensor | None,  # [B] float32: written with max|p| of the stored params (FP8), or None
) -> None:
    amaxes = []
    compute, widen = compute_dtype(params[0].dtype), widening(params[0].dtype)  # one sharding group: one dtype
    for j in range(len(params)):
        p = params[j]
        buf = momentum_buffer[j] if momentum_buffer is not None else None
        p32 = widen(p)
        buf32 = widen(buf) if buf is not None else None
        p_new, buf_new = _math(p32, grads[j], buf32, lambda k: as_compute(table[j, k], compute))
        keep = table[j, APPLY] != 0
        if buf is not None:
            store_where(keep, [(buf, buf_new, buf32)])
        p_stored = torch.where(keep, p_new, p32).to(p.dtype)
        p.copy_(p_stored)
        if amax is not None:
            amaxes.append(p_stored.abs().amax().float())
    counts.copy_(advance(counts, table[:, APPLY]))
    if amax is not None:
        amax.copy_(torch.stack(amaxes))
