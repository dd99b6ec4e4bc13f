"""Adapters for the trainers people train with, one small module per trainer.

* :mod:`compiled_step.integrations.transformers` -- ``FusedTrainer``, HF ``Trainer`` with FusedStep as its
  step (needs ``transformers``);
* :mod:`compiled_step.integrations.lightning` -- ``FusedStepCallback`` for ``pytorch_lightning.Trainer``
  (needs ``pytorch_lightning``).

Accelerate and a plain DDP loop need no adapter: ``compiled_step.FusedOptimizer`` is the optimizer they
step (see the README's "Where you train"). Each module imports its framework when it is imported; this
package and ``compiled_step`` import none of them.
"""
