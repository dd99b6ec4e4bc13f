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
(``FusedOptimizer(torch.optim.AdamW(...), max_grad_norm=1.0)``) where users build the optimizer.

Several optimizers under one grad norm (``FusedOptimizer([muon, adamw], max_grad_norm=1.0)``) look like
one to a trainer: ``param_groups`` lists every optimizer's groups in order (the same dicts, so an LR
scheduler built on the wrapper drives them all), ``state`` is a read-only view of every optimizer's
state, and ``state_dict()`` holds each optimizer's under ``"optimizers"``.

Lightning's ``LightningOptimizer`` subclasses the class of what it wraps and forwards missing attributes,
so methods here may run with a ``LightningOptimizer`` as ``self``: they never assign to ``self`` (what a
step records lives in ``_record``).
"""

from __future__ import annotations

from collections import OrderedDict
from types import MappingProxyType

import torch
from torch.amp.grad_scaler import OptState

from compiled_step import wrappers
from compiled_step.fused_step import FusedStep

FUSED_STATE_KEY = "fused_step"  # FusedStep's counters in FusedOptimizer.state_dict()
OPTIMIZERS_KEY = "optimizers"  # with several optimizers, their state dicts, in order


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
        optimizer: a ``torch.optim.AdamW``, ``Adam``, ``SGD`` or ``Muon`` (exact types), or a list of them
            (one grad norm over all). Wrap it *before* handing it to a trainer (``accelerator.prepare``,
            ``Trainer(optimizers=...)``, ``configure_optimizers``); wrappers trainers return are refused with
            what to pass instead.
        config, distributed, **options: as for ``FusedStep`` (``max_grad_norm=1.0``, ``model_parts=[model]``...).

    The trainer's own clipping must be off (FusedStep clips): ``compiled_step.integrations`` has the
    adapters that move it (HF Trainer's ``max_grad_norm``, Lightning's ``gradient_clip_val``).

    ``fused`` is the ``FusedStep``; ``optimizer`` the wrapped optimizer; ``grad_norm`` the last step's norm.
    Raises ``TypeError``/``ValueError`` as ``FusedStep`` does, before anything changes.
    """

    # GradScaler hands itself to step() (step takes ``grad_scaler``) instead of unscaling and checking every
    # grad in a pass of its own; the step folds 1/scale into its grad scale and records found-inf from its
    # own norm (see _amp_grad_scale, _record_found_inf).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer, config=None, distributed=None, **options):
        for item in optimizer if isinstance(optimizer, (list, tuple)) else (optimizer,):
            wrappers.refuse_wrapped(item, "FusedOptimizer")
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
        """The wrapped ``torch.optim`` optimizer (with several, ``optimizers``)."""
        return self.fused.optimizer

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The wrapped optimizers, in order."""
        return self.fused.optimizers

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's ``param_groups`` (with several, all their groups in order: the same dicts)."""
        optimizers = self.fused.optimizers
        if len(optimizers) == 1:
            return optimizers[0].param_groups
        return [group for o in optimizers for group in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self._single("param_groups are set").param_groups = value

    @property
    def state(self):
        """The wrapped optimizer's ``state`` (with several, a read-only view of all of theirs)."""
        optimizers = self.fused.optimizers
        if len(optimizers) == 1:
            return optimizers[0].state
        return MappingProxyType({p: st for o in optimizers for p, st in o.state.items()})

    @state.setter
    def state(self, value) -> None:
        self._single("state is set").state = value

    @property
    def defaults(self) -> dict:
        """The wrapped optimizer's ``defaults`` (with several, the first's)."""
        return self.fused.optimizers[0].defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self._single("defaults are set").defaults = value

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer; the next step rebuilds FusedStep's plan around it."""
        self._single("a param group is added").add_param_group(param_group)

    def _single(self, what: str) -> torch.optim.Optimizer:
        optimizers = self.fused.optimizers
        if len(optimizers) != 1:
            raise TypeError(f"this FusedOptimizer wraps {len(optimizers)} optimizers: the {what} on one of them "
                            "(fused_optimizer.optimizers[k])")
        return optimizers[0]

    # ------------------------------------------------------------------ step

    @property
    def grad_norm(self) -> torch.Tensor:
        """The last step's total grad norm before clipping: a float64 0-d tensor on the params' device, NaN
        before the first step. It is **one tensor updated in place** by every step (no host sync), so a
        reference taken before ``step()`` reads that step's norm after it; ``clone()`` it to keep a value."""
        record = self._record
        return record.norm if record.norm is not None else record.norm_on(_params_device(self.param_groups))

    @property
    def steps(self) -> int:
        """How many times ``step()`` ran (applied or skipped for a non-finite norm)."""
        return self._record.steps

    def step(self, closure=None, *, num_label_tokens=None, dp_group_size=None, grad_scaler=None):
        """The fused step: evaluate ``closure`` (if given, under ``torch.enable_grad()`` as torch.optim does),
        then norm, clip and update in one pass. Returns the closure's loss (None without a closure).

        ``num_label_tokens``/``dp_group_size``: FusedStep's PP/EP scaling. ``grad_scaler``: what
        ``GradScaler.step`` passes (torch's contract for optimizers that handle scaling): its scale is applied
        here, a step whose grads hold an inf or NaN is skipped, as GradScaler skips it, and that found-inf is
        recorded (a device tensor) for ``scaler.update()``; GradScaler reads no grad itself. The step hooks
        registered on this object run around it (``register_step_pre_hook``: return ``(args, kwargs)`` to
        replace them, ``args`` starting with the optimizer, as torch.optim does); those registered on the
        wrapped optimizer and the global ones run inside ``FusedStep.step()``.
        """
        args = (self, closure)
        kwargs = {"num_label_tokens": num_label_tokens, "dp_group_size": dp_group_size, "grad_scaler": grad_scaler}
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
        optimizers = self.fused.optimizers
        if len(optimizers) == 1:
            state_dict = dict(optimizers[0].state_dict())
        else:
            state_dict = {OPTIMIZERS_KEY: [o.state_dict() for o in optimizers]}
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
        optimizers = self.fused.optimizers
        parts = [state_dict] if len(optimizers) == 1 else state_dict.get(OPTIMIZERS_KEY)
        if not isinstance(parts, list) or len(parts) != len(optimizers):
            raise ValueError(f"this FusedOptimizer wraps {len(optimizers)} optimizers; the state dict holds "
                             f"{'one optimizer' if OPTIMIZERS_KEY not in state_dict else len(parts)}")
        before = self.fused.state_dict()
        saved = [o.state_dict() for o in optimizers] if len(optimizers) > 1 else None
        if own is not None:
            self.fused.load_state_dict(own)  # validates before changing anything
        try:
            for o, part in zip(optimizers, parts):
                o.load_state_dict(part)  # each raises before changing anything
        except BaseException:
            self.fused.load_state_dict(before)
            for o, part in zip(optimizers, saved or ()):
                o.load_state_dict(part)  # the ones already loaded, back as they were
            raise
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError("FusedOptimizer cannot be pickled or deep-copied (its FusedStep holds compiled graphs and "
                        "buffers); save state_dict() and load it into a new FusedOptimizer")

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(o).replace("\n", "\n  ") for o in self.fused.optimizers)
        c = self.fused.config
        return f"FusedOptimizer(max_grad_norm={c.max_grad_norm}, norm_type={c.norm_type},\n  {inner})"


def _fused_step(optimizer: FusedOptimizer, closure=None, *, num_label_tokens=None, dp_group_size=None,
                grad_scaler=None):
    grad_scale = _amp_grad_scale(optimizer, grad_scaler)  # validates before anything changes
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    norm = optimizer.fused.step(grad_scale=grad_scale, num_label_tokens=num_label_tokens,
                                dp_group_size=dp_group_size)
    if _scaling(grad_scaler):
        _record_found_inf(optimizer, grad_scaler)
    record = optimizer._record
    record.norm_on(norm.device).copy_(norm)
    record.steps += 1
    return loss


def _scaling(grad_scaler) -> bool:
    if grad_scaler is None:
        return False
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return grad_scaler.is_enabled()


def _amp_grad_scale(optimizer: FusedOptimizer, grad_scaler=None) -> torch.Tensor | None:
    """The factor FusedStep multiplies the grads by under a ``GradScaler`` (None without one, or when
    ``unscale_`` already ran).

    For optimizers with ``_step_supports_amp_scaling`` whose ``step`` takes ``grad_scaler``, ``GradScaler.step``
    passes itself and leaves the grads alone: the factor is 1/its scale, unless the user's ``scaler.unscale_``
    already unscaled them (and recorded their found-inf). When ``step``'s signature hides the argument (a
    wrapper's ``step(*args, **kwargs)``, as Accelerate patches in), GradScaler instead checks the grads itself
    and sets ``optimizer.grad_scale`` (its scale; None after ``unscale_``) and ``optimizer.found_inf``.
    ``found_inf`` is never read: a grad with an inf or NaN makes the step's norm non-finite and the step skips
    itself (``skipped_steps`` counts it), exactly the steps GradScaler skips, without reading a flag on the host.
    """
    if _scaling(grad_scaler):
        unscaled = grad_scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED
        scale = None if unscaled else grad_scaler._get_scale_async()
    else:
        scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if scale is None and found_inf is None:
            return None
    if optimizer.fused.config.error_if_nonfinite:
        raise ValueError("error_if_nonfinite=True raises on the overflowing steps a GradScaler expects to skip; "
                         "use the default error_if_nonfinite=False with a GradScaler")
    return None if scale is None else torch.as_tensor(scale).to(torch.float64).reciprocal().reshape(())


def _record_found_inf(optimizer: FusedOptimizer, grad_scaler: torch.amp.GradScaler) -> None:
    """Give ``scaler.update()`` this step's found-inf, as GradScaler's own check would have: 1.0 when the
    step's norm was not finite (a grad held an inf or NaN: the step skipped itself), float32 on the params'
    device, made by a device op (no host sync). After the user's ``unscale_`` GradScaler recorded it already."""
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        return
    finite = optimizer.fused.last_step_finite
    state["found_inf_per_device"] = {finite.device: torch.logical_not(finite).to(torch.float32)}


def _params_device(param_groups: list[dict]) -> torch.device:
    for group in param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")
