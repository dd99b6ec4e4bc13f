"""FusedStep under a ``torch.amp.GradScaler``: torch's contract for optimizers that handle scaling themselves.

``FusedStep._step_supports_amp_scaling`` is True and its ``step`` takes ``grad_scaler``, so ``GradScaler.step``
passes itself instead of unscaling and checking every grad in a pass of its own: the step folds 1/scale into its
grad scale (``grad_scale_of``) and records found-inf from its own norm (``record_found_inf``).
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState


def scaling(grad_scaler) -> bool:
    """Whether ``grad_scaler`` (``step``'s argument) scales; raises ``TypeError`` for anything but a GradScaler."""
    if grad_scaler is None:
        return False
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler.is_enabled()


def grad_scale_of(optimizer: torch.optim.Optimizer, grad_scaler, error_if_nonfinite: bool) -> torch.Tensor | None:
    """The factor FusedStep multiplies the grads by under a ``GradScaler`` (None without one, or when
    ``unscale_`` already ran). Raises before anything changes.

    For optimizers with ``_step_supports_amp_scaling`` whose ``step`` takes ``grad_scaler``, ``GradScaler.step``
    passes itself and leaves the grads alone: the factor is 1/its scale, unless the user's ``scaler.unscale_``
    already unscaled them (and recorded their found-inf). When ``step``'s signature hides the argument (a
    wrapper's ``step(*args, **kwargs)``, as Accelerate patches in), GradScaler instead checks the grads itself
    and sets ``optimizer.grad_scale`` (its scale; None after ``unscale_``) and ``optimizer.found_inf``.
    ``found_inf`` is never read: a grad with an inf or NaN makes the step's norm non-finite and the step skips
    itself (``skipped_steps`` counts it), exactly the steps GradScaler skips, without reading a flag on the host.
    """
    if scaling(grad_scaler):
        unscaled = grad_scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED
        scale = None if unscaled else grad_scaler._get_scale_async()
    else:
        scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if scale is None and found_inf is None:
            return None
    if error_if_nonfinite:
        raise ValueError("error_if_nonfinite=True raises on the overflowing steps a GradScaler expects to skip; "
                         "use the default error_if_nonfinite=False with a GradScaler")
    return None if scale is None else torch.as_tensor(scale).to(torch.float64).reciprocal().reshape(())


def record_found_inf(optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler,
                     finite: torch.Tensor) -> None:
    """Give ``scaler.update()`` this step's found-inf, as GradScaler's own check would have: 1.0 when the
    step's norm was not ``finite`` (a grad held an inf or NaN: the step skipped itself), float32 on the params'
    device, made by a device op (no host sync). After the user's ``unscale_`` GradScaler recorded it already."""
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        return
    state["found_inf_per_device"] = {finite.device: torch.logical_not(finite).to(torch.float32)}
