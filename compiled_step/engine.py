"""The engine behind ``FusedStep``: what a step builds, binds, runs and undoes.

``FusedStep`` (``fused_step.py``) is the public surface: the ``torch.optim.Optimizer`` API, argument checks,
hooks and checkpoints. Everything a step does to memory goes through one ``Engine``:

1. **build**, once per plan (``Engine._build``): the plan (``planning.py``), agreed across ranks
   (``agreement.py``); the persistent buffers and the views users see, as one ``storage.Storage``; the binder
   (``binding.py``); the program (``program.py``), run by ``cuda_graphs.Runner``;
2. **bind**, every step (``Engine._bind``): identity checks, grads copied in only where they are not the
   installed views, state adopted only where it changed, one small copy of the hyperparameters;
3. **run** (``Engine.step``): the program's norm half (Phase A, collectives, finish), then its update half
   (Phase B), or their CUDA graphs;
4. **undo** (``Engine._undo_norm_half``): when ``error_if_nonfinite`` raises after the norm half, what that
   half counted and created is put back, so the failed step changed nothing.

Each feature is wired in here once: DDP's bucket views (``lifecycle/ddp.py``), FP8 weights
(``lifecycle/fp8_step.py``), optimizer-state offload (``lifecycle/offload.py``), training health
(``health.py``), CUDA graphs (``cuda_graphs.py``). This module orchestrates; it holds no per-element math and
calls ``torch.distributed`` only through ``collectives.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from compiled_step import agreement, binding, buckets, checks, collectives, compiling, cuda_graphs, experts, \
    planning, program, state_dtypes, storage
from compiled_step.config import DistributedConfig, FusedStepConfig
from compiled_step.health import TrainingHealth
from compiled_step.lifecycle import ddp, offload
from compiled_step.lifecycle.fp8_step import Fp8Weights
from compiled_step.norm import NormKind
from compiled_step.optimizers import Optimizers
from compiled_step.rules import MATRIX


@dataclass
class Built:
    """Everything built for one plan: its storage, the binder that checks it every step, the program over it
    and the runner that replays the program."""

    storage: storage.Storage
    binder: binding.Binder
    program: program.Program
    runner: cuda_graphs.Runner

    @property
    def plan(self) -> planning.Plan:
        return self.storage.plan


class Engine:
    """Builds, binds, runs and undoes the steps of one ``FusedStep``; holds what a step leaves behind (the
    current plan's ``Built`` and the total/finite/skipped outputs, kept across rebuilds)."""

    def __init__(self, optimizers: Optimizers, config: FusedStepConfig, distributed: DistributedConfig, *,
                 fp8: Fp8Weights, health: TrainingHealth, offload_optimizer_state: bool):
        self.optimizers, self.config, self.distributed = optimizers, config, distributed
        self.fp8, self.health, self.offload_optimizer_state = fp8, health, offload_optimizer_state
        dist = distributed
        self.pp_group = collectives.process_group_of(dist.device_mesh, dist.pp_axis_name) if dist.pp_axis_name else None
        self.ep_group = collectives.process_group_of(dist.moe_mesh, dist.ep_axis_name) if dist.ep_axis_name else None
        self.norm_kind = NormKind.of(float(config.norm_type))
        names = config.stochastic_rounding
        # Made whatever the config asks: an optimizer may round its params itself (torchao's bf16_stochastic_round),
        # with the config's seed.
        self.rounding = program.StochasticRounding("params" in names, "state" in names, config.stochastic_rounding_seed)
        self.compiler = compiling.Compiler(config.backend, enabled=config.compile, verbose=config.verbose,
                                           notice=config.compile_notice,
                                           combo_kernels=compiling.resolve_combo_kernels(config.combo_kernels))
        self.fillers = buckets.Fillers()
        self.built: Built | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.output_views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.warned_copy = False
        # total, finite, skipped: made now (not by the first step) so that grad_norm is one tensor from the start
        self.outputs_on(_params_device(optimizers.groups()))

    # ------------------------------------------------------------------ what a step uses and leaves

    def grad_scales(self, grad_scale, num_label_tokens, dp_group_size) -> tuple:
        """The grad scale of plain and of expert params: floats, or 0-d float64 tensors. Validates, changes
        nothing."""
        base = checks.check_grad_scale(grad_scale)
        if isinstance(num_label_tokens, torch.Tensor) and num_label_tokens.device.type == "cpu" \
                and num_label_tokens.numel() == 1:
            num_label_tokens = num_label_tokens.item()  # free on the host; as a tensor, a blocking copy per step
        divisor = experts.pp_divisor(self.pp_group is not None, num_label_tokens, dp_group_size)
        if divisor is not None:
            base = base / (divisor.double() if isinstance(divisor, torch.Tensor) else divisor)
        dist = self.distributed
        ratio = experts.ep_ratio(dist.moe_mesh, dp_group_size, dist.expert_tp_replication_factor)
        return base, base if ratio is None else base / ratio

    def outputs_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The total norm, finite flag and skip counter (``[1]`` tensors): kept across plan rebuilds.

        ``[1]``, not 0-d: torch 2.13's AOTAutograd drops a compiled graph's in-place writes to 0-d
        inputs (``out.copy_(x.sum())`` leaves a 0-d ``out`` unchanged, eager backend included).
        Users see 0-d views of them (``grad_norm``, ``last_step_finite``, ``skipped_steps``), made once
        here so that each property returns the same tensor every time.
        """
        if self.outputs is None or self.outputs[0].device != device:
            old = self.outputs
            self.outputs = (torch.full((1,), float("nan"), dtype=torch.float64, device=device),
                            torch.ones(1, dtype=torch.bool, device=device),
                            torch.zeros(1, dtype=torch.int64, device=device))
            if old is not None:
                for new, value in zip(self.outputs, old):
                    new.copy_(value)
            self.output_views = tuple(t[0] for t in self.outputs)
        return self.outputs

    @property
    def storage(self) -> storage.Storage | None:
        """The current plan's buffers (None before the first step)."""
        return self.built.storage if self.built is not None else None

    def use_runner(self, runner: cuda_graphs.Runner) -> None:
        """Replace the current plan's runner: how tests and ``gpu-check`` put a logged or failing capture in
        (the runner is what they test; the engine builds its own at every plan)."""
        self.built.runner = runner

    def copied_grads(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.built.binder.copied) if self.built is not None else ()

    # ------------------------------------------------------------------ run

    def step(self, values: list[list], scales: tuple, loss) -> torch.Tensor:
        """One step with the hyperparameter ``values`` (``Optimizers.hyperparameters()``) and grad ``scales``
        (``grad_scales``): bind, the norm half, the update half. Returns the total norm (a new 0-d tensor)."""
        built = self._bind(values, scales)
        self.health.bind_loss(loss)
        buffers = built.storage.buffers
        if self.offload_optimizer_state:
            offload.offload_in(built.storage.groups, buffers)
        built.runner.run_norm()
        if self.config.error_if_nonfinite and not bool(buffers.finite):
            self._undo_norm_half(built)
            raise RuntimeError(
                f"The total norm of order {self.config.norm_type} of the gradients is non-finite "
                f"({float(buffers.total)}); nothing was updated. Pass error_if_nonfinite=False to skip "
                "such steps.")
        built.runner.run_update()
        # The params changed in place through the buffers, which autograd cannot see: bump their version
        # counters as torch.optim's in-place update does, so a graph that saved a param before the
        # step raises in backward instead of using the new values.
        torch.autograd.graph.increment_version(built.binder.params)
        if self.offload_optimizer_state:
            offload.offload_out(built.storage.groups, buffers)
        self.fp8.store()
        return buffers.total[0].clone()  # the buffer is overwritten by the next step

    def _undo_norm_half(self, built: Built) -> None:
        """The norm half ran and the step raises instead of updating: the finish counted the step as skipped
        (it raised instead), and the bind may have created state for params stepped the first time (none was
        used). Put both back."""
        built.storage.buffers.skipped.sub_(1)
        built.binder.forget(self.optimizers.items, built.binder.created)

    def zero_grads(self, set_to_none: bool) -> None:
        """``FusedStep.zero_grad``: the buffers in place, or torch's ``set_to_none``."""
        built, opts = self.built, self.optimizers
        if set_to_none or built is None:
            opts.zero_grad(set_to_none)
            return
        if not built.binder.grads_unchanged() or not built.binder.unchanged(opts.groups(), opts.variants()):
            # zeroes grads that are not the views too, and those of params the plan does not hold yet
            # (added by add_param_group since the last step)
            opts.zero_grad(False)
        built.binder.zero_grads()

    # ------------------------------------------------------------------ bind

    def _bind(self, values: list[list], scales: tuple) -> Built:
        opts = self.optimizers
        variants = opts.variants()
        built = self.built
        if built is not None:
            built.binder.created.clear()  # state created by this step only (see _undo_norm_half)
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
        if built.binder.copied and not self.warned_copy:
            self.warned_copy = True
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

    # ------------------------------------------------------------------ build

    def _build(self, variants: list) -> Built:
        opts, dist, config = self.optimizers, self.distributed, self.config
        param_lists = [group["params"] for group in opts.groups()]
        rules = opts.group_rules()
        matrix_groups = {i: rule for i, rule in enumerate(rules) if rule.KIND == MATRIX}
        # DDP's bucket views are read in place by bucket updates; a matrix rule needs whole matrices in its
        # stacks, so Muon's params keep FusedStep's grads (and DDP's re-pointing costs a copy per step).
        bucket_view_params = ddp.bucket_view_params(dist.model_parts)
        in_matrix_groups = {id(p) for i in matrix_groups for p in param_lists[i]}
        read_in_place = frozenset(bucket_view_params - in_matrix_groups)
        external = ddp.external_grads(param_lists, read_in_place)
        plan = planning.build_plan(
            param_lists, names=experts.param_names(dist.model_parts),
            expert_ids=experts.expert_param_ids(dist.model_parts, dist.ep_axis_name), ep=self.ep_group,
            ep_axis_name=dist.ep_axis_name, pp=self.pp_group, bucket_size=config.bucket_size,
            pack_threshold=config.pack_threshold, flat_params=config.flat_params, fp8_ids=self.fp8.ids,
            external_grads=frozenset(external), matrix_groups=matrix_groups,
            group_labels=opts.labels())
        checks.refuse_partial_params(plan)
        owners = opts.owners()
        def kept_dtypes_of(plan):  # per group, the keys the user keeps in bfloat16 (raises for a dtype not allowed)
            return state_dtypes.state_dtypes(plan, [opts.items[owners[g.key.param_group]] for g in plan.groups],
                                             [rules[g.key.param_group] for g in plan.groups])

        kept_dtypes_of(plan)  # checked before the agreement, as every check of the local plan
        plan = self._agree(plan)
        kept_dtypes = kept_dtypes_of(plan)  # the agreed plan's groups (an EP rank without experts gains some)
        previous = [p.grad for p in plan.params]
        binding.check_grads(plan, previous)
        # Each group's state layout, from its rule's declaration (raises for what cannot be placed, before
        # anything changes).
        state_layouts = [storage.lay_out_state(g, rules[g.key.param_group], variants[g.key.param_group], dtypes)
                         for g, dtypes in zip(plan.groups, kept_dtypes, strict=True)]
        self._check_rounding(plan, rules, state_layouts)
        if self.built is not None:
            self.built.binder.release()  # the old plan's grad hooks
        # Drop the old plan's buffers now: what still references them (the params' .data aliases, p.grad
        # and optimizer.state views) is moved into the new buffers one by one, freeing each old buffer as
        # its last view goes, before the next new one is made (``Binder.install``, ``Binder.bind_state``).
        self.built = None
        group_rules = [rules[g.key.param_group] for g in plan.groups]  # per sharding group
        group_variants = [variants[g.key.param_group] for g in plan.groups]
        offload_state = self.offload_optimizer_state
        groups = [storage.GroupBuffers(g, layout, offload=offload_state, external_grads=external, rule=rule)
                  for g, layout, rule in zip(plan.groups, state_layouts, group_rules, strict=True)]
        lr_ratios = [[rule.lr_ratio(st.whole_shape, var) for st in g.stacks]
                     for g, rule, var in zip(plan.groups, group_rules, group_variants, strict=True)]
        buffers = storage.StepBuffers(plan, group_rules, self.norm_kind, config.max_grad_norm,
                                      self.outputs_on(plan.device), offload=offload_state, lr_ratios=lr_ratios)
        store = storage.Storage(plan, groups, buffers, group_rules, group_variants)
        binder = binding.Binder(store, rules, owners, param_lists, variants, bucket_view_params=read_in_place,
                                ddp_params=bucket_view_params)
        binder.install(previous)
        binder.bind_state(opts.items)
        fp8 = self.fp8.calls(plan, buffers) if self.fp8 else None
        prog = program.build(store, self.norm_kind, self.compiler, self.fillers, fp8,
                             self.health.for_plan(plan, param_lists), self.rounding)
        capture = config.cuda_graphs and not offload_state and plan.device.type == "cuda"
        self.built = Built(store, binder, prog, cuda_graphs.Runner(prog, plan.device, capture))
        return self.built

    def _check_rounding(self, plan: planning.Plan, rules: list, state_layouts: list) -> None:
        """Raise, before anything changes, where stochastic rounding is asked for and a group that has bfloat16
        stores to round has a rule that cannot (its updates take no ``rounding``), or where nothing it names is
        bfloat16 (it would silently round nothing)."""
        if not self.config.stochastic_rounding:
            return
        applies = False
        for g, layout in zip(plan.groups, state_layouts, strict=True):
            rule = rules[g.key.param_group]
            if self.rounding.applies(g.key.dtype, tuple(k.dtype for k in layout.values())):
                applies = True
                if not rule.STOCHASTIC_ROUNDING:
                    raise ValueError(f"{g.label}: stochastic_rounding={self.config.stochastic_rounding} is not "
                                     f"offered for {rule.NAME} (Adam, AdamW and torchao's AdamW types only). Nothing "
                                     "was changed.")
        if not applies:
            raise ValueError(f"stochastic_rounding={self.config.stochastic_rounding}, but no param (\"params\") or "
                             "state (\"state\": compiled_step.bf16_moments) it names is bfloat16. Nothing was changed.")

    def _agree(self, plan: planning.Plan) -> planning.Plan:
        """In a distributed run, make every rank's collectives identical (one all_gather_object over
        the default group per plan build; see ``agreement.py``)."""
        rank_world = collectives.world()
        if rank_world is None or rank_world[1] == 1:
            return plan
        reachable = [(r.process_group, r.device_type) for r in plan.reductions]
        reachable += [g for g in (self.ep_group, self.pp_group) if g is not None]
        meshes = [p.device_mesh for g in plan.groups for p in g.params[:1] if planning.is_dtensor(p)]
        meshes += [m for m in (self.distributed.moe_mesh, self.distributed.device_mesh) if m is not None]
        for mesh in meshes:
            reachable += collectives.mesh_process_groups(mesh)
        resolvable = {collectives.process_group_key(pg): (pg, device_type) for pg, device_type in reachable}
        payloads = collectives.agree(agreement.agreement_payload(plan, collectives.process_group_key, resolvable))
        return agreement.reconcile(plan, payloads, rank_world[0], resolvable)


def _params_device(param_groups: list[dict]) -> torch.device:
    for group in param_groups:
        for p in group["params"]:
            return torch.device("cpu") if p.device.type == "meta" else p.device
    return torch.device("cpu")
