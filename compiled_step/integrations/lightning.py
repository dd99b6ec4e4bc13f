"""Lightning: ``FusedStepCallback`` makes a ``pytorch_lightning.Trainer`` step with FusedStep (tested with 2.6.6).

    from compiled_step.integrations.lightning import FusedStepCallback
    trainer = pl.Trainer(max_steps=100, gradient_clip_val=1.0, callbacks=[FusedStepCallback()])

The module, its ``configure_optimizers`` and the Trainer's arguments stay as they are. Through public
Lightning hooks and attributes only:

* ``setup`` (fit): ``trainer.gradient_clip_val`` becomes FusedStep's ``max_grad_norm`` and is set to None
  for the run (restored at ``teardown``), so Lightning's ``clip_grad_norm_`` pass inside the closure is
  gone; FusedStep clips inside the step. ``gradient_clip_algorithm="value"`` is refused.
* ``on_fit_start`` (after ``configure_optimizers``, before a checkpoint's optimizer state is restored):
  every optimizer in ``trainer.strategy.optimizers`` is wrapped in ``FusedOptimizer`` (one already a
  ``FusedOptimizer`` is kept). Lightning's ``LightningOptimizer`` then wraps that: its step runs the
  closure (forward, backward) and FusedStep's step, and counts ``global_step``, so ``max_steps``, LR
  scheduler intervals and ``ModelCheckpoint`` work; checkpoints carry ``FusedOptimizer.state_dict()``.
* ``on_train_batch_end``: after a batch whose optimizer stepped, FusedStep's grad norm is logged with
  ``pl_module.log(log_grad_norm, ...)`` (on step; ``grad_norm``, or ``grad_norm_<i>`` per optimizer when
  there are several).

Returning ``FusedOptimizer(...)`` from ``configure_optimizers`` works without the callback too; then
leave ``gradient_clip_val`` unset (Lightning would clip first, a second pass) and pass ``max_grad_norm``.
"""

from __future__ import annotations

import pytorch_lightning as pl

from compiled_step.fused_step import FusedOptimizer

TESTED_VERSION = "2.6.6"


class FusedStepCallback(pl.Callback):
    """Step every optimizer of the run with FusedStep, clipping at ``Trainer(gradient_clip_val=...)``.

    Args:
        log_grad_norm: the name FusedStep's grad norm is logged under after each step (None: not logged).
        **options: further ``FusedStep`` options (``compile_notice=False``, ``bucket_size``...); not
            ``max_grad_norm`` (it is ``gradient_clip_val``) nor ``model_parts`` (the LightningModule).
    """

    def __init__(self, *, log_grad_norm: str | None = "grad_norm", **options):
        for key in ("max_grad_norm", "model_parts"):
            if key in options:
                raise ValueError(f"FusedStepCallback takes {key} from "
                                 f"{'Trainer(gradient_clip_val=...)' if key == 'max_grad_norm' else 'the module'}")
        if log_grad_norm is not None and not isinstance(log_grad_norm, str):
            raise TypeError(f"log_grad_norm must be a name or None, got {type(log_grad_norm).__name__}")
        self.log_grad_norm = log_grad_norm
        self.options = options
        self._trainer_clip: tuple | None = None  # (gradient_clip_val) taken from the Trainer, restored at teardown
        self._max_grad_norm: float | None = None
        self._steps_logged: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clip = trainer.gradient_clip_val
        algorithm = trainer.gradient_clip_algorithm
        if clip and algorithm is not None and str(getattr(algorithm, "value", algorithm)) == "value":
            raise ValueError(f"FusedStepCallback clips by norm; Trainer(gradient_clip_algorithm='value', "
                             f"gradient_clip_val={clip}) clips every element. Use gradient_clip_algorithm='norm'.")
        self._max_grad_norm = float(clip) if clip else None
        self._trainer_clip = (clip,)
        trainer.gradient_clip_val = None  # FusedStep clips inside the step: no clip_grad_norm_ pass first

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = []
        for index, optimizer in enumerate(trainer.strategy.optimizers):
            if isinstance(optimizer, FusedOptimizer):
                ours = optimizer.config.max_grad_norm
                if self._max_grad_norm is not None and ours != self._max_grad_norm:
                    raise ValueError(f"optimizer {index} is a FusedOptimizer clipping at max_grad_norm={ours}, but "
                                     f"Trainer(gradient_clip_val={self._max_grad_norm}): set one of them")
                wrapped.append(optimizer)
            else:
                wrapped.append(FusedOptimizer(optimizer, max_grad_norm=self._max_grad_norm, model_parts=[pl_module],
                                              **self.options))
        trainer.strategy.optimizers = wrapped  # Lightning re-wraps them in LightningOptimizers
        self._steps_logged = [o.steps for o in wrapped]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.log_grad_norm is None:
            return
        optimizers = [o for o in trainer.strategy.optimizers if isinstance(o, FusedOptimizer)]
        for index, optimizer in enumerate(optimizers):
            if optimizer.steps == self._steps_logged[index]:
                continue  # accumulating: no step in this batch
            self._steps_logged[index] = optimizer.steps
            name = self.log_grad_norm if len(optimizers) == 1 else f"{self.log_grad_norm}_{index}"
            pl_module.log(name, optimizer.grad_norm, on_step=True, on_epoch=False, batch_size=1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._trainer_clip is not None:
            trainer.gradient_clip_val = self._trainer_clip[0]
            self._trainer_clip = None
