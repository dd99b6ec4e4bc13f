"""compiled_step: one torch.compile'd optimizer step (norm, clip, scaling and update fused).

``FusedStep`` replaces ``clip_grad_norm_`` + ``optimizer.step()``; the seed's functions (NeMo
Automodel ``components.training.utils``) are available under the same names.
"""

from compiled_step.experts import _TE_EXPERT_PARAM_PATTERN, mark_experts
from compiled_step.fused_step import DistributedConfig, FusedStep, FusedStepConfig
from compiled_step.nemo_compat import _clip_grad_norm_impl, clip_grad_norm, scale_grads_and_clip_grad_norm

__all__ = [
    "FusedStep",
    "FusedStepConfig",
    "DistributedConfig",
    "mark_experts",
    "clip_grad_norm",
    "_clip_grad_norm_impl",
    "scale_grads_and_clip_grad_norm",
    "_TE_EXPERT_PARAM_PATTERN",
]
