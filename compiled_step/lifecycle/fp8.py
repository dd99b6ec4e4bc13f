"""FP8 lifecycle: the first-microbatch flag and dynamic FP8 weight scales.

Two unrelated jobs that both follow the optimizer step.

**The first-microbatch flag** (TransformerEngine's ``is_first_microbatch`` argument). TE
quantizes a weight to FP8 when told ``True`` and caches the result, reuses that cache when
told ``False``, and neither caches nor reuses when told ``None``. Within one optimizer step
the weights do not change, so microbatches after the first can reuse the cache. The
lifecycle of a :class:`FirstMicrobatchFlag`:

* ``begin_step()``: call before the first microbatch's forward; value becomes ``True``.
* ``after_first_microbatch()``: call after the first microbatch's backward; ``False``.
* ``reset()``: call after the optimizer step; ``None``.

NeMo Automodel never resets its flag, so a forward between two steps (evaluation, say) is told
``False`` and reuses FP8 weights quantized *before* the update. ``reset()`` closes that hole.
``after_first_microbatch()`` refuses to run while the flag is ``None`` (no step begun),
since ``False`` there would ask TE to reuse a cache no microbatch of this step filled.

NeMo Automodel's ``prepare_after_first_microbatch()`` acts on a module-level default flag
(:func:`default_first_microbatch_flag`), which NeMo Automodel's
``prepare_for_grad_accumulation`` (in :mod:`compiled_step.lifecycle.fsdp`) sets to True.
:func:`feed_first_microbatch_flag` passes a flag's value to every module whose ``forward``
takes an ``is_first_microbatch`` argument, through removable forward-pre-hooks.

**Dynamic FP8 weight scales for FSDP2's float8 all-gather** (the job of torchao's
``precompute_float8_dynamic_scale_for_fsdp``, torchao 0.18). With
``enable_fsdp_float8_all_gather`` torchao casts each sharded weight to FP8 before the
all-gather, using the scale stored in ``weight._local_tensor._precomputed_scale`` (a
``WeightWithDynamicFloat8CastTensor``) when one is there. Its recipe, reproduced exactly by
:func:`fp8_scales_from_amax`: ``amax`` per weight (in the weights' dtype, all-reduced MAX
over the shards), clamped below at ``1e-12`` *in that dtype*, then
``finfo(float8_dtype).max / amax`` in float64, clamped to the float16 max for float16
weights, cast to float32. :func:`fp8_scales_from_amax` is a pure tensor function (no
collectives, no host sync), meant to run inside the compiled update on amax values computed
there; :func:`store_fp8_scales_for_fsdp` then writes the scales where torchao reads them.
:func:`precompute_fp8_scales_for_fsdp` is the eager end-to-end equivalent of torchao's
function, built on the same pieces. Call it, or the compiled path, after the optimizer step.

torchao is optional: without it no ``Float8Linear`` can exist, so
:func:`find_float8_fsdp_weights` returns ``[]``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from compiled_step import collectives

__all__ = [
    "FP8_SCALE_EPS",
    "FirstMicrobatchFlag",
    "FirstMicrobatchHooks",
    "Float8FSDPWeight",
    "default_first_microbatch_flag",
    "feed_first_microbatch_flag",
    "find_float8_fsdp_weights",
    "fp8_scales_from_amax",
    "fp8_weight_amax",
    "precompute_fp8_scales_for_fsdp",
    "prepare_after_first_microbatch",
    "store_fp8_scales_for_fsdp",
]

# torchao.float8.float8_utils.EPS: the smallest amax a scale is computed from.
FP8_SCALE_EPS = 1e-12

_FLOAT8_DTYPES = frozenset(
    {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
)

_KWARG = "is_first_microbatch"


# --------------------------------------------------------------------------------------
# First-microbatch flag
# --------------------------------------------------------------------------------------


class FirstMicrobatchFlag:
    """The value to pass as TransformerEngine's ``is_first_microbatch``: True, False or None.

    Starts as None. See the module docstring for the call sites of :meth:`begin_step`,
    :meth:`after_first_microbatch` and :meth:`reset`.
    """

    __slots__ = ("_value",)

    def __init__(self) -> None:
        self._value: bool | None = None

    @property
    def value(self) -> bool | None:
        """True on the first microbatch of a step, False on later ones, None outside a step."""
        return self._value

    def begin_step(self) -> None:
        """Call before the first microbatch's forward: TE re-quantizes and caches."""
        self._value = True

    def after_first_microbatch(self) -> None:
        """Call after the first microbatch's forward-backward: later microbatches reuse the cache.

        Raises ``RuntimeError`` when no step has begun (value None): False would make TE
        reuse FP8 weights that no microbatch of this step quantized.
        """
        if self._value is None:
            raise RuntimeError(
                "after_first_microbatch() called outside a step: call begin_step() "
                "(or prepare_for_grad_accumulation) before the first microbatch"
            )
        self._value = False

    def reset(self) -> None:
        """Call after the optimizer step: the cached FP8 weights are stale from now on."""
        self._value = None

    def __repr__(self) -> str:
        return f"FirstMicrobatchFlag(value={self._value!r})"


# Module-level default flag that the NeMo-named functions drive, like NeMo Automodel's global
# IS_FIRST_MICROBATCH. Creating an object is not an import-time side effect on anything else.
_DEFAULT_FLAG = FirstMicrobatchFlag()


def default_first_microbatch_flag() -> FirstMicrobatchFlag:
    """The flag driven by the NeMo-named functions and fed by default to TE modules."""
    return _DEFAULT_FLAG


def prepare_after_first_microbatch() -> None:
    """Disable the first-microbatch flag after the first forward-backward pass (NeMo Automodel's function).

    Call after the first microbatch of a gradient-accumulation step, so later microbatches
    reuse the FP8 weights cached by the first instead of re-quantizing. Acts on
    :func:`default_first_microbatch_flag`. Unlike NeMo Automodel, raises ``RuntimeError`` when
    no step has begun (see :meth:`FirstMicrobatchFlag.after_first_microbatch`).
    """
    _DEFAULT_FLAG.after_first_microbatch()


def _iter_unique_modules(model_parts: nn.Module | Iterable[nn.Module]) -> Iterator[nn.Module]:
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    seen: set[int] = set()
    for part in parts:
        if not isinstance(part, nn.Module):
            raise TypeError(f"model_parts must hold torch.nn.Module objects, got {type(part).__name__}")
        for module in part.modules():
            if id(module) not in seen:
                seen.add(id(module))
                yield module


def _first_microbatch_position(module: nn.Module) -> int | None:
    """Positional index of ``is_first_microbatch`` in ``module.forward``, -1 if keyword-only,
    None if ``forward`` does not take it."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        return None
    for index, param in enumerate(params):
        if param.name == _KWARG:
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                return index
            if param.kind == param.KEYWORD_ONLY:
                return -1
    return None


class FirstMicrobatchHooks:
    """Handle for the hooks installed by :func:`feed_first_microbatch_flag`.

    ``modules`` lists the hooked modules; ``remove()`` (or leaving a ``with`` block)
    uninstalls every hook.
    """

    def __init__(self, modules: list[nn.Module], handles: list[RemovableHandle]) -> None:
        self.modules = modules
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FirstMicrobatchHooks:
        return self

    def __exit__(self, *exc_info: object) -> bool:
        self.remove()
        return False


def feed_first_microbatch_flag(
    model_parts: nn.Module | Iterable[nn.Module], flag: FirstMicrobatchFlag | None = None
) -> FirstMicrobatchHooks:
    """Pass ``flag.value`` as ``is_first_microbatch`` to every module whose forward takes it.

    Install once, after building the model (TE's ``Linear``, ``LayerNormLinear``,
    ``TransformerLayer``... take the argument). Each such module gets a forward-pre-hook
    that adds ``is_first_microbatch=flag.value`` to the call, read at call time, unless
    the caller passed the argument explicitly (by keyword or position): an explicit value
    wins. ``flag`` defaults to :func:`default_first_microbatch_flag`.

    Returns a :class:`FirstMicrobatchHooks`; call ``.remove()`` to uninstall. Raises
    ``ValueError`` when no module takes the argument (asking for FP8 weight caching on a
    model without TE modules is a configuration mistake) and ``TypeError`` for bad input.
    """
    if flag is None:
        flag = _DEFAULT_FLAG
    if not isinstance(flag, FirstMicrobatchFlag):
        raise TypeError(f"flag must be a FirstMicrobatchFlag, got {type(flag).__name__}")
    targets = [
        (module, position)
        for module in _iter_unique_modules(model_parts)
        if (position := _first_microbatch_position(module)) is not None
    ]
    if not targets:
        raise ValueError(f"no module in model_parts has a forward that takes {_KWARG!r}")

    handles = []
    for module, position in targets:

        def hook(mod, args, kwargs, _position=position):
            passed_positionally = _position >= 0 and len(args) > _position
            if _KWARG not in kwargs and not passed_positionally:
                kwargs[_KWARG] = flag.value
            return args, kwargs

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return FirstMicrobatchHooks([m for m, _ in targets], handles)


# --------------------------------------------------------------------------------------
# Dynamic FP8 weight scales
# --------------------------------------------------------------------------------------


def _check_float8_dtype(float8_dtype: object) -> torch.dtype:
    if float8_dtype not in _FLOAT8_DTYPES:
        raise ValueError(f"float8_dtype must be one of {sorted(map(str, _FLOAT8_DTYPES))}, got {float8_dtype}")
    return float8_dtype  # type: ignore[return-value]


def fp8_scales_from_amax(
    amax: torch.Tensor,
    *,
    float8_dtype: torch.dtype = torch.float8_e4m3fn,
    weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-weight FP8 scales from per-weight amax values, as torchao computes them.

    Args:
        amax: 1-D floating tensor, ``amax[i] = max |w_i|`` over the *whole* weight ``i``
            (all shards). Its values must be representable in ``weight_dtype``, which they
            are when they are maxima of ``weight_dtype`` values.
        float8_dtype: the FP8 format the weights are cast to (default e4m3, torchao's
            default for weights).
        weight_dtype: the dtype of the high-precision weights; defaults to ``amax.dtype``.
            It matters twice: torchao clamps amax at ``1e-12`` rounded to this dtype, and
            caps the scale at the float16 max for float16 weights.

    Returns:
        float32 tensor shaped like ``amax``. ``amax == 0`` gives ``fp8_max / eps``; an
        infinite amax gives 0; NaN stays NaN. Pure tensor math: no collectives, no host
        sync, safe inside ``torch.compile``.

    Raises ``TypeError``/``ValueError`` for a non-tensor, non-1-D or non-floating ``amax``
    or an unknown dtype.
    """
    if not isinstance(amax, torch.Tensor):
        raise TypeError(f"amax must be a torch.Tensor, got {type(amax).__name__}")
    if amax.dim() != 1:
        raise ValueError(f"amax must be 1-D (one value per weight), got shape {tuple(amax.shape)}")
    if not amax.dtype.is_floating_point or amax.dtype in _FLOAT8_DTYPES:
        raise TypeError(f"amax must be a float16/bfloat16/float32/float64 tensor, got {amax.dtype}")
    float8_dtype = _check_float8_dtype(float8_dtype)
    weight_dtype = amax.dtype if weight_dtype is None else weight_dtype
    if not isinstance(weight_dtype, torch.dtype) or not weight_dtype.is_floating_point:
        raise TypeError(f"weight_dtype must be a floating torch.dtype, got {weight_dtype}")

    # torchao clamps in the weights' own dtype (so eps is 1e-12 rounded to that dtype, 0 for
    # float16), and only then upcasts: float64 division keeps eager and compiled numerics equal.
    clamped = amax.to(weight_dtype).clamp(min=FP8_SCALE_EPS).to(torch.float64)
    scales = torch.finfo(float8_dtype).max / clamped
    if weight_dtype == torch.float16:
        # A float16 weight times a larger scale would overflow before the FP8 cast.
        scales = scales.clamp(max=torch.finfo(torch.float16).max)
    return scales.to(torch.float32)


def _local_amax(weight: torch.Tensor) -> torch.Tensor:
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    local = local.detach()
    if local.numel() == 0:
        # An uneven FSDP shard can be empty; it contributes nothing to the max. torch.zeros,
        # not new_zeros: torchao's weight subclass would wrap the result of new_zeros.
        return torch.zeros((), dtype=local.dtype, device=local.device)
    return local.abs().amax()


@torch.no_grad()
def fp8_weight_amax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eager amax of each weight over all its shards, stacked: ``out[i] = max |weights[i]|``.

    Plain tensors are reduced locally. For DTensors the local maxima are all-reduced (MAX)
    over every mesh dimension where the weight is not replicated: one collective per
    distinct (mesh, placements) and mesh dimension, so every rank must call this with the
    same weights in the same order. The result has the weights' dtype (one dtype for all:
    the max of values is exact in their own dtype) and lives on the first weight's device.

    Raises ``ValueError`` for an empty list or mixed dtypes, ``TypeError`` for non-tensors.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("weights is empty")
    for w in weights:
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights must be tensors, got {type(w).__name__}")
    dtypes = {w.dtype for w in weights}
    if len(dtypes) != 1:
        raise ValueError(f"weights must share one dtype, got {sorted(map(str, dtypes))}")
    (dtype,) = dtypes

    local = [_local_amax(w) for w in weights]
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        if isinstance(w, DTensor):
            groups.setdefault((id(w.device_mesh), tuple(w.placements)), []).append(i)
    for indices in groups.values():
        mesh = weights[indices[0]].device_mesh
        placements = weights[indices[0]].placements
        # float32 for the wire: exact for float16/bfloat16 values, and gloo has no MAX for
        # every half type. float64 weights keep float64.
        wire_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        stacked = torch.stack([local[i] for i in indices]).to(wire_dtype)
        for mesh_dim, placement in enumerate(placements):
            if not placement.is_replicate():
                collectives.all_reduce_max_over_mesh_dim(stacked, mesh, mesh_dim)
        for slot, i in enumerate(indices):
            local[i] = stacked[slot].to(dtype)
    device = local[0].device
    return torch.stack([a.to(device) for a in local])


@dataclass(frozen=True)
class Float8FSDPWeight:
    """A torchao ``Float8Linear`` whose FSDP2-sharded weight takes a precomputed scale."""

    module: nn.Module
    float8_dtype: torch.dtype

    @property
    def weight(self) -> DTensor:
        # Read at use time: the module's registered parameter is what FSDP all-gathers.
        return self.module.weight  # type: ignore[return-value]


def find_float8_fsdp_weights(model_parts: nn.Module | Iterable[nn.Module]) -> list[Float8FSDPWeight]:
    """The torchao float8 weights whose FSDP all-gather reads a precomputed scale.

    Same selection and order as torchao's ``precompute_float8_dynamic_scale_for_fsdp``:
    ``Float8Linear`` modules in ``modules()`` order whose weight is a DTensor over a
    ``WeightWithDynamicFloat8CastTensor`` (i.e. ``enable_fsdp_float8_all_gather=True`` and
    ``fully_shard`` applied). Returns ``[]`` when torchao is not installed, since no such
    module can exist then.
    """
    # A Float8Linear can only exist if the user imported torchao: don't import it ourselves (slow,
    # and on CPU-only machines it prints load errors for its CUDA kernels).
    if "torchao.float8.float8_linear" not in sys.modules:
        return []
    try:
        from torchao.float8.float8_linear import Float8Linear
        from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
    except ImportError:
        return []
    found = []
    for module in _iter_unique_modules(model_parts):
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, Float8Linear)
            and isinstance(weight, DTensor)
            and isinstance(weight._local_tensor, WeightWithDynamicFloat8CastTensor)
        ):
            found.append(Float8FSDPWeight(module, module.config.cast_config_weight.target_dtype))
    return found


def store_fp8_scales_for_fsdp(targets: Sequence[Float8FSDPWeight], scales: torch.Tensor) -> None:
    """Store ``scales[i]`` where torchao's FSDP float8 all-gather reads it for ``targets[i]``.

    Writes ``targets[i].weight._local_tensor._precomputed_scale = scales[i]`` (a 0-d view,
    as torchao does). Call after the optimizer step and before the next forward's
    all-gather. ``scales`` must be a 1-D float32 tensor with one entry per target, e.g. from
    :func:`fp8_scales_from_amax`; raises ``ValueError``/``TypeError`` otherwise, before
    storing anything.
    """
    targets = list(targets)
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if scales.dim() != 1 or scales.numel() != len(targets):
        raise ValueError(
            f"scales must be 1-D with {len(targets)} entries (one per target), got shape {tuple(scales.shape)}"
        )
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32 (torchao's scale dtype), got {scales.dtype}")
    for target in targets:
        if not isinstance(target, Float8FSDPWeight):
            raise TypeError(f"targets must be Float8FSDPWeight objects, got {type(target).__name__}")
    for i, target in enumerate(targets):
        target.weight._local_tensor._precomputed_scale = scales[i]


@torch.no_grad()
def precompute_fp8_scales_for_fsdp(model_parts: nn.Module | Iterable[nn.Module]) -> torch.Tensor | None:
    """Eager equivalent of torchao's ``precompute_float8_dynamic_scale_for_fsdp``.

    Call after the optimizer step, on every rank. Finds the float8 FSDP weights, computes
    their amax (one all-reduce per mesh dimension), turns them into scales with
    :func:`fp8_scales_from_amax` and stores them. Returns the scales (float32, one per
    weight, in :func:`find_float8_fsdp_weights` order) or None when there are no such
    weights. Raises ``ValueError`` when the weights mix float8 target dtypes (torchao
    requires one).
    """
    targets = find_float8_fsdp_weights(model_parts)
    if not targets:
        return None
    float8_dtypes = {t.float8_dtype for t in targets}
    if len(float8_dtypes) != 1:
        raise ValueError(
            f"float8 weights use several target dtypes {sorted(map(str, float8_dtypes))}; torchao supports one"
        )
    amax = fp8_weight_amax([t.weight for t in targets])
    scales = fp8_scales_from_amax(amax, float8_dtype=next(iter(float8_dtypes)), weight_dtype=amax.dtype)
    store_fp8_scales_for_fsdp(targets, scales)
    return scales

