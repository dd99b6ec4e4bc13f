"""NeMo Automodel's functional API (``components.training.utils``), same names and signatures.

Swap ``from nemo_automodel.components.training.utils import ...`` for ``from compiled_step import ...``.
Built on the same machinery as ``FusedStep`` (plan -> compiled partial norms -> one collective per
process group -> clip coefficient), but, as in NeMo Automodel, grads are the caller's tensors, they
are clipped *in place* and the optimizer step stays the caller's. The README's "NeMo Automodel's functions"
lists the main differences; each function's docstring says the rest.
"""

from __future__ import annotations

from typing import Iterable

import torch

from compiled_step import buckets, collectives, compiling, experts, planning
from compiled_step.config import FusedStepConfig
from compiled_step.experts import _TE_EXPERT_PARAM_PATTERN  # noqa: F401  (re-exported name)
from compiled_step.norm import CLIP_EPS, NormKind, combine, total_from
from compiled_step.norm.partials import partial_of_list, scale_partial
from compiled_step.rules.common import compute_dtype
from compiled_step.storage import flat_alias

# Grads of at most this many elements are concatenated into one tensor for the norm (one compiled call
# for a thousand biases instead of one bucket slot each); the rest go through buckets of BUCKET.
PACK_THRESHOLD = 16384
BUCKET = 16
# The partial norms are compiled (the same graphs for every call). False runs them eagerly: for
# debugging, and in tests that would otherwise compile in every rank of every spawned process.
COMPILE_NORMS = True
_COMPILER = compiling.Compiler()
_FILLERS = buckets.Fillers()


def _flat(g: torch.Tensor) -> torch.Tensor:
    return flat_alias(g) if planning.is_dense(g) else g.reshape(-1)


def _check_norm_args(max_norm, norm_type) -> None:
    FusedStepConfig(max_grad_norm=max_norm, norm_type=norm_type)  # the same errors as FusedStep


def _group_partial(kind: NormKind, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The partial norm (float64 ``[w]`` on ``device``) of one group's local grads, bucket by bucket."""
    small = [_flat(g) for g in grads if 0 < g.numel() <= PACK_THRESHOLD]
    slots = [_flat(g) for g in grads if g.numel() > PACK_THRESHOLD]
    if small:
        slots.append(torch.cat(small))
    if not slots:
        return torch.zeros(kind.partial_width, dtype=torch.float64, device=device)
    fn = _COMPILER.get(partial_of_list) if COMPILE_NORMS else partial_of_list
    order = torch.tensor(kind.p if kind.kind == "scaled" else 2.0, dtype=torch.float64, device=slots[0].device)
    parts = []
    with compiling.compile_settings(_COMPILER.combo_kernels):
        for bucket in buckets.chunk(len(slots), BUCKET):
            members = [slots[i] for i in bucket]
            fillers = _FILLERS.get(members[0].device, {"grads": members[0].dtype}, BUCKET)["grads"]
            signature = ("norm list", kind.kind, members[0].dtype, members[0].device.type)
            with _COMPILER.first_call(signature, f"partial norm of a list of grads ({kind.kind})"):
                parts.append(fn(buckets.padded(members, fillers, BUCKET), order, kind=kind.kind, p=kind.p).to(device))
    return combine(kind.kind, torch.stack(parts), order.to(device) if kind.kind == "scaled" else kind.p)


def _norm_grad(p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the grad to clip in place, the grad the norm is taken of); both None without a grad.

    A DTensor grad in other placements than its param's is redistributed to the param's placements
    (and becomes ``p.grad``); a Partial grad of a Partial param is clipped as it is (scaling is linear)
    while its norm is taken of the summed grad.
    """
    g = p.grad
    if g is None:
        return None, None
    if not planning.is_dtensor(g):
        return g, g
    if not any(pl.is_partial() for pl in p.placements):
        g = collectives.match_grad_placement(p, g)
        if g is not p.grad:
            p.grad = g
    return g, collectives.summed_grad(g)


def _total_norm(kind: NormKind, plan: planning.Plan, norm_grads: list[list[torch.Tensor]], scales: list
                ) -> torch.Tensor:
    """The total norm of the scaled grads: partials per group, reduced per process group, then over PP."""
    device = plan.device
    order = torch.tensor(kind.p if kind.kind == "scaled" else 2.0, dtype=torch.float64, device=device)
    p_arg = order if kind.kind == "scaled" else kind.p
    partials = [scale_partial(kind.kind, kind.p, _group_partial(kind, grads, device), s)
                for grads, s in zip(norm_grads, scales)]
    if not partials:
        combined = torch.zeros(kind.partial_width, dtype=torch.float64, device=device)
    else:
        partials = torch.stack(partials)
        for reduction in plan.reductions:
            index = torch.tensor(reduction.members, device=device)
            reduced = collectives.reduce_stacked(kind, partials.index_select(0, index), reduction, order)
            partials.index_copy_(0, index, reduced)
        combined = combine(kind.kind, partials, p_arg)
    if plan.pp is not None:
        combined = collectives.reduce_stacked(kind, combined[None], plan.pp, order)[0]
    return total_from(kind.kind, combined, p_arg)


def _multiply_in_place(clip_grads: list[list[torch.Tensor]], factors: list, plan: planning.Plan, foreach) -> None:
    for grads, factor, group in zip(clip_grads, factors, plan.groups):
        if factor is None or not grads:
            continue
        # float32 for bf16/fp16/fp32 grads; float64 grads get a float64 factor, as clip_grad_norm_ gives them.
        factor = factor.to(device=group.key.device, dtype=compute_dtype(group.key.grad_dtype), non_blocking=True)
        if foreach is False:
            for g in grads:
                g.mul_(factor)
        else:
            torch._foreach_mul_(grads, factor)


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
) -> torch.Tensor | None:
    """Scale grads, compute the global norm of the scaled grads and clip, in one multiply per grad.

    Returns the total norm (float64 0-d tensor), or None when ``max_norm`` is None (grads are then
    only scaled, without computing a norm).
    """
    _check_norm_args(max_norm, norm_type)
    kind = NormKind.of(float(norm_type))
    plan = planning.build_plan(param_lists, names=names, expert_ids=expert_ids, ep=ep, ep_axis_name=ep_axis_name,
                               pp=pp, bucket_size=BUCKET)
    base, expert = _scale_tensor(base_scale, plan.device), _scale_tensor(expert_scale, plan.device)
    scales = [expert if g.key.is_expert else base for g in plan.groups]
    clip_grads, norm_grads = [], []
    for group in plan.groups:
        pairs = [_norm_grad(p) for p in group.params]
        clip_grads.append([planning.local_tensor(c) for c, _ in pairs if c is not None])
        norm_grads.append([planning.local_tensor(n) for _, n in pairs if n is not None])
    if max_norm is None:
        _multiply_in_place(clip_grads, scales, plan, foreach)
        return None
    total = _total_norm(kind, plan, norm_grads, scales)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped.")
    coef = (max_norm / (total + CLIP_EPS)).clamp(max=1.0)
    _multiply_in_place(clip_grads, [coef if s is None else coef * s for s in scales], plan, foreach)
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
        return None  # NeMo Automodel tolerates this: no PP reduction without a mesh
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
    """Common gradient clipping helper (NeMo Automodel's), for every parallelism.

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
    if use_torch_clip_grad_norm and pp is None and not any(planning.is_dtensor(p) for p in params):
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
    """Scale grads for PP/EP and clip, in one multiply per grad (NeMo Automodel makes a separate ``div_`` pass).

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
