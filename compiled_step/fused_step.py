"""FusedStep: one compiled step replacing ``clip_grad_norm_`` + ``optimizer.step()``.

This module is the public surface: ``FusedStep`` is a ``torch.optim.Optimizer`` (and a
``torch.distributed.checkpoint`` ``Stateful``) whose ``param_groups``, ``state`` and ``defaults`` are the wrapped
optimizers'; it checks arguments before anything changes, runs the hooks, and saves and loads checkpoints
(``state_dicts.py``). What a step does to memory (build, bind, run, undo) is the engine's (``engine.py``); the
README's "How a step runs" draws it.
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType

import torch

from compiled_step import grad_scaling, planning, program, state_dicts, state_dtypes
from compiled_step.config import DistributedConfig, FusedStepConfig, split_options
from compiled_step.engine import Engine
from compiled_step.health import TrainingHealth
from compiled_step.lifecycle import fp8 as fp8_lifecycle
from compiled_step.lifecycle.fp8_step import Fp8Weights
from compiled_step.lifecycle.fsdp import GradAccumulation
from compiled_step.optimizers import Optimizers


class FusedStep(torch.optim.Optimizer):
    """One compiled step replacing ``clip_grad_norm_(params, max_grad_norm, norm_type)`` + ``optimizer.step()``.

    The optimizer stays the source of truth: hyperparameters are read from ``param_groups`` every
    step and state lives in ``optimizer.state`` in torch's own format, so ``state_dict()``, LR
    schedulers and switching to ``optimizer.step()`` at any step keep working.

    FusedStep is a ``torch.optim.Optimizer`` itself, for trainers (HF Trainer, Accelerate, Lightning, a DDP
    loop) and LR schedulers: ``param_groups``, ``state`` and ``defaults`` *are* the wrapped optimizer's
    (properties, so they stay the same objects after its ``load_state_dict`` replaces them); with several
    optimizers ``param_groups`` lists all their groups in order (the same dicts) and ``state`` is a read-only
    view of all of theirs. ``FusedOptimizer`` is the same class.

    Lightning's ``LightningOptimizer`` subclasses the class of what it wraps and forwards missing attributes to
    it, so the methods it does not define (``zero_grad``, ``state_dict``, ``load_state_dict``, the properties)
    may run with a ``LightningOptimizer`` as ``self``: they assign nothing to ``self`` (what steps leave behind
    is written in place into tensors made in ``__init__``).

    Args:
        optimizer: a ``torch.optim.AdamW``, ``Adam``, ``SGD`` or ``Muon`` (exact types), or a list or
            tuple of them (e.g. ``[muon, adamw]``): one total norm over all their params clips all of
            them, and each is updated by its own rule in the same prepared step. Trainers' wrappers
            (``AcceleratedOptimizer``, ``LightningOptimizer``, torchtitan's ``OptimizersContainer``) and
            another ``FusedStep`` are refused with what to pass instead (``wrappers.py``): wrap *before*
            handing it to a trainer.
        config: a ``FusedStepConfig``, or pass its fields as keywords (``max_grad_norm=1.0``...).
        distributed: a ``DistributedConfig``, or pass its fields as keywords (``model_parts``,
            ``device_mesh``, ``pp_axis_name``, ``moe_mesh``, ``ep_axis_name``,
            ``expert_tp_replication_factor``).
        fp8_weights: params whose FP8 scales the step computes (default: torchao float8 FSDP2
            weights found in ``model_parts``).
        fp8_dtype: their float8 format.
        first_microbatch_flag: TransformerEngine's ``is_first_microbatch`` flag to drive.
        offload_optimizer_state: keep optimizer state on the CPU between steps.

    The trainer's own clipping must be off (FusedStep clips): ``compiled_step.integrations`` has the
    adapters that move it (HF Trainer's ``max_grad_norm``, Lightning's ``gradient_clip_val``).

    Raises ``TypeError``/``ValueError`` for unsupported optimizers or options, before anything changes.
    """

    # GradScaler hands itself to step() (step takes ``grad_scaler``) instead of unscaling and checking every
    # grad in a pass of its own (see grad_scaling.py).
    _step_supports_amp_scaling = True

    def __init__(self, optimizer, config: FusedStepConfig | None = None,
                 distributed: DistributedConfig | None = None, *, fp8_weights=None,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 first_microbatch_flag: fp8_lifecycle.FirstMicrobatchFlag | None = None,
                 offload_optimizer_state: bool = False, **options):
        self._optimizers = Optimizers(optimizer)  # refuses trainers' wrappers, saying what to pass instead
        self.config, self.distributed = split_options(options, config, distributed)
        if not isinstance(offload_optimizer_state, bool):
            raise TypeError("offload_optimizer_state must be a bool")
        opts = self._optimizers
        planning.check_params([g["params"] for g in opts.groups()], {}, opts.labels())
        opts.hyperparameters()  # validates every group now
        self._fp8 = Fp8Weights(self.distributed.model_parts, fp8_weights, fp8_dtype, opts.groups())
        self.first_microbatch = first_microbatch_flag or fp8_lifecycle.default_first_microbatch_flag()
        self._accumulation: GradAccumulation | None = None
        self._health = TrainingHealth(self.config)  # the training-health options' state and attributes
        self._steps = 0
        for o in opts.items:  # a resume keeps bfloat16 moments bfloat16 (torch's load casts them to the params')
            state_dtypes.keep_saved_state_dtypes(o)
        self._engine = Engine(opts, self.config, self.distributed, fp8=self._fp8, health=self._health,
                              offload_optimizer_state=offload_optimizer_state)
        # torch.optim.Optimizer's own set-up of its hook tables and of the wrapper that runs the step hooks
        # (global ones included) around step(), without the param groups and state Optimizer.__init__ would
        # build: they are the wrapped optimizers' (the properties below). Like an unpickled torch optimizer,
        # it adds differentiable=False to ``defaults`` when missing (Muon's lack it; FusedStep refuses True).
        torch.optim.Optimizer.__setstate__(self, {})

    # ------------------------------------------------------------------ public API

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The optimizers this FusedStep steps, in order."""
        return self._optimizers.items

    @property
    def rules(self) -> tuple:
        """The update rule of every param group, the optimizers' groups in order (``rules.UpdateRule``)."""
        return tuple(self._optimizers.group_rules())

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer this FusedStep steps (with several, use ``optimizers``)."""
        if len(self._optimizers) != 1:
            raise AttributeError(f"this FusedStep steps {len(self._optimizers)} optimizers: use .optimizers")
        return self._optimizers.items[0]

    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's ``param_groups`` (with several, all their groups in order: the same dicts)."""
        optimizers = self._optimizers.items
        return optimizers[0].param_groups if len(optimizers) == 1 else self._optimizers.groups()

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self._single("param_groups are set").param_groups = value

    @property
    def state(self):
        """The wrapped optimizer's ``state`` (with several, a read-only view of all of theirs)."""
        optimizers = self._optimizers.items
        if len(optimizers) == 1:
            return optimizers[0].state
        return MappingProxyType({p: st for o in optimizers for p, st in o.state.items()})

    @state.setter
    def state(self, value) -> None:
        self._single("state is set").state = value

    @property
    def defaults(self) -> dict:
        """The wrapped optimizer's ``defaults`` (with several, the first's)."""
        return self._optimizers.items[0].defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self._single("defaults are set").defaults = value

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer; the next step rebuilds the plan around it."""
        self._single("a param group is added").add_param_group(param_group)

    def _single(self, what: str) -> torch.optim.Optimizer:
        optimizers = self._optimizers.items
        if len(optimizers) != 1:
            raise TypeError(f"this FusedStep wraps {len(optimizers)} optimizers: the {what} on one of them "
                            "(fused.optimizers[k])")
        return optimizers[0]

    @property
    def grad_norm(self) -> torch.Tensor:
        """The last step's total grad norm before clipping: a float64 0-d tensor on the params' device, NaN
        before the first step. It is **one tensor updated in place** by every step (no host sync), so a
        reference taken before ``step()`` reads that step's norm after it; ``clone()`` it to keep a value
        (``step()`` returns such a copy). A new tensor only if the params move to another device."""
        return self._engine.output_views[0]

    @property
    def steps(self) -> int:
        """How many times ``step()`` ran (applied or skipped for a non-finite norm or a spike)."""
        return self._steps

    def step(self, closure=None, *, grad_scale: float | torch.Tensor | None = None,
             num_label_tokens: int | torch.Tensor | None = None, dp_group_size: int | None = None,
             loss: float | torch.Tensor | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        """Scale, norm, clip and update in one pass over memory.

        Args:
            closure: as for any ``torch.optim`` optimizer: called first (under ``torch.enable_grad()``) to
                compute the loss and the grads; its result is returned.
            grad_scale: multiply every grad by this factor before the norm and the update (a
                number or a 0-d tensor; folded into the compiled math, no extra pass).
            num_label_tokens, dp_group_size: NeMo Automodel's PP/EP scaling. With PP on
                (``pp_axis_name``) grads are divided by ``num_label_tokens / dp_group_size``; with
                ``moe_mesh`` given, expert grads are further divided by ``(dp_group_size /
                ep_shard_size) * expert_tp_replication_factor``. ``num_label_tokens`` may be a 0-d
                device tensor. A CPU tensor (``grad_scale`` too) is read on the host, like a number.
            loss: with ``skip_spike_sigma``, this step's loss (a one-element tensor, read on the device,
                or a number): the step is also skipped when it is a spike of the losses of the last
                ``spike_window`` applied steps given one. Pass the same value on every rank.
            grad_scaler: what ``GradScaler.step`` passes (torch's contract for optimizers that handle
                scaling): its scale is undone inside the step, a step whose grads hold an inf or NaN is
                skipped, as GradScaler skips it, and that found-inf is recorded (a device tensor) for
                ``scaler.update()``; GradScaler reads no grad itself (``grad_scaling.py``).

        Returns:
            Without a closure, the total norm of the (scaled) grads before clipping: a float64 0-d tensor
            on the params' device, a new one each step (``grad_norm`` is the one updated in place); with a
            closure, the closure's result, as ``torch.optim`` returns it. Nothing in this call reads a
            device value on the host, unless ``error_if_nonfinite=True``. When the norm is NaN/inf the
            update is skipped with params, state and step counters left bit-identical, and
            ``skipped_steps`` counts it.

        The step hooks registered on this object (and torch's global ones) run around it, through
        ``torch.optim.Optimizer``'s own wrapper; those registered on the wrapped optimizers run inside it.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__} (step's other arguments are "
                            "keywords: step(grad_scale=...))")
        amp_scale = grad_scaling.grad_scale_of(self, grad_scaler, self.config.error_if_nonfinite)  # validates
        if amp_scale is not None and grad_scale is not None:
            raise ValueError("step(grad_scale=...) under a GradScaler: the scaler's scale is undone by the step; "
                             "pass grad_scale or use the GradScaler, not both")
        if num_label_tokens is None and self._accumulation is not None:
            num_label_tokens = self._accumulation.num_label_tokens  # counted by accumulate()
        scales = self._engine.grad_scales(amp_scale if amp_scale is not None else grad_scale, num_label_tokens,
                              dp_group_size)  # validates, changes nothing
        loss = self._health.check_loss(loss)
        values = self._optimizers.hyperparameters()  # validates before the closure and the hooks run
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        norm = self._update(scales, loss, values if closure is None else None)
        if grad_scaling.scaling(grad_scaler):
            grad_scaling.record_found_inf(self, grad_scaler, self.last_step_finite)
        self._steps += 1
        return norm if closure is None else result

    @torch.no_grad()
    def _update(self, scales: tuple, loss: float | torch.Tensor | None, values: list | None) -> torch.Tensor:
        """The step after the checks and the closure: ``values`` are the hyperparameters read before them (None
        after a closure, which may change them)."""
        opts = self._optimizers
        self._accumulation = None
        if opts.run_hooks("pre") or values is None:
            values = opts.hyperparameters()  # read again: a pre-hook or the closure may change them
        norm = self._engine.step(values, scales, loss)
        opts.mark_stepped()
        # Weights changed: FP8 weights TransformerEngine cached on the first microbatch are stale.
        self.first_microbatch.reset()
        opts.run_hooks("post")
        return norm

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the grads in place (default), so autograd and FSDP2 accumulate into the same buffers.

        ``set_to_none=True`` is ``optimizer.zero_grad()`` (torch's default, which Accelerate passes): grads
        become None, and a param that gets no grad in the next backward is skipped, as torch skips it. In
        the next backward, a hook on each param points the grad back at its view of the buffers (see
        ``grad_restore.py``), so the step copies nothing; FSDP2's sharded grads, which FSDP2 assigns
        itself, are copied in by the next ``step()``.
        """
        self._engine.zero_grads(set_to_none)

    def accumulate(self, num_microbatches: int):
        """Context manager for one step's gradient accumulation over ``num_microbatches``.

        Drives every FSDP2 module in ``model_parts``: no reduce-scatter and no reshard after
        backward until the last microbatch, the right flags before the last backward, everything
        restored afterwards (also when an exception escapes). Drives the first-microbatch flag
        (True, then False; ``step()`` resets it to None). Tokens added with ``acc.add_tokens(n)``
        (ints or 0-d tensors, no sync) become ``step()``'s ``num_label_tokens`` unless it is given::

            with fused.accumulate(4) as acc:
                for mb in acc.split(batch):
                    loss_fn(model(mb)).backward()
                    acc.add_tokens((mb["labels"] != -100).sum())
            fused.step(dp_group_size=dp)
        """
        accumulation = GradAccumulation(list(self.distributed.model_parts), num_microbatches,
                                        pp_enabled=self._engine.pp_group is not None, fp8_flag=self.first_microbatch)
        return self._accumulate(accumulation)

    @contextlib.contextmanager
    def _accumulate(self, accumulation: GradAccumulation):
        self._accumulation = None
        with accumulation:
            yield accumulation
        # Reached only when the block ended normally: a failed step's tokens never reach step().
        self._accumulation = accumulation

    @property
    def pending_num_label_tokens(self) -> int | torch.Tensor | None:
        """The token count of the last ``accumulate()`` block, which the next ``step()`` uses as its
        ``num_label_tokens`` (None once a step consumed it, or when no block ended normally)."""
        return self._accumulation.num_label_tokens if self._accumulation is not None else None

    @property
    def last_step_copied_grads(self) -> tuple[str, ...]:
        """Names of the params whose grads the last ``step()`` copied into the grad buffers (grads that
        were not FusedStep's views: assigned, re-pointed by DDP, or made by FSDP2). Empty when none."""
        return self._engine.copied_grads()

    @property
    def engine(self) -> Engine:
        """What builds, binds and runs the steps (``engine.py``): the current plan's ``storage`` (its buffers),
        ``built.program`` and ``built.runner``, for tools and tests that inspect them. Not a stable API."""
        return self._engine

    @property
    def offload_optimizer_state(self) -> bool:
        """Whether optimizer state is kept on the CPU between steps (the constructor's argument)."""
        return self._engine.offload_optimizer_state

    @offload_optimizer_state.setter
    def offload_optimizer_state(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError("offload_optimizer_state must be a bool")
        self._engine.offload_optimizer_state = value

    @property
    def plan(self) -> planning.Plan | None:
        """The current plan (read-only; None before the first step)."""
        built = self._engine.built
        return built.plan if built is not None else None

    @property
    def program(self) -> program.Program | None:
        """The prepared calls of the current plan (read-only; None before the first step)."""
        built = self._engine.built
        return built.program if built is not None else None

    @property
    def cuda_graph_captured(self) -> bool:
        """Whether the current plan's step is replayed as CUDA graphs (CUDA params, after two steps)."""
        built = self._engine.built
        return built is not None and built.runner.captured

    @property
    def skipped_steps(self) -> torch.Tensor:
        """int64 0-d tensor: steps skipped for a non-finite norm (updated in place)."""
        return self._engine.output_views[2]

    @property
    def last_step_finite(self) -> torch.Tensor:
        """bool 0-d tensor: whether the last total norm was finite (updated in place; True before the first
        step); with ``skip_spike_sigma`` a finite step may still be skipped (``spike_skipped_steps``)."""
        return self._engine.output_views[1]

    # ------------------------------------------------------------------ training health (``health.py``)

    @property
    def param_norms(self) -> torch.Tensor | None:
        """float64 ``[N]`` on the params' device (``param_norms=True``): the pre-clip norm (of ``norm_type``)
        of each param's scaled grad at the last step, in the order of the optimizer's ``param_groups``.

        Global for sharded params. Updated in place by every step (clone it to keep it); a new tensor
        after the params change. None before the first step or with ``param_norms=False``.
        """
        return self._health.param_norms

    def param_norms_by_name(self) -> dict[str, float]:
        """``{name: norm}`` of the last step, for logging; names from ``model_parts`` (else
        ``param_groups[i][j]``). **Reads the device**: one copy of ``param_norms`` to the host (a sync
        on an accelerator), so call it when you log, not every step."""
        return self._health.param_norms_by_name()

    @property
    def spike_skipped_steps(self) -> torch.Tensor | None:
        """int64 0-d tensor (``skip_spike_sigma``): steps skipped for a norm or loss spike, apart from
        ``skipped_steps`` (non-finite norms). Updated in place."""
        return self._health.spike_skipped_steps

    @property
    def clip_coef(self) -> torch.Tensor | None:
        """float64 0-d tensor: the clip coefficient the last step's update applied to the scaled grads
        (1 when not clipped; ZClip's with ``adaptive_clip``). Written by the step when any
        training-health option is on, else None. Updated in place."""
        return self._health.clip_coef

    @property
    def fp8_targets(self) -> list:
        """The torchao float8 FSDP2 weights (``Float8FSDPWeight``) whose scales ``step()`` stores."""
        return list(self._fp8.targets)

    @property
    def fp8_amax(self) -> torch.Tensor | None:
        """float32 ``[n_fp8]``: max |w| of each FP8 weight after the last step (updated in place)."""
        return self._fp8.amax

    @property
    def fp8_scales(self) -> torch.Tensor | None:
        """float32 ``[n_fp8]``: their FP8 scales, as torchao computes them (updated in place)."""
        return self._fp8.scales

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict()`` plus ``"fused_step"``: FusedStep's own state, the skip
        counter and the last step's finite flag (0-d tensors) and the training-health options' state (spike
        windows and counter, ZClip's statistics); with several optimizers, their state dicts are a list under
        ``"optimizers"`` (``state_dicts.py``). Plain containers of tensors and numbers, so
        ``torch.load(weights_only=True)`` reads it and a plain ``torch.optim`` optimizer loads it; the tensors
        are the optimizer's own, as torch returns them (deep-copy to keep a snapshot while training on).

        FusedStep is a ``torch.distributed.checkpoint`` ``Stateful``: pass it to ``dcp.save``/``dcp.load``.
        The state-dict hooks registered on it run around this (``register_state_dict_pre_hook``...).
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        _, finite, skipped = self._engine.output_views
        own = {"skipped_steps": skipped.clone(), "last_step_finite": finite.clone(), **self._health.state_dict()}
        state_dict = state_dicts.combined(self._optimizers.items, own)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what ``state_dict()`` returned, a plain ``torch.optim`` state dict (FusedStep's own state then
        stays as it is), or what ``FusedOptimizer.state_dict()`` and ``FusedStep.state_dict()`` returned before
        issue 23 (the latter held FusedStep's own state only: the optimizer's then stays as it is; load it into
        the optimizer, as before). Works before the first step. Raises ``KeyError``/``TypeError``/``ValueError``
        before changing anything."""
        state_dict = dict(state_dict)  # shallow copy, as torch's load_state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        own, parts = state_dicts.split(state_dict, len(self._optimizers))
        counters = state_dicts.counters(own) if own is not None else None
        if own is not None:
            self._health.check_state_dict(own)
        if parts is not None:
            state_dicts.load_optimizers(self._optimizers.items, parts)
        if counters is not None:
            _, finite, skipped = self._engine.outputs
            skipped.copy_(counters["skipped_steps"])
            finite.copy_(counters["last_step_finite"])
            self._health.load_state_dict(own)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError("FusedStep cannot be pickled or deep-copied (it holds compiled graphs and buffers); save "
                        "state_dict() and load it into a new FusedStep")

    def __repr__(self) -> str:
        c = self.config
        lines = [f"FusedStep({self._optimizers.type_names()}, max_grad_norm={c.max_grad_norm}, "
                 f"norm_type={c.norm_type}, compile={c.compile}, flat_params={c.flat_params}, "
                 f"bucket_size={c.bucket_size}, cuda_graphs={c.cuda_graphs})"]
        built = self._engine.built
        if built is None:
            lines.append("  plan: not built yet (built by the first step)")
        else:
            lines += ["  " + line for line in built.plan.describe()]
            lines.append(f"  program: {len(built.program.calls)} calls"
                         f"{', captured as CUDA graphs' if built.runner.captured else ''}")
        return "\n".join(lines)


FusedOptimizer = FusedStep  # the name the trainers' recipes use: one class

