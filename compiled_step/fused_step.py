"""FusedStep: plan -> Phase A (compiled partial norms) -> reduce -> norm/clip -> Phase B (compiled update).

This module orchestrates; it holds no per-element math. The compiled math is in ``kernels.py`` and
``rules/``; the only calls into ``torch.distributed`` are in ``collectives.py``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from compiled_step import collectives, kernels, norms, planning
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
        for name in ("error_if_nonfinite", "compile", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")


class GroupWork(NamedTuple):
    """One sharding group's tensors for this step (only params that have a grad)."""

    group: planning.ShardingGroup
    params: list[torch.Tensor]  # params with a grad (DTensor or plain), in plan order
    flat_params: list[torch.Tensor]  # local shards, 1-D, non-empty ones only
    flat_grads: list[torch.Tensor]  # matching local grads, 1-D
    nonempty: list[int]  # indices into ``params`` of the tensors in flat_params


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
        verbose: print compile progress to stderr.
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
        verbose: bool = False,
    ):
        self.rule = rule_for(optimizer)
        self.config = FusedStepConfig(
            max_grad_norm=max_grad_norm,
            norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite,
            compile=compile,
            backend=backend,
            bucket_size=bucket_size,
            verbose=verbose,
        )
        self.optimizer = optimizer
        self._kind = kernels.NormKind.of(float(norm_type))
        self._validate_param_groups()
        self._compiler = kernels.Compiler(backend, enabled=compile, verbose=verbose)
        self._plan: planning.Plan | None = None
        self._dummies: dict[tuple, tuple] = {}
        self._norm_order: torch.Tensor | None = None
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

    @staticmethod
    def _check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
        if g.is_sparse:
            raise TypeError(f"{where}: sparse grads are not supported; FusedStep needs dense grads")
        if g.shape != p.shape:
            raise ValueError(f"{where}: grad shape {tuple(g.shape)} differs from param shape {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"{where}: grad is on {g.device} but the param is on {p.device}")
        if g.is_complex() or not g.is_floating_point():
            raise TypeError(f"{where}: grads must be real floating point, got {g.dtype}")

    # ------------------------------------------------------------------ plan and per-step work

    def _current_plan(self) -> planning.Plan:
        signature = planning.params_signature(self.optimizer)
        if self._plan is None or self._plan.signature != signature:
            self._validate_param_groups()  # params may have been added since construction
            self._plan = planning.build_plan(self.optimizer)
            device = self._plan.norm_device
            if self.skipped_steps is None or self.skipped_steps.device != device:
                self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
                self.last_step_finite = torch.ones((), dtype=torch.bool, device=device)
            self._norm_order = torch.tensor(self._kind.p, dtype=torch.float64, device=device)
        return self._plan

    def _collect(self, plan: planning.Plan) -> list[GroupWork]:
        """Gather and validate this step's grads. Changes nothing."""
        work = []
        for group in plan.groups:
            params, flat_params, flat_grads, nonempty = [], [], [], []
            for i, p in enumerate(group.params):
                g = p.grad
                if g is None:
                    continue
                self._check_grad(p, g, group.names[i] if i < len(group.names) else "param")
                local_p, local_g = planning.local_tensor(p), planning.local_tensor(g)
                if local_p.numel() > 0:
                    nonempty.append(len(params))
                    flat_p = _flat(local_p)
                    flat_params.append(flat_p)
                    flat_grads.append(_flat_like(local_g, local_p))
                params.append(p)
            work.append(GroupWork(group, params, flat_params, flat_grads, nonempty))
        return work

    def _buckets(self, n: int) -> list[range]:
        return planning.chunk(n, self.config.bucket_size)

    def _pad(self, items: list, fillers: list) -> list:
        missing = self.config.bucket_size - len(items)
        return items if missing == 0 else list(items) + list(fillers[:missing])

    def _dummies_for(self, like_p: torch.Tensor, like_g: torch.Tensor, n_state: int):
        """One-element scratch tensors that pad the last bucket to ``bucket_size``, so every call
        has the same list length and hits the same graph. Their grads are zero (they add nothing to
        the norm); whatever the update writes into them is never read. Each slot gets its own
        tensors: Dynamo guards on which inputs alias, so reusing one tensor would recompile."""
        key = (like_p.device, like_p.dtype, like_g.dtype, n_state)
        dummies = self._dummies.get(key)
        if dummies is None:
            def make(dtype):
                return [torch.zeros(1, dtype=dtype, device=like_p.device) for _ in range(self.config.bucket_size)]

            states = list(zip(*[make(like_p.dtype) for _ in range(n_state)])) or [()] * self.config.bucket_size
            dummies = (make(like_p.dtype), make(like_g.dtype), states)
            self._dummies[key] = dummies
        return dummies

    # ------------------------------------------------------------------ phases

    def _phase_a(self, work: list[GroupWork], scale: torch.Tensor | None) -> list[torch.Tensor]:
        """Partial norms per sharding group, float64 ``[w]`` on the norm device, scale applied."""
        kind, compiler = self._kind, self._compiler
        if kind.kind == "sum":
            fn, extra = compiler.get(kernels.partial_norm_sum), (kind.p,)
        elif kind.kind == "max":
            fn, extra = compiler.get(kernels.partial_norm_max), ()
        else:
            fn, extra = compiler.get(kernels.partial_norm_scaled), (self._norm_order,)
        device = self._plan.norm_device
        partials = []
        for w in work:
            bucket_partials = []
            for bucket in self._buckets(len(w.flat_grads)):
                grads = [w.flat_grads[i] for i in bucket]
                grads = self._pad(grads, self._dummies_for(grads[0], grads[0], 0)[1])
                signature = ("norm", kind.kind, grads[0].dtype, grads[0].device.type)
                with compiler.first_call(signature, f"Phase A norm graph ({kind.kind}, {grads[0].dtype})"):
                    bucket_partials.append(fn(grads, *extra).to(device))
            if bucket_partials:
                partial = norms.combine(kind, torch.stack(bucket_partials))
            else:
                partial = torch.zeros(kind.partial_width, dtype=torch.float64, device=device)
            partials.append(norms.apply_scale(kind, partial, scale))
        return partials

    def _phase_b(self, work: list[GroupWork], result: norms.NormResult, scale: torch.Tensor | None) -> None:
        rule, compiler, optimizer = self.rule, self._compiler, self.optimizer
        update = compiler.get(rule.update)
        base_coef = result.clip_coef if scale is None else result.clip_coef * scale
        finite_by_device: dict[torch.device, torch.Tensor] = {}
        pending = []
        # First build every table and state (can still raise on a bad hyperparameter), then mutate.
        for w in work:
            if not w.params:
                continue
            pg = optimizer.param_groups[w.group.key.param_group]
            var = rule.variant(pg)
            local_device = w.group.key.device
            states, state_tensors, steps = [], [], []
            if rule.needs_state(var):
                for p in w.params:
                    st = optimizer.state[p]
                    tensors, step = rule.state_tensors(p, st, var, local_device)
                    states.append(st)
                    state_tensors.append(tuple(planning.local_tensor(t) for t in tensors))
                    steps.append(step)
            else:  # e.g. SGD without momentum: torch keeps no state, and neither do we
                states = [{}] * len(w.params)
                state_tensors = [()] * len(w.params)
                steps = [None] * len(w.params)
            vector = rule.per_tensor_vector(states, steps, local_device)
            table = rule.scalar_table(optimizer, pg, vector[w.nonempty] if len(w.nonempty) != len(w.params) else vector)
            sign = -1.0 if pg.get("maximize", False) else 1.0
            grad_coef = (base_coef * sign).to(device=local_device, dtype=torch.float32, non_blocking=True)
            if local_device not in finite_by_device:
                finite_by_device[local_device] = result.finite.to(local_device, non_blocking=True)
            pending.append((w, var, state_tensors, steps, table, grad_coef))

        for w, var, state_tensors, steps, table, grad_coef in pending:
            finite = finite_by_device[w.group.key.device]
            flat_states = [tuple(_flat(t) for t in state_tensors[i]) for i in w.nonempty]
            n_state = len(flat_states[0]) if flat_states else 0
            bucket_size = self.config.bucket_size
            n_rows = len(w.flat_params)
            padded_rows = -(-n_rows // bucket_size) * bucket_size
            if padded_rows != n_rows:
                table = torch.nn.functional.pad(table, (0, 0, 0, padded_rows - n_rows))
            tables = table.view(-1, bucket_size, table.shape[1]) if n_rows else table
            for b, bucket in enumerate(self._buckets(n_rows)):
                params = [w.flat_params[i] for i in bucket]
                grads = [w.flat_grads[i] for i in bucket]
                bucket_states = [flat_states[i] for i in bucket]
                dummy_p, dummy_g, dummy_s = self._dummies_for(params[0], grads[0], n_state)
                params, grads = self._pad(params, dummy_p), self._pad(grads, dummy_g)
                bucket_states = self._pad(bucket_states, dummy_s)
                state_args = rule.state_lists(var, bucket_states)
                signature = ("update", rule.NAME, var, params[0].dtype, grads[0].dtype, params[0].device.type)
                with compiler.first_call(signature, f"Phase B update graph ({rule.NAME}, {var}, {params[0].dtype})"):
                    update(params, grads, *state_args, tables[b], grad_coef, finite)
            real_steps = [s for s in steps if s is not None]
            if real_steps:
                torch._foreach_add_(real_steps, finite.to(torch.float32))

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def step(self, *, grad_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Norm, clip and update in one pass over memory; returns the pre-clip total norm.

        Args:
            grad_scale: multiply every grad by this factor before the norm and the update (a
                number or a 0-d tensor; folded into the compiled math, no extra pass).

        Returns:
            The total norm of the (scaled) grads before clipping: a float64 0-d tensor on the
            params' device. Nothing in this call reads a device value on the host, unless
            ``error_if_nonfinite=True``. When the norm is NaN/inf the update is skipped with
            params, state and step counters left bit-identical, and ``skipped_steps`` counts it.
        """
        _run_optimizer_hooks(self.optimizer, "pre")
        with kernels.compile_settings():
            plan = self._current_plan()
            kind = type(self.optimizer).__name__
            for group in self.optimizer.param_groups:
                self.rule.validate_group(group, kind)
            scale = _as_scale(grad_scale, plan.norm_device)
            work = self._collect(plan)
            partials = self._phase_a(work, scale)
            total_partial = collectives.reduce_partials(self._kind, partials, plan)
            result = norms.finish(self._kind, total_partial, self.config.max_grad_norm)
            if self.config.error_if_nonfinite and not bool(result.finite):
                raise RuntimeError(
                    f"The total norm of order {self.config.norm_type} of the gradients is non-finite "
                    f"({float(result.total)}); nothing was updated. Pass error_if_nonfinite=False to skip such steps."
                )
            self._phase_b(work, result, scale)
            self.last_step_finite = result.finite
            self.skipped_steps += (~result.finite).to(torch.int64)
        # LR schedulers wrap optimizer.step to record that it ran and warn otherwise; FusedStep is
        # that step, so record it the same way (torch.optim.lr_scheduler's ``_opt_called``).
        self.optimizer._opt_called = True
        _run_optimizer_hooks(self.optimizer, "post")
        return result.total

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


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of all elements of a dense tensor, in memory order.

    ``detach()`` makes the alias a non-view without ``requires_grad``: Dynamo guards on the
    ``_base`` of view inputs (its sizes and strides) and on ``requires_grad``, so passing
    ``p.view(-1)`` would recompile for every distinct param shape and layout."""
    if t.is_contiguous():
        return t.view(-1).detach()
    if _is_dense_positive(t):
        # e.g. channels_last or transposed weights: dense in memory, just permuted.
        return t.as_strided((t.numel(),), (1,), t.storage_offset()).detach()
    raise ValueError(
        f"FusedStep needs params and optimizer state stored densely (no gaps or overlaps); got a tensor "
        f"of shape {tuple(t.shape)} and stride {t.stride()}"
    )


def _is_dense_positive(t: torch.Tensor) -> bool:
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


_warned_stride_copy = False


def _flat_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The grad flattened in the param's memory order, so element i of both belongs together."""
    if g.stride() == p.stride() or g.numel() <= 1:
        return _flat(g)
    global _warned_stride_copy
    if not _warned_stride_copy:
        warnings.warn(
            f"a grad's strides {g.stride()} differ from its param's {p.stride()}; FusedStep copies such grads "
            "into the param's layout each step (an extra read and write).",
            stacklevel=4,
        )
        _warned_stride_copy = True
    return _flat(torch.empty_like(p).copy_(g))
