"""torchao's quantized Adam and AdamW (``torchao.optim``: ``Adam8bit``/``AdamW8bit``, ``Adam4bit``/``AdamW4bit``,
``AdamFp8``/``AdamWFp8``, and ``_AdamW``), matching its numerics. ``rules/torchao.py`` makes one rule per
format (``format_rule``): its optimizer types and its ``Format``, everything else from here.

torchao's reference math per param is the same for every format (``torchao/optim/adam.py``,
``single_param_adam``, compiled per param; every op in float32, the Python-float hyperparameters rounded to
float32 where they meet a tensor, ``lr`` a float32 tensor, ``step`` torch's float32 step tensor, already
incremented)::

    p   = p - (lr * wd) * p                 # AdamW
    g   = g + wd * p                        # Adam (L2), with the undecayed p
    bc1 = 1 - beta1 ** step ; bc2 = 1 - beta2 ** step
    m   = deq(m).lerp(g, 1 - beta1)         # 1 - beta: a Python float, rounded once
    v   = deq(v).lerp(g.square(), 1 - beta2)
    m, v stored quantized; the param update reads the float32 values, not the stored ones
    p   = p - lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)

The formats differ in how a moment is stored (``FORMATS``). A param of at least 4096 elements that is whole
blocks keeps each moment quantized, in blocks of consecutive elements, each with one float32 scale:

* ``8bit`` (``OptimState8bit``): blocks of 256 by default; uint8 codes shaped like the param, each the index of the
  nearest entry of a 256-entry map (``create_dynamic_map``: signed for ``exp_avg``, unsigned for
  ``exp_avg_sq``) to x / scale, where scale is the block's max |x| (at least 1e-12);
* ``4bit`` (``OptimState4bit``): blocks of 128 by default; 16-entry maps (signed: ``create_dynamic_map(True, 3, 4)``;
  unsigned: ``linspace(0, 1, 17)[1:]``, no zero), two codes per byte (the even element in the high
  nibble), the codes a flat ``[numel / 2]`` tensor;
* ``fp8`` (``OptimStateFp8``): blocks of 256 by default; float8_e4m3fn codes shaped like the param, x / scale rounded
  by the dtype conversion, where scale is the block's max |x| (at least 1e-12) / 448.

A map code is the one torchao finds: the largest entry <= x (its branchless binary search over the sorted
map; for the 8-bit maps the same index computed from the map's structure in 2 gathers instead of 8), then one
up when x is at least halfway to the next (ties go up). Smaller params keep plain
tensors of the param's dtype (``zeros_like``).

So these rules keep their state in parts (``STATE_PARTS``): torch's ``exp_avg`` of a quantized param is the
buffer keys ``exp_avg_codes`` (uint8: float8 codes are kept as their bits, so the engine's buffers hold no
float8 dtype) and ``exp_avg_scale`` (float32, one per block), which the engine lays out like any state;
``assemble`` wraps views of them in torchao's state class (what ``optimizer.state`` holds) and
``disassemble`` reads a state tensor torchao made (a loaded checkpoint, the first step's adoption) back into
parts. A small param's ``exp_avg`` is the buffer key ``exp_avg`` itself.

Every block statistic needs its whole block, and a param of 4096 elements or more needs its codes and scales
side by side, so these are ``MATRIX`` rules (like Adafactor): same-shape params in stacks, one compiled call
per stack, every dim symbolic; the variant (the format's name and the optimizer's ``block_size``) is a graph
constant. Within a stack every
param is quantized or none is (it depends on the shape only).

DTensor params (FSDP2) are updated as torchao updates them (``LOCAL_SHARDS``): each rank's local shard as a
param of its own shape, its state torchao's state class over the shard's codes and scales inside a DTensor
like the param. torchao decides by the shard whether to quantize (``_new_buffer`` on ``p.to_local()``), so
a shard of under 4096 elements, or not whole blocks, keeps plain state, even where the whole param would be
quantized: blocks never straddle a shard edge, and a sharded run's state may differ in form from an
unsharded one's, as torchao's own does.

``bf16_stochastic_round=True`` (any format, and torchao's ``_AdamW``: the ``plain`` format, no state quantized)
rounds bfloat16 params stochastically, unbiased like torchao's, with FusedStep's counter-based random bits
(``rounds_itself``; ``common.random_bits16``, seeded by ``FusedStepConfig.stochastic_rounding_seed``), not
torchao's ``torch.randint``: so the same seed gives the same bits, on every rank, with no generator state, and
the rounded values differ from torchao's own run's draw by draw.

Not supported (``group_values`` raises ``ValueError`` before anything changes): DTensor params with partial
placements, ``amsgrad=True`` (torchao 0.18's own step fails on quantized state:
its state classes have no ``maximum``), a block size that is not a positive int (even for 4-bit), a
non-contiguous quantized param, and state in another form than torchao makes for the param.

torchao is imported by ``rules.rule_for`` only when it is handed a torchao optimizer, so ``compiled_step``
imports and runs without torchao; this module needs it (its maps and state classes).
"""

from __future__ import annotations

import types
from typing import Callable, NamedTuple

import torch
from torchao.optim.quant_utils import create_dynamic_map
from torchao.optim.subclass_4bit import OptimState4bit
from torchao.optim.subclass_8bit import OptimState8bit
from torchao.optim.subclass_fp8 import OptimStateFp8

from compiled_step.matrices import numel
from compiled_step.planning import is_dtensor, local_tensor
from compiled_step.rules.adam import moment_values
from compiled_step.rules.common import (
    APPLY,
    GRAD_COEF,
    MATRIX,
    Rounding,
    StateTensor,
    as_compute,
    leading_columns,
    reject_common_options,
    rounding_bits,
    store_where,
)

KIND = MATRIX
STEP_KEY = "step"  # torchao's state["step"] (float32, 0-d): a view of the count
PARAM_NDIMS = None  # any rank
ROW_SHARDED = False
# torchao's math is per local tensor: on FSDP2 each rank quantizes its own shard (``_new_buffer`` on
# ``p.to_local()``, wrapped back in a DTensor), so a shard is updated as a param of its local shape, no gather.
LOCAL_SHARDS = True

HP_COLUMNS = ("scale", "sign", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled")
_LR, _BETA1, _BETA2, _EPS, _WD, _DECOUPLED = range(2, len(HP_COLUMNS))

TABLE_COLUMNS = ("apply", "grad_coef")

MIN_QUANTIZED = 4096  # torchao (after bitsandbytes) quantizes params of at least this many elements

# torch's state keys, whether each is quantized with the signed map, and the buffer keys a quantized one is kept in.
_MOMENTS = {"exp_avg": True, "exp_avg_sq": False}
STATE_PARTS = {key: (f"{key}_codes", f"{key}_scale") for key in _MOMENTS}
STATE_KEYS = (*_MOMENTS, *(part for parts in STATE_PARTS.values() for part in parts))
LOW_PRECISION_KEYS: tuple[str, ...] = ()  # torchao decides its state's dtypes (state_dtypes.py)
# update_matrices takes ``rounding``: bfloat16 params round stochastically where the optimizer asks
# (``bf16_stochastic_round``: ``rounds_itself``) or FusedStepConfig.stochastic_rounding does, and a small
# param's plain bfloat16 moments where the config's "state" does.
STOCHASTIC_ROUNDING = True

_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8).max)  # 448: torchao divides each block's max |x| by it


class Format(NamedTuple):
    """How a quantized moment is stored. ``qmaps``: the code maps by signedness (torchao's own constructors, as
    Python constants the update graphs embed), or None where the codes are float8 values; ``packed``: two
    4-bit codes per byte in a flat tensor, else one code per element in the param's shape; ``floor_code``:
    (values, qmap, signed) -> the index of the largest map entry <= each value (0 where none is)."""

    name: str
    qmaps: dict[bool, tuple[float, ...]] | None
    packed: bool
    state_class: type
    wrap: Callable  # (codes, scale, qmap or None, signed, shape, dtype) -> the state class's tensor
    floor_code: Callable | None


def _searched_floor_code(unit: torch.Tensor, qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """torchao's branchless binary search over the sorted map: log2(entries) dependent gathers."""
    entries = qmap.numel()
    half = entries // 2
    codes = torch.where(unit >= qmap[half], half, 0)
    step = half // 2
    while step:
        codes = codes + torch.where(unit >= qmap[codes + step], step, 0)
        step //= 2
    return codes


def _dynamic_map_floor_code(unit: torch.Tensor, qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """The binary search's result for the 8-bit maps (``create_dynamic_map(signed, 7, 8)``) in 2 gathers, not 8.

    Why: the 8 dependent gathers of the search are scalar loads in Inductor's CPU code and were most of the
    8-bit step. The map has structure: band i (0..6) holds n_i = 2**i (signed; 2**(i + 1) unsigned) entries
    10**(i - 6) * (0.1 + 0.9 * (j + 0.5) / n_i), after the zero (index 127 signed, 0 unsigned), the negative
    band mirrored below it. So the band of |x| is the count of the powers 10**-6 .. 10**-1 at most |x|, and j
    is linear in |x|. That estimate is within one entry of the answer (float rounding near an entry; at a band
    edge j = -1 or n_i lands on the neighbouring band's entry, the right one), and one gather each way makes
    it exact. (Measured on those values: off by one at 387 of 5218 signed and 122 of 2607 unsigned, never
    by more, each within a few ulps of an entry, where the rounding step reaches the same code anyway; the
    corrections keep the floor exact rather than lean on that.) ``test_torchao_quantized`` checks the
    codes against torchao's own search on every entry, midpoint and their float neighbours."""
    v = unit.abs()
    # The band by 6 comparisons, not log10 (transcendental ops cost more than the gathers saved): per band its
    # entry count n_i and 10 ** (6 - i), exact in float32, as selects.
    per_band, decade = torch.full_like(v, 1.0 if signed else 2.0), torch.full_like(v, 1e6)
    for i in range(1, 7):
        in_band = v >= 10.0 ** (i - 7)
        per_band = torch.where(in_band, 2.0 ** (i if signed else i + 1), per_band)
        decade = torch.where(in_band, 10.0 ** (6 - i), decade)
    j = torch.floor((v * decade - 0.1) * per_band / 0.9 - 0.5)
    j = torch.minimum(j.clamp(min=-1.0), per_band)
    position = per_band - 1 + j  # among the entries above zero (-1: zero itself)
    # Below zero the largest entry <= -|x| mirrors the smallest positive one >= |x|: one position further out.
    estimate = torch.where(unit >= 0, 128 + position, 125 - position) if signed else position
    last = qmap.numel() - 1
    estimate = torch.where(unit == unit, estimate, 0.0).clamp(0, last)  # NaN: the search's 0
    codes = estimate.to(torch.int64)
    codes = torch.where(qmap[codes] > unit, (codes - 1).clamp(min=0), codes)
    up = (codes + 1).clamp(max=last)
    return torch.where(qmap[up] <= unit, up, codes)


FORMATS = {
    "8bit": Format("8bit", {True: tuple(create_dynamic_map(signed=True)),
                                 False: tuple(create_dynamic_map(signed=False))}, False, OptimState8bit,
                   lambda codes, scale, qmap, signed, shape, dtype: OptimState8bit(codes, scale, qmap, signed,
                                                                                    dtype=dtype),
                   _dynamic_map_floor_code),
    # torchao's subclass_4bit maps: a 3-exponent-bit dynamic map, and a linear one without zero.
    "4bit": Format("4bit", {True: tuple(create_dynamic_map(True, 3, 4)),
                                 False: tuple(torch.linspace(0, 1, 17)[1:].tolist())}, True, OptimState4bit,
                   lambda codes, scale, qmap, signed, shape, dtype: OptimState4bit(codes, scale, qmap, signed, shape,
                                                                                    dtype=dtype),
                   _searched_floor_code),
    "fp8": Format("fp8", None, False, OptimStateFp8,
                  lambda codes, scale, qmap, signed, shape, dtype: OptimStateFp8(codes.view(_FP8), scale,
                                                                                  dtype=dtype),
                  None),
    # torchao's _AdamW (block_size inf): every param keeps plain state (``zeros_like``: the param's dtype).
    "plain": Format("plain", None, False, None, None, None),
}


class Variant(NamedTuple):
    """The graphs' constants: the format's name and the optimizer's ``block_size`` (torchao's defaults: 256 for
    8-bit and FP8, 128 for 4-bit; transformers' ``optim="adamw_torch_4bit"`` passes 256). amsgrad is refused,
    and every hyperparameter is a tensor read each step."""

    format: str
    block: int  # 0 for the plain format
    stochastic_round: bool = False  # the optimizer's bf16_stochastic_round: its bfloat16 params round at random


def variant(fmt: Format, optimizer) -> Variant:
    """The graphs' constants for ``optimizer``'s groups."""
    block = 0 if fmt.name == "plain" else optimizer.block_size
    return Variant(fmt.name, block, bool(optimizer.bf16_stochastic_round))


def state_keys(var: Variant) -> tuple[str, ...]:
    return STATE_KEYS


def quantizes(var: Variant, shape: tuple[int, ...]) -> bool:
    """torchao's ``_new_buffer``: a param of at least 4096 elements, whole blocks, keeps quantized state (never
    with the plain format: ``_AdamW``'s block size is infinite)."""
    return var.format != "plain" and numel(shape) >= MIN_QUANTIZED and numel(shape) % var.block == 0


def rounds_itself(var: Variant) -> bool:
    """The optimizer asks for stochastic rounding of its bfloat16 params (torchao's ``bf16_stochastic_round``):
    the engine passes ``rounding`` with params set, seeded by ``FusedStepConfig.stochastic_rounding_seed``."""
    return var.stochastic_round


def _codes_shape(fmt: Format, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (numel(shape) // 2,) if fmt.packed else tuple(shape)


def state_layout(var: Variant, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
    """A quantized param: each moment's codes (uint8: the param's shape, or half its elements flat where two
    4-bit codes share a byte) and scales (float32, one per block); any other param: each moment as a tensor of
    its shape and dtype. For a DTensor param ``shape`` is its local shard's: torchao decides by the shard
    (``_new_buffer`` on ``p.to_local()``), so a shard's blocks never straddle its edge."""
    fmt = FORMATS[var.format]
    if not quantizes(var, shape):
        return {key: StateTensor(tuple(shape), dtype) for key in _MOMENTS}
    layout = {}
    for key in _MOMENTS:
        codes, scale = STATE_PARTS[key]
        layout[codes] = StateTensor(_codes_shape(fmt, shape), torch.uint8)
        layout[scale] = StateTensor((numel(shape) // var.block,), torch.float32)
    return layout


def assemble(fmt: Format, key: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...],
             dtype: torch.dtype) -> torch.Tensor:
    """torchao's state tensor ``key`` over the buffer views ``parts`` (its codes and scales): what
    ``optimizer.state[p][key]`` holds, so that torchao's own step and ``state_dict()`` read and write the buffers."""
    codes, scale = (parts[name] for name in STATE_PARTS[key])
    signed = _MOMENTS[key]
    qmap = None if fmt.qmaps is None else torch.tensor(fmt.qmaps[signed], dtype=torch.float32, device=codes.device)
    return fmt.wrap(codes, scale, qmap, signed, tuple(shape), dtype)


def _codes_of(value) -> torch.Tensor:
    """A state tensor's codes as the uint8 buffers keep them (float8 codes as their bits)."""
    return value.codes.view(torch.uint8) if value.codes.dtype == _FP8 else value.codes


def _form_error(fmt: Format, key: str, value, declared: dict[str, StateTensor]) -> str | None:
    """Why ``value`` is not torchao's state tensor ``key`` in the form ``declared`` (None: it is)."""
    if declared.keys() == {key}:  # a plain tensor of the param's shape
        want = declared[key]
        quantized = fmt.state_class is not None and isinstance(value, fmt.state_class)
        if quantized or not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(want.shape):
            return f"a plain tensor of shape {tuple(want.shape)}"
        return None
    codes, scale = (declared[name] for name in STATE_PARTS[key])
    sign = "" if fmt.qmaps is None else (", signed" if _MOMENTS[key] else ", unsigned")
    want = f"an {fmt.state_class.__name__} of codes {tuple(codes.shape)}, {tuple(scale.shape)} blocks{sign}"
    if not isinstance(value, fmt.state_class) or tuple(value.codes.shape) != tuple(codes.shape) or \
            tuple(value.scale.shape) != tuple(scale.shape) or value.codes.dtype != (_FP8 if fmt.qmaps is None
                                                                                  else torch.uint8):
        return want
    if fmt.qmaps is not None and value.signed != _MOMENTS[key]:
        return want
    return None


def disassemble(fmt: Format, key: str, value: torch.Tensor,
                declared: dict[str, StateTensor]) -> dict[str, torch.Tensor]:
    """The buffer keys' values of a state tensor torchao holds (loaded, or made by its own step): its codes (as
    uint8) and scales for a quantized one, else itself. Raises ``ValueError`` for one of another form
    (``group_values`` raises first, before anything changes)."""
    error = _form_error(fmt, key, value, declared)
    if error is not None:
        raise ValueError(f"{fmt.name}: state {key!r} must be {error}, got {value!r}")
    if declared.keys() == {key}:
        return {key: value}
    codes, scale = STATE_PARTS[key]
    return {codes: _codes_of(value), scale: value.scale}


def count_at_bind(created: bool) -> None:
    """The count is torchao's ``state["step"]`` (``STEP_KEY``), read where it is."""
    return None


def _refuse_unsupported(fmt: Format, optimizer, group: dict, where: str) -> None:
    """``ValueError`` for params and state these rules do not update as torchao would."""
    name = type(optimizer).__name__
    if group["amsgrad"]:
        raise ValueError(f"{where}: amsgrad=True is not supported with {name} (torchao 0.18's own "
                         "step fails on its quantized state). Nothing was updated.")
    block = optimizer.block_size
    if fmt.name != "plain" and (not isinstance(block, int) or block < 1 or (fmt.packed and block % 2)):
        raise ValueError(f"{where}: {name}'s block_size must be a positive{' even' if fmt.packed else ''} int (its "
                         f"codes are packed two per byte), got {block!r}. Nothing was updated.")
    var = variant(fmt, optimizer)
    for p in group["params"]:
        if is_dtensor(p) and any(placement.is_partial() for placement in p.placements):
            raise ValueError(f"{where}: a DTensor param with placements {p.placements} holds partial values; "
                             f"{name} updates each rank's shard (Shard or Replicate placements). Nothing was updated.")
        local = local_tensor(p)
        shape = tuple(local.shape)
        if quantizes(var, shape) and not local.is_contiguous():
            raise ValueError(f"{where}: a param of shape {shape} with quantized state must be contiguous (torchao's "
                             f"blocks are runs of {block} elements in memory). Nothing was updated.")
        declared = state_layout(var, shape, p.dtype)
        for key, value in optimizer.state.get(p, {}).items():
            if key in _MOMENTS:
                parts = {k: t for k, t in declared.items() if k == key or k in STATE_PARTS[key]}
                error = _form_error(fmt, key, local_tensor(value), parts)  # a DTensor's: its shard's
                if error is not None:
                    raise ValueError(f"{where}: a param of shape {shape} keeps state {key!r} as {value!r}; FusedStep "
                                     f"expects {error}, as torchao makes it. Nothing was updated.")


def group_values(fmt: Format, optimizer, group: dict, where: str) -> list:
    """The group's hyperparameters in ``HP_COLUMNS[2:]`` order; raises ``ValueError`` for what torchao refuses
    at construction and for what these rules do not support, before anything changes."""
    reject_common_options(group, type(optimizer).__name__)
    _refuse_unsupported(fmt, optimizer, group, where)
    return [*moment_values(group, where), 1.0 if optimizer.is_adamw else 0.0]


def slot_table(
    hp: torch.Tensor,  # [S, len(HP_COLUMNS)] float64: each slot's group hyperparameters
    counts: torch.Tensor,  # [S] float32: each tensor's step count before this update (read by the update)
    apply: torch.Tensor,  # [S] bool: the tensor is updated this step (finite norm and a grad)
    coef: torch.Tensor,  # [] float64: the clip coefficient
    table: torch.Tensor,  # [S, K'] the table the result goes to, read for its dtype only (see norm/finish.py)
) -> torch.Tensor:  # [S, len(TABLE_COLUMNS)] in the table's dtype
    return leading_columns(hp, apply, coef, table)


def lr_ratio(shape: tuple[int, ...], var: Variant) -> float:
    """No lr adjustment per shape."""
    return 1.0


def call_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """An upper estimate of the bytes one param's update holds while its call runs: about eight float32
    temporaries per element (the grad, the moments, the scaled moments and the new param)."""
    return numel(shape) * 8 * 4


def _quantize(fmt: Format, x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's block quantization of ``x`` (``[n, blocks, block]`` float32): (uint8 codes of the same shape,
    unpacked; float8 codes as their bits, float32 scales ``[n, blocks]``).

    A map format divides each block by its max |x| (at least 1e-12), then maps it to the nearest map entry:
    the largest entry <= the value (``Format.floor_code``: torchao's binary search, or its result computed),
    then one entry up when the value is at least halfway there (ties go up). fp8 divides by the max |x| (at least 1e-12) / 448 and
    converts to float8_e4m3fn."""
    if fmt.qmaps is None:
        scale = x.abs().amax(dim=-1).clamp(min=1e-12) / _FP8_MAX
        return (x / scale.unsqueeze(-1)).to(_FP8).view(torch.uint8), scale
    qmap = torch.tensor(fmt.qmaps[signed], dtype=torch.float32, device=x.device)
    scale = x.abs().amax(dim=-1).clamp(min=1e-12)
    unit = x / scale.unsqueeze(-1)
    codes = fmt.floor_code(unit, qmap, signed)
    above = (codes + 1).clamp(max=qmap.numel() - 1)
    low, high = qmap[codes], qmap[above]
    codes = torch.where(unit - low >= (high - low) * 0.5, above, codes)
    return codes.to(torch.uint8), scale


def _dequantize(fmt: Format, codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 values of ``codes`` (``[n, blocks, block]`` uint8, unpacked) and ``scale`` (``[n, blocks]``)."""
    if fmt.qmaps is None:
        return codes.view(_FP8).float() * scale.unsqueeze(-1)
    qmap = torch.tensor(fmt.qmaps[signed], dtype=torch.float32, device=codes.device)
    return qmap[codes.int()] * scale.unsqueeze(-1)


def _unpack(fmt: Format, codes: torch.Tensor, blocks_shape: tuple) -> torch.Tensor:
    """A stack's stored codes ``[n, *codes shape]`` as one uint8 code per element, ``[n, blocks, block]``: two
    4-bit codes per byte, the even element's in the high nibble (torchao's packing)."""
    if fmt.packed:
        codes = torch.stack([codes >> 4, codes & 0b1111], dim=-1)
    return codes.reshape(blocks_shape)


def _pack(fmt: Format, codes: torch.Tensor, stored_shape: tuple) -> torch.Tensor:
    """The inverse of ``_unpack``: ``[n, blocks, block]`` codes in the stored shape."""
    if fmt.packed:
        pairs = codes.reshape(codes.size(0), -1, 2)
        codes = (pairs[..., 0] << 4) | pairs[..., 1]
    return codes.reshape(stored_shape)


def update_matrices(
    params: torch.Tensor,  # [n, *S] same-shape params of one group (param dtype); mutated
    grads: torch.Tensor,  # [n, *S] their grads; read only
    hp: torch.Tensor,  # [H] float64: the group's hyperparameter row
    table: torch.Tensor,  # [n, len(TABLE_COLUMNS)] float32 or float64: apply flags and grad coefficients
    lr_ratio: torch.Tensor,  # [1] float64: unused
    counts: torch.Tensor,  # [n] float32: torchao's steps before this update; mutated (+1 where applied)
    variant: Variant,  # graph constant: the format and block size
    exp_avg: torch.Tensor | None,  # [n, *S] (small params), or None; mutated
    exp_avg_sq: torch.Tensor | None,  # [n, *S] (small params), or None; mutated
    exp_avg_codes: torch.Tensor | None,  # [n, *codes shape] uint8 (quantized params), or None; mutated
    exp_avg_scale: torch.Tensor | None,  # [n, blocks] float32 (quantized params), or None; mutated
    exp_avg_sq_codes: torch.Tensor | None,  # as exp_avg_codes
    exp_avg_sq_scale: torch.Tensor | None,  # as exp_avg_scale
    rounding: Rounding | None,  # stochastic rounding of bfloat16 params and plain moments, or None: to nearest
) -> None:
    fmt = FORMATS[variant.format]
    n, shape = params.size(0), params.shape
    quantized = exp_avg_codes is not None  # a property of the stack's shape: a graph constant

    def per_param(x: torch.Tensor) -> torch.Tensor:  # [n] -> [n, 1, ...] against the blocks or the params
        return x.reshape(n, *([1] * (2 if quantized else params.dim() - 1)))

    def blocks(x: torch.Tensor) -> torch.Tensor:  # [n, *S] -> [n, blocks, block] for a quantized stack
        return x.reshape(n, -1, variant.block) if quantized else x

    rows = as_compute(table, torch.float32)
    applied = table[:, APPLY] != 0  # [n]
    # torchao's scalars: Python floats rounded to float32 where they meet a tensor; lr is a float32 tensor.
    lr, wd, eps = hp[_LR].float(), hp[_WD].float(), hp[_EPS].float()
    beta1, beta2 = hp[_BETA1].float(), hp[_BETA2].float()
    one_minus_beta1, one_minus_beta2 = (1.0 - hp[_BETA1]).float(), (1.0 - hp[_BETA2]).float()
    decoupled = hp[_DECOUPLED] != 0
    # AdamW's decay (lr * wd) and Adam's L2 term (wd): the unused one is 0, which changes no finite value.
    decay = torch.where(decoupled, lr * wd, torch.zeros_like(wd))
    l2 = torch.where(decoupled, torch.zeros_like(wd), wd)
    step = counts + 1.0  # torchao increments its float32 step first
    bias_correction1 = per_param(1.0 - torch.pow(beta1, step))
    bias_correction2_sqrt = per_param((1.0 - torch.pow(beta2, step)).sqrt())

    p32 = blocks(params.float())
    g = blocks(grads.float()) * per_param(rows[:, GRAD_COEF])
    p_decayed = p32 - decay * p32
    g = g + l2 * p32

    state = dict(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, exp_avg_codes=exp_avg_codes, exp_avg_scale=exp_avg_scale,
                 exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_scale=exp_avg_sq_scale)  # by buffer key

    def old(key: str) -> torch.Tensor:  # a moment's float32 value before the update
        if quantized:
            codes, scale = STATE_PARTS[key]
            return _dequantize(fmt, _unpack(fmt, state[codes], p32.shape), state[scale], _MOMENTS[key])
        return state[key].float()

    new = {"exp_avg": torch.lerp(old("exp_avg"), g, one_minus_beta1),
           "exp_avg_sq": torch.lerp(old("exp_avg_sq"), g.square(), one_minus_beta2)}
    denom = new["exp_avg_sq"].sqrt() / bias_correction2_sqrt + eps
    p_new = p_decayed - lr * (new["exp_avg"] / bias_correction1) / denom  # the float32 moments, not the stored ones

    # Each store keeps its old value where the update is not applied (a skipped step is bit-identical).
    keep = applied.reshape(n, *([1] * (params.dim() - 1)))  # against [n, *S]
    plain = [] if quantized else list(new)
    bits = None
    if rounding is not None:  # keyed by each param's new step count and each element's place in the call
        position = torch.arange(params.numel(), device=params.device).reshape(shape)
        bits = rounding_bits(rounding, step.reshape(keep.shape), position,
                             [params.dtype] + [state[key].dtype for key in plain])
    store_where(keep, [(params, p_new.reshape(shape), params)], bits[:1] if bits is not None else None)
    for k, (key, value) in enumerate(new.items()):
        if quantized:
            codes_key, scale_key = STATE_PARTS[key]
            codes, scale = _quantize(fmt, value, _MOMENTS[key])
            stored = state[codes_key]
            keep_codes = applied.reshape(n, *([1] * (stored.dim() - 1)))  # against [n, *codes shape]
            store_where(keep_codes, [(stored, _pack(fmt, codes, stored.shape), stored)])
            store_where(applied.reshape(n, 1), [(state[scale_key], scale, state[scale_key])])  # against [n, blocks]
        else:
            store_where(keep, [(state[key], value, state[key])], bits[1 + k:2 + k] if bits is not None else None)
    # The step count advances in the graph that writes the params: an interrupted step never leaves a
    # param updated with its count unchanged.
    counts.copy_(counts + table[:, APPLY])


# The rule contract's names every format shares (``rules/__init__.py``), copied into each format's rule.
_SHARED = ("KIND", "STEP_KEY", "PARAM_NDIMS", "ROW_SHARDED", "LOCAL_SHARDS", "HP_COLUMNS", "TABLE_COLUMNS",
           "STATE_KEYS", "STATE_PARTS", "LOW_PRECISION_KEYS", "STOCHASTIC_ROUNDING", "Variant", "state_keys",
           "state_layout", "count_at_bind", "slot_table", "lr_ratio", "call_bytes", "rounds_itself", "update_matrices")


def format_rule(name: str, optimizers: tuple[type, ...], fmt: Format) -> types.ModuleType:
    """The rule (a module object, as every rule is) for torchao's ``optimizers`` keeping their state in ``fmt``:
    this module's shared names, and ``variant``, ``group_values``, ``assemble``, ``disassemble`` bound to ``fmt``.
    ``rules/torchao.py`` makes one per format."""
    rule = types.ModuleType(f"compiled_step.rules.torchao.{name}", f"torchao's {', '.join(t.__name__ for t in optimizers)}"
                            f" ({fmt.name} state): quantized_adam's rule for this format.")
    for shared in _SHARED:
        setattr(rule, shared, globals()[shared])
    rule.NAME, rule.OPTIMIZERS, rule.FORMAT = name, optimizers, fmt

    def variant_of(optimizer, group: dict) -> Variant:
        return variant(fmt, optimizer)

    def group_values_of(optimizer, group: dict, where: str) -> list:
        return group_values(fmt, optimizer, group, where)

    def assemble_of(key: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...],
                    dtype: torch.dtype) -> torch.Tensor:
        return assemble(fmt, key, parts, shape, dtype)

    def disassemble_of(key: str, value: torch.Tensor, declared: dict[str, StateTensor]) -> dict[str, torch.Tensor]:
        return disassemble(fmt, key, value, declared)

    rule.variant, rule.group_values = variant_of, group_values_of
    rule.assemble, rule.disassemble = assemble_of, disassemble_of
    return rule
