"""Sharding groups and buckets: pure Python over the optimizer's params; no compile, no collectives.

A plan is built from *all* params of the optimizer (not only those with a grad this step), so that
every rank derives the same groups and issues the same collectives. It is rebuilt only when the set
of params or param groups changes (``signature``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor as a plain tensor, or the tensor itself.

    torchao's float8 FSDP weights are DTensors over a ``WeightWithDynamicFloat8CastTensor``
    wrapper (and so are their optimizer states, made with ``zeros_like``); the compiled math wants
    the plain tensor inside, which shares its storage.
    """
    local = t._local_tensor if _is_dtensor(t) else t
    if type(local).__name__ == "WeightWithDynamicFloat8CastTensor":
        local = local._tensor
    return local


_DTENSOR_TYPE = None


def _is_dtensor(t) -> bool:
    # Called per tensor per step: resolve the DTensor class once (an import statement per call
    # costs a microsecond, which a thousand params turn into a millisecond).
    global _DTENSOR_TYPE
    if _DTENSOR_TYPE is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = type("NoDTensor", (), {})
        _DTENSOR_TYPE = DTensor
    return isinstance(t, _DTENSOR_TYPE)


@dataclass(frozen=True)
class GroupKey:
    """What must be equal for params to share a bucket graph and a norm reduction."""

    param_group: int  # index into optimizer.param_groups
    device: torch.device
    dtype: torch.dtype
    mesh_key: tuple = ()  # (mesh identity, placements) for DTensors; () for plain tensors
    is_expert: bool = False
    fp8: bool = False  # FP8 weights: the update also returns the new weights' amax (never packed)


@dataclass
class ShardingGroup:
    key: GroupKey
    params: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # Indices into ``params`` of the tensors whose local shard is small enough to be packed: they are
    # processed end to end in one flat buffer (one compiled call) instead of one bucket slot each.
    small: list[int] = field(default_factory=list)
    large: list[int] = field(default_factory=list)


@dataclass
class Reduction:
    """One process group over which some sharding groups' partial norms are reduced.

    ``members`` are indices into ``Plan.groups``; their partials are stacked and reduced in one
    collective. ``device_type`` is the mesh's: partials travel there for the collective (NCCL cannot
    reduce CPU tensors, e.g. under FSDP2's CPUOffloadPolicy) and come back.
    """

    process_group: object
    device_type: str
    label: str
    members: list[int] = field(default_factory=list)
    over_shards: bool = True  # a mesh dim the params are sharded over (False for EP: different experts)


@dataclass
class Plan:
    signature: tuple
    groups: list[ShardingGroup]
    norm_device: torch.device
    reductions: list[Reduction] = field(default_factory=list)  # mesh dims and EP, one entry per process group
    pp: Reduction | None = None  # applied last, to the combined partial of all groups


def params_signature(param_lists) -> tuple:
    """Identity of the params and their grouping; cheap enough to check every step."""
    return tuple(tuple(map(id, params)) for params in param_lists)


def mesh_key_of(p: torch.Tensor) -> tuple:
    if not _is_dtensor(p):
        return ()
    return (id(p.device_mesh), tuple(p.device_mesh.mesh_dim_names or ()), tuple(p.device_mesh.shape), p.placements)


def _on_ep_mesh(p: torch.Tensor, ep_axis_name: str | None) -> bool:
    """A DTensor whose device mesh has the EP axis: an expert param (recognition by mesh axis)."""
    return bool(ep_axis_name) and _is_dtensor(p) and ep_axis_name in (p.device_mesh.mesh_dim_names or ())


def build_plan(
    param_lists: list[list[torch.Tensor]],
    *,
    names: dict[int, str] | None = None,
    expert_ids: frozenset[int] = frozenset(),
    ep: tuple | None = None,
    ep_axis_name: str | None = None,
    pp: tuple | None = None,
    pack_threshold: int = 0,
    fp8_ids: frozenset[int] = frozenset(),
) -> Plan:
    """Group *all* params (not only those with grads) so every rank issues the same collectives.

    Args:
        param_lists: one list of params per optimizer param group.
        names: fully qualified names by ``id(param)``, for error messages.
        expert_ids: ``id()`` of expert params (see ``experts.expert_param_ids``). DTensors whose
            mesh has ``ep_axis_name`` are experts too, whether or not they are in ``expert_ids``
            (``FusedStep`` without ``model_parts`` knows no names, but still sees the mesh).
        ep: ``(process_group, device_type)`` of the EP axis; expert params whose mesh lacks the EP
            axis (plain tensors, or DTensors sharded on a dp-only mesh) are reduced over it, since
            different EP ranks hold different experts.
        ep_axis_name: the EP axis name, to tell which DTensor experts already reduce over EP.
        pp: ``(process_group, device_type)`` of the pipeline axis, reduced over last.
        pack_threshold: local shards with at most this many elements are packed (0: none).
        fp8_ids: ``id()`` of FP8 weights, whose amax the update computes.
    """
    names = names or {}
    groups: dict[GroupKey, ShardingGroup] = {}
    for index, params in enumerate(param_lists):
        for p in params:
            local = local_tensor(p)
            is_expert = id(p) in expert_ids or _on_ep_mesh(p, ep_axis_name)
            key = GroupKey(index, local.device, p.dtype, mesh_key_of(p), is_expert, fp8=id(p) in fp8_ids)
            sharding_group = groups.setdefault(key, ShardingGroup(key))
            sharding_group.params.append(p)
            sharding_group.names.append(names.get(id(p), f"param_groups[{index}] param {len(sharding_group.params) - 1}"))
    ordered = list(groups.values())
    for group in ordered:
        for i, p in enumerate(group.params):
            packable = local_tensor(p).numel() <= pack_threshold and not group.key.fp8
            (group.small if packable else group.large).append(i)
    accelerators = [g.key.device for g in ordered if g.key.device.type != "cpu"]
    norm_device = accelerators[0] if accelerators else torch.device("cpu")

    # Distinct process groups in order of first appearance. Ranks that share a process group hold
    # the same params (same pipeline stage), hence the same plan and the same collective order.
    reductions: dict[int, Reduction] = {}

    def add(process_group, device_type, label, member, over_shards=True):
        reduction = reductions.setdefault(
            id(process_group), Reduction(process_group, device_type, label, over_shards=over_shards)
        )
        reduction.members.append(member)

    for member, group in enumerate(ordered):
        p = group.params[0]
        mesh_names = ()
        if _is_dtensor(p):
            mesh = p.device_mesh
            mesh_names = tuple(mesh.mesh_dim_names or ())
            for dim, placement in enumerate(p.placements):
                if not placement.is_replicate():
                    label = mesh_names[dim] if mesh_names else f"mesh dim {dim}"
                    add(mesh.get_group(mesh_dim=dim), mesh.device_type, label, member)
        if group.key.is_expert and ep is not None and (ep_axis_name is None or ep_axis_name not in mesh_names):
            add(ep[0], ep[1], "ep", member, over_shards=False)
    pp_reduction = Reduction(pp[0], pp[1], "pp") if pp is not None else None
    return Plan(params_signature(param_lists), ordered, norm_device, list(reductions.values()), pp_reduction)


def chunk(n: int, size: int) -> list[range]:
    """Index ranges of consecutive buckets of at most ``size`` items."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]
