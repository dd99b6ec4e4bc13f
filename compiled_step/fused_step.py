"""FusedStep: one compiled step replacing ``clip_grad_norm_`` + ``optimizer.step()``.

The step is built in three parts (see the README's architecture section):

1. **build**, once per plan (``_build``): the plan (``planning.py``), the persistent buffers and
   the views users see (``storage.py``), the binder (``binding.py``) and the prepared program
   (``program.py``), run by ``cuda_graphs.Runner``;
2. **bind**, every step (``_bind``): identity checks, grads copied in only where they are not the
   installed views, state adopted only where it changed, one small copy of the hyperparameters;
3. **run**: the program's norm half (Phase A, collectives, finish) and update half (Phase B), or
   their CUDA graphs.

``FusedStep`` is itself a ``torch.optim.Optimizer`` (and a ``torch.distributed.checkpoint`` ``Stateful``), for
trainers that step optimizers themselves: ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizers'.

This module orchestrates; it holds no per-element math and calls ``torch.distributed`` only
through ``collectives.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from types import MappingProxyType

import torch

from compiled_step import agreement, binding, buckets, checks, collectives, compiling, cuda_graphs, experts, \
    grad_scaling, planning, program, state_dicts, storage
from compiled_step.config import DistributedConfig, FusedStepConfig, split_options
from compiled_step.health import TrainingHealth
from compiled_step.lifecycle import ddp, offload
from compiled_step.lifecycle import fp8 as fp8_lifecycle
from compiled_step.lifecycle.fp8_step import Fp8Weights
from compiled_step.lifecycle.fsdp import GradAccumulation
from compiled_step.norm import NormKind
from compiled_step.optimizers import Optimizers
from compiled_step.rules import MATRIX


@dataclass
class _Built:
    """Everything built for one plan."""

    plan: planning.Plan
    groups: list[storage.GroupBuffers]
    buffers: storage.StepBuffers
    binder: binding.Binder
    program: program.Program
    runner: cuda_graphs.Runner


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
        dist = self.distributed
        self._pp_group = collectives.process_group_of(dist.device_mesh, dist.pp_axis_name) if dist.pp_axis_name else None
        self._ep_group = collectives.process_group_of(dist.moe_mesh, dist.ep_axis_name) if dist.ep_axis_name else None
        self._kind = NormKind.of(float(self.config.norm_type))
        self._compiler = compiling.Compiler(self.config.backend, enabled=self.config.compile,
                                            verbose=self.config.verbose, notice=self.config.compile_notice,
                                            combo_kernels=compiling.resolve_combo_kernels(self.config.combo_kernels))
        self._fp8 = Fp8Weights(dist.model_parts, fp8_weights, fp8_dtype, opts.groups())
        self.first_microbatch = first_microbatch_flag or fp8_lifecycle.default_first_microbatch_flag()
        self.offload_optimizer_state = offload_optimizer_state
        self._fillers = buckets.Fillers()
        self._accumulation: GradAccumulation | None = None
        self._warned_copy = False
        self._built: _Built | None = None
        self._health = TrainingHealth(self.config)  # the training-health options' state and attributes
        self._steps = 0
        # total, finite, skipped: made now (not by the first step) so that grad_norm is one tensor from the start
        self._outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._outputs_on(_params_device(opts.groups()))
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
        return self._output_views[0]

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
        scales = self._scales(amp_scale if amp_scale is not None else grad_scale, num_label_tokens,
                              dp_group_size)  # validates, changes nothing
        loss = self._health.check_loss(loss)
        self._optimizers.hyperparameters()  # validates before the closure and the hooks run
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        norm = self._update(scales, loss)
        if grad_scaling.scaling(grad_scaler):
            grad_scaling.record_found_inf(self, grad_scaler, self.last_step_finite)
        self._steps += 1
        return norm if closure is None else result

    @torch.no_grad()
    def _update(self, scales: tuple, loss: float | torch.Tensor | None) -> torch.Tensor:
        opts = self._optimizers
        self._accumulation = None
        opts.run_hooks("pre")
        built = self._bind(opts.hyperparameters(), scales)  # read again: a pre-hook may change them
        self._health.bind_loss(loss)
        if self.offload_optimizer_state:
            offload.offload_in(built.groups, built.buffers)
        built.runner.run_norm()
        if self.config.error_if_nonfinite and not bool(built.buffers.finite):
            built.buffers.skipped.sub_(1)  # raised, not skipped: the counter counts skips only
            built.binder.forget(opts.items, built.binder.created)  # and no state was created
            raise RuntimeError(
                f"The total norm of order {self.config.norm_type} of the gradients is non-finite "
                f"({float(built.buffers.total)}); nothing was updated. Pass error_if_nonfinite=False to skip "
                "such steps.")
        built.runner.run_update()
        # The params changed in place through the buffers, which autograd cannot see: bump their version
        # counters as torch.optim's in-place update does, so a graph that saved a param before the
        # step raises in backward instead of using the new values.
        torch.autograd.graph.increment_version(built.binder.params)
        if self.offload_optimizer_state:
            offload.offload_out(built.groups, built.buffers)
        self._fp8.store()
        opts.mark_stepped()
        # Weights changed: FP8 weights TransformerEngine cached on the first microbatch are stale.
        self.first_microbatch.reset()
        opts.run_hooks("post")
        return built.buffers.total[0].clone()  # the buffer is overwritten by the next step

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the grads in place (default), so autograd and FSDP2 accumulate into the same buffers.

        ``set_to_none=True`` is ``optimizer.zero_grad()`` (torch's default, which Accelerate passes): grads
        become None, and a param that gets no grad in the next backward is skipped, as torch skips it. In
        the next backward, a hook on each param points the grad back at its view of the buffers (see
        ``grad_restore.py``), so the step copies nothing; FSDP2's sharded grads, which FSDP2 assigns
        itself, are copied in by the next ``step()``.
        """
        built = self._built
        if set_to_none or built is None:
            self._optimizers.zero_grad(set_to_none)
            return
        opts = self._optimizers
        if not built.binder.grads_unchanged() or not built.binder.unchanged(opts.groups(), opts.variants()):
            # zeroes grads that are not the views too, and those of params the plan does not hold yet
            # (added by add_param_group since the last step)
            opts.zero_grad(False)
        built.binder.zero_grads()

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
                                        pp_enabled=self._pp_group is not None, fp8_flag=self.first_microbatch)
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
        return tuple(name for name, _ in self._built.binder.copied) if self._built is not None else ()

    @property
    def plan(self) -> planning.Plan | None:
        """The current plan (read-only; None before the first step)."""
        return self._built.plan if self._built is not None else None

    @property
    def program(self) -> program.Program | None:
        """The prepared calls of the current plan (read-only; None before the first step)."""
        return self._built.program if self._built is not None else None

    @property
    def cuda_graph_captured(self) -> bool:
        """Whether the current plan's step is replayed as CUDA graphs (CUDA params, after two steps)."""
        return self._built is not None and self._built.runner.captured

    @property
    def skipped_steps(self) -> torch.Tensor:
        """int64 0-d tensor: steps skipped for a non-finite norm (updated in place)."""
        return self._output_views[2]

    @property
    def last_step_finite(self) -> torch.Tensor:
        """bool 0-d tensor: whether the last total norm was finite (updated in place; True before the first
        step); with ``skip_spike_sigma`` a finite step may still be skipped (``spike_skipped_steps``)."""
        return self._output_views[1]

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

    # ------------------------------------------------------------------ build

    def _build(self, variants: list) -> _Built:
        opts, dist, config = self._optimizers, self.distributed, self.config
        param_lists = [group["params"] for group in opts.groups()]
        rules = opts.group_rules()
        matrix_groups = {i: rule for i, rule in enumerate(rules) if rule.KIND == MATRIX}
        # DDP's bucket views are read in place by bucket updates; a matrix rule needs whole matrices in its
        # stacks, so Muon's params keep FusedStep's grads (and DDP's re-pointing costs a copy per step).
        in_matrix_groups = {id(p) for i in matrix_groups for p in param_lists[i]}
        ddp_params = frozenset(ddp.bucket_view_params(dist.model_parts) - in_matrix_groups)
        external = ddp.external_grads(param_lists, ddp_params)
        plan = planning.build_plan(
            param_lists, names=experts.param_names(dist.model_parts),
            expert_ids=experts.expert_param_ids(dist.model_parts, dist.ep_axis_name), ep=self._ep_group,
            ep_axis_name=dist.ep_axis_name, pp=self._pp_group, bucket_size=config.bucket_size,
            pack_threshold=config.pack_threshold, flat_params=config.flat_params, fp8_ids=self._fp8.ids,
            external_grads=frozenset(external), matrix_groups=matrix_groups,
            group_labels=opts.labels())
        checks.refuse_partial_params(plan)
        owners = opts.owners()
        checks.refuse_state_of_another_dtype(plan, [opts.items[owners[g.key.param_group]].state
                                                    for g in plan.groups])
        plan = self._agree(plan)
        previous = [p.grad for p in plan.params]
        binding.check_grads(plan, previous)
        # Each group's state layout, from its rule's declaration (raises for what cannot be placed, before
        # anything changes).
        state_layouts = [storage.lay_out_state(g, rules[g.key.param_group], variants[g.key.param_group])
                         for g in plan.groups]
        if self._built is not None:
            self._built.binder.release()  # the old plan's grad hooks
        # Drop the old plan's buffers now: what still references them (the params' .data aliases, p.grad
        # and optimizer.state views) is moved into the new buffers one by one, freeing each old buffer as
        # its last view goes, before the next new one is made (``Binder.install``, ``Binder.bind_state``).
        self._built = None
        outputs = self._outputs_on(plan.device)
        group_rules = [rules[g.key.param_group] for g in plan.groups]  # per sharding group
        group_variants = [variants[g.key.param_group] for g in plan.groups]
        groups = [storage.GroupBuffers(g, layout, offload=self.offload_optimizer_state, external_grads=external)
                  for g, layout in zip(plan.groups, state_layouts)]
        lr_ratios = [[rule.lr_ratio(st.whole_shape, var) for st in g.stacks]
                     for g, rule, var in zip(plan.groups, group_rules, group_variants)]
        buffers = storage.StepBuffers(plan, group_rules, self._kind, config.max_grad_norm, outputs,
                                      offload=self.offload_optimizer_state, lr_ratios=lr_ratios)
        binder = binding.Binder(plan, groups, buffers, rules, owners, param_lists, variants, ddp_params,
                                ddp.bucket_view_params(dist.model_parts))
        binder.install(previous)
        binder.bind_state(opts.items)
        fp8 = self._fp8.calls(plan, buffers) if self._fp8 else None
        prog = program.build(plan, groups, buffers, group_rules, group_variants, self._kind, self._compiler,
                             self._fillers, fp8, self._health.for_plan(plan, param_lists))
        capture = config.cuda_graphs and not self.offload_optimizer_state and plan.device.type == "cuda"
        self._built = _Built(plan, groups, buffers, binder, prog, cuda_graphs.Runner(prog, plan.device, capture))
        return self._built

    def _agree(self, plan: planning.Plan) -> planning.Plan:
        """In a distributed run, make every rank's collectives identical (one all_gather_object over
        the default group per plan build; see ``agreement.py``)."""
        where = collectives.world()
        if where is None or where[1] == 1:
            return plan
        reachable = [(r.process_group, r.device_type) for r in plan.reductions]
        reachable += [g for g in (self._ep_group, self._pp_group) if g is not None]
        meshes = [p.device_mesh for g in plan.groups for p in g.params[:1] if planning.is_dtensor(p)]
        meshes += [m for m in (self.distributed.moe_mesh, self.distributed.device_mesh) if m is not None]
        for mesh in meshes:
            reachable += collectives.mesh_process_groups(mesh)
        resolvable = {collectives.process_group_key(pg): (pg, device_type) for pg, device_type in reachable}
        payloads = collectives.agree(agreement.agreement_payload(plan, collectives.process_group_key, resolvable))
        return agreement.reconcile(plan, payloads, where[0], resolvable)

    def _outputs_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The total norm, finite flag and skip counter (``[1]`` tensors): kept across plan rebuilds.

        ``[1]``, not 0-d: torch 2.13's AOTAutograd drops a compiled graph's in-place writes to 0-d
        inputs (``out.copy_(x.sum())`` leaves a 0-d ``out`` unchanged, eager backend included).
        Users see 0-d views of them (``grad_norm``, ``last_step_finite``, ``skipped_steps``), made once
        here so that each property returns the same tensor every time.
        """
        if self._outputs is None or self._outputs[0].device != device:
            old = self._outputs
            self._outputs = (torch.full((1,), float("nan"), dtype=torch.float64, device=device),
                             torch.ones(1, dtype=torch.bool, device=device),
                             torch.zeros(1, dtype=torch.int64, device=device))
            if old is not None:
                for new, value in zip(self._outputs, old):
                    new.copy_(value)
            self._output_views = tuple(t[0] for t in self._outputs)
        return self._outputs

    # ------------------------------------------------------------------ bind

    def _bind(self, values: list[list], scales: tuple) -> _Built:
        opts = self._optimizers
        variants = opts.variants()
        built = self._built
        if built is not None:
            built.binder.created.clear()  # state created by this step only (see step())
        if built is None or not built.binder.unchanged(opts.groups(), variants):
            built = None  # no reference to the old plan while the new one is built (see _build)
            built = self._build(variants)
        try:
            active_changed = built.binder.bind_grads()
            rebuild = False
        except binding.Rebuild:  # a grad of another dtype: re-key its group
            rebuild = True  # rebuilt after the handler: its traceback references the old binder
        if rebuild:
            built = None
            built = self._build(variants)
            active_changed = built.binder.bind_grads()
        if built.binder.copied and not self._warned_copy:
            self._warned_copy = True
            warnings.warn(checks.copy_warning(built.binder.copied, named=bool(self.distributed.model_parts)),
                          stacklevel=checks.user_stacklevel())
        if active_changed or not built.binder.state_unchanged(opts.items):
            built.binder.bind_state(opts.items)
        base, expert = scales
        rows = []
        for group in built.plan.groups:
            index = group.key.param_group
            rows.append([expert if group.key.is_expert else base, values[index][0], *values[index][1]])
        built.binder.write_hyperparameters(rows)
        return built

    def _scales(self, grad_scale, num_label_tokens, dp_group_size) -> tuple:
        """The grad scale of plain and of expert params: floats, or 0-d float64 tensors."""
        base = checks.check_grad_scale(grad_scale)
        if isinstance(num_label_tokens, torch.Tensor) and num_label_tokens.device.type == "cpu" \
                and num_label_tokens.numel() == 1:
            num_label_tokens = num_label_tokens.item()  # free on the host; as a tensor, a blocking copy per step
        divisor = experts.pp_divisor(self._pp_group is not None, num_label_tokens, dp_group_size)
        if divisor is not None:
            base = base / (divisor.double() if isinstance(divisor, torch.Tensor) else divisor)
        dist = self.distributed
        ratio = experts.ep_ratio(dist.moe_mesh, dp_group_size, dist.expert_tp_replication_factor)
        return base, base if ratio is None else base / ratio

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
        _, finite, skipped = self._output_views
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
            _, finite, skipped = self._outputs
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
        if self._built is None:
            lines.append("  plan: not built yet (built by the first step)")
        else:
            lines += ["  " + line for line in self._built.plan.describe()]
            lines.append(f"  program: {len(self._built.program.calls)} calls"
                         f"{', captured as CUDA graphs' if self._built.runner.captured else ''}")
        return "\n".join(lines)


FusedOptimizer = FusedStep  # the name the trainers' recipes use: one class


def _params_device(param_groups: list[dict]) -> torch.device:
    for group in param_groups:
        for p in group["params"]:
            return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")
