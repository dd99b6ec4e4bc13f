"""HF ``Trainer`` whose optimizer step is FusedStep's: ``FusedTrainer`` (tested with transformers 5.25.0).

    from compiled_step.integrations.transformers import FusedTrainer
    trainer = FusedTrainer(model=model, args=args, train_dataset=train_dataset)   # was: Trainer(...)

What differs from ``Trainer``, and why:

* ``create_optimizer`` (public, documented for overriding): the optimizer Trainer builds from ``args``
  (or the one given as ``optimizers=(optimizer, scheduler)``) is wrapped in ``FusedOptimizer`` with
  ``max_grad_norm=args.max_grad_norm`` (None when it is <= 0). Its ``state_dict()`` carries AdamW's
  moments and FusedStep's counters, so ``optimizer.pt`` checkpoints and ``resume_from_checkpoint`` restore
  both.
* ``_clip_grad_norm`` and ``_get_grad_norm`` (private): Trainer clips with ``accelerator.clip_grad_norm_``
  before ``optimizer.step()`` and, with ``max_grad_norm <= 0``, still computes the norm for its log, each
  a pass over the grads. FusedStep clips inside its step, so both return ``FusedOptimizer.grad_norm``,
  the tensor every step writes its norm into; Trainer reads it (``.item()``) when it logs, after the
  step, so its ``grad_norm`` log is FusedStep's norm of that step. No public hook runs between the
  backward and that clip (``on_pre_optimizer_step`` runs after it), hence the private overrides: their
  names and parameters are checked when a ``FusedTrainer`` is built, and the test extra pins
  ``transformers==5.25.0``.
* Trainer's ``model.zero_grad()`` sets the grads to None every step; FusedStep points them back at its
  buffers before the next backward writes them.
"""

from __future__ import annotations

import inspect

import transformers
from transformers import Trainer

from compiled_step.fused_step import FusedOptimizer

TESTED_VERSION = "5.25.0"
# The private Trainer methods overridden below, with the parameters they had in TESTED_VERSION.
_OVERRIDDEN = {"_clip_grad_norm": ["self", "model"], "_get_grad_norm": ["self", "model", "grad_norm"]}


def _check_trainer_internals() -> None:
    for name, expected in _OVERRIDDEN.items():
        method = getattr(Trainer, name, None)
        found = list(inspect.signature(method).parameters) if callable(method) else None
        if found != expected:
            raise RuntimeError(
                f"FusedTrainer overrides Trainer.{name}({', '.join(expected)}), which transformers "
                f"{transformers.__version__} {'defines as ' + repr(found) if found else 'lacks'}; it was written for "
                f"transformers {TESTED_VERSION}. Install transformers=={TESTED_VERSION}, or use Trainer with "
                "optimizers=(FusedOptimizer(...), scheduler) and max_grad_norm=0 (Trainer then computes its own norm "
                "for the log, one extra pass over the grads).")


class FusedTrainer(Trainer):
    """``transformers.Trainer`` with FusedStep's fused clip + step (see the module docstring).

    Args:
        *args, **kwargs: as for ``Trainer``. ``args.max_grad_norm`` becomes FusedStep's ``max_grad_norm``.
        fused_options: further ``FusedStep`` options (``compile_notice=False``, ``bucket_size``...); not
            ``max_grad_norm`` (it comes from ``args``) nor ``model_parts`` (the model).

    Raises ``RuntimeError`` when this transformers lacks the methods overridden here, ``ValueError`` for
    DeepSpeed (its engine steps the optimizer itself) or for options that belong elsewhere.
    """

    def __init__(self, *args, fused_options: dict | None = None, **kwargs):
        _check_trainer_internals()
        fused_options = dict(fused_options or {})
        for key in ("max_grad_norm", "model_parts"):
            if key in fused_options:
                raise ValueError(f"fused_options[{key!r}]: FusedTrainer takes it from "
                                 f"{'args.max_grad_norm' if key == 'max_grad_norm' else 'the model'}")
        self._fused_options = fused_options
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            raise ValueError("FusedTrainer cannot drive DeepSpeed: its engine clips and steps the optimizer itself")

    def create_optimizer(self, model=None):
        """Trainer's optimizer (built from ``args``, or the one passed in), wrapped in ``FusedOptimizer``."""
        optimizer = super().create_optimizer(model)
        if _fused_inside(optimizer) is not None:
            self._check_max_grad_norm(_fused_inside(optimizer))
            return optimizer
        max_grad_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else None
        self.optimizer = FusedOptimizer(optimizer, max_grad_norm=max_grad_norm,
                                        model_parts=[self.model if model is None else model], **self._fused_options)
        return self.optimizer

    def _check_max_grad_norm(self, fused: FusedOptimizer) -> None:
        ours = fused.config.max_grad_norm
        theirs = self.args.max_grad_norm if self.args.max_grad_norm > 0 else None
        if ours != theirs:
            raise ValueError(f"The FusedOptimizer passed to FusedTrainer clips at max_grad_norm={ours}, but "
                             f"TrainingArguments(max_grad_norm={self.args.max_grad_norm}) asks for {theirs}: set one "
                             "value in both places (FusedTrainer hands args.max_grad_norm to the FusedOptimizer it "
                             "builds when given a plain optimizer).")

    def _fused_optimizer(self) -> FusedOptimizer:
        fused = _fused_inside(self.optimizer)
        if fused is None:
            raise RuntimeError(f"FusedTrainer's optimizer is {type(self.optimizer).__name__}, not a FusedOptimizer: "
                               "something replaced it after create_optimizer()")
        return fused

    # Private in transformers 5.25 (checked in __init__); see the module docstring for why.
    def _clip_grad_norm(self, model):
        return self._fused_optimizer().grad_norm  # FusedStep clips inside optimizer.step()

    def _get_grad_norm(self, model, grad_norm=None):
        return self._fused_optimizer().grad_norm  # filled in place by optimizer.step(), read when logging


def _fused_inside(optimizer) -> FusedOptimizer | None:
    """The FusedOptimizer in ``optimizer`` or under Accelerate's wrappers (their ``.optimizer``), or None."""
    while optimizer is not None and not isinstance(optimizer, FusedOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer
