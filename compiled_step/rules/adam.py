"""Adam and AdamW (``torch.optim.Adam`` / ``torch.optim.AdamW``), matching torch's numerics.

torch's reference math per param (single-tensor and foreach paths agree)::

    g   = -g if maximize else g
    g   = g + wd * p                      # Adam (L2), not AdamW
    p   = p * (1 - lr * wd)               # AdamW / Adam(decoupled_weight_decay=True)
    m   = m.lerp(g, 1 - beta1)
    v   = v * beta2 + (1 - beta2) * g * g
    vm  = max(vm, v)  ; v_used = vm       # amsgrad
    bc1 = 1 - beta1 ** step ; bc2 = 1 - beta2 ** step     (step already incremented)
    p   = p + (-lr / bc1) * m / (sqrt(v_used) / sqrt(bc2) + eps)

Adam's L2 term and AdamW's decoupled decay are both always present in the one graph, with the
unused one set to its identity (``l2 = 0`` or ``decay = 1``), so Adam and AdamW share a graph.
``maximize`` is folded into the sign of the grad coefficient. Only ``amsgrad`` changes the graph,
because it adds a state tensor.

The per-tensor scalars (bias corrections from each tensor's on-device step count, as torch's
capturable path computes them) are computed once per step for every tensor in the finish graph
(``slot_table``), in float64 like torch's Python-float scalars, then rounded to the table's dtype:
float32, or float64 in a plan with float64 params. The update graphs index that table; they never
recompute ``beta ** step`` per element.

Precision: bfloat16, float16 and float32 params are updated in float32 and rounded once on store;
float64 params in float64 throughout, as torch.optim's float64 step (``common.compute_dtype``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.rules.common import (
    APPLY,
    ELEMENTWISE,
    GRAD_COEF,
    SCALE,
    Rounding,
    SIGN,
    StateTensor,
    as_compute,
    bf16_stochastic,
    check_range,
    compute_dtype,
    hyperparameter,
    like_param,
    reject_common_options,
    rounding_bits,
    store_where,
    widening,
)

NAME = "adam"
KIND = ELEMENTWISE
STEP_KEY = "step"  # the per-tensor counts are torch's state["step"] (0-d views into one vector)

# Group hyperparameters (float64, one row per sharding group); SCALE and SIGN come first for every rule.
HP_COLUMNS = ("scale", "sign", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled")
_LR, _BETA1, _BETA2, _EPS, _WD, _DECOUPLED = range(2, len(HP_COLUMNS))

# Per-tensor scalars (the table's dtype, one row per slot); APPLY and GRAD_COEF come first for every rule.
TABLE_COLUMNS = ("apply", "grad_coef", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "l2",
                 "neg_step_size", "bc2_sqrt")
_ONE_MINUS_BETA1, _T_BETA2, _ONE_MINUS_BETA2, _T_EPS, _DECAY, _L2, _NEG_STEP_SIZE, _BC2_SQRT = range(2, 10)

STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# The moments may be kept in bfloat16 for float32 params (``state_dtypes``): read widened, rounded on store.
LOW_PRECISION_KEYS = STATE_KEYS
# The updates take ``rounding`` (stochastic rounding of bfloat16 stores), its random bits keyed by the step count.
STOCHASTIC_ROUNDING = True


class Variant(NamedTuple):
    """Structural options: each distinct value compiles its own update graphs."""

    amsgrad: bool


def variant(optimizer, group: dict) -> Variant:
    return Variant(amsgrad=bool(group["amsgrad"]))


def state_keys(var: Variant) -> tuple[str, ...]:
    return STATE_KEYS if var.amsgrad else STATE_KEYS[:2]


def state_layout(var: Variant, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
    """Every state tensor is shaped and typed like its param (torch's ``zeros_like``)."""
    return like_param(state_keys(var), shape, dtype)


def count_at_bind(created: bool) -> float | None:
    """The count is torch's ``state["step"]`` (``STEP_KEY``), read where it is: nothing to write."""
    return None


def group_values(optimizer: torch.optim.Optimizer, group: dict, where: str) -> list:
    """The group's hyperparameters in ``HP_COLUMNS[2:]`` order: floats, or device tensors as they are.

    Raises ``ValueError`` for values torch.optim refuses at construction (an LR scheduler or a user
    can write them into ``param_groups`` later), before anything changes.
    """
    reject_common_options(group, type(optimizer).__name__)
    lr, beta1, beta2, eps, wd = moment_values(group, where)
    check_range(wd, "weight_decay", where, low=0.0)
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
    return [lr, beta1, beta2, eps, wd, 1.0 if decoupled else 0.0]


def moment_values(group: dict, where: str) -> list:
    """``lr, beta1, beta2, eps, weight_decay`` of an Adam-family group (torch's and torchao's), read as
    ``hyperparameter`` reads them, with the range checks both make at construction (lr, eps >= 0, betas in
    [0, 1)); the weight decay's is the caller's (torch checks it, torchao does not)."""
    lr = hyperparameter(group["lr"], "lr", where)
    betas = group["betas"]
    if isinstance(betas, torch.Tensor) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}. Nothing was updated.")
    beta1 = hyperparameter(betas[0], "betas[0]", where)
    beta2 = hyperparameter(betas[1], "betas[1]", where)
    eps = hyperparameter(group["eps"], "eps", where)
    wd = hyperparameter(group["weight_decay"], "weight_decay", where)
    check_range(lr, "lr", where, low=0.0)
    check_range(eps, "eps", where, low=0.0)
    check_range(beta1, "betas[0]", where, low=0.0, high=1.0)
    check_range(beta2, "betas[1]", where, low=0.0, high=1.0)
    return [lr, beta1, beta2, eps, wd]


def slot_table(
    hp: torch.Tensor,  # [S, len(HP_COLUMNS)] float64: each slot's group hyperparameters
    counts: torch.Tensor,  # [S] float32: each tensor's step count before this update
    apply: torch.Tensor,  # [S] bool: the tensor is updated this step (finite norm and a grad)
    coef: torch.Tensor,  # [] float64: the clip coefficient
    table: torch.Tensor,  # [S, K'] the table the result goes to, read for its dtype only (see norm/finish.py)
) -> torch.Tensor:  # [S, len(TABLE_COLUMNS)] in the table's dtype
    lr, beta1, beta2 = hp[:, _LR], hp[:, _BETA1], hp[:, _BETA2]
    wd, decoupled = hp[:, _WD], hp[:, _DECOUPLED] != 0
    step = counts.double() + 1.0  # torch increments the step before the bias corrections
    bias_correction1 = 1.0 - torch.pow(beta1, step)
    bias_correction2 = 1.0 - torch.pow(beta2, step)
    columns = [
        apply.double(),
        coef * hp[:, SCALE] * hp[:, SIGN],
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        hp[:, _EPS],
        torch.where(decoupled, 1.0 - lr * wd, torch.ones_like(lr)),
        torch.where(decoupled, torch.zeros_like(wd), wd),
        -(lr / bias_correction1),
        bias_correction2.sqrt(),
    ]
    return torch.stack(columns, dim=1).to(table.dtype)


def advance(counts: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Counts after the update: the step count grows where the update was applied."""
    return counts + apply


def _math(p32, g_raw, m32, v32, vm32, col):
    """One Adam/AdamW update in the params' compute precision (``*32``: float32, or float64 for float64
    params; the names are the graphs' node names). ``col(k)`` is column k of the table in that precision,
    as a 0-d value (one tensor) or a ``[rows, 1]`` column (a flat buffer); the math is the same."""
    g = widening(p32.dtype)(g_raw) * col(GRAD_COEF) + col(_L2) * p32
    p_decayed = p32 * col(_DECAY)
    m_new = torch.lerp(m32, g, col(_ONE_MINUS_BETA1))
    v_new = v32 * col(_T_BETA2) + col(_ONE_MINUS_BETA2) * g * g
    vm_new = torch.maximum(vm32, v_new) if vm32 is not None else None
    v_used = vm_new if vm_new is not None else v_new
    denom = v_used.sqrt() / col(_BC2_SQRT) + col(_T_EPS)
    p_new = p_decayed + col(_NEG_STEP_SIZE) * m_new / denom
    return p_new, m_new, v_new, vm_new


def update_flat(
    params: torch.Tensor,  # [R, ROW] a group's flat params (param dtype); mutated
    grads: torch.Tensor,  # [R, ROW] their grads, row for row; read only
    exp_avg: torch.Tensor,  # [R, ROW] first moments (param dtype); mutated
    exp_avg_sq: torch.Tensor,  # [R, ROW] second moments; mutated
    max_exp_avg_sq: torch.Tensor | None,  # [R, ROW] amsgrad maxima, or None; mutated
    row_slot: torch.Tensor,  # [R] int32: which of the group's slots each row belongs to
    table: torch.Tensor,  # [Sf, len(TABLE_COLUMNS)] float32 or float64: the group's flat slots' scalars
    counts: torch.Tensor,  # [Sf] float32: their step counts; mutated (+1 where applied)
    rounding: Rounding | None,  # stochastic rounding of bfloat16 stores, or None: to nearest
) -> None:
    rows = as_compute(table[row_slot.long()], compute_dtype(params.dtype))  # [R, K]: a row's scalars, read once
    widen = widening(params.dtype)
    p32, m32, v32 = widen(params), widen(exp_avg), widen(exp_avg_sq)
    vm32 = widen(max_exp_avg_sq) if max_exp_avg_sq is not None else None
    p_new, m_new, v_new, vm_new = _math(p32, grads, m32, v32, vm32, lambda k: rows[:, k, None])
    keep = rows[:, APPLY, None] != 0
    stores = [(params, p_new, p32), (exp_avg, m_new, m32), (exp_avg_sq, v_new, v32)]
    if max_exp_avg_sq is not None:
        stores.append((max_exp_avg_sq, vm_new, vm32))
    if rounding is not None:  # keyed by each row's step count and each element's place in the buffer
        position = torch.arange(params.numel(), device=params.device).view(params.shape)
        bits = rounding_bits(rounding, counts[row_slot.long()][:, None], position, [d.dtype for d, *_ in stores])
    else:
        bits = None
    store_where(keep, stores, bits)
    # The step count advances in the same graph that writes the params: an interrupted step never
    # leaves a param updated with its count unchanged.
    counts.copy_(advance(counts, table[:, APPLY]))


def update_bucket(
    params: list[torch.Tensor],  # B x [n_i] param shards, flattened (param dtype); mutated
    grads: list[torch.Tensor],  # B x [n_i] grads; read only
    exp_avg: list[torch.Tensor],  # B x [n_i] first moments; mutated
    exp_avg_sq: list[torch.Tensor],  # B x [n_i] second moments; mutated
    max_exp_avg_sq: list[torch.Tensor] | None,  # B x [n_i] amsgrad maxima, or None; mutated
    table: torch.Tensor,  # [B, len(TABLE_COLUMNS)] float32 or float64: the bucket's slots' scalars
    counts: torch.Tensor,  # [B] float32: their step counts; mutated
    amax: torch.Tensor | None,  # [B] float32: written with max|p| of the stored params (FP8), or None
    rounding: Rounding | None,  # stochastic rounding of bfloat16 stores, or None: to nearest
) -> None:
    amaxes = []
    compute, widen = compute_dtype(params[0].dtype), widening(params[0].dtype)  # one sharding group: one dtype
    for j in range(len(params)):
        p, m, v = params[j], exp_avg[j], exp_avg_sq[j]
        vm = max_exp_avg_sq[j] if max_exp_avg_sq is not None else None
        p32, m32, v32 = widen(p), widen(m), widen(v)
        vm32 = widen(vm) if vm is not None else None
        p_new, m_new, v_new, vm_new = _math(p32, grads[j], m32, v32, vm32, lambda k: as_compute(table[j, k], compute))
        keep = table[j, APPLY] != 0
        stores = [(p, p_new, p32), (m, m_new, m32), (v, v_new, v32)] + ([(vm, vm_new, vm32)] if vm is not None else [])
        bits = rounding_bits(rounding, counts[j], torch.arange(p.numel(), device=p.device),
                             [d.dtype for d, *_ in stores], first_stream=4 * j) if rounding is not None else None
        store_where(keep, stores[1:], bits[1:] if bits is not None else None)
        if bits is not None and bits[0] is not None:
            p_stored = bf16_stochastic(torch.where(keep, p_new, p32), bits[0])
        else:
            p_stored = torch.where(keep, p_new, p32).to(p.dtype)
        p.copy_(p_stored)
        if amax is not None:  # a reduction over the values being stored: same loop, no extra read
            amaxes.append(p_stored.abs().amax().float())
    counts.copy_(advance(counts, table[:, APPLY]))
    if amax is not None:
        amax.copy_(torch.stack(amaxes))
