"""Reductions across ranks. The only module that calls ``torch.distributed``.

Partials of all sharding groups that reduce over the same process group are stacked and reduced in
one collective (SUM, or MAX for the inf norm), then the groups are combined locally and the result
is reduced over the pipeline axis. The order of process groups comes from the plan, identical on
every rank that shares them. For ``norm_type`` other than 1, 2 and inf, each process group takes two
collectives (MAX of the per-rank maxima, then SUM of the rescaled sums) so that nothing overflows.
"""

from __future__ import annotations

import torch

from compiled_step.norm.kinds import NormKind


def _dist():
    import torch.distributed as dist

    return dist


def all_reduce(t: torch.Tensor, op, reduction) -> torch.Tensor:
    """All-reduce ``t`` over ``reduction.process_group`` on the mesh's device type; result on ``t``'s device."""
    dist = _dist()
    on_mesh_device = t.device.type == reduction.device_type
    comm = t.contiguous() if on_mesh_device else t.to(reduction.device_type)
    dist.all_reduce(comm, op=op, group=reduction.process_group)
    return comm if on_mesh_device else comm.to(t.device)


def all_reduce_max(t: torch.Tensor, reduction) -> torch.Tensor:
    """MAX all-reduce that keeps NaN, in one collective.

    gloo's MAX drops a NaN unless it comes from rank 0 (it takes ``std::max`` pairwise), so a NaN
    grad on any other rank gave a finite inf-norm and the step was applied instead of skipped. A
    NaN flag per element rides in the same collective and restores the NaN afterwards.
    """
    nan = torch.isnan(t)
    both = torch.stack([torch.where(nan, torch.full_like(t, -torch.inf), t), nan.to(t.dtype)])
    both = all_reduce(both, _dist().ReduceOp.MAX, reduction)
    return torch.where(both[1] > 0, torch.full_like(t, torch.nan), both[0])


def reduce_stacked(kind: NormKind, stacked: torch.Tensor, reduction, order: torch.Tensor) -> torch.Tensor:
    """Reduce ``[k, w]`` partials of ``k`` sharding groups over one process group."""
    op = _dist().ReduceOp
    if kind.kind == "sum":
        return all_reduce(stacked, op.SUM, reduction)
    if kind.kind == "max":
        return all_reduce_max(stacked, reduction)
    local_max, local_sum = stacked[:, 0], stacked[:, 1]
    global_max = all_reduce_max(local_max, reduction)
    safe_max = torch.where(global_max > 0, global_max, torch.ones_like(global_max))
    weight = torch.where(local_max > 0, (local_max / safe_max).pow(order), torch.zeros_like(local_max))
    global_sum = all_reduce(local_sum * weight, op.SUM, reduction)
    return torch.stack([global_max, global_sum], dim=1)


def exchange(exchange, send: torch.Tensor, receive: torch.Tensor) -> None:
    """All-to-all of ``send`` into ``receive`` (``[W, L]`` each: block q goes to rank q, block r comes from
    rank r) over a row-sharded matrix group's process group (``planning.Exchange``)."""
    dist = _dist()
    if send.device.type == exchange.device_type:
        dist.all_to_all_single(receive, send, group=exchange.process_group)
        return
    out = torch.empty_like(receive, device=exchange.device_type)
    dist.all_to_all_single(out, send.to(exchange.device_type), group=exchange.process_group)
    receive.copy_(out)


def reduce_partials_over(reduction, kind: NormKind, partials: torch.Tensor, members: torch.Tensor | None,
                         order: torch.Tensor, param_partials: torch.Tensor | None = None,
                         param_rows: torch.Tensor | None = None) -> None:
    """Reduce the member groups' rows of ``partials`` in place over one process group (a program call).

    With ``param_rows``, those rows of ``param_partials`` (per-param partials, ``param_norms``) are stacked
    under the groups' and reduced in the same collective, in place too.
    """
    stacked = partials if members is None else partials.index_select(0, members)
    groups = stacked.shape[0]
    if param_rows is not None:
        stacked = torch.cat([stacked, param_partials.index_select(0, param_rows)])
    reduced = reduce_stacked(kind, stacked, reduction, order)
    if param_rows is not None:
        param_partials.index_copy_(0, param_rows, reduced[groups:])
        reduced = reduced[:groups]
    if members is None:
        partials.copy_(reduced)
    else:
        partials.index_copy_(0, members, reduced)


def reduce_amax(amax: torch.Tensor, reduction) -> torch.Tensor:
    """NaN-preserving MAX all-reduce of FP8 weights' amax over one process group."""
    return all_reduce_max(amax, reduction)


def all_reduce_max_over_mesh_dim(t: torch.Tensor, mesh, mesh_dim: int) -> torch.Tensor:
    """In-place MAX all-reduce of ``t`` over one mesh dim (the eager FP8 amax reference uses it)."""
    dist = _dist()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
    return t


def match_grad_placement(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The grad in its param's placements.

    A Replicate param can legitimately receive a Partial grad (e.g. replicated LoRA-A inside a
    column-parallel projection), and a sharded param's grad can arrive Partial too. Its rank-local
    values are summands, not the grad: norms and updates computed from them would differ across
    ranks. Redistributing once (an all-reduce or reduce-scatter, as DTensor decides) gives every rank
    the real grad in the param's layout, as torch.optim's DTensor path would on ``param.add_(grad)``.
    """
    if g.placements == p.placements:
        return g
    return g.redistribute(device_mesh=p.device_mesh, placements=p.placements)


def summed_grad(g: torch.Tensor) -> torch.Tensor:
    """A DTensor grad with every ``Partial`` placement reduced (to ``Replicate``): what its norm is of."""
    from torch.distributed.tensor import Replicate

    if not any(pl.is_partial() for pl in g.placements):
        return g
    placements = [Replicate() if pl.is_partial() else pl for pl in g.placements]
    return g.redistribute(device_mesh=g.device_mesh, placements=placements)


def process_group_of(mesh, axis_name: str) -> tuple:
    """``(process_group, device_type)`` of one named axis of a DeviceMesh."""
    names = tuple(mesh.mesh_dim_names or ())
    if axis_name not in names:
        raise ValueError(f"axis {axis_name!r} is not a dimension of the device mesh (its dims are {names})")
    return mesh[axis_name].get_group(), mesh.device_type


def agree(payload: object) -> list[object]:
    """Every rank's ``payload`` (one ``all_gather_object`` over the default group), in rank order.

    Called on every rank once per plan build (the plan's collectives), and once per CUDA-graph capture
    (its outcome, ``cuda_graphs.py``), in a distributed run of more than one rank.
    """
    dist = _dist()
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    return gathered


def world() -> tuple[int, int] | None:
    """``(rank, world_size)`` of the default process group, or None outside a distributed run."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.get_rank(), dist.get_world_size()


def process_group_key(process_group) -> tuple[str, tuple[int, ...]]:
    """``(group name, global ranks)``: equal on every member, distinct for two groups over the same ranks."""
    return process_group.group_name, tuple(_dist().get_process_group_ranks(process_group))


def mesh_process_groups(mesh) -> list[tuple]:
    """``(process_group, device_type)`` of every dim of a DeviceMesh."""
    return [(mesh.get_group(mesh_dim=d), mesh.device_type) for d in range(mesh.ndim)]
