"""What every update rule shares: the leading columns, hyperparameter reading and validation."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

# A rule's KIND: how its update reads the params (see rules/__init__.py): elementwise over flat buffers and
# buckets, or over stacks of whole same-shape params (matrices for Muon, any shape for Adafactor).
ELEMENTWISE, MATRIX = "elementwise", "matrix"


class StateTensor(NamedTuple):
    """One state tensor of one param, as a rule's ``state_layout`` declares it: torch's shape and dtype.

    The engine (``storage.py``) lays the state out from these: a key whose every tensor is shaped like its
    param shares the param's rows and memory layout (``zeros_like``); any other key (a factored row/column
    pair, a per-block scale, a tensor for some params only) gets rows of its own, each tensor contiguous
    (``new_zeros``), so it costs its own size, not the param's.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype


def like_param(keys, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
    """The layout of a rule whose every state tensor is shaped and typed like its param (Adam, SGD, Muon)."""
    return {key: StateTensor(tuple(shape), dtype) for key in keys}

# Leading columns of every rule's group hyperparameter row (float64) ...
SCALE, SIGN = 0, 1  # the group's grad scale (PP/EP/grad_scale) and -1 for ``maximize``
# ... and of every rule's per-tensor table (``table_dtype``: float32, float64 in a plan with float64 params).
APPLY, GRAD_COEF = 0, 1  # 1.0 where the tensor is updated this step; scale * clip coefficient * sign


def leading_columns(hp: torch.Tensor, apply: torch.Tensor, coef: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The per-tensor table of a rule whose update reads only the leading columns (APPLY, GRAD_COEF): Adafactor
    and torchao's 8-bit Adam, which compute their other scalars from the counts inside the update."""
    columns = [apply.double(), coef * hp[:, SCALE] * hp[:, SIGN]]
    return torch.stack(columns, dim=1).to(table.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a param of ``dtype`` is updated in: float64 for float64 params, float32 for every other.

    Why: torch.optim's float64 step is float64 throughout (float64 tensors, Python-float scalars), exact to
    ~1e-16; a single float32 intermediate (table, coefficient, scale, update) costs 1e-7 relative. bfloat16,
    float16 and float32 params are updated in float32 and rounded once on store, as before.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def widening(dtype: torch.dtype):
    """The cast of a tensor to ``compute_dtype(dtype)``, as a Tensor method: ``Tensor.double`` for float64 params,
    ``Tensor.float`` for the others, so their graphs keep the ``.float()`` nodes they always had."""
    return torch.Tensor.double if dtype == torch.float64 else torch.Tensor.float


def table_dtype(param_dtypes) -> torch.dtype:
    """The dtype of a plan's per-tensor table: float64 when any param computes in float64, else float32.

    One table serves the whole plan (the finish writes it in one call); each update reads its rows in its own
    compute dtype (``as_compute``), so a float32 group next to a float64 one gets the same float32 scalars.
    """
    return torch.float64 if any(compute_dtype(d) == torch.float64 for d in param_dtypes) else torch.float32


def as_compute(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``table`` in ``dtype`` (a param's compute dtype): itself when it already is, so no node enters the graph."""
    return table if table.dtype == dtype else table.to(dtype)


def hyperparameter(value, name: str, where: str) -> float | torch.Tensor:
    """A hyperparameter as a Python float, or as the accelerator tensor it is.

    ``torch.optim`` accepts tensors for lr, betas and weight_decay. A CPU tensor is read on the host
    as torch's non-capturable path does. A tensor on an accelerator is used where it is, as torch's
    ``capturable=True`` path does: FusedStep copies it into its hyperparameter buffer on the device,
    never reading it on the host (so its value is not range-checked).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: hyperparameter {name!r} must be a scalar, got a tensor of shape "
                             f"{tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"{where}: hyperparameter {name!r} requires grad; differentiable optimizers are "
                             "not supported")
        if value.device.type == "meta":
            raise ValueError(f"{where}: hyperparameter {name!r} is a tensor on meta, which holds no value")
        if value.device.type != "cpu":
            return value.detach().reshape(())
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: hyperparameter {name!r} must be a real number, got {type(value).__name__}")
    return float(value)


def check_range(value, name: str, where: str, *, low: float, high: float | None = None) -> None:
    """torch.optim's construction-time checks, applied every step (``low <= value < high``).

    Device tensors are not checked: reading them would synchronise the host with the device.
    """
    if isinstance(value, torch.Tensor):
        return
    if math.isnan(value) or value < low or (high is not None and value >= high):
        bound = f"{low} <= {name}" + (f" < {high}" if high is not None else "")
        raise ValueError(f"{where}: invalid {name} {value!r}: torch.optim requires {bound}. "
                         "Nothing was updated.")


def reject_common_options(group: dict, kind: str) -> None:
    """Options that change semantics in ways the compiled step does not reproduce."""
    if group.get("differentiable", False):
        raise ValueError(
            f"{kind}(differentiable=True) is not supported: FusedStep updates params in place under no_grad "
            "and cannot build an autograd graph through the optimizer step."
        )


def store_where(keep: torch.Tensor, stores, bits: list | None = None) -> None:
    """Write ``new`` into each destination where ``keep``, else its old value (bit-identical on a skip).

    ``old32``: the destination's value in its compute dtype (float32, or float64 for float64 params).
    ``bits``: None, or per store its random bits (``rounding_bits``): a bfloat16 destination with bits rounds
    stochastically, every other one to nearest. A kept old value is a bfloat16 value, which both round exactly.
    """
    for k, (dst, new, old32) in enumerate(stores):
        if bits is not None and bits[k] is not None:
            dst.copy_(bf16_stochastic(torch.where(keep, new, old32).float(), bits[k]))
        else:
            dst.copy_(torch.where(keep, new, old32).to(dst.dtype))


def rounding_bits(rounding: "Rounding | None", step: torch.Tensor, position: torch.Tensor, dtypes,
                  first_stream: int = 0) -> list | None:
    """Per store (the params first, then the state keys, of ``dtypes``), the random bits of its stochastic
    rounding, or None where it rounds to nearest (not asked for, or not a bfloat16 destination). None when
    ``rounding`` is None. Streams are numbered from ``first_stream`` (a bucket's tensors take their own)."""
    if rounding is None:
        return None
    out = []
    for k, dtype in enumerate(dtypes):
        wanted = rounding.params if k == 0 else rounding.state
        out.append(random_bits16(rounding.seed, step, first_stream + k, position)
                   if wanted and dtype == torch.bfloat16 else None)
    return out


class Rounding(NamedTuple):
    """Stochastic rounding of an update's bfloat16 stores (``FusedStepConfig.stochastic_rounding``).

    ``seed``: a ``[1]`` int64 graph input, the call's own seed (the run's seed mixed with the call's index in the
    program, so two calls never share a stream); ``params``/``state``: graph constants, which stores round
    stochastically (bfloat16 destinations only; others round to nearest as always).
    """

    seed: torch.Tensor
    params: bool
    state: bool


def random_bits16(seed: torch.Tensor, step: torch.Tensor, stream: int, position: torch.Tensor) -> torch.Tensor:
    """16 random bits per element (int32 in [0, 2**16)), a pure function of (seed, step, stream, position):
    counter-based, so no generator state, no host sync, replayable in a CUDA graph, and the same wherever the
    inputs are the same (every rank of a replicated param). ``step``: the tensor's step count (float, broadcast
    against ``position``); ``stream``: which store (0 the params, 1.. the state keys); ``position``: the
    element's index in its buffer (int64).

    All int32, with wrapping multiplies (logical shifts written as an arithmetic shift and a mask): int64
    multiplies have no vector instruction on AVX2, and Inductor recomputes a per-row key inside the element
    loop, so the key is a cheap linear combination and the per-element hash does the mixing: three rounds of
    multiply-xorshift over (position xor key)."""
    # seed[0], a scalar: broadcast as a [1] tensor against a dynamic [rows, 256] block, Inductor (2.13) indexed it
    # by the column, reading past its one element.
    key = seed[0].to(torch.int32) * 0x2545F491 + step.to(torch.int32) * 0x1E3779B1 + stream * 0x632BE5AB
    x = position.to(torch.int32) ^ key
    for multiplier in (0x7FEB352D, 0x5BD1E995, 0x2C1B3C6D):
        x = x ^ ((x >> 16) & 0xFFFF)
        x = x * multiplier
    return (x ^ ((x >> 15) & 0x1FFFF)) & 0xFFFF


def bf16_stochastic(x32: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x32`` (float32) rounded to bfloat16 away from zero with probability (dropped fraction / 2**16), else
    toward zero: unbiased, E[result] = x32. Non-finite values pass through unchanged."""
    raw = x32.view(torch.int32)
    toward_zero = raw & -65536  # the bfloat16 bits: sign, exponent and 7 mantissa bits
    away = bits < (raw & 0xFFFF)
    rounded = torch.where(away, toward_zero + 65536, toward_zero).view(torch.float32)
    return torch.where(torch.isfinite(x32), rounded, x32).to(torch.bfloat16)
