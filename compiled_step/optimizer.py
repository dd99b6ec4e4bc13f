"""FusedOptimizer: FusedStep in the shape of a ``torch.optim.Optimizer``, for code that steps optimizers itself.

Trainers (HF Trainer, Accelerate, Lightning, a DDP loop) take an optimizer and call ``zero_grad()``,
``step(closure)``, ``state_dict()``, ``load_state_dict()`` on it, hand it to LR schedulers and to a
``GradScaler``, and check ``isinstance(optimizer, torch.optim.Optimizer)``. ``FusedOptimizer(optimizer, **options)``
is that object: its ``step()`` is ``FusedStep.step()`` (norm, clip and update in one pass), everything
else is the wrapped optimizer's own, shared rather than copied:

* ``param_groups``, ``state`` and ``defaults`` *are* the wrapped optimizer's (properties, so they stay the
  same objects even after ``load_state_dict`` replaces them inside it): LR schedulers built on either
  object write the lr FusedStep reads, and ``optimizer.state`` views agree;
* ``state_dict()`` is the wrapped optimizer's, plus FusedStep's own counters under ``"fused_step"``: one dict
  that ``torch.save``/``torch.load(weights_only=True)`` and the trainers' checkpointing carry, and that a
  plain ``torch.optim`` optimizer also loads (it ignores the extra key);
* ``zero_grad()`` zeroes in place (FusedStep's buffers are the grads).

A class of its own rather than ``FusedStep.as_optimizer()``: the trainers' recipes need one expression
(``FusedOptimizer(torch.optim.AdamW(...), max_grad_norm=1.0)``) where users build the optimizer, and
the ``optimizer`` argument leaves room for a list of optimizers under one grad norm later.

Lightning's ``LightningOptimizer`` subclasses the class of what it wraps and forwards missing attributes,
so methods here may run with a ``LightningOptimizer`` as ``self``: they never assign to ``self`` (what a
step records lives in ``_record``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from compiled_step import wrappers
from compiled_step.fused_step import FusedStep

FUSED_STATE_KEY = "fused_step"  # FusedStep's counters in FusedOptimizer.state_dict()


class _Record:
    """What steps leave behind: the last grad norm (one tensor updated in place) and the step count."""

    def __init__(self):
        self.norm: torch.Tensor | None = None
        self.steps = 0

    def norm_on(self, device: torch.device) -> torch.Tensor:
        if self.norm is None or self.norm.device != device:
            old = self.norm
            self.norm = torch.full((), float("nan"), dtype=torch.float64, device=device)
            if old is not None:
                self.norm.copy_(old)
        return self.norm


class FusedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step()`` is ``FusedStep``'s: clip + update of ``optimizer`` in one pass.

    Args:
        optimizer: a ``torch.optim.AdamW``, ``Adam`` or ``SGD`` (exact types). Wrap it *before* handing it to a
            trainer (``accelerator.prepare``, ``Trainer(optimizers=...)``, ``configure_optimizers``); wrappers
            trainers return are refused with what to pass instead.
        config, distributed, **options: as for ``FusedStep`` (``max_grad_norm=1.0``, ``model_parts=[model]``...).

    The trainer's own clipping must be off (FusedStep clips): ``compiled_step.integrations`` has the
    adapters that move it (HF Trainer's ``max_grad_norm``, Lightning's ``gradient_clip_val``).

    ``fused`` is the ``FusedStep``; ``optimizer`` the wrapped optimizer; ``grad_norm`` the last step's norm.
    Raises ``TypeError``/``ValueError`` as ``FusedStep`` does, before anything changes.
    """

    # GradScaler hands its scale to step() instead of unscaling the grads and syncing the host on its
    # inf flag; the step folds 1/scale into its grad scale (see _amp_grad_scale).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, config=None, distributed=None, **options):
        if isinstance(optimizer, (list, tuple)):
            raise TypeError("FusedOptimizer wraps one optimizer; several optimizers under one grad norm are not "
                            "supported yet")
        wrappers.refuse_wrapped(optimizer, "FusedOptimizer")
        self.fused = FusedStep(optimizer, config, distributed, **options)  # validates everything first
        self._record = _Record()
        # torch.optim.Optimizer.__init__ would build param groups of its own; only its hook tables are kept.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # ------------------------------------------------------------------ the wrapped optimizer's objects

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped ``torch.optim`` optimizer."""
        return self.fused.optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.fused.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.fused.optimizer.param_groups = value

    @property
    def state(self):
        return self.fused.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.fused.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.fused.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.fused.optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer; the next step rebuilds FusedStep's plan around it."""
        self.fused.optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ step

    @property
    def grad_norm(self) -> torch.Tensor:
        """The last step's total grad norm before clipping: a float64 0-d tensor on the params' device, NaN
        before the first step. It is **one tensor updated in place** by every step (no host sync), so a
        reference taken before ``step()`` reads that step's norm after it; ``clone()`` it to keep a value."""
        record = self._record
        return record.norm if record.norm is not None else record.norm_on(_params_device(self.fused.optimizer))

    @property
    def steps(self) -> int:
        """How many times ``step()`` ran (applied or skipped for a non-finite norm)."""
        return self._record.steps

    def step(self, closure=None, *, num_label_tokens=None, dp_group_size=None):
        """The fused step: evaluate ``closure`` (if given, under ``torch.enable_grad()`` as torch.optim does),
        then norm, clip and update in one pass. Returns the closure's loss (None without a closure).

        ``num_label_tokens``/``dp_group_size``: FusedStep's PP/EP scaling. Under a ``GradScaler``, its scale
        is applied here, and a step whose grads hold an inf or NaN is skipped, as GradScaler skips it. The step hooks
        registered on this object run around it (``register_step_pre_hook``: return ``(args, kwargs)`` to
        replace them, ``args`` starting with the optimizer, as torch.optim does); those registered on the
        wrapped optimizer and the global ones run inside ``FusedStep.step()``.
        """
        args, kwargs = (self, closure), {"num_label_tokens": num_label_tokens, "dp_group_size": dp_group_size}
        for hook in self._optimizer_step_pre_hooks.values():
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {result!r}")
                args, kwargs = result
        loss = _fused_step(*args, **kwargs)
        for hook in self._optimizer_step_post_hooks.values():
            hook(self, args, kwargs)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the grads **in place, whatever** ``set_to_none`` **says**: FusedStep's flat grad buffers are the
        grads (``p.grad`` is a view of them and autograd accumulates into it), so they persist between steps.
        ``set_to_none`` is accepted because trainers pass it (Accelerate's ``zero_grad`` passes True).

        As with torch's ``set_to_none=False``, a param that gets no grad in the next backward then has a zero
        grad and is stepped (weight decay, moment decay), where ``set_to_none=True`` would skip it. To skip
        such params, set the grads to None another way (``model.zero_grad()``): FusedStep points them back at
        its buffers when the backward writes them."""
        self.fused.zero_grad(set_to_none=False)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict()`` plus ``"fused_step"``: FusedStep's skip counter and last
        finite flag. Plain containers of tensors and numbers, so ``torch.load(weights_only=True)`` reads it."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = dict(self.fused.optimizer.state_dict())
        state_dict[FUSED_STATE_KEY] = self.fused.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what ``state_dict()`` returned, or a plain ``torch.optim`` state dict (FusedStep's counters are
        then left as they are). Works before the first step. On an error nothing is changed."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        own = state_dict.pop(FUSED_STATE_KEY, None)
        before = self.fused.state_dict()
        if own is not None:
            self.fused.load_state_dict(own)  # validates before changing anything
        try:
            self.fused.optimizer.load_state_dict(state_dict)  # raises before changing anything
        except BaseException:
            self.fused.load_state_dict(before)
            raise
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError("FusedOptimizer cannot be pickled or deep-copied (its FusedStep holds compiled graphs and "
                        "buffers); save state_dict() and load it into a new FusedOptimizer")

    def __repr__(self) -> str:
        inner = repr(self.fused.optimizer).replace("\n", "\n  ")
        c = self.fused.config
        return f"FusedOptimizer(max_grad_norm={c.max_grad_norm}, norm_type={c.norm_type},\n  {inner})"


def _fused_step(optimizer: FusedOptimizer, closure=None, *, num_label_tokens=None, dp_group_size=None):
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    norm = optimizer.fused.step(grad_scale=_amp_grad_scale(optimizer), num_label_tokens=num_label_tokens,
                                dp_group_size=dp_group_size)
    record = optimizer._record
    record.norm_on(norm.device).copy_(norm)
    record.steps += 1
    return loss


def _amp_grad_scale(optimizer: FusedOptimizer) -> torch.Tensor | None:
    """The factor FusedStep multiplies the grads by under a ``GradScaler`` (None without one, or when
    ``unscale_`` already ran).

    ``GradScaler.step`` sets ``optimizer.grad_scale`` (its scale; None after ``unscale_``) and
    ``optimizer.found_inf`` for optimizers with ``_step_supports_amp_scaling``. The factor is 1/scale.
    ``found_inf`` is not read: GradScaler computed it from the same grads the step norms, so a grad with
    an inf or NaN makes the step's norm non-finite and the step skips itself (``skipped_steps`` counts it),
    exactly the steps GradScaler skips, without reading the flag on the host.
    """
    scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    if scale is None and found_inf is None:
        return None
    if optimizer.fused.config.error_if_nonfinite:
        raise ValueError("error_if_nonfinite=True raises on the overflowing steps a GradScaler expects to skip; "
                         "use the default error_if_nonfinite=False with a GradScaler")
    return None if scale is None else torch.as_tensor(scale).to(torch.float64).reciprocal().reshape(())


def _params_device(optimizer: torch.optim.Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
