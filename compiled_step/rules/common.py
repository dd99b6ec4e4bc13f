"""Helpers shared by the update rules."""

from __future__ import annotations

import numbers

import torch


def host_float(value, *, name: str) -> float:
    """Read a hyperparameter as a Python float without touching an accelerator.

    ``torch.optim`` accepts tensors for some hyperparameters (lr, betas, weight_decay). A 0-d
    CPU tensor is read on the host, exactly as torch.optim's own non-capturable path does with
    ``.item()``. A tensor on an accelerator would force a device-to-host sync every step, which
    FusedStep promises never to do, so it is refused.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"hyperparameter {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            raise ValueError(
                f"hyperparameter {name!r} is a tensor on {value.device}; FusedStep reads hyperparameters on the host "
                "each step and would have to sync the device. Keep it as a Python number or a CPU tensor."
            )
        if value.requires_grad:
            raise ValueError(f"hyperparameter {name!r} requires grad; differentiable optimizers are not supported")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"hyperparameter {name!r} must be a real number, got {type(value).__name__}")
    return float(value)


def reject_common_options(group: dict, kind: str) -> None:
    """Options that change semantics in ways the compiled step does not reproduce."""
    if group.get("differentiable", False):
        raise ValueError(
            f"{kind}(differentiable=True) is not supported: FusedStep updates params in place under no_grad "
            "and cannot build an autograd graph through the optimizer step."
        )
