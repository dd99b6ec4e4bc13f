"""FusedStep: plan -> Phase A (compiled partial norms) -> reduce -> norm/clip -> Phase B (compiled update).

This module orchestrates; it holds no per-element math. The compiled math is in ``kernels.py`` and
``rules/``; the only calls into ``torch.distributed`` are in ``collectives.py``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch

from compiled_step import arena, collectives, experts, gradnorm, kernels, norms, planning
from compiled_step.lifecycle import fp8 as fp8_lifecycle
from compiled_step.lifecycle.fsdp import GradAccumulation
from compiled_step.rules import rule_for


@dataclass(frozen=True, kw_only=True)
class FusedStepConfig:
    """Validated options of a FusedStep. Raises ``TypeError``/``ValueError`` on bad values."""

    max_grad_norm: float | None = None  # None: no clipping (the norm is still computed and returned)
    norm_type: float = 2.0  # 1, 2, inf or any finite p > 0
    error_if_nonfinite: bool = False  # raise instead of skipping on a non-finite norm (syncs the host)
    compile: bool = True  # False runs the same functions eagerly
    backend: object = "inductor"  # torch.compile backend (a counting backend in tests)
    bucket_size: int = 16  # tensors per compiled call
    pack_threshold: int = 16384  # local shards of at most this many elements are packed into one buffer
    verbose: bool = False  # print compile progress to stderr (it is always logged at INFO)

    def __post_init__(self):
        mgn = self.max_grad_norm
        if mgn is not None:
            if isinstance(mgn, bool) or not isinstance(mgn, numbers.Real):
                raise TypeError(f"max_grad_norm must be a positive number or None, got {type(mgn).__name__}")
            if not math.isfinite(mgn) or mgn <= 0:
                raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {mgn}")
        nt = self.norm_type
        if isinstance(nt, bool) or not isinstance(nt, numbers.Real):
            raise TypeError(f"norm_type must be a number (1, 2, inf or any p > 0), got {type(nt).__name__}")
        if math.isnan(nt) or nt <= 0:
            raise ValueError(f"norm_type must be > 0 (1, 2, inf or any finite p > 0), got {nt}")
        if isinstance(self.bucket_size, bool) or not isinstance(self.bucket_size, int) or self.bucket_size < 1:
            raise ValueError(f"bucket_size must be an int >= 1, got {self.bucket_size!r}")
        if isinstance(self.pack_threshold, bool) or not isinstance(self.pack_threshold, int) or self.pack_threshold < 0:
            raise ValueError(f"pack_threshold must be an int >= 0, got {self.pack_threshold!r}")
        for name in ("error_if_nonfinite", "compile", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Where the params live across ranks; runtime objects (modules, meshes) go in as they are."""

    model_parts: tuple = ()  # modules whose params the optimizer holds: names and expert markers
    device_mesh: object = None  # DeviceMesh holding the pipeline axis
    pp_axis_name: str | None = None  # PP is on when given: the norm is reduced over it, PP scaling applies
    moe_mesh: object = None  # DeviceMesh of the MoE params (EP scaling uses its "ep_shard" dim)
    ep_axis_name: str | None = None  # EP axis of moe_mesh: expert DTensors are recognised by it
    expert_tp_replication_factor: int = 1  # expert grads are also divided by this (seed semantics)

    def __post_init__(self):
        experts.check_replication_factor(self.expert_tp_replication_factor)
        if self.pp_axis_name is not None and self.device_mesh is None:
            raise ValueError("pp_axis_name needs device_mesh (the mesh that has the pipeline axis)")
        if self.ep_axis_name is not None and self.moe_mesh is None:
            raise ValueError("ep_axis_name needs moe_mesh (the mesh that has the expert-parallel axis)")


class FusedStep:
    """One compiled step replacing ``clip_grad_norm_(params, max_grad_norm, norm_type)`` + ``optimizer.step()``.

    The optimizer stays the source of truth: hyperparameters are read from ``param_groups`` every
    step and state lives in ``optimizer.state`` in torch's own format, so ``state_dict()``, LR
    schedulers and switching to ``optimizer.step()`` at any step keep working.

    Args:
        optimizer: a ``torch.optim.AdamW``, ``Adam`` or ``SGD``.
        max_grad_norm: clip the total norm to this value; ``None`` disables clipping.
        norm_type: 1, 2, ``inf`` or any finite p > 0.
        error_if_nonfinite: raise ``RuntimeError`` on a non-finite total norm instead of skipping
            the step. This reads the norm on the host (a device sync), so it is off by default.
        compile: ``False`` runs the same math eagerly (debugging, second reference).
        backend: ``torch.compile`` backend.
        bucket_size: tensors per compiled call; the compiled graphs do not depend on the model size.
        pack_threshold: params whose local shard has at most this many elements are packed end to
            end and updated in one compiled call (their state lives in flat arenas, as views).
        verbose: print compile progress to stderr.
        model_parts, device_mesh, pp_axis_name, moe_mesh, ep_axis_name, expert_tp_replication_factor:
            the seed's distributed arguments (see ``DistributedConfig`` and the README). Params may
            be DTensors (FSDP2, TP, HSDP, EP); each sharding group's partial norm is reduced over
            the mesh dims where it is not Replicate, plus EP for experts, then over PP.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
        compile: bool = True,
        backend="inductor",
        bucket_size: int = 16,
        pack_threshold: int = 16384,
        verbose: bool = False,
        model_parts=None,
        device_mesh=None,
        pp_axis_name: str | None = None,
        moe_mesh=None,
        ep_axis_name: str | None = None,
        expert_tp_replication_factor: int = 1,
        fp8_weights=None,
        fp8_dtype: torch.dtype = torch.float8_e4m3fn,
        first_microbatch_flag: fp8_lifecycle.FirstMicrobatchFlag | None = None,
        offload_optimizer_state: bool = False,
    ):
        self.rule = rule_for(optimizer)
        if isinstance(model_parts, torch.nn.Module):
            model_parts = [model_parts]
        self.distributed = DistributedConfig(
            model_parts=tuple(model_parts or ()),
            device_mesh=device_mesh,
            pp_axis_name=pp_axis_name,
            moe_mesh=moe_mesh,
            ep_axis_name=ep_axis_name,
            expert_tp_replication_factor=expert_tp_replication_factor,
        )
        self._pp_group = collectives.process_group_of(device_mesh, pp_axis_name) if pp_axis_name else None
        self._ep_group = collectives.process_group_of(moe_mesh, ep_axis_name) if ep_axis_name else None
        self.config = FusedStepConfig(
            max_grad_norm=max_grad_norm,
            norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite,
            compile=compile,
            backend=backend,
            bucket_size=bucket_size,
            pack_threshold=pack_threshold,
            verbose=verbose,
        )
        self.optimizer = optimizer
        self._validate_param_groups()
        self._compiler = kernels.Compiler(backend, enabled=compile, verbose=verbose)
        self._norm = gradnorm.GradNorm(kernels.NormKind.of(float(norm_type)), bucket_size, self._compiler)
        self._plan: planning.Plan | None = None
        self._packed_states: dict[int, arena.PackedState] = {}
        # FP8: torchao float8 FSDP weights found in model_parts (their scales are stored where
        # torchao's all-gather reads them), or an explicit list of params (scales only exposed).
        self._fp8_targets = fp8_lifecycle.find_float8_fsdp_weights(self.distributed.model_parts)
        if fp8_weights is None:
            fp8_weights = [t.weight for t in self._fp8_targets]
        self._fp8_weights = list(fp8_weights)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        stray = [i for i, w in enumerate(self._fp8_weights) if id(w) not in held]
        if stray:
            raise ValueError(f"fp8_weights[{stray[0]}] is not a param of the optimizer; FP8 scales are computed "
                             "from the weights the step updates")
        fp8_lifecycle._check_float8_dtype(fp8_dtype)
        self._fp8_dtype = fp8_dtype
        self.fp8_scales: torch.Tensor | None = None  # float32 [n_fp8]: scales after the last step
        self.fp8_amax: torch.Tensor | None = None  # float32 [n_fp8]: max |w| of each FP8 weight after it
        # TransformerEngine's is_first_microbatch (the seed's global by default): reset after step().
        self.first_microbatch = first_microbatch_flag or fp8_lifecycle.default_first_microbatch_flag()
        if not isinstance(offload_optimizer_state, bool):
            raise TypeError("offload_optimizer_state must be a bool")
        self.offload_optimizer_state = offload_optimizer_state
        self._accumulation: GradAccumulation | None = None
        self.skipped_steps: torch.Tensor | None = None  # int64 0-d: steps skipped for a non-finite norm
        self.last_step_finite: torch.Tensor | None = None  # bool 0-d: was the last step applied?

    # ------------------------------------------------------------------ validation

    def _validate_param_groups(self) -> None:
        kind = type(self.optimizer).__name__
        for group in self.optimizer.param_groups:
            self.rule.validate_group(group, kind)
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError("FusedStep does not support complex params (got one of dtype %s)" % p.dtype)
                if p.is_sparse:
                    raise TypeError("FusedStep does not support sparse params")
                if not p.is_floating_point():
                    raise TypeError(f"FusedStep needs floating-point params, got {p.dtype}")

    _check_grad = staticmethod(gradnorm.check_grad)

    # ------------------------------------------------------------------ plan

    def _current_plan(self) -> planning.Plan:
        param_lists = [group["params"] for group in self.optimizer.param_groups]
        signature = planning.params_signature(param_lists)
        if self._plan is None or self._plan.signature != signature:
            self._validate_param_groups()  # params may have been added since construction
            dist = self.distributed
            self._plan = planning.build_plan(
                param_lists,
                names=experts.param_names(dist.model_parts),
                expert_ids=experts.expert_param_ids(dist.model_parts, dist.ep_axis_name),
                ep=self._ep_group,
                ep_axis_name=dist.ep_axis_name,
                pp=self._pp_group,
                pack_threshold=self.config.pack_threshold,
                fp8_ids=frozenset(map(id, self._fp8_weights)),
            )
            self._packed_states = {}
            device = self._plan.norm_device
            if self.skipped_steps is None or self.skipped_steps.device != device:
                self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
                self.last_step_finite = torch.ones((), dtype=torch.bool, device=device)
        return self._plan

    def _scales(self, plan, grad_scale, num_label_tokens, dp_group_size):
        """Per-group float64 scales: grad_scale x PP token divisor, and for experts / the EP ratio."""
        device = plan.norm_device
        dist = self.distributed
        base = _as_scale(grad_scale, device)
        divisor = experts.pp_divisor(self._pp_group is not None, num_label_tokens, dp_group_size)
        if divisor is not None:
            inverse = 1.0 / _as_tensor(divisor, device)
            base = inverse if base is None else base * inverse
        ratio = experts.ep_ratio(dist.moe_mesh, dp_group_size, dist.expert_tp_replication_factor)
        expert = base
        if ratio is not None:
            inverse_ratio = torch.tensor(1.0 / ratio, dtype=torch.float64).to(device, non_blocking=True)
            expert = inverse_ratio if base is None else base * inverse_ratio
        return gradnorm.group_scales(plan, base, expert)

    def _phase_b(self, work: list[gradnorm.GroupWork], result: norms.NormResult, scales: list) -> None:
        """Update every group: first build all state and scalar tables (this can still raise, on a
        bad hyperparameter, before anything changed), then run the compiled updates."""
        optimizer = self.optimizer
        finite_by_device: dict[torch.device, torch.Tensor] = {}
        large, packed = [], []
        for index, (w, scale) in enumerate(zip(work, scales)):
            pg = optimizer.param_groups[w.group.key.param_group]
            var = self.rule.variant(pg)
            device = w.group.key.device
            coef = result.clip_coef if scale is None else result.clip_coef * scale
            sign = -1.0 if pg.get("maximize", False) else 1.0  # maximize: ascend, i.e. negate the grad
            grad_coef = (coef * sign).to(device=device, dtype=torch.float32, non_blocking=True)
            if device not in finite_by_device:
                finite_by_device[device] = result.finite.to(device, non_blocking=True)
            if w.packed_grad is not None:
                packed.append(self._prepare_packed(index, w, pg, var, grad_coef))
            if w.params:
                large.append(self._prepare_large(w, pg, var, grad_coef))

        amax_by_param: dict[int, torch.Tensor] = {}
        for prepared in large:
            self._run_large(*prepared, finite_by_device[prepared[0].group.key.device], amax_by_param)
        for prepared in packed:
            self._run_packed(*prepared, finite_by_device[prepared[0].group.key.device])
        if self._fp8_weights:
            self._update_fp8_scales(amax_by_param)

    def _prepare_large(self, w, pg, var, grad_coef):
        """State (created lazily in torch's format) and the scalar table for a group's large params."""
        rule, device = self.rule, w.group.key.device
        states, state_tensors, steps = [], [], []
        if rule.needs_state(var):
            for p in w.params:
                st = self.optimizer.state[p]
                tensors, step = rule.state_tensors(p, st, var, device)
                states.append(st)
                state_tensors.append(tuple(planning.local_tensor(t) for t in tensors))
                steps.append(step)
        else:  # e.g. SGD without momentum: torch keeps no state, and neither do we
            states = [{}] * len(w.params)
            state_tensors = [()] * len(w.params)
            steps = [None] * len(w.params)
        vector = rule.per_tensor_vector(states, steps, device)
        table = rule.scalar_table(self.optimizer, pg, vector[w.nonempty] if len(w.nonempty) != len(w.params) else vector)
        return w, var, state_tensors, steps, table, grad_coef

    def _run_large(self, w, var, state_tensors, steps, table, grad_coef, finite, amax_by_param) -> None:
        """The bucket update over a group's large params, ``bucket_size`` tensors per call."""
        rule, compiler, norm = self.rule, self._compiler, self._norm
        update = compiler.get(rule.update)
        want_amax = w.group.key.fp8
        flat_states = [tuple(gradnorm.flat(t) for t in state_tensors[i]) for i in w.nonempty]
        n_state = len(flat_states[0]) if flat_states else 0
        bucket_size = self.config.bucket_size
        n_rows = len(w.flat_params)
        padded_rows = -(-n_rows // bucket_size) * bucket_size
        if padded_rows != n_rows:  # padding slots get zero scalars; what they compute is discarded
            table = torch.nn.functional.pad(table, (0, 0, 0, padded_rows - n_rows))
        tables = table.view(-1, bucket_size, table.shape[1]) if n_rows else table
        for b, bucket in enumerate(norm.buckets(n_rows)):
            params = [w.flat_params[i] for i in bucket]
            grads = [w.flat_grads[i] for i in bucket]
            bucket_states = [flat_states[i] for i in bucket]
            dummy_p, dummy_g, dummy_s = norm.dummies_for(params[0], grads[0], n_state)
            params, grads = norm.pad(params, dummy_p), norm.pad(grads, dummy_g)
            state_args = rule.state_lists(var, norm.pad(bucket_states, dummy_s))
            signature = ("update", rule.NAME, var, want_amax, params[0].dtype, grads[0].dtype, params[0].device.type)
            with compiler.first_call(signature, f"Phase B update graph ({rule.NAME}, {var}, {params[0].dtype})"):
                amax = update(params, grads, *state_args, tables[b], grad_coef, finite, compute_amax=want_amax)
            if want_amax:
                for slot, i in enumerate(bucket):
                    amax_by_param[id(w.params[w.nonempty[i]])] = amax[slot]
        real_steps = [s for s in steps if s is not None]
        if real_steps:
            torch._foreach_add_(real_steps, finite.to(torch.float32))

    def _update_fp8_scales(self, amax_by_param: dict[int, torch.Tensor]) -> None:
        """Scales from the amax the update computed: one MAX all-reduce per process group, then
        torchao's formula, stored where torchao's FSDP float8 all-gather reads them."""
        plan = self._plan
        amax_by_group: dict[int, torch.Tensor] = {}
        for index, group in enumerate(plan.groups):
            if not group.key.fp8:
                continue
            values = []
            for p in group.params:
                amax = amax_by_param.get(id(p))
                if amax is None:  # not updated this step (no grad, or an empty local shard): read it
                    local = planning.local_tensor(p).detach()
                    amax = local.abs().amax().float() if local.numel() else local.new_zeros((), dtype=torch.float32)
                values.append(amax.to(plan.norm_device))
            amax_by_group[index] = torch.stack(values)
        reduced = collectives.reduce_amax(amax_by_group, plan)
        by_id = {}
        for index, group in enumerate(plan.groups):
            if group.key.fp8:
                for p, value in zip(group.params, reduced[index]):
                    by_id[id(p)] = (value, p.dtype)
        amax = torch.stack([by_id[id(w)][0] for w in self._fp8_weights])
        weight_dtypes = {by_id[id(w)][1] for w in self._fp8_weights}
        weight_dtype = weight_dtypes.pop() if len(weight_dtypes) == 1 else None
        self.fp8_amax = amax
        self.fp8_scales = fp8_lifecycle.fp8_scales_from_amax(amax, float8_dtype=self._fp8_dtype, weight_dtype=weight_dtype)
        if self._fp8_targets:
            position = {id(w): i for i, w in enumerate(self._fp8_weights)}
            targets = [t for t in self._fp8_targets if id(t.weight) in position]
            fp8_lifecycle.store_fp8_scales_for_fsdp(targets, self.fp8_scales[[position[id(t.weight)] for t in targets]])

    def _prepare_packed(self, index, w, pg, var, grad_coef):
        """State adoption and the scalar table for a group's small params (may still raise)."""
        rule = self.rule
        packed = self._packed_states.get(index)
        keys = rule.state_keys(var)
        if packed is None or packed.keys != keys:
            small_params = [w.group.params[i] for i in w.group.small]
            packed = arena.PackedState(small_params, w.small_local, keys, rule.USES_STEP,
                                       w.group.key.device, w.small_local[0].dtype)
            self._packed_states[index] = packed
        active = [g is not None for g in w.small_grads]
        small_params = [w.group.params[i] for i in w.group.small]
        first = packed.adopt(small_params, self.optimizer.state, active) if keys or rule.USES_STEP else [0.0] * len(active)
        device = w.group.key.device
        vector = packed.steps if rule.USES_STEP else torch.tensor(first, dtype=torch.float32).to(device, non_blocking=True)
        table = rule.scalar_table(self.optimizer, pg, vector)
        active_t = torch.tensor(active, dtype=torch.bool).to(device, non_blocking=True)
        return w, var, packed, table, active_t, grad_coef

    def _run_packed(self, w, var, packed, table, active, grad_coef, finite) -> None:
        rule, compiler = self.rule, self._compiler
        flat_params = packed.param_buffer
        torch._foreach_copy_(packed.param_views, w.small_local)
        state_args = rule.packed_state_args(var, packed.arenas)
        update_packed = compiler.get(rule.update_packed)
        signature = ("update_packed", rule.NAME, var, flat_params.dtype, w.packed_grad.dtype, flat_params.device.type)
        with compiler.first_call(signature, f"packed update graph ({rule.NAME}, {var}, {flat_params.dtype})"):
            update_packed(flat_params, w.packed_grad, *state_args, packed.segment, table, active, grad_coef, finite)
        torch._foreach_copy_(w.small_local, packed.param_views)
        if packed.steps is not None:
            packed.steps.add_((finite & active).to(torch.float32))

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def step(
        self,
        *,
        grad_scale: float | torch.Tensor | None = None,
        num_label_tokens: int | torch.Tensor | None = None,
        dp_group_size: int | None = None,
    ) -> torch.Tensor:
        """Scale, norm, clip and update in one pass over memory; returns the pre-clip total norm.

        Args:
            grad_scale: multiply every grad by this factor before the norm and the update (a
                number or a 0-d tensor; folded into the compiled math, no extra pass).
            num_label_tokens, dp_group_size: the seed's PP/EP scaling. With PP on (``pp_axis_name``)
                grads are divided by ``num_label_tokens / dp_group_size``; with ``moe_mesh`` given,
                expert grads are further divided by ``(dp_group_size / ep_shard_size) *
                expert_tp_replication_factor``. ``num_label_tokens`` may be a 0-d device tensor.

        Returns:
            The total norm of the (scaled) grads before clipping: a float64 0-d tensor on the
            params' device. Nothing in this call reads a device value on the host, unless
            ``error_if_nonfinite=True``. When the norm is NaN/inf the update is skipped with
            params, state and step counters left bit-identical, and ``skipped_steps`` counts it.
        """
        kind = type(self.optimizer).__name__
        for group in self.optimizer.param_groups:
            self.rule.validate_group(group, kind)
        if num_label_tokens is None and self._accumulation is not None:
            num_label_tokens = self._accumulation.num_label_tokens  # counted by accumulate()
        self._accumulation = None
        _run_optimizer_hooks(self.optimizer, "pre")
        if self.offload_optimizer_state:
            self._move_state(to_params=True)
        with kernels.compile_settings():
            plan = self._current_plan()
            scales = self._scales(plan, grad_scale, num_label_tokens, dp_group_size)
            work = self._norm.collect(plan)
            result = self._norm.total(plan, work, scales, self.config.max_grad_norm)
            if self.config.error_if_nonfinite and not bool(result.finite):
                raise RuntimeError(
                    f"The total norm of order {self.config.norm_type} of the gradients is non-finite "
                    f"({float(result.total)}); nothing was updated. Pass error_if_nonfinite=False to skip such steps."
                )
            self._phase_b(work, result, scales)
            self.last_step_finite = result.finite
            self.skipped_steps += (~result.finite).to(torch.int64)
        # LR schedulers wrap optimizer.step to record that it ran and warn otherwise; FusedStep is
        # that step, so record it the same way (torch.optim.lr_scheduler's ``_opt_called``).
        self.optimizer._opt_called = True
        if self.offload_optimizer_state:
            self._move_state(to_params=False)
        # Weights changed: FP8 weights TransformerEngine cached on the first microbatch are stale.
        self.first_microbatch.reset()
        _run_optimizer_hooks(self.optimizer, "post")
        return result.total

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
        accumulation = GradAccumulation(
            list(self.distributed.model_parts), num_microbatches,
            pp_enabled=self._pp_group is not None, fp8_flag=self.first_microbatch,
        )
        return self._accumulate(accumulation)

    @contextlib.contextmanager
    def _accumulate(self, accumulation: GradAccumulation):
        self._accumulation = None
        with accumulation:
            yield accumulation
        # Reached only when the block ended normally: a failed step's tokens never reach step().
        self._accumulation = accumulation

    def _move_state(self, to_params: bool) -> None:
        """Keep optimizer state off the accelerator between steps (``offload_optimizer_state``).

        Before the update every state tensor moves to its param's device, after it back to the
        CPU. With params on the CPU (a CPU-only machine, or FSDP2's CPUOffloadPolicy) nothing moves.
        Packed arenas live only during the step when state moved off them: adoption copies the state
        back in. When nothing moved (CPU params) the arenas are kept, so the CPU path costs what it
        costs without offload. The copy back to the CPU is blocking (a sync, the one exception to
        sync-free steps): state read on the host right after ``step()`` must be complete.
        """
        moved = False
        for p, state in self.optimizer.state.items():
            device = planning.local_tensor(p).device if to_params else torch.device("cpu")
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and planning.local_tensor(value).device != device:
                    state[key] = value.to(device, non_blocking=to_params)
                    moved = True
        if moved and not to_params:
            self._packed_states = {}  # the state entries are no longer views into the arenas

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Same as ``optimizer.zero_grad(set_to_none)``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)


# ---------------------------------------------------------------------- helpers


def _run_optimizer_hooks(optimizer: torch.optim.Optimizer, when: str) -> None:
    """Run the step hooks that ``optimizer.step()`` would run (``register_step_pre_hook`` /
    ``register_step_post_hook``, global and per instance), with empty args since FusedStep's step
    takes none of the optimizer's. A pre-hook's replacement args are therefore ignored."""
    from torch.optim import optimizer as optim_module

    if when == "pre":
        hooks = [*optim_module._global_optimizer_pre_hooks.values(), *optimizer._optimizer_step_pre_hooks.values()]
    else:
        hooks = [*optimizer._optimizer_step_post_hooks.values(), *optim_module._global_optimizer_post_hooks.values()]
    for hook in hooks:
        hook(optimizer, (), {})


def _as_tensor(value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64, non_blocking=True)
    return torch.tensor(float(value), dtype=torch.float64).to(device, non_blocking=True)


def _as_scale(grad_scale, device: torch.device) -> torch.Tensor | None:
    if grad_scale is None:
        return None
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must be a scalar, got shape {tuple(grad_scale.shape)}")
        return grad_scale.reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"grad_scale must be a number or a 0-d tensor, got {type(grad_scale).__name__}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be finite, got {grad_scale}")
    return torch.tensor(float(grad_scale), dtype=torch.float64).to(device, non_blocking=True)
