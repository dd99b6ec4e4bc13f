"""compiled_step.planning: where every param lives, checked on the plan itself (no buffer, no compile).

``build_plan`` is pure Python over the params' metadata, so these tests call it directly and check the
invariants the rest of the engine relies on (storage.py allocates ``rows`` rows per group, the compiled
calls slice the per-slot vectors at ``first_slot``...): every param placed exactly once, in whole rows
that no other param of its group touches, at a slot no other param has, with 16-byte-aligned slot
ranges; groups split by param group, dtype and grad dtype; a param someone else aliases never moved.

References are independent of the module: ``math.ceil`` for the rows a param needs, torch's own
``Tensor.is_contiguous`` (over every permutation of the dims) for what "dense" means, torch's
``empty`` strides for contiguous strides. Everything is exact (integers and layouts): no tolerance.
End-to-end placement through ``FusedStep`` is tested in test_rebuild_and_ownership.py (aliases) and
test_adversity.py (a param listed twice).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compiled_step import FusedStep
from compiled_step.planning import (ALIASED, BUCKETED, ROW, SLOT_ALIGN, STAGED, build_plan, check_params,
                                    dense_strides, is_dense, rows_for)
from conftest import BUCKET, PACK, make_params


def _mixed_param_groups():
    """Two param groups: fp32 params of every conftest shape, bf16 params, a bf16 param whose grads are
    fp32 (``grad_dtype``), a frozen param (no grad ever: it is still planned) and a large one."""
    first = make_params() + [torch.nn.Parameter(torch.randn(30, dtype=torch.bfloat16)),
                             torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]
    wide = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.bfloat16))
    wide.grad_dtype = torch.float32
    frozen = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    second = [torch.nn.Parameter(torch.randn(700)), wide, frozen, torch.nn.Parameter(torch.randn(2, 3))]
    return [first, second]


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat_params", "left_in_place"])
@pytest.mark.parametrize("bucket_size", [BUCKET, 1])
def test_every_param_is_placed_once_in_whole_rows_of_its_own_at_a_slot_of_its_own(flat_params, bucket_size):
    param_lists = _mixed_param_groups()
    plan = build_plan(param_lists, bucket_size=bucket_size, pack_threshold=PACK, flat_params=flat_params)
    every = [p for params in param_lists for p in params]
    # Every param exactly once, in its own param group.
    assert sorted(map(id, plan.params)) == sorted(map(id, every))
    for group in plan.groups:
        assert all(any(p is q for q in param_lists[group.key.param_group]) for p in group.params)
    # Groups split by (param group, dtype, grad dtype): one group per distinct triple, all members alike.
    triples = {(i, p.dtype, getattr(p, "grad_dtype", None) or p.dtype)
               for i, params in enumerate(param_lists) for p in params}
    assert len(plan.groups) == len(triples)
    for group in plan.groups:
        k = group.key
        assert {(k.param_group, p.dtype, getattr(p, "grad_dtype", None) or p.dtype) for p in group.params} == \
            {(k.param_group, k.dtype, k.grad_dtype)}
    slots = []
    for group in plan.groups:
        assert len(group.entries) == len(group.params)
        assert group.first_slot % SLOT_ALIGN == 0, "a group's per-slot slices must start 16-byte aligned"
        taken = set()
        for entry, p in zip(group.entries, group.params):
            assert entry.numel == p.numel()
            rows = range(entry.row, entry.row + math.ceil(p.numel() / ROW))  # whole rows, enough for every element
            assert not taken & set(rows), f"{entry}: rows shared with another param of the group"
            taken |= set(rows)
            assert rows.stop <= group.rows
            # The flat regions come first in every buffer; the bucketed params after them.
            assert (rows.stop <= group.flat_rows) if entry.region != BUCKETED else (entry.row >= group.flat_rows)
            assert group.first_slot <= entry.slot < group.first_slot + group.slots
            slots.append(entry.slot)
            if entry.region == BUCKETED:
                b, j = divmod(group.bucketed.index(entry.index), bucket_size)
                assert group.bucket_first_slot(b) % SLOT_ALIGN == 0
                assert entry.slot == group.bucket_first_slot(b) + j
            elif not flat_params:
                assert entry.region == STAGED and p.numel() <= PACK  # only small params are staged
        n_bucketed = sum(e.region == BUCKETED for e in group.entries)
        assert group.bucket_count == math.ceil(n_bucketed / bucket_size)
        if not flat_params:  # nothing moves: the region is decided by the size alone
            assert n_bucketed == sum(p.numel() > PACK for p in group.params)
    assert len(slots) == len(set(slots)), "two params share a slot"
    assert plan.slots == sum(g.slots for g in plan.groups)
    assert plan.reductions == [] and plan.pp is None  # plain tensors on one device: nothing to reduce


def test_rows_for_is_the_ceiling_of_elements_over_the_row_width():
    for n in (0, 1, ROW - 1, ROW, ROW + 1, 5 * ROW, 5 * ROW + 3, 10**6 + 7):
        assert rows_for(n) == math.ceil(n / ROW), n


def test_a_param_another_tensor_aliases_stays_where_it_is():
    """A param whose storage another tensor shares (a view of it, a ``detach()`` someone keeps, a param
    made over a slice of a buffer) is staged, never aliased into the flat buffer: moving it would cut the
    alias off from the weights. The same param without the alias is aliased."""
    lone, viewed, sliced_base = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6)), torch.randn(12)
    sliced = torch.nn.Parameter(sliced_base[:6])
    alias = viewed.detach()  # noqa: F841 -- held on purpose: it shares viewed's storage
    plan = build_plan([[lone, viewed, sliced]], flat_params=True, pack_threshold=PACK)
    (group,) = plan.groups
    assert [e.region for e in group.entries] == [ALIASED, STAGED, STAGED]
    del alias
    plan = build_plan([[lone, viewed, sliced]], flat_params=True, pack_threshold=PACK)
    assert [e.region for e in plan.groups[0].entries] == [ALIASED, ALIASED, STAGED]


def test_expert_params_get_groups_of_their_own_reduced_over_ep_only():
    """Expert and plain params never share a group (their grads are scaled differently and their partial
    norms reduced over EP, where different ranks hold different experts); the EP reduction lists the expert
    groups only and is not one over shards. A sentinel stands for the process group: planning only records it."""
    params = make_params()
    experts = frozenset(id(p) for p in params[::2])
    ep_group = object()
    plan = build_plan([params], expert_ids=experts, ep=(ep_group, "cpu"), pack_threshold=PACK)
    assert len(plan.groups) == 2
    for group in plan.groups:
        assert {id(p) in experts for p in group.params} == {group.key.is_expert}
    (reduction,) = plan.reductions
    assert reduction.process_group is ep_group and reduction.label == "ep" and not reduction.over_shards
    assert reduction.members == [i for i, g in enumerate(plan.groups) if g.key.is_expert]


# ---------------------------------------------------------------------- check_params


def _cases():
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    meta = torch.nn.Parameter(torch.randn(3, device="meta"))
    return {
        "twice_in_one_group": ([[a, b, a]], ValueError, r"listed twice in the optimizer \(param_groups\[0\]\[0\] and "
                                                        r"param_groups\[0\]\[2\]\)"),
        "in_two_groups": ([[a, b], [c, b]], ValueError, r"listed twice in the optimizer \(param_groups\[0\]\[1\] and "
                                                        r"param_groups\[1\]\[1\]\)"),
        "two_devices": ([[a], [meta]], ValueError, r"every param on one device; found cpu \(param_groups\[0\]\[0\]\), "
                                                   r"meta \(param_groups\[1\]\[0\]\)"),
        "integer": ([[a, torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)]], TypeError,
                    "needs floating-point params, got torch.int64"),
        "sparse": ([[torch.nn.Parameter(torch.randn(3, 3).to_sparse())]], TypeError, "sparse params"),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_check_params_refuses_with_a_message_naming_the_params(case):
    param_lists, error, match = _cases()[case]
    with pytest.raises(error, match=match):
        check_params(param_lists, {})


def test_a_name_from_the_model_replaces_the_position_in_messages():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^encoder\.weight is listed twice"):
        check_params([[a, b], [a]], {id(a): "encoder.weight"})


def test_params_on_two_devices_are_refused_at_construction_before_anything_changes():
    """Through FusedStep: refused when constructed, the optimizer and its params exactly as they were."""
    cpu = make_params()
    meta = torch.nn.Parameter(torch.randn(4, device="meta"))
    opt = torch.optim.AdamW([{"params": cpu}, {"params": [meta], "lr": 0.5}], lr=1e-2)
    before_params = [p.detach().clone() for p in cpu]
    before_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match="every param on one device"):
        FusedStep(opt, max_grad_norm=1.0, compile=False)
    assert all(torch.equal(p, b) for p, b in zip(cpu, before_params))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before_groups
    assert [g["params"] for g in opt.param_groups] == [cpu, [meta]] and not opt.state
    assert all(p.grad is None for p in cpu)


# ---------------------------------------------------------------------- is_dense / dense_strides


def _layouts():
    base = torch.randn(4, 6, 5, 3)
    return {
        "contiguous": base,
        "transposed": base[0, 0].t(),
        "permuted": base.permute(2, 0, 3, 1),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "channels_last_3d": torch.randn(2, 3, 4, 5, 2).contiguous(memory_format=torch.channels_last_3d),
        "size_one_dims_odd_strides": torch.randn(1, 6).as_strided((1, 6, 1), (99, 1, 7)),
        "zero_dim": torch.tensor(3.0),
        "every_other_column": base[..., ::2],
        "a_row_slice": base[:, 1:4],
        "expanded": torch.randn(1, 5).expand(4, 5),
        "overlapping": torch.randn(10).as_strided((4, 3), (2, 1)),
        "column_of_a_matrix": torch.randn(6, 5)[:, 2],
    }


def _dense_per_torch(t: torch.Tensor) -> bool:
    """Dense = contiguous after some permutation of the dims, by torch's own ``is_contiguous``."""
    return any(t.permute(order).is_contiguous() for order in itertools.permutations(range(t.dim())))


@pytest.mark.parametrize("layout", list(_layouts()))
def test_is_dense_and_dense_strides_agree_with_torch(layout):
    t = _layouts()[layout]
    expected = _dense_per_torch(t)
    assert expected == (layout not in ("every_other_column", "a_row_slice", "expanded", "overlapping",
                                       "column_of_a_matrix"))  # the reference itself, checked on known layouts
    assert is_dense(t) == expected
    strides = dense_strides(t)
    assert strides == (tuple(t.stride()) if expected else torch.empty(t.shape).stride())
    # Whatever the input, a tensor made with these strides is dense over exactly numel elements: element i of
    # a param's memory and element i of its grad's and state's memory are the same logical element.
    made = torch.empty_strided(t.shape, strides)
    assert _dense_per_torch(made) and made.untyped_storage().nbytes() == t.numel() * made.element_size()
