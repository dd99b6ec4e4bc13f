"""Adafactor (``torch.optim.Adafactor``), matching torch's numerics, on stacks of same-shape params.

torch's reference math per param (``torch/optim/_adafactor.py``, single-tensor path; ``step`` already
incremented, every scalar a Python float)::

    g      = -g if maximize else g
    beta2' = step ** beta2_decay                    # one_minus_beta2_t
    rho    = min(lr, 1 / step ** 0.5)
    alpha  = max(eps2, ||p|| / numel ** 0.5) * rho   # the param's RMS, before the decay
    p      = p * (1 - lr * weight_decay)            # only when weight_decay != 0 (x 1 is exact anyway)
    ndim >= 2:  row_var = row_var.lerp(mean(g * g, dim=-1), beta2')      # [..., r, 1]
                col_var = col_var.lerp(mean(g * g, dim=-2), beta2')      # [..., 1, c]
                v       = row_var @ col_var / max(mean(row_var, dim=-2), eps1)
    else:       variance = variance.lerp(g * g, beta2'); v = variance
    u      = g / sqrt(max(v, eps1 ** 2))
    p      = p - alpha / max(1, ||u|| / (numel ** 0.5 * d)) * u

(``mean(g * g)`` as torch computes it: ``norm(g) ** 2 / size``.) ``eps1=None`` is the params' dtype's
machine epsilon.

Its state is not shaped like the param: a matrix (or a stack of them, any rank >= 2) keeps a factored
``row_var``/``col_var`` pair, a vector (or a scalar) its full ``variance``; ``state_layout`` declares
them, and ``storage.lay_out_state`` packs them in rows of their own. Every per-param quantity (two
norms, the row and column means) needs the whole param, so Adafactor is a ``MATRIX`` rule: its params
live in stacks of same-shape params (``planning``), one compiled ``update_matrices`` call per stack
(graphs per rank and orientation-free: every dim is symbolic). It does not gather sharded params
(``ROW_SHARDED = False``: a DTensor shard is refused with a clear error).

The scalars torch computes in Python floats (``beta2'``, ``rho``, ``alpha`` and the update's scale) are
computed in float64 in the update graph from the step counts and the group's float64 hyperparameter
row, then rounded to the compute precision once where torch hands them to a kernel. The per-tensor
table holds only the apply flag and the grad coefficient (clip coefficient x scale x sign).

Precision: bfloat16, float16 and float32 params are updated in float32 and rounded once on store;
float64 params in float64 throughout (``common.compute_dtype``). torch updates bfloat16 params in
bfloat16 (norms and all), so only float32 and float64 are matched to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.rules.common import (
    APPLY,
    GRAD_COEF,
    MATRIX,
    StateTensor,
    as_compute,
    check_range,
    compute_dtype,
    hyperparameter,
    leading_columns,
    reject_common_options,
    store_where,
    widening,
)

NAME = "adafactor"
KIND = MATRIX
STEP_KEY = "step"  # torch's state["step"]: a 0-d view of the count
PARAM_NDIMS = None  # any rank: factored from 2-D on, a full variance below
ROW_SHARDED = False

# eps1 = None (the dtype's epsilon) is stored as -1 (torch refuses a negative eps1): the update then picks the
# epsilon of its params' dtype. (Not NaN: a NaN row never compares equal, and would be copied every step.)
HP_COLUMNS = ("scale", "sign", "lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")
_LR, _BETA2_DECAY, _EPS1, _EPS2, _D, _WD = range(2, len(HP_COLUMNS))

_DTYPE_EPS = -1.0

TABLE_COLUMNS = ("apply", "grad_coef")

STATE_KEYS = ("row_var", "col_var", "variance")
LOW_PRECISION_KEYS: tuple[str, ...] = ()  # state kept in the params' dtype only (state_dtypes.py)
STOCHASTIC_ROUNDING = False  # its updates round to nearest only (FusedStepConfig.stochastic_rounding)


class Variant(NamedTuple):
    """Adafactor has no structural option: every hyperparameter is a tensor read each step."""


def variant(optimizer, group: dict) -> Variant:
    return Variant()


def state_keys(var: Variant) -> tuple[str, ...]:
    return STATE_KEYS


def state_layout(var: Variant, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
    """torch's ``_init_group``: a factored pair for >= 2-D params, reduced over the last dim (``row_var``)
    and the one before (``col_var``); a full ``variance`` for vectors and scalars."""
    if len(shape) >= 2:
        return {"row_var": StateTensor((*shape[:-1], 1), dtype),
                "col_var": StateTensor((*shape[:-2], 1, shape[-1]), dtype)}
    return {"variance": StateTensor(tuple(shape), dtype)}


def count_at_bind(created: bool) -> None:
    """The count is torch's ``state["step"]`` (``STEP_KEY``), read where it is."""
    return None


def group_values(optimizer: torch.optim.Optimizer, group: dict, where: str) -> list:
    """The group's hyperparameters in ``HP_COLUMNS[2:]`` order; raises ``ValueError`` for what
    ``torch.optim.Adafactor`` refuses at construction, before anything changes."""
    reject_common_options(group, type(optimizer).__name__)
    lr = hyperparameter(group["lr"], "lr", where)
    beta2_decay = hyperparameter(group["beta2_decay"], "beta2_decay", where)
    eps = group["eps"]
    if isinstance(eps, torch.Tensor) or not hasattr(eps, "__len__") or len(eps) != 2:
        raise ValueError(f"{where}: eps must be a pair (eps1, eps2), got {eps!r}. Nothing was updated.")
    eps1 = _DTYPE_EPS if eps[0] is None else hyperparameter(eps[0], "eps[0]", where)
    eps2 = hyperparameter(eps[1], "eps[1]", where)
    d = hyperparameter(group["d"], "d", where)
    wd = hyperparameter(group["weight_decay"], "weight_decay", where)
    check_range(lr, "lr", where, low=0.0)
    if not isinstance(beta2_decay, torch.Tensor) and not beta2_decay <= 0.0:
        raise ValueError(f"{where}: invalid beta2_decay {beta2_decay!r}: torch.optim requires beta2_decay <= 0. "
                         "Nothing was updated.")
    if eps[0] is not None:
        check_range(eps1, "eps[0]", where, low=0.0)
    check_range(eps2, "eps[1]", where, low=0.0)
    check_range(d, "d", where, low=1.0)
    check_range(wd, "weight_decay", where, low=0.0)
    return [lr, beta2_decay, eps1, eps2, d, wd]


def slot_table(
    hp: torch.Tensor,  # [S, len(HP_COLUMNS)] float64: each slot's group hyperparameters
    counts: torch.Tensor,  # [S] float32: each tensor's step count before this update (read by the update)
    apply: torch.Tensor,  # [S] bool: the tensor is updated this step (finite norm and a grad)
    coef: torch.Tensor,  # [] float64: the clip coefficient
    table: torch.Tensor,  # [S, K'] the table the result goes to, read for its dtype only (see norm/finish.py)
) -> torch.Tensor:  # [S, len(TABLE_COLUMNS)] in the table's dtype
    return leading_columns(hp, apply, coef, table)


def lr_ratio(shape: tuple[int, ...], var: Variant) -> float:
    """Adafactor adjusts no lr per shape (its scale is the param's RMS, computed in the update)."""
    return 1.0


def call_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """An upper estimate of the bytes one param's update holds while its call runs: the grad, the variance
    estimate and the update in the compute precision, and the new param."""
    n = 1
    for size in shape:
        n *= size
    return n * 4 * compute_dtype(dtype).itemsize


def update_matrices(
    params: torch.Tensor,  # [n, *S] same-shape params of one group (param dtype); mutated
    grads: torch.Tensor,  # [n, *S] their grads; read only
    hp: torch.Tensor,  # [H] float64: the group's hyperparameter row
    table: torch.Tensor,  # [n, len(TABLE_COLUMNS)] float32 or float64: apply flags and grad coefficients
    lr_ratio: torch.Tensor,  # [1] float64: unused (Adafactor adjusts no lr per shape)
    counts: torch.Tensor,  # [n] float32: torch's steps before this update; mutated (+1 where applied)
    variant: Variant,  # graph constant
    row_var: torch.Tensor | None,  # [n, *S[:-1], 1] (>= 2-D params), or None; mutated
    col_var: torch.Tensor | None,  # [n, *S[:-2], 1, S[-1]] (>= 2-D params), or None; mutated
    variance: torch.Tensor | None,  # [n, *S] (vectors and scalars), or None; mutated
) -> None:
    n, compute = params.size(0), compute_dtype(params.dtype)
    widen, rows = widening(params.dtype), as_compute(table, compute)

    def per_param(x: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 1, ...] against the params
        return x.reshape(n, *([1] * (params.dim() - 1)))

    keep = per_param(table[:, APPLY] != 0)
    g = widen(grads) * per_param(rows[:, GRAD_COEF])
    p32 = widen(params)
    numel = p32[0].numel()
    # torch's Python-float scalars, per param, in float64
    step = counts.double() + 1.0
    beta2_t = torch.pow(step, hp[_BETA2_DECAY]).to(compute)  # torch hands the float to lerp_ (one rounding)
    rho = torch.minimum(hp[_LR], 1.0 / step.sqrt())
    rms = torch.linalg.vector_norm(p32.reshape(n, -1), dim=1).double() / numel ** 0.5
    alpha = torch.maximum(rms, hp[_EPS2]) * rho
    eps1 = torch.where(hp[_EPS1] < 0, torch.finfo(params.dtype).eps, hp[_EPS1])
    p_decayed = p32 * (1.0 - hp[_LR] * hp[_WD]).to(compute)
    stores = []
    if params.dim() >= 3:  # >= 2-D params: factored
        row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.size(-1)
        col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.size(-2)
        # The state's size-1 dims are symbols to Dynamo (every dim of a stack is): shaped like the means, they
        # are known to be 1, so the product below broadcasts.
        rv32, cv32 = widen(row_var).reshape(row_mean.shape), widen(col_var).reshape(col_mean.shape)
        row_new = torch.lerp(rv32, row_mean, per_param(beta2_t))
        col_new = torch.lerp(cv32, col_mean, per_param(beta2_t))
        # row_var @ col_var: an outer product (inner dim 1), one multiply per element either way
        estimate = row_new * col_new / row_new.mean(dim=-2, keepdim=True).clamp(min=eps1.to(compute))
        stores += [(row_var, row_new, rv32), (col_var, col_new, cv32)]
    else:
        v32 = widen(variance)
        estimate = torch.lerp(v32, g * g, per_param(beta2_t))
        stores.append((variance, estimate, v32))
    update = estimate.clamp(min=(eps1 * eps1).to(compute)).rsqrt() * g
    update_rms = torch.linalg.vector_norm(update.reshape(n, -1), dim=1).double() / (numel ** 0.5 * hp[_D])
    scale = (-alpha / torch.clamp(update_rms, min=1.0)).to(compute)
    stores.append((params, p_decayed + per_param(scale) * update, p32))
    store_where(keep, stores)
    # The step count advances in the graph that writes the params: an interrupted step never leaves a
    # param updated with its count unchanged.
    counts.copy_(counts + table[:, APPLY])
