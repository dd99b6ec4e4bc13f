"""The norm half of the program when a training-health option is on (``program.norm_calls`` otherwise).

The same calls in the same places, with three changes:

1. with ``param_norms``, Phase A is ``param_partials.partials_of_buffer_by_param`` (and its form for
   external grads): the same one read of each group's grads also writes every param's partial;
2. with ``param_norms``, each collective reduces the member groups' per-param partials in the same
   stacked tensor as their partials, where the reduction is over shards of those params (a mesh dim
   they are sharded over): one collective per process group, as before. Over EP (different experts
   on different ranks) and PP (different stages' params) a param's partial is already whole;
3. the finish is ``finish.finish_with_health``: the spike checks, ZClip, the windows, the per-param
   norms in the optimizer's order.
"""

from __future__ import annotations

import torch

from compiled_step import buckets, collectives, compiling, storage
from compiled_step.health import HealthState, ParamNormRows
from compiled_step.norm import finish as finish_module
from compiled_step.norm import param_partials
from compiled_step.norm.kinds import NormKind
from compiled_step.program import COLLECTIVE, COMPILED, EAGER, OP_NAMES, Call, _collectives, _function_name, \
    external_grad_buckets, members_index, rule_kwargs
from compiled_step.program import norm_calls as default_norm_calls


def norm_calls(plan, groups: list[storage.GroupBuffers], buffers: storage.StepBuffers, rules: list, kind: NormKind,
               compiler: compiling.Compiler, fillers: buckets.Fillers, state: HealthState,
               rows: ParamNormRows | None) -> list[Call]:
    """The norm half with the health finish; with ``rows`` (``param_norms=True``), per-param partials too."""
    if rows is None:
        norm = default_norm_calls(plan, groups, buffers, rules, kind, compiler, fillers)[:-1]  # all but the finish
    else:
        norm = []
        for g, gb in enumerate(groups):
            norm += _phase_a(plan, g, gb, buffers, kind, compiler, rows)
            norm += _external(plan, g, gb, buffers, kind, compiler, fillers, rows)
        norm += _collectives_with_params(plan, buffers, kind, rows)
    partials = buffers.pp_partial if plan.pp is not None else buffers.partials
    per_param = (rows.partials, rows.norm_rows, rows.norms) if rows is not None else (None, None, None)
    rule_args, names = rule_kwargs(rules, buffers)
    norm.append(Call(
        "finish with training health: total norm, spike checks, clip coefficient, finite flag, per-tensor scalars"
        + (", per-param norms" if rows is not None else ""), COMPILED, compiler.get(finish_module.finish_with_health),
        (partials, buffers.order, buffers.max_norm, buffers.hp, buffers.slot_group, buffers.counts, buffers.active,
         buffers.total, buffers.finite, buffers.skipped, buffers.table, *per_param, state.tensors),
        dict(kind=kind.kind, p=kind.p, **rule_args), _function_name(finish_module.finish_with_health),
        ("finish_with_health", kind.kind, names, plan.device.type, rows is not None,
         state.tensors.norm_window is not None, state.tensors.zclip is not None)))
    return norm


def _phase_a(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, kind: NormKind,
             compiler: compiling.Compiler, rows: ParamNormRows) -> list[Call]:
    own_rows = rows.group_rows(plan, g)
    if gb.group.grad_rows == 0:  # nothing in the grad buffer: zero partials, every step (reduced in place)
        return [Call(f"zero the partial norms of group {g} (no local elements)", EAGER, _zero,
                     (buffers.partial_rows[g], own_rows))]
    fn = param_partials.partials_of_buffer_by_param
    return [Call(
        f"Phase A partial norms, group {g} and its {len(gb.group.params)} params", COMPILED, compiler.get(fn),
        (gb.grads, rows.part_rows[g], rows.part_param[g], buffers.scales[g], buffers.order, buffers.partial_rows[g],
         own_rows),
        dict(kind=kind.kind, p=kind.p), _function_name(fn), ("norm_by_param", kind.kind, gb.grads.dtype,
                                                             plan.device.type))]


def _zero(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.zero_()


def _external(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, kind: NormKind,
              compiler: compiling.Compiler, fillers: buckets.Fillers, rows: ParamNormRows) -> list[Call]:
    """Phase A over a group's external grads: one call per bucket, each writing its params' rows."""
    if not gb.group.external:
        return []
    fn = param_partials.add_partials_of_list_by_param
    return [Call(f"Phase A partial norms, group {g}, external grads {b}", COMPILED, compiler.get(fn),
                 (grads, buffers.scales[g], buffers.order, buffers.partial_rows[g], rows.external_rows(plan, g, b)),
                 dict(kind=kind.kind, p=kind.p), _function_name(fn),
                 ("norm_external_by_param", kind.kind, gb.grads.dtype, plan.device.type))
            for b, grads in enumerate(external_grad_buckets(gb, plan.bucket_size, fillers))]


def _collectives_with_params(plan, buffers: storage.StepBuffers, kind: NormKind, rows: ParamNormRows) -> list[Call]:
    """The collectives of ``program._collectives``, each also carrying the member groups' per-param rows
    where the reduction is over their shards; PP as there (per-param partials are whole on a stage)."""
    calls = []
    op = OP_NAMES[kind.kind]
    for reduction in plan.reductions:
        members, index = reduction.members, members_index(plan, reduction)
        param_rows = [r for m in members for r in rows.region(plan, m)] if reduction.over_shards else []
        param_index = torch.tensor(param_rows, dtype=torch.int64, device=plan.device) if param_rows else None
        shape = f"f64[{len(members)} + {len(param_rows)}, {storage.PARTIAL_WIDTH}]"
        calls.append(Call(
            f"all_reduce({op}) over {reduction.label!r}: {shape} (partial norms of groups {members} and of "
            f"{len(param_rows)} param rows)", COLLECTIVE, reduce_with_param_partials,
            (reduction, kind, buffers.partials, index, rows.partials, param_index, buffers.order)))
    if plan.pp is not None:  # program._collectives' last two calls: combine the groups, reduce over PP
        calls += _collectives(plan, buffers, kind)[len(plan.reductions):]
    return calls


def reduce_with_param_partials(reduction, kind: NormKind, partials: torch.Tensor, members: torch.Tensor | None,
                               param_partials: torch.Tensor, param_rows: torch.Tensor | None,
                               order: torch.Tensor) -> None:
    """Reduce the member groups' partials and the given per-param rows in place, in one stacked collective."""
    groups = partials if members is None else partials.index_select(0, members)
    if param_rows is None:
        reduced = collectives.reduce_stacked(kind, groups, reduction, order)
    else:
        stacked = torch.cat([groups, param_partials.index_select(0, param_rows)])
        reduced = collectives.reduce_stacked(kind, stacked, reduction, order)
        param_partials.index_copy_(0, param_rows, reduced[groups.shape[0]:])
        reduced = reduced[:groups.shape[0]]
    if members is None:
        partials.copy_(reduced)
    else:
        partials.index_copy_(0, members, reduced)
