"""Ranks agree on the step's collectives, once per plan build.

Every rank builds its plan from its own params. When a rank holds no params of a sharding group its
peers reduce over a process group they share (an EP rank without plain experts, say), its plan has
fewer collectives than theirs and the step would hang. So when a plan is built in a distributed run,
each rank sends a description of its reductions (``agreement_payload``: process group names and ranks,
member group signatures and mesh dims), all ranks gather them (one ``all_gather_object``, in
``collectives.agree``) and ``reconcile`` gives every rank the same collectives in the same order.
Pure Python over the gathered descriptions: every rank computes the same answer, so when agreement is
impossible every rank raises the same error, and none is left waiting in a collective.
"""

from __future__ import annotations

import torch

from compiled_step.planning import GroupKey, Plan, Reduction, ShardingGroup


def group_signature(group: ShardingGroup) -> tuple:
    """What identifies a sharding group across the ranks of a process group it is reduced over: no
    object identities, and nothing that differs between those ranks (such as which subgroup of
    another mesh dim a rank is in)."""
    k = group.key
    mesh = (k.mesh_key[1], k.mesh_key[2], str(k.mesh_key[3])) if k.mesh_key else ((), (), "")
    return (k.param_group, str(k.dtype), str(k.grad_dtype), *mesh, k.is_expert, k.fp8)


def _signatures(groups: list[ShardingGroup]) -> list[tuple]:
    """Signatures made unique by an ordinal, in plan order: two meshes of equal names and shape over
    different process groups look alike, and the param order, the same on every rank, tells them apart."""
    seen: dict[tuple, int] = {}
    out = []
    for group in groups:
        sig = group_signature(group)
        out.append(sig + (seen.get(sig, 0),))
        seen[sig] = seen.get(sig, 0) + 1
    return out


def agreement_payload(plan: Plan, key_of, resolvable: dict[tuple, tuple]) -> dict:
    """This rank's collectives, for every rank to compare. ``key_of(pg)`` is ``(group name, global
    ranks)``: the same on every member of a process group, distinct for two groups over the same ranks."""
    signatures = _signatures(plan.groups)
    return {
        "reductions": [(key_of(r.process_group), r.label, r.over_shards,
                        [(signatures[m], d) for m, d in zip(r.members, r.dims)]) for r in plan.reductions],
        "resolvable": sorted(resolvable),
    }


def reconcile(plan: Plan, payloads: list[dict], rank: int, resolvable: dict[tuple, tuple]) -> Plan:
    """The plan with the collectives every rank agrees on, from every rank's ``agreement_payload``.

    A rank that holds no params of a sharding group its peers reduce over a shared process group
    (e.g. an EP rank without plain experts) gets an empty group in that reduction, whose partial
    is zero: every rank then issues the same collectives, in the same order (process groups sorted
    by their ranks, members by signature). ``resolvable`` maps the ranks of every process group this
    rank can reach (its reductions, EP, PP, the dims of its meshes) to ``(process_group,
    device_type)``. Raises ``RuntimeError``, identically on every rank (they all see the same
    payloads), when a rank would have to join a process group it cannot reach.
    """
    shared: dict[tuple, dict] = {}
    for payload in payloads:
        for pg_key, label, over_shards, members in payload["reductions"]:
            entry = shared.setdefault(tuple(pg_key), {"label": label, "over_shards": over_shards, "members": set()})
            entry["members"].update((tuple(sig), dim) for sig, dim in members)
    problems = []
    for pg_key, entry in sorted(shared.items()):
        for member in pg_key[1]:
            own = {tuple(r[0]) for r in payloads[member]["reductions"]}
            reachable = {tuple(r) for r in payloads[member]["resolvable"]}
            if pg_key not in own and pg_key not in reachable:
                problems.append(f"rank {member} holds no params reduced over {entry['label']!r} (ranks "
                                f"{list(pg_key[1])}) and has no handle on that process group")
    if problems:
        raise RuntimeError("FusedStep: the ranks cannot agree on the step's collectives: " + "; ".join(problems)
                           + ". Give every rank the same params (empty shards are fine), or the meshes.")
    groups = list(plan.groups)
    index = {sig: i for i, sig in enumerate(_signatures(groups))}
    reductions = []
    # The same order on every rank: by the first (signature, mesh dim) each reduction covers. A group
    # reduced over two dims must be reduced over them in the same order on every rank (each
    # collective must combine partials at the same stage), and ranks that share two process groups
    # must enter them in the same order; the subgroup names a rank sees differ, so they cannot order.
    for key, pg_key, entry in sorted((min(e["members"]), k, e) for k, e in shared.items()):
        if rank not in pg_key[1]:
            continue
        members, dims = [], []
        for sig, dim in sorted(entry["members"]):
            if sig not in index:
                index[sig] = len(groups)
                groups.append(_empty_group(sig, plan.device, plan.slots))
            if index[sig] not in members:
                members.append(index[sig])
                dims.append(dim)
        process_group, device_type = resolvable[pg_key]
        reductions.append(Reduction(process_group, device_type, entry["label"], members, entry["over_shards"], dims))
    return Plan(plan.signature, groups, plan.device, plan.bucket_size, plan.slots, reductions, plan.pp)


def _empty_group(signature: tuple, device: torch.device, first_slot: int) -> ShardingGroup:
    """A group this rank holds no params of, so that its (zero) partial joins its peers' collective."""
    param_group, dtype, grad_dtype, names, shape, placements, is_expert, fp8, _ = signature
    to_dtype = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
    mesh_key = (None, names, shape, placements) if names or shape else ()
    key = GroupKey(param_group, device, to_dtype.get(dtype, torch.float32), to_dtype.get(grad_dtype, torch.float32),
                   mesh_key, is_expert, fp8)
    return ShardingGroup(key, first_slot=first_slot)
