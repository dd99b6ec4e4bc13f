"""Optimizer wrappers that trainers hand out, and what to pass to FusedStep instead.

Every wrapper below adds work to ``step()`` that a ``FusedStep`` built on the optimizer inside would
silently skip: Accelerate's ``AcceleratedOptimizer`` gates the step on gradient accumulation and applies
the ``GradScaler``; Lightning's ``LightningOptimizer`` counts the step (``trainer.global_step``, so
``max_steps``); torchtitan's ``OptimizersContainer`` steps several optimizers. So they are refused,
before anything changes, with the line that does work: ``FusedOptimizer`` goes *inside* the wrapper.

The frameworks are never imported here: an object can only be an instance of a class whose module is
already in ``sys.modules``, so the checks read ``sys.modules`` and stay torch-only.
"""

from __future__ import annotations

import sys

# (module, class name): one entry per place a framework defines the class.
_ACCELERATE = (("accelerate.optimizer", "AcceleratedOptimizer"),)
_LIGHTNING = (("pytorch_lightning.core.optimizer", "LightningOptimizer"),
              ("lightning.pytorch.core.optimizer", "LightningOptimizer"))
_TORCHTITAN = (("torchtitan.components.optimizer.optimizer", "OptimizersContainer"),
               ("torchtitan.components.optimizer", "OptimizersContainer"))
_FUSED = (("compiled_step.fused_step", "FusedStep"),)


def _is_instance(obj, places) -> bool:
    for module_name, class_name in places:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and isinstance(obj, cls):
            return True
    return False


def refuse_wrapped(optimizer, who: str) -> None:
    """Raise ``TypeError`` naming what to pass when ``optimizer`` is a trainer's wrapper (or a
    ``FusedStep``); return for anything else, which ``rule_for`` then checks.

    ``who`` is the class being built, for the message.
    """
    if _is_instance(optimizer, _LIGHTNING):
        inner = type(optimizer._optimizer).__name__
        raise TypeError(
            f"{who} got a LightningOptimizer (wrapping {inner}). Lightning counts trainer.global_step (and so "
            "max_steps) when that wrapper steps, so a step made beside it is never counted. Return "
            f"FusedOptimizer({inner}(...), max_grad_norm=...) from configure_optimizers (from compiled_step import "
            "FusedOptimizer), or add compiled_step.integrations.lightning.FusedStepCallback() to the Trainer's "
            "callbacks, which wraps the optimizers configure_optimizers returns. To step it yourself and count "
            f"steps yourself, pass optimizer.optimizer (the {inner}).")
    if _is_instance(optimizer, _ACCELERATE):
        inner = type(optimizer.optimizer).__name__
        raise TypeError(
            f"{who} got an AcceleratedOptimizer (wrapping {inner}): accelerator.prepare() has already wrapped it, "
            "and its step() skips steps during gradient accumulation and applies the GradScaler, which a "
            f"{who} built on the {inner} inside would bypass. Wrap before prepare: optimizer = "
            f"FusedOptimizer({inner}(...), max_grad_norm=...) (from compiled_step import FusedOptimizer), then "
            "accelerator.prepare(model, optimizer, ...). To step it yourself without those, pass "
            f"optimizer.optimizer (the {inner}).")
    if _is_instance(optimizer, _TORCHTITAN):
        inner = [type(o).__name__ for o in optimizer.optimizers]
        what = (f"pass container.optimizers[0] (the {inner[0]} inside) and step the {who} instead of the container"
                if len(inner) == 1 else
                f"several optimizers ({', '.join(inner)}) under one grad norm are not supported yet; one {who} per "
                "optimizer would clip each by its own norm, not by the global one the container's training loop "
                "computes")
        raise TypeError(f"{who} got torchtitan's OptimizersContainer, which steps {len(inner)} optimizer(s) together; "
                        f"{who} wraps one torch.optim optimizer: {what}.")
    # Last: a LightningOptimizer wrapping a FusedStep is an instance of FusedStep too (it subclasses its class).
    if _is_instance(optimizer, _FUSED):
        inner = [type(o).__name__ for o in optimizer.optimizers]
        pass_instead = f"fused.optimizer (the {inner[0]} inside)" if len(inner) == 1 else \
            f"fused.optimizers (the {', '.join(inner)} inside)"
        raise TypeError(
            f"{who} got a FusedStep (FusedOptimizer is the same class), which already steps its optimizer with the "
            f"fused step: use it as it is. To build another, pass {pass_instead}.")
