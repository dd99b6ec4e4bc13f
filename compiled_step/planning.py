"""Sharding groups and buckets: pure Python over the optimizer's params; no compile, no collectives.

A plan is built from *all* params of the optimizer (not only those with a grad this step), so that
every rank derives the same groups and issues the same collectives. It is rebuilt only when the set
of params or param groups changes (``signature``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


@dataclass(frozen=True)
class GroupKey:
    """What must be equal for params to share a bucket graph and a norm reduction."""

    param_group: int  # index into optimizer.param_groups
    device: torch.device
    dtype: torch.dtype
    mesh_key: tuple = ()  # (mesh identity, placements) for DTensors; () for plain tensors
    is_expert: bool = False


@dataclass
class ShardingGroup:
    key: GroupKey
    params: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@dataclass
class Plan:
    signature: tuple
    groups: list[ShardingGroup]
    norm_device: torch.device


def params_signature(optimizer: torch.optim.Optimizer) -> tuple:
    """Identity of the params and their grouping; cheap enough to check every step."""
    return tuple(tuple(map(id, group["params"])) for group in optimizer.param_groups)


def mesh_key_of(p: torch.Tensor) -> tuple:
    if not _is_dtensor(p):
        return ()
    return (id(p.device_mesh), tuple(p.device_mesh.mesh_dim_names or ()), tuple(p.device_mesh.shape), p.placements)


def build_plan(optimizer: torch.optim.Optimizer, param_names: dict[int, str] | None = None,
               expert_ids: frozenset[int] = frozenset()) -> Plan:
    groups: dict[GroupKey, ShardingGroup] = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            local = local_tensor(p)
            key = GroupKey(index, local.device, p.dtype, mesh_key_of(p), id(p) in expert_ids)
            sharding_group = groups.setdefault(key, ShardingGroup(key))
            sharding_group.params.append(p)
            sharding_group.names.append((param_names or {}).get(id(p), f"param_groups[{index}]"))
    ordered = list(groups.values())
    devices = [g.key.device for g in ordered]
    accelerators = [d for d in devices if d.type != "cpu"]
    norm_device = accelerators[0] if accelerators else torch.device("cpu")
    return Plan(params_signature(optimizer), ordered, norm_device)


def chunk(n: int, size: int) -> list[range]:
    """Index ranges of consecutive buckets of at most ``size`` items."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]
