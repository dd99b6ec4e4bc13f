"""Muon (``torch.optim.Muon``), matching torch's numerics, on stacks of same-shape matrices.

torch's reference math per 2-D param (``torch/optim/_muon.py``, single-tensor path)::

    buf    = buf.lerp(g, 1 - momentum)                     # momentum_buffer, zeros at first
    update = g.lerp(buf, momentum) if nesterov else buf
    O      = NS(update)                                    # Newton-Schulz, in bfloat16
    p      = p * (1 - lr * weight_decay)                   # decoupled weight decay
    p      = p - lr * ratio(shape, adjust_lr_fn) * O

    NS(X):  X = X.bfloat16(); X = X.T if rows > cols; X = X / max(||X||_F, eps)
            repeat ns_steps: G = X @ X.T; G' = c * G @ G + b * G; X = G' @ X + a * X
            (the transpose undone)

FusedStep runs it for same-shape matrices of a param group at once (``update_matrices``: one
compiled call per shape, or per chunk of it sized by ``call_bytes`` and ``matrices.call_chunks`` so
that a call's temporaries stay bounded; batched matmuls, as nanochat stacks them), with the clip coefficient and
the grad scale folded into the same code that forms the Newton-Schulz input: the grads are read
once. The matrices live in the group's flat buffers, each in whole rows, so a stack is a strided 3-D
view of the buffer (``planning``'s matrix stacks).

Structural options (``Variant``): ``ns_steps``, ``ns_coefficients`` (graph constants: the loop count
and the matmul coefficients) and ``adjust_lr_fn`` (the per-shape lr ratio, computed on the host at
build). lr, weight_decay, momentum, nesterov and eps are tensors read every step.

Precision: torch's Muon accepts float64 params and keeps them float64 everywhere but in Newton-Schulz
(the float64 update cast to bfloat16; the bfloat16 result added to the float64 param). FusedStep does
the same: float64 params get float64 momentum and a float64 update (``common.compute_dtype``); the
other dtypes compute in float32 and round once on store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from compiled_step.compiling import CASTS_FUSED_AWAY
from compiled_step.rules.common import (
    APPLY,
    GRAD_COEF,
    MATRIX,
    SCALE,
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

NAME = "muon"
KIND = MATRIX
STEP_KEY = None  # torch's Muon keeps no step; its momentum buffer starts at zero (count_at_bind: no count)
# The params it updates: 2-D matrices; row-sharded ones (FSDP2's Shard(0)) too, gathered whole to their owner by
# prepare_matrices, orthogonalize and apply_matrices with the all-to-alls between them.
PARAM_NDIMS = (2,)
ROW_SHARDED = True

HP_COLUMNS = ("scale", "sign", "lr", "weight_decay", "momentum", "nesterov", "eps")
_LR, _WD, _MOMENTUM, _NESTEROV, _EPS = range(2, len(HP_COLUMNS))

TABLE_COLUMNS = ("apply", "grad_coef", "decay", "momentum", "one_minus_momentum", "nesterov", "eps")
_T_DECAY, _T_MOMENTUM, _ONE_MINUS_MOMENTUM, _T_NESTEROV, _T_EPS = range(2, len(TABLE_COLUMNS))

STATE_KEYS = ("momentum_buffer",)
LOW_PRECISION_KEYS: tuple[str, ...] = ()  # state kept in the params' dtype only (state_dtypes.py)
STOCHASTIC_ROUNDING = False  # its updates round to nearest only (FusedStepConfig.stochastic_rounding)

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


class Variant(NamedTuple):
    """Structural options: each distinct value compiles its own update graph."""

    ns_steps: int
    ns_coefficients: tuple[float, float, float]
    adjust_lr_fn: str | None


def variant(optimizer, group: dict) -> Variant:
    return Variant(int(group["ns_steps"]), tuple(float(c) for c in group["ns_coefficients"]), group["adjust_lr_fn"])


def state_keys(var: Variant) -> tuple[str, ...]:
    return STATE_KEYS


def state_layout(var: Variant, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
    """The momentum buffer is shaped and typed like its matrix."""
    return like_param(STATE_KEYS, shape, dtype)


def count_at_bind(created: bool) -> None:
    """Muon keeps no count."""
    return None


def group_values(optimizer: torch.optim.Optimizer, group: dict, where: str) -> list:
    """The group's hyperparameters in ``HP_COLUMNS[2:]`` order; raises ``ValueError`` for what
    ``torch.optim.Muon`` refuses (at construction or in ``step``), before anything changes."""
    reject_common_options(group, type(optimizer).__name__)
    lr = hyperparameter(group["lr"], "lr", where)
    wd = hyperparameter(group["weight_decay"], "weight_decay", where)
    momentum = hyperparameter(group["momentum"], "momentum", where)
    eps = hyperparameter(group["eps"], "eps", where)
    check_range(lr, "lr", where, low=0.0)
    check_range(wd, "weight_decay", where, low=0.0)
    check_range(momentum, "momentum", where, low=0.0)
    steps, coefficients = group["ns_steps"], group["ns_coefficients"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
        raise ValueError(f"{where}: ns_steps must be an int in [0, 100) (torch.optim.Muon's bound), got {steps!r}. "
                         "Nothing was updated.")
    if len(coefficients) != 3:
        raise ValueError(f"{where}: ns_coefficients must be 3 numbers (a, b, c), got {coefficients!r}. Nothing was "
                         "updated.")
    if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"{where}: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}. "
                         "Nothing was updated.")
    return [lr, wd, momentum, 1.0 if group["nesterov"] else 0.0, eps]


def lr_ratio(shape: tuple[int, int], var: Variant) -> float:
    """The stack constant ``update_matrices`` and ``apply_matrices`` get: torch's lr adjustment for whole
    matrices of ``shape`` under the variant's ``adjust_lr_fn``."""
    return adjust_lr_ratio(shape, var.adjust_lr_fn)


def adjust_lr_ratio(shape: tuple[int, int], adjust_lr_fn: str | None) -> float:
    """torch's ``_adjust_lr`` ratio for a matrix of ``shape`` (computed on the host, in Python floats)."""
    rows, cols = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw"


def slot_table(
    hp: torch.Tensor,  # [S, len(HP_COLUMNS)] float64: each slot's group hyperparameters
    counts: torch.Tensor,  # [S] float32: unused (Muon keeps no count)
    apply: torch.Tensor,  # [S] bool: the matrix is updated this step (finite norm and a grad)
    coef: torch.Tensor,  # [] float64: the clip coefficient
    table: torch.Tensor,  # [S, K'] the table the result goes to, read for its dtype only (see norm/finish.py)
) -> torch.Tensor:  # [S, len(TABLE_COLUMNS)] in the table's dtype
    momentum = hp[:, _MOMENTUM]
    columns = [
        apply.double(),
        coef * hp[:, SCALE],  # Muon has no maximize: the SIGN column is always 1
        1.0 - hp[:, _LR] * hp[:, _WD],
        momentum,
        1.0 - momentum,
        hp[:, _NESTEROV],
        hp[:, _EPS],
    ]
    return torch.stack(columns, dim=1).to(table.dtype)


def call_bytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """An upper estimate of the bytes one matrix of ``shape`` (params of ``dtype``) holds while its update
    runs, for sizing the calls (``matrices.call_chunks``): the Newton-Schulz input in the compute precision,
    three bfloat16 copies of the matrix (the input, the normalized one, the next iterate) and two bfloat16
    Gram matrices. Upper, as Inductor fuses some of them away: a 16 x 256x4096 fp32 stack in one call measured
    4.25 MiB per matrix on the CPU (tests/test_muon_memory.py), against this 10.25 MiB."""
    rows, cols = shape
    small = min(rows, cols)
    return rows * cols * (compute_dtype(dtype).itemsize + 3 * 2) + 2 * small * small * 2


def _round_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bfloat16, round to nearest even, done on the bits: equal to ``x.bfloat16()`` for every finite
    value and the infinities (a NaN may come out as an infinity: the Newton-Schulz output is NaN either way,
    as torch's)."""
    bits = x.view(torch.int32)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # add half an ulp (ties to even), drop 16 bits
    return bits.view(torch.float32).bfloat16()


def newton_schulz(x: torch.Tensor, eps: torch.Tensor, var: Variant) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` for a stack ``[n, A, B]`` (bfloat16 out, as torch's).

    ``eps``: ``[n, 1, 1]``. The transpose for tall matrices depends on the shape only, so it is a
    graph guard, not a branch on values.
    """
    a, b, c = var.ns_coefficients
    # Where Inductor fuses bfloat16 casts away (torch < 2.13), the input and the norm are rounded on the bits;
    # measured on torch 2.11 without it: inputs one bf16 ulp off, which five Newton-Schulz steps grow to
    # 0.01-0.03 on outputs below 0.65. torch 2.13 and 2.14 keep the casts, and their graphs stay as they are.
    x16 = _round_to_bfloat16(x.float()) if CASTS_FUSED_AWAY else x.bfloat16()
    # The Frobenius norm does not depend on the transpose: taken before it (bf16, as torch's norm of bf16).
    norm = torch.linalg.vector_norm(x16, dim=(1, 2), keepdim=True)
    if CASTS_FUSED_AWAY:
        norm = _round_to_bfloat16(norm.float())
    ortho = x16 / torch.maximum(norm, eps.to(norm.dtype))
    tall = x.size(1) > x.size(2)
    if tall:
        ortho = ortho.mT
    for _ in range(var.ns_steps):
        gram = ortho @ ortho.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.baddbmm(ortho, gram_update, ortho, beta=a)
    return ortho.mT if tall else ortho


def update_matrices(
    params: torch.Tensor,  # [n, A, B] same-shape matrices of one param group (param dtype); mutated
    grads: torch.Tensor,  # [n, A, B] their grads; read only
    hp: torch.Tensor,  # [H] float64: the group's hyperparameter row (lr and weight decay, as torch's floats)
    table: torch.Tensor,  # [n, len(TABLE_COLUMNS)] float32 or float64: the matrices' slots' scalars
    lr_ratio: torch.Tensor,  # [1] float64: torch's lr adjustment for this shape
    counts: torch.Tensor,  # [n] float32: the matrices' counts (unused: Muon keeps none)
    variant: Variant,  # graph constant
    momentum_buffer: torch.Tensor,  # [n, A, B] momentum buffers (param dtype); mutated
) -> None:
    """Whole matrices: momentum, Newton-Schulz and the update in one call."""
    update = _momentum(grads, table, momentum_buffer)
    _apply(params, hp, table, lr_ratio, newton_schulz(update, _col(table, _T_EPS), variant))


# Row-sharded matrices (FSDP2): every rank forms the Newton-Schulz input of its rows; an all-to-all
# sends each matrix's rows to the rank that owns the matrix (matrix k: rank k % W), which
# orthogonalizes it whole; a second all-to-all sends each rank its rows of the result.
# ``box``: a stack's region of the all-to-all buffer, [W, n_own, chunk, B] bfloat16: [q, j] holds
# rows of matrix j * W + q (to or from its owner q), zero-padded to ``chunk`` rows, and zero matrices
# past the last.


def prepare_matrices(
    grads: torch.Tensor,  # [n, a, B] this rank's rows of n matrices; read only
    table: torch.Tensor,  # [n, len(TABLE_COLUMNS)] float32 or float64
    box: torch.Tensor,  # [W, n_own, chunk, B] bfloat16: written with this rank's rows of each Newton-Schulz input
    momentum_buffer: torch.Tensor,  # [n, a, B] this rank's rows of the momentum buffers; mutated
) -> None:
    update = _momentum(grads, table, momentum_buffer).bfloat16()  # what Newton-Schulz casts first
    world, n_own, rows = box.size(0), box.size(1), update.size(1)
    padded = torch.nn.functional.pad(update, (0, 0, 0, 0, 0, world * n_own - update.size(0)))
    # narrow, not [:, :, :rows]: a slice of a symbolic size has an unknown length that torch 2.11 cannot guard on
    box.narrow(2, 0, rows).copy_(padded.view(n_own, world, rows, update.size(2)).transpose(0, 1))


@dataclass(frozen=True)
class Whole:
    """Graph constant: the row count of a stack's whole matrices (a plain int would be traced as a
    size Dynamo cannot guard on, and the transpose for tall matrices needs that guard)."""

    rows: int


def orthogonalize(
    box: torch.Tensor,  # [W, n_own, chunk, B] bfloat16: rank q's rows of the matrices this rank owns; overwritten
    hp: torch.Tensor,  # [H] float64: the group's hyperparameter row (eps)
    whole: Whole,  # graph constant: the matrices' row count
    variant: Variant,  # graph constant
) -> None:
    """Newton-Schulz of the owned matrices, whole (the padding rows cropped); the result replaces them."""
    world, n_own, chunk, cols = box.shape
    rows = whole.rows
    # narrow, not [:, :rows]: a slice of a symbolic size has an unknown length (min(rows, size)) that the
    # transpose test below could not guard on; narrow checks rows <= size once and has length rows.
    whole = box.transpose(0, 1).reshape(n_own, world * chunk, cols).narrow(1, 0, rows)
    ortho = newton_schulz(whole, hp[_EPS].to(torch.float32).reshape(1, 1, 1), variant)
    ortho = torch.nn.functional.pad(ortho, (0, 0, 0, world * chunk - rows))
    box.copy_(ortho.view(n_own, world, chunk, cols).transpose(0, 1))


def apply_matrices(
    params: torch.Tensor,  # [n, a, B] this rank's rows of the matrices (param dtype); mutated
    hp: torch.Tensor,  # [H] float64
    table: torch.Tensor,  # [n, len(TABLE_COLUMNS)] float32 or float64
    lr_ratio: torch.Tensor,  # [1] float64: torch's lr adjustment for the whole matrices' shape
    box: torch.Tensor,  # [W, n_own, chunk, B] bfloat16: this rank's rows of each Newton-Schulz output
) -> None:
    world, n_own, chunk, cols = box.shape
    mine = box.transpose(0, 1).reshape(world * n_own, chunk, cols)
    mine = mine.narrow(0, 0, params.size(0)).narrow(1, 0, params.size(1))  # this rank's matrices, its rows
    _apply(params, hp, table, lr_ratio, mine)


def _col(table: torch.Tensor, k: int) -> torch.Tensor:
    return table[:, k, None, None]  # [n, 1, 1]


def _momentum(grads: torch.Tensor, table: torch.Tensor, momentum_buffer: torch.Tensor) -> torch.Tensor:
    """The momentum buffer updated in place (where applied); returns the Newton-Schulz input in the compute
    precision (``*32``: float32, or float64 for float64 params; the names are the graphs' node names)."""
    keep = _col(table, APPLY) != 0
    # Dynamo orders a graph's inputs by first use (a dtype read counts): the grads before the buffer, as always.
    _, compute = grads.dtype, compute_dtype(momentum_buffer.dtype)
    widen, table = widening(compute), as_compute(table, compute)
    g = widen(grads) * _col(table, GRAD_COEF)
    buf32 = widen(momentum_buffer)
    momentum_buffer.copy_(torch.where(keep, torch.lerp(buf32, g, _col(table, _ONE_MINUS_MOMENTUM)), buf32))
    # The Newton-Schulz input reads the buffer as stored, in its dtype, as torch's does (and this
    # order keeps Inductor's CPU outer-loop fusion away from a KeyError it raises in torch 2.13 when
    # the new buffer is both stored and read by the norm's reduction).
    stored = widen(momentum_buffer)
    return torch.where(_col(table, _T_NESTEROV) != 0, torch.lerp(g, stored, _col(table, _T_MOMENTUM)), stored)


def _apply(params: torch.Tensor, hp: torch.Tensor, table: torch.Tensor, lr_ratio: torch.Tensor,
           ortho: torch.Tensor) -> None:
    """Decoupled weight decay and the orthogonalized step, where applied (bit-identical elsewhere)."""
    # torch: p.add_(O, alpha=-lr * ratio) with the Python float rounded to the param's precision once.
    # (hp and lr_ratio are used before params, which keeps the graphs' input order: see _momentum)
    neg_lr = (-(hp[_LR] * lr_ratio[0])).to(compute_dtype(params.dtype))
    widen, table = widening(params.dtype), as_compute(table, compute_dtype(params.dtype))
    p32 = widen(params)
    store_where(_col(table, APPLY) != 0, [(params, p32 * _col(table, _T_DECAY) + neg_lr * widen(ortho), p32)])
