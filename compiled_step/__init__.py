"""compiled_step: one torch.compile'd optimizer step (norm, clip, scaling and update fused).

``FusedStep`` replaces ``clip_grad_norm_`` + ``optimizer.step()`` and is itself a ``torch.optim.Optimizer``
for trainers (``FusedOptimizer`` is the same class; adapters in ``compiled_step.integrations``, imported
only on demand); NeMo Automodel's functions (``components.training.utils``) are available under the
same names.
"""

from compiled_step.experts import _TE_EXPERT_PARAM_PATTERN, mark_experts
from compiled_step.config import DistributedConfig, FusedStepConfig
from compiled_step.fused_step import FusedOptimizer, FusedStep
from compiled_step.lifecycle import (
    FirstMicrobatchFlag,
    GradAccumulation,
    ScopedModuleOffloading,
    accumulate,
    feed_first_microbatch_flag,
    find_float8_fsdp_weights,
    fp8_scales_from_amax,
    move_to_device,
    precompute_fp8_scales_for_fsdp,
    prepare_after_first_microbatch,
    prepare_for_final_backward,
    prepare_for_grad_accumulation,
    store_fp8_scales_for_fsdp,
)
from compiled_step.nemo_compat import _clip_grad_norm_impl, clip_grad_norm, scale_grads_and_clip_grad_norm
from compiled_step.padding import count_tail_padding, count_tail_padding_tensor
from compiled_step.state_dtypes import bf16_moments, fp32_moments

__all__ = [
    "FusedStep",
    "FusedOptimizer",
    "FusedStepConfig",
    "DistributedConfig",
    "mark_experts",
    "clip_grad_norm",
    "_clip_grad_norm_impl",
    "scale_grads_and_clip_grad_norm",
    "_TE_EXPERT_PARAM_PATTERN",
    # NeMo Automodel's lifecycle helpers
    "prepare_for_grad_accumulation",
    "prepare_for_final_backward",
    "prepare_after_first_microbatch",
    "ScopedModuleOffloading",
    "move_to_device",
    "count_tail_padding",
    # beyond NeMo Automodel's API
    "count_tail_padding_tensor",
    "bf16_moments",
    "fp32_moments",
    "GradAccumulation",
    "accumulate",
    "FirstMicrobatchFlag",
    "feed_first_microbatch_flag",
    "fp8_scales_from_amax",
    "find_float8_fsdp_weights",
    "store_fp8_scales_for_fsdp",
    "precompute_fp8_scales_for_fsdp",
]
