"""compiled_step.program: the list of calls one step runs, for a given plan, anchored to eager torch.

For each layout the expected call list is written out by hand from the layout (which params are small enough
to be staged, how many buckets ``bucket_size`` makes, how many rows each param needs), not read back from the
plan: one Phase-A call per sharding group, the collectives only where a process group reduces something, one
finish, then per group the staged params copied in, one flat update, copied out, and one call per bucket.
Labels and the pure function each compiled call runs name the rule (``rules.sgd`` / ``rules.adam``).

So that a right-looking list that computes the wrong thing cannot pass, every layout is stepped 3 times against
the reference: eager ``torch.nn.utils.clip_grad_norm_`` over all params, then each ``torch.optim`` optimizer's
``step()``, on copies of the params with the same grads. Tolerances, as in test_parity.py: fp32
``rtol=1e-5, atol=1e-6`` (FusedStep's norm is fp64, torch's fp32: the clip coefficient differs in the last
bits); bf16 params ``rtol=2**-5, atol=2e-3`` (torch.optim computes in bf16, FusedStep in fp32 with one rounding,
a few bf16 ulps apart). The total norm is compared with the fp64 norm of the grads (``torch.linalg.vector_norm``
of the upcast grads, ``rtol=1e-12``: both sum fp64 squares, in another order): torch's ``clip_grad_norm_`` norms
bf16 grads in bf16, 1e-4 relative away, which moves the fp32 params of the mixed layout by 1.4e-6 through the
clip coefficient; that layout's reference therefore clips with torch's ``clip_grads_with_norm_`` (the second half
of ``clip_grad_norm_``) given the fp64 norm. ``compile=False`` runs the same functions eagerly: the
list is the same with compile on (test_replay.py records and replays it compiled).
"""

from __future__ import annotations

import re

import pytest
import torch

from compiled_step import FusedStep
from compiled_step.planning import ROW
from conftest import BUCKET, PACK, make_grads, make_params, set_grads, write_grads

FP32_TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TOL = dict(rtol=2**-5, atol=2e-3)
FINISH = ("compiled", "finish: total norm, clip coefficient, finite flag, per-tensor scalars", "norm.finish.finish")


def _phase_a(g):
    return ("compiled", f"Phase A partial norm, group {g}", "norm.partials.partial_of_buffer")


def _flat(g, n, rows, rule="adam"):
    return ("compiled", f"Phase B flat update, group {g} ({n} params, {rows} rows)", f"rules.{rule}.update_flat")


def _staged(g, n, direction):
    return ("eager", f"copy {n} staged params {direction}, group {g}", "")


def _bucket(g, b, rule="adam"):
    return ("compiled", f"Phase B bucket update, group {g}, bucket {b}", f"rules.{rule}.update_bucket")


def _extra_params(*shapes, dtype=torch.float32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _layout(name):
    """(optimizers' param groups per optimizer class, FusedStep options, expected norm calls, expected update
    calls). conftest.SHAPES' element counts are 48, 6, 1, 1, 48, 25, 25, 13, 24: each fits one row of ``ROW``;
    with ``PACK`` = 20 four are staged (6, 1, 1, 13) and five bucketed, in ceil(5 / BUCKET) = 2 buckets."""
    assert ROW >= 48 and PACK == 20 and BUCKET == 4  # the counts below assume these
    params = make_params()
    if name == "one_group_moved_in":  # every param moved into the flat buffer: one update call
        return ([(torch.optim.AdamW, [{"params": params}])], dict(flat_params=True),
                [_phase_a(0), FINISH], [_flat(0, 9, 9)])
    if name == "groups_by_dtype_and_param_group_left_in_place":
        # param group 0: the fp32 params and two bf16 ones (a group per dtype); param group 1: two fp32 params.
        bf16 = _extra_params((30,), (3,), dtype=torch.bfloat16)
        second = _extra_params((7,), (40,), seed=6)
        groups = [{"params": params + bf16}, {"params": second, "lr": 3e-2}]
        update = [_staged(0, 4, "in"), _flat(0, 4, 4), _staged(0, 4, "out"), _bucket(0, 0), _bucket(0, 1)]
        for g in (1, 2):  # bf16 (3,) and fp32 (7,) staged, bf16 (30,) and fp32 (40,) bucketed
            update += [_staged(g, 1, "in"), _flat(g, 1, 1), _staged(g, 1, "out"), _bucket(g, 0)]
        return ([(torch.optim.AdamW, groups)], dict(flat_params=False),
                [_phase_a(0), _phase_a(1), _phase_a(2), FINISH], update)
    if name == "two_optimizers_one_finish":  # SGD with momentum and AdamW: one norm, one finish, each its rule
        return ([(torch.optim.SGD, [{"params": params[:5], "momentum": 0.9}]),
                 (torch.optim.AdamW, [{"params": params[5:]}])], dict(flat_params=True),
                [_phase_a(0), _phase_a(1), FINISH], [_flat(0, 5, 5, "sgd"), _flat(1, 4, 4)])
    raise ValueError(name)


def _described(calls):
    return [(c.runs_as, c.label, c.function) for c in calls]


def _twin(param_groups):
    """Copies of the params, in the same groups with the same options."""
    copies = {}
    out = []
    for group in param_groups:
        twin = dict(group)
        twin["params"] = [copies.setdefault(id(p), torch.nn.Parameter(p.detach().clone())) for p in group["params"]]
        out.append(twin)
    return out


def _fp64_norm(grads):
    return torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))


@pytest.mark.filterwarnings("ignore:FusedStep copied")  # the first step's grads are new tensors, as autograd's are
@pytest.mark.parametrize("layout", ["one_group_moved_in", "groups_by_dtype_and_param_group_left_in_place",
                                    "two_optimizers_one_finish"])
def test_the_call_list_of_a_plan_and_its_steps_match_eager_torch(layout):
    optimizers, options, norm, update = _layout(layout)
    ours = [cls(groups, lr=1e-2) for cls, groups in optimizers]
    theirs = [cls(_twin(groups), lr=1e-2) for cls, groups in optimizers]
    params = [p for o in ours for g in o.param_groups for p in g["params"]]
    ref = [p for o in theirs for g in o.param_groups for p in g["params"]]
    fused = FusedStep(ours if len(ours) > 1 else ours[0], max_grad_norm=1.0, compile=False, bucket_size=BUCKET,
                      pack_threshold=PACK, **options)
    assert fused.program is None  # built by the first step
    for step in range(3):
        grads = make_grads(params, step)
        write_grads(params, grads)  # into the buffers from the second step on
        set_grads(ref, grads)
        total = fused.step()
        if any(p.dtype == torch.bfloat16 for p in ref):  # torch's clip with the exact norm (module docstring)
            torch.nn.utils.clip_grads_with_norm_(ref, 1.0, _fp64_norm(grads))
        else:
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
        for o in theirs:
            o.step()
        if step == 0:
            prog = fused.program
            assert _described(prog.norm) == norm, prog.describe()
            assert _described(prog.update) == update, prog.describe()
            assert [line.split(maxsplit=2)[2] for line in prog.describe()] == [c.label for c in prog.calls]
        assert fused.program is prog  # nothing rebuilt it
        torch.testing.assert_close(total, _fp64_norm(grads), rtol=1e-12, atol=0)
        for p, q in zip(params, ref):
            torch.testing.assert_close(p.detach(), q.detach(), **(BF16_TOL if p.dtype == torch.bfloat16 else FP32_TOL))


@pytest.mark.filterwarnings("ignore:FusedStep copied")  # FSDP2-style grads: new DTensors every step
def test_a_sharded_param_group_adds_one_collective_between_phase_a_and_the_finish():
    """DTensor params sharded over a one-rank mesh (gloo): the plan has one reduction (the mesh dim), and the
    program one all-reduce of the partial norms after Phase A and before the finish; the params are staged or
    bucketed (a shard never moves). The other layouts above have no process group and no collective."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from compiled_step.cli.bench.fsdp import single_process_group

    plain = make_params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    with single_process_group(torch.device("cpu")) as mesh:
        params = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) if p.dim() else p
                  for p in plain]
        opt, ref_opt = torch.optim.AdamW(params, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
        fused = FusedStep(opt, max_grad_norm=1.0, compile=False, bucket_size=BUCKET, pack_threshold=PACK)
        for step in range(3):
            grads = make_grads(plain, step)
            for p, g in zip(params, grads):
                p.grad = distribute_tensor(g, mesh, [Shard(0)]) if p.dim() else g.clone()
            set_grads(ref, grads)
            total = fused.step()
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
            torch.testing.assert_close(total, _fp64_norm(grads), rtol=1e-12, atol=0)
            for p, q in zip(params, ref):
                mine = p.full_tensor() if hasattr(p, "full_tensor") else p
                torch.testing.assert_close(mine.detach(), q.detach(), **FP32_TOL)
        sharded = [g for g, group in enumerate(fused.plan.groups) if group.key.mesh_key]
        labels = [c.label for c in fused.program.norm]
        kinds = [c.runs_as for c in fused.program.norm]
    assert len(fused.plan.groups) == 2 and len(sharded) == 1  # the 0-d param is a plain tensor: its own group
    assert kinds == ["compiled", "compiled", "collective", "compiled"], fused.program.describe()
    assert re.fullmatch(rf"all_reduce\(SUM\) over 'mesh dim 0': f64\[1, \d+\] \(partial norms of groups "
                        rf"\[{sharded[0]}\]\)", labels[2]), labels[2]
    assert labels[3] == FINISH[1]
    assert all(c.runs_as != "collective" for c in fused.program.update)
