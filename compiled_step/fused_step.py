"""FusedStep: one compiled step replacing ``clip_grad_norm_`` + ``optimizer.step()``.

The step is built in three parts (see the README's architecture section):

1. **build**, once per plan (``_build``): the plan (``planning.py``), the persistent buffers and
   the views users see (``storage.py``), the binder (``binding.py``) and the prepared program
   (``program.py``), run by ``cuda_graphs.Runner``;
2. **bind**, every step (``_bind``): identity checks, grads copied in only where they are not the
   installed views, state adopted only where it changed, one small copy of the hyperparameters;
3. **run**: the program's norm half (Phase A, collectives, finish) and update half (Phase B), or
   their CUDA graphs.

This module orchestrates; it holds no per-element math and calls ``torch.distributed`` only
through ``collectives.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from compiled_step import agreement, binding, buckets, checks, collectives, compiling, cuda_graphs, experts, planning, \
    program, storage
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


class FusedStep:
    """One compiled step replacing ``clip_grad_norm_(params, max_grad_norm, norm_type)`` + ``optimizer.step()``.

    The optimizer stays the source of truth: hyperparameters are read from ``param_groups`` every
    step and state lives in ``optimizer.state`` in torch's own format, so ``state_dict()``, LR
    schedulers and switching to ``optimizer.step()`` at any step keep working.

    Args:
        optimizer: a ``torch.optim.AdamW``, ``Adam``, ``SGD`` or ``Muon`` (exact types), or a list or
            tuple of them (e.g. ``[muon, adamw]``): one total norm over all their params clips all of
            them, and each is updated by its own rule in the same prepared step. Trainers' wrappers
            (``AcceleratedOptimizer``, ``LightningOptimizer``, torchtitan's ``OptimizersContainer``) and
            ``FusedOptimizer`` are refused with what to pass instead (``wrappers.py``).
        config: a ``FusedStepConfig``, or pass its fields as keywords (``max_grad_norm=1.0``...).
        distributed: a ``DistributedConfig``, or pass its fields as keywords (``model_parts``,
            ``device_mesh``, ``pp_axis_name``, ``moe_mesh``, ``ep_axis_name``,
            ``expert_tp_replication_factor``).
        fp8_weights: params whose FP8 scales the step computes (default: torchao float8 FSDP2
            weights found in ``model_parts``).
        fp8_dtype: their float8 format.
        first_microbatch_flag: TransformerEngine's ``is_first_microbatch`` flag to drive.
        offload_optimizer_state: keep optimizer state on the CPU between steps.

    Raises ``TypeError``/``ValueError`` for unsupported optimizers or options, before anything changes.
    """

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
        self._outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # total, finite, skipped

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

    @torch.no_grad()
    def step(self, *, grad_scale: float | torch.Tensor | None = None,
             num_label_tokens: int | torch.Tensor | None = None, dp_group_size: int | None = None,
             loss: float | torch.Tensor | None = None) -> torch.Tensor:
        """Scale, norm, clip and update in one pass over memory; returns the pre-clip total norm.

        Args:
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

        Returns:
            The total norm of the (scaled) grads before clipping: a float64 0-d tensor on the
            params' device. Nothing in this call reads a device value on the host, unless
            ``error_if_nonfinite=True``. When the norm is NaN/inf the update is skipped with
            params, state and step counters left bit-identical, and ``skipped_steps`` counts it.
        """
        if num_label_tokens is None and self._accumulation is not None:
            num_label_tokens = self._accumulation.num_label_tokens  # counted by accumulate()
        scales = self._scales(grad_scale, num_label_tokens, dp_group_size)  # validates, changes nothing
        loss = self._health.check_loss(loss)
        opts = self._optimizers
        opts.hyperparameters()  # validates before the hooks run
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

        ``set_to_none=True`` is ``optimizer.zero_grad()``: grads become None. In the next backward,
        a hook on each param points the grad back at its zeroed view of the buffers before autograd
        writes it (see ``grad_restore.py``), so nothing is copied; FSDP2's sharded grads, which
        FSDP2 assigns itself, are copied in by the next ``step()``.
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
    def skipped_steps(self) -> torch.Tensor | None:
        """int64 0-d tensor: steps skipped for a non-finite norm (updated in place)."""
        return self._outputs[2][0] if self._outputs is not None else None

    @property
    def last_step_finite(self) -> torch.Tensor | None:
        """bool 0-d tensor: whether the last total norm was finite (updated in place); with
        ``skip_spike_sigma`` a finite step may still be skipped (``spike_skipped_steps``)."""
        return self._outputs[1][0] if self._outputs is not None else None

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
        Users see 0-d views of them.
        """
        if self._outputs is None or self._outputs[0].device != device:
            old = self._outputs
            self._outputs = (torch.zeros(1, dtype=torch.float64, device=device),
                             torch.ones(1, dtype=torch.bool, device=device),
                             torch.zeros(1, dtype=torch.int64, device=device))
            if old is not None:
                for new, value in zip(self._outputs, old):
                    new.copy_(value)
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """FusedStep's own state: the skip counter and the last step's finite flag (0-d tensors), and the
        training-health options' state (spike windows and counter, ZClip's statistics).

        The optimizer's state is ``optimizer.state_dict()``; with both, a run resumes bit-identically.
        FusedStep is a ``torch.distributed.checkpoint`` ``Stateful``: pass it to ``dcp.save``/``dcp.load``
        next to the model's and optimizer's state dicts.
        """
        if self._outputs is None:
            return {"skipped_steps": torch.zeros((), dtype=torch.int64),
                    "last_step_finite": torch.ones((), dtype=torch.bool), **self._health.state_dict()}
        return {"skipped_steps": self._outputs[2][0].clone(), "last_step_finite": self._outputs[1][0].clone(),
                **self._health.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what ``state_dict()`` returned. Raises ``KeyError``/``TypeError`` before changing anything."""
        missing = {"skipped_steps", "last_step_finite"} - set(state_dict)
        if missing:
            raise KeyError(f"FusedStep state_dict lacks {sorted(missing)}")
        values = {}
        for key, dtype in (("skipped_steps", torch.int64), ("last_step_finite", torch.bool)):
            value = state_dict[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                values[key] = value.detach().reshape(1).to(dtype)
            elif isinstance(value, (bool, int)) and not (key == "skipped_steps" and isinstance(value, bool)):
                values[key] = torch.tensor([value], dtype=dtype)
            else:
                raise TypeError(f"FusedStep state_dict[{key!r}] must be a one-element tensor or a number, got "
                                f"{type(value).__name__}")
        self._health.check_state_dict(state_dict)
        device = self._outputs[0].device if self._outputs is not None else torch.device("cpu")
        total, finite, skipped = self._outputs_on(device)
        skipped.copy_(values["skipped_steps"])
        finite.copy_(values["last_step_finite"])
        self._health.load_state_dict(state_dict)

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
