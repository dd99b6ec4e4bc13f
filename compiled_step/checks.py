"""What FusedStep refuses or warns about, checked before anything changes, and where its warnings point."""

from __future__ import annotations

import math
import numbers
import os
import sys

import torch

from compiled_step import planning

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside compiled_step and torch
    (``step()`` runs under torch's ``no_grad`` decorator, whose frames would otherwise be blamed)."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)):
            return level
        frame, level = frame.f_back, level + 1
    return 1


# Why a step copied a grad in (``binding._why_foreign``), as the copy warning says it.
ANOTHER_FUSED_STEP = (
    "a view of another FusedStep's grad buffer: two FusedSteps hold these params, and the other one owned their "
    "grads (built later, or stepped last). The FusedStep that steps takes the grads back with one copy each; "
    "stepping both in turn copies at every switch. Keep one FusedStep per param")
DDP_BUCKET_VIEW = ("re-pointed at DistributedDataParallel's bucket, as DDP does with gradient_as_bucket_view=True in "
                   "every backward")
VIEW_OF_ANOTHER_BUFFER = ("a view of a larger buffer that is not FusedStep's: assigned to p.grad, or re-pointed by "
                          "another library")
NEW_TENSOR = "a new tensor: assigned to p.grad, or made by autograd or FSDP where p.grad was None"


def copy_warning(copied: list[tuple[str, str]], named: bool) -> str:
    """The once-per-FusedStep warning about grads copied into the grad buffers: which, and why."""
    name, why = copied[0]
    others = f" and {len(copied) - 1} other param(s)" if len(copied) > 1 else ""
    hint = "" if named else " (pass model_parts=[model] to FusedStep to see param names)"
    if not named and why == VIEW_OF_ANOTHER_BUFFER:
        # Without model_parts FusedStep cannot tell a DDP bucket from any other buffer: say what would.
        hint = (" (pass model_parts=[model] to FusedStep to see param names; for a DistributedDataParallel model "
                "with gradient_as_bucket_view=True, it also makes FusedStep read the grads in DDP's buckets)")
    return (f"FusedStep copied the grad of {name}{others}{hint} into its grad buffers, an extra read and write "
            f"of each: the grad was {why}. FusedStep's buffers are the grads: zero them with fused.zero_grad() "
            "(grads set to None by zero_grad() are re-pointed at the buffers in backward, at no cost), and "
            "don't assign p.grad. fused.last_step_copied_grads lists the copies of the last step. (Shown once.)")


def refuse_partial_params(plan: planning.Plan) -> None:
    """Raise where a DTensor param has a Partial placement (its value is a sum over ranks)."""
    for group in plan.groups:
        for p, name in zip(group.params, group.names):
            if planning.is_dtensor(p) and any(pl.is_partial() for pl in p.placements):
                raise ValueError(f"{name} is a DTensor with a Partial placement: its value is a sum over ranks, "
                                 "which an optimizer update cannot be applied to. Redistribute it first.")


def check_grad_scale(grad_scale) -> float | torch.Tensor:
    """``step()``'s ``grad_scale`` validated: a float, or a 0-d float64 tensor on an accelerator."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must be a scalar, got shape {tuple(grad_scale.shape)}")
        if grad_scale.device.type != "cpu":
            return grad_scale.detach().reshape(()).to(torch.float64)  # used on its device, never read
        grad_scale = grad_scale.item()  # free on the host; as a tensor, a blocking copy to the device per step
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"grad_scale must be a number or a 0-d tensor, got {type(grad_scale).__name__}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be finite, got {grad_scale}")
    return float(grad_scale)
