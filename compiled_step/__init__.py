"""compiled_step: one torch.compile'd optimizer step (norm, clip, scaling and update fused)."""

from compiled_step.fused_step import FusedStep, FusedStepConfig

__all__ = ["FusedStep", "FusedStepConfig"]
