"""What happens around the optimizer step: FSDP2 accumulation, FP8 flags and scales, offloading.

* :mod:`.fsdp` -- NeMo Automodel's ``prepare_for_grad_accumulation`` / ``prepare_for_final_backward``
  and the exception-safe :class:`GradAccumulation` driver (``accumulate(...)``).
* :mod:`.fp8` -- TransformerEngine's first-microbatch flag (``FirstMicrobatchFlag``, NeMo Automodel's
  ``prepare_after_first_microbatch``) and torchao-compatible dynamic FP8 weight scales.
* :mod:`.offload` -- NeMo Automodel's ``ScopedModuleOffloading`` and ``move_to_device``, device-generic.

Importing this package has no side effects (no torchao import, no process group, no settings).
"""

from compiled_step.lifecycle.fp8 import (
    FP8_SCALE_EPS,
    FirstMicrobatchFlag,
    FirstMicrobatchHooks,
    Float8FSDPWeight,
    default_first_microbatch_flag,
    feed_first_microbatch_flag,
    find_float8_fsdp_weights,
    fp8_scales_from_amax,
    fp8_weight_amax,
    precompute_fp8_scales_for_fsdp,
    prepare_after_first_microbatch,
    store_fp8_scales_for_fsdp,
)
from compiled_step.lifecycle.fsdp import (
    GradAccumulation,
    Microbatch,
    accumulate,
    fsdp_modules,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
    reset_fsdp_iteration_state,
)
from compiled_step.lifecycle.offload import ScopedModuleOffloading, move_to_device, release_device_cache

__all__ = [
    "FP8_SCALE_EPS",
    "FirstMicrobatchFlag",
    "FirstMicrobatchHooks",
    "Float8FSDPWeight",
    "GradAccumulation",
    "Microbatch",
    "ScopedModuleOffloading",
    "accumulate",
    "default_first_microbatch_flag",
    "feed_first_microbatch_flag",
    "find_float8_fsdp_weights",
    "fp8_scales_from_amax",
    "fp8_weight_amax",
    "fsdp_modules",
    "move_to_device",
    "precompute_fp8_scales_for_fsdp",
    "prepare_after_first_microbatch",
    "prepare_for_final_backward",
    "prepare_for_grad_accumulation",
    "release_device_cache",
    "reset_fsdp_iteration_state",
    "store_fp8_scales_for_fsdp",
]
