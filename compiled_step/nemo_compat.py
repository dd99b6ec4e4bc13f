"""The seed's functional API (NeMo Automodel ``components.training.utils``), same names and signatures.

Swap ``from nemo_automodel.components.training.utils import ...`` for ``from compiled_step import ...``.
Built on the same machinery as ``FusedStep`` (plan -> compiled partial norms -> one collective per
process group -> clip coefficient), but, as in the seed, grads are clipped *in place* and the
optimizer step stays the caller's. Differences from the seed are listed in the README.
"""

from __future__ import annotations

from typing import Iterable

import torch

from compiled_step import collectives, experts, gradnorm, kernels, planning
from compiled_step.experts import _TE_EXPERT_PARAM_PATTERN  # noqa: F401  (re-exported seed name)

_ENGINES: dict[tuple, gradnorm.GradNorm] = {}
# Grads of at most this many elements are packed into one buffer for the norm (FusedStep's default).
PACK_THRESHOLD = 16384


def _engine(norm_type: float, compile: bool) -> gradnorm.GradNorm:
    """One engine per (norm kind, compile): its padding tensors and compiled graphs are reused."""
    kind = kernels.NormKind.of(float(norm_type))
    key = (kind, compile)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = gradnorm.GradNorm(kind, 16, kernels.Compiler(enabled=compile))
    return engine


def _check_norm_args(max_norm, norm_type) -> None:
    # Reuse FusedStep's validation so the functional API raises the same errors.
    from compiled_step.fused_step import FusedStepConfig

    FusedStepConfig(max_grad_norm=max_norm, norm_type=norm_type)


@torch.no_grad()
def _clip_in_place(
    param_lists: list[list[torch.Tensor]],
    max_norm: float | None,
    norm_type: float,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    names: dict[int, str] | None = None,
    expert_ids: frozenset[int] = frozenset(),
    ep: tuple | None = None,
    ep_axis_name: str | None = None,
    pp: tuple | None = None,
    base_scale: float | torch.Tensor | None = None,
    expert_scale: float | torch.Tensor | None = None,
    compile: bool = True,
) -> torch.Tensor | None:
    """Scale grads, compute the global norm of the scaled grads and clip, in one multiply per grad.

    Returns the total norm (float64 0-d tensor), or None when ``max_norm`` is None (grads are then
    only scaled, without computing a norm).
    """
    _check_norm_args(max_norm, norm_type)
    engine = _engine(norm_type, compile)
    with kernels.compile_settings():
        plan = planning.build_plan(param_lists, names=names, expert_ids=expert_ids, ep=ep,
                                   ep_axis_name=ep_axis_name, pp=pp, pack_threshold=PACK_THRESHOLD)
        device = plan.norm_device
        base = _scale_tensor(base_scale, device)
        expert = _scale_tensor(expert_scale, device)
        scales = gradnorm.group_scales(plan, base, expert)
        work = engine.collect(plan)
        if max_norm is None:
            factors = scales
            total = None
        else:
            result = engine.total(plan, work, scales, max_norm)
            if error_if_nonfinite and not bool(result.finite):
                raise RuntimeError(
                    f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                    "so it cannot be clipped."
                )
            factors = [result.clip_coef if s is None else result.clip_coef * s for s in scales]
            total = result.total
        for w, factor in zip(work, factors):
            if factor is None:
                continue
            local_grads = [planning.local_tensor(p.grad) for p in w.params]
            local_grads += [g for g in w.small_grads if g is not None]
            factor = factor.to(device=w.group.key.device, dtype=torch.float32, non_blocking=True)
            if not local_grads:
                continue
            if foreach is False:
                for g in local_grads:
                    g.mul_(factor)
            else:
                torch._foreach_mul_(local_grads, factor)
    return total


def _scale_tensor(value, device) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64, non_blocking=True)
    return torch.tensor(float(value), dtype=torch.float64).to(device, non_blocking=True)


@torch.no_grad()
def _clip_grad_norm_impl(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh=None,
) -> torch.Tensor:
    """Sharding-aware ``clip_grad_norm_``: DTensor grads of any mesh/placements, plus a PP mesh.

    Returns the total norm as a float64 0-d tensor (no host sync) and clips grads in place.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    pp = (pp_mesh.get_group(), pp_mesh.device_type) if pp_mesh is not None else None
    return _clip_in_place([params], max_norm, norm_type, error_if_nonfinite=error_if_nonfinite,
                          foreach=foreach, pp=pp)


def _pp(pp_enabled: bool, device_mesh, pp_axis_name):
    if not pp_enabled:
        return None
    if pp_axis_name is None:
        raise ValueError("pp_axis_name must be provided when pp_enabled is True")
    if device_mesh is None:
        return None  # the seed tolerates this: no PP reduction without a mesh
    return collectives.process_group_of(device_mesh, pp_axis_name)


def _trainable_params(model_parts) -> list[torch.Tensor]:
    return [p for m in model_parts for p in m.parameters() if p.requires_grad]


@torch.no_grad()
def clip_grad_norm(
    max_grad_norm: float | None,
    model_parts: list[torch.nn.Module],
    norm_type: float = 2.0,
    pp_enabled: bool = False,
    device_mesh=None,
    pp_axis_name: str | None = None,
    foreach: bool = True,
    use_torch_clip_grad_norm: bool = False,
    moe_mesh=None,
    ep_axis_name: str | None = None,
) -> torch.Tensor | float:
    """Common gradient clipping helper (the seed's), for every parallelism.

    Groups params by sharding pattern, reduces each group's partial norm over the mesh dims where it
    is sharded (one collective per process group), over EP for expert params when ``moe_mesh`` and
    ``ep_axis_name`` are given, and over PP when enabled; then clips grads in place.

    Returns:
        The total norm as a float64 0-d tensor on the grads' device (no host sync), or ``0.0``
        when ``max_grad_norm`` is None (nothing is clipped).
    """
    if max_grad_norm is None:
        return 0.0
    params = _trainable_params(model_parts)
    pp = _pp(pp_enabled, device_mesh, pp_axis_name)
    if use_torch_clip_grad_norm and pp is None and not any(planning._is_dtensor(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type=norm_type, foreach=foreach)
    ep = collectives.process_group_of(moe_mesh, ep_axis_name) if moe_mesh is not None and ep_axis_name else None
    return _clip_in_place(
        [params], max_grad_norm, norm_type, foreach=foreach,
        names=experts.param_names(model_parts),
        expert_ids=experts.expert_param_ids(model_parts, ep_axis_name) if ep is not None else frozenset(),
        ep=ep, ep_axis_name=ep_axis_name, pp=pp,
    )


@torch.no_grad()
def scale_grads_and_clip_grad_norm(
    max_grad_norm: float | None,
    model_parts: list[torch.nn.Module],
    norm_type: float = 2.0,
    pp_enabled: bool = False,
    device_mesh=None,
    moe_mesh=None,
    ep_axis_name: str | None = None,
    pp_axis_name: str | None = None,
    foreach: bool = True,
    num_label_tokens: int | torch.Tensor | None = None,
    dp_group_size: int | None = None,
    expert_tp_replication_factor: int = 1,
    use_torch_clip_grad_norm: bool = False,
) -> torch.Tensor | float:
    """Scale grads for PP/EP and clip, in one multiply per grad (the seed makes a separate ``div_`` pass).

    - PP scaling: with ``pp_enabled`` and both given, all grads are divided by
      ``num_label_tokens / dp_group_size``.
    - EP scaling: with ``moe_mesh`` and ``dp_group_size`` given, expert grads are divided by
      ``(dp_group_size / ep_shard_size) * expert_tp_replication_factor``.
    - The norm is that of the scaled grads, reduced over mesh dims, EP (for experts) and PP.

    Returns:
        The total norm as a float64 0-d tensor, or ``0.0`` when ``max_grad_norm`` is None (grads
        are still scaled).
    """
    experts.check_replication_factor(expert_tp_replication_factor)
    divisor = experts.pp_divisor(pp_enabled, num_label_tokens, dp_group_size)
    ratio = experts.ep_ratio(moe_mesh, dp_group_size, expert_tp_replication_factor)
    base = None if divisor is None else 1.0 / divisor
    expert = base if ratio is None else (1.0 / ratio if base is None else base / ratio)
    params = _trainable_params(model_parts)
    ep = collectives.process_group_of(moe_mesh, ep_axis_name) if moe_mesh is not None and ep_axis_name else None
    total = _clip_in_place(
        [params], max_grad_norm, norm_type, foreach=foreach,
        names=experts.param_names(model_parts),
        expert_ids=experts.expert_param_ids(model_parts, ep_axis_name),
        ep=ep, ep_axis_name=ep_axis_name, pp=_pp(pp_enabled, device_mesh, pp_axis_name),
        base_scale=base, expert_scale=expert,
    )
    return 0.0 if total is None else total
