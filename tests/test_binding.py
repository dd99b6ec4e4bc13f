"""compiled_step.binding: after binding, ``p``, ``p.grad`` and ``optimizer.state[p]`` are views of the plan's
buffers; the binder rebuilds the plan when the structure changes and only then; grads it cannot use are
refused, grads that are not its views are copied in and named.

The buffers are reached through public seams only: ``fused.plan`` (each param's row) and ``fused.program``
(the persistent tensors its calls take: Phase A reads the group's grad buffer, the flat update its param
and state buffers).

Reference for values: eager ``clip_grad_norm_`` + ``torch.optim.AdamW`` on a copy of the model, stepped
with the same batches. Tolerance ``rtol=1e-5, atol=1e-6`` (fp32), as in test_parity.py: FusedStep's norm is
fp64 where torch's is fp32, so the clip coefficient differs in the last bits. Layout checks (addresses,
strides, identities) are exact. ``compile=False`` runs the same step functions eagerly: what is tested is
where tensors live and when the plan is rebuilt, which compiling does not change. Rebuilds on
``add_param_group`` with aliases are in test_rebuild_and_ownership.py, shape/sparse/device refusals through
``step()`` in test_robustness.py; they are not repeated here.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from compiled_step import FusedStep
from compiled_step.binding import Rebuild, check_grad
from compiled_step.planning import BUCKETED, ROW
from conftest import BUCKET, PACK, make_grads, make_params, set_grads
from test_parity import assert_states_close
from test_replay import _eager_step, _loss, _model

TOL = dict(rtol=1e-5, atol=1e-6)


def _assert_close(model, ref):
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------- check_grad


@pytest.mark.parametrize("grad,error,match", [
    (torch.ones(3, dtype=torch.int64), TypeError, r"w: grads must be real floating point, got torch\.int64"),
    (torch.ones(3, dtype=torch.complex64), TypeError, r"w: grads must be real floating point, got torch\.complex64"),
    (torch.ones(3, dtype=torch.bfloat16), Rebuild, r"w: grad dtype changed to torch\.bfloat16"),
], ids=["integer", "complex", "another_dtype_rebuilds"])
def test_check_grad_refuses_a_grad_the_step_cannot_use_and_rebuilds_for_another_dtype(grad, error, match):
    """Shape, sparse and device are refused through ``step()`` in test_robustness.py; these are the rest. A grad
    of another dtype than its buffer's is no error: the binder raises Rebuild and FusedStep re-keys the group."""
    with pytest.raises(error, match=match):
        check_grad(torch.zeros(3), grad, "w", grad_dtype=torch.float32)


def test_check_grad_accepts_a_grad_that_matches_its_param_in_any_layout():
    p = torch.zeros(4, 6)
    for g in (torch.ones(4, 6), torch.ones(6, 4).t(), torch.ones(4, 12)[:, ::2]):
        check_grad(p, g, "w", grad_dtype=torch.float32)  # raises on failure
    check_grad(torch.zeros(3, dtype=torch.bfloat16), torch.ones(3), "w")  # no buffer yet: any float dtype


def test_grad_device_mismatch_is_rejected():
    # On a CPU-only machine autograd and the grad setter refuse to build a param/grad pair on two
    # devices, so the check itself is exercised directly; test_robustness.py's CUDA test goes end to end.
    with pytest.raises(ValueError, match="grad is on cpu but the param is on meta"):
        check_grad(torch.zeros(3, device="meta"), torch.zeros(3), "w")



# ---------------------------------------------------------------------- views of the buffers


def _buffers(fused):
    """Per sharding group: its grad buffer (Phase A's input), param buffer and state buffers (the flat update's)."""
    out = []
    for g, _ in enumerate(fused.plan.groups):
        phase_a = [c for c in fused.program.norm if c.label == f"Phase A partial norm, group {g}"]
        flat = [c for c in fused.program.update if c.label.startswith(f"Phase B flat update, group {g} ")]
        assert len(phase_a) == 1 and len(flat) <= 1, fused.program.describe()
        state = {k: v for k, v in flat[0].kwargs.items() if k.startswith("exp_avg")} if flat else {}
        out.append((phase_a[0].args[0], flat[0].args[0] if flat else None, state))
    return out


def _at_row(buffer: torch.Tensor, row: int) -> int:
    return buffer.data_ptr() + row * ROW * buffer.element_size()


@pytest.mark.parametrize("flat_params", [True, False], ids=["flat_params", "left_in_place"])
def test_params_grads_and_state_are_views_of_the_buffers_at_their_rows(flat_params):
    """Every grad starts at its param's row of its group's grad buffer; with ``flat_params`` every param and its
    state at the same row of the param and state buffers, with the param's strides (transposed included) and a
    storage of its own that spans exactly its bytes (so torch.save writes one param, not the buffer). Params left
    in place keep their memory; their state is in the state buffers all the same, at their rows."""
    params = make_params()
    before = {id(p): p.data_ptr() for p in params}
    opt = torch.optim.AdamW(params, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False, bucket_size=BUCKET, pack_threshold=PACK,
                      flat_params=flat_params)
    set_grads(params, make_grads(params, 0))
    fused.step()
    for group, (grads, param_buffer, state) in zip(fused.plan.groups, _buffers(fused)):
        assert grads.dtype == group.key.grad_dtype
        for p, e in zip(group.params, group.entries):
            assert p.grad.data_ptr() == _at_row(grads, e.row)
            assert p.grad.stride() == p.stride()
            if flat_params:
                assert e.region != BUCKETED
                assert p.data_ptr() == _at_row(param_buffer, e.row)
                assert p.untyped_storage().data_ptr() == p.data_ptr()
                assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
            else:
                assert p.data_ptr() == before[id(p)]  # not moved
            assert sorted(state) == ["exp_avg", "exp_avg_sq"]
            for key, buffer in state.items():  # every region's state: the buckets' rows follow the flat ones
                assert opt.state[p][key].data_ptr() == _at_row(buffer, e.row), key
                assert opt.state[p][key].stride() == p.stride(), key
        assert flat_params or any(e.region == BUCKETED for e in group.entries)  # both regions exercised


def test_a_grad_the_user_replaces_is_copied_in_named_and_the_view_restored():
    """The replaced grad's values are used (the result matches eager torch), it is named in
    ``last_step_copied_grads`` for that step only, the user's tensor is left as it was, and ``p.grad`` is the
    buffer view again after the step (autograd accumulates into the buffer next time, no second copy)."""
    model, ref = _model(), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False, model_parts=[model])
    weight = model[2].weight
    for step in range(4):
        _loss(model, step).backward()
        _loss(ref, step).backward()
        view = weight.grad
        if step == 1:
            mine = weight.grad.clone()
            weight.grad = mine
            kept = mine.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-time copy warning: its text is test_rebuild_and_ownership's
            fused.step()
        _eager_step(ref, ref_opt)
        assert fused.last_step_copied_grads == (("2.weight",) if step == 1 else ())
        if step >= 1:
            assert weight.grad is view  # the buffer view, installed by the first step
        if step == 1:
            assert weight.grad is not mine and torch.equal(mine, kept)
        _assert_close(model, ref)
        fused.zero_grad()
        ref_opt.zero_grad()
    assert_states_close(opt, ref_opt, TOL)


# ---------------------------------------------------------------------- rebuilds: on structure changes only


def _event(name, model, ref, opt, ref_opt, extra, ref_extra):
    """Apply one change between steps on both sides; the fused side's ``zero_grad`` is FusedStep's or the
    optimizer's as the event says (the eager side always sets grads to None)."""
    if name == "lr_and_maximize":  # hyperparameters, as a scheduler writes them
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] *= 0.5
            o.param_groups[0]["maximize"] = True
    elif name == "add_param_group":
        opt.add_param_group({"params": list(extra.parameters()), "lr": 3e-2})
        ref_opt.add_param_group({"params": list(ref_extra.parameters()), "lr": 3e-2})
    elif name == "data_swapped":  # model.to(), a user's assignment: the param lives elsewhere now
        for p, q in ((model[0].bias, ref[0].bias),):
            p.data = p.data.clone() * 0.5
            q.data = q.data.clone() * 0.5


# (event before the step, whether the plan must be rebuilt at that step)
_EVENTS = [("first_step", True), ("zero_grad_in_place", False), ("lr_and_maximize", False),
           ("optimizer_zero_grad", False), ("grad_replaced", False), ("add_param_group", True),
           ("zero_grad_in_place", False), ("data_swapped", True), ("zero_grad_in_place", False)]


def test_the_plan_is_rebuilt_when_the_structure_changes_and_only_then():
    """``fused.plan`` and ``fused.program`` stay the same objects through grads zeroed either way, a grad replaced,
    and hyperparameter changes; they are new after ``add_param_group`` and after a param's ``.data`` is replaced.
    Every step matches eager torch, so neither a missed rebuild nor a spurious one goes unseen."""
    model, ref = _model(), _model()
    torch.manual_seed(1)
    extra = torch.nn.Linear(4, 3)
    torch.manual_seed(1)
    ref_extra = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False)
    gen = torch.Generator().manual_seed(7)
    joined = False
    for step, (event, rebuilt) in enumerate(_EVENTS):
        _event(event, model, ref, opt, ref_opt, extra, ref_extra)
        joined |= event == "add_param_group"
        x = torch.randn(16, 4, generator=gen)
        extra_loss = (lambda e: (e(x) ** 2).mean()) if joined else (lambda e: 0.0)
        (_loss(model, step) + extra_loss(extra)).backward()
        (_loss(ref, step) + extra_loss(ref_extra)).backward()
        if event == "grad_replaced":
            model[0].weight.grad = model[0].weight.grad.clone()
        plan, prog = fused.plan, fused.program
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused.step()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()) + (list(ref_extra.parameters()) if joined else []), 1.0)
        ref_opt.step()
        assert (fused.plan is not plan) == rebuilt, (step, event)
        assert (fused.program is not prog) == rebuilt, (step, event)
        _assert_close(model, ref)
        _assert_close(extra, ref_extra)
        if _EVENTS[min(step + 1, len(_EVENTS) - 1)][0] == "optimizer_zero_grad":
            opt.zero_grad()  # set to None: the grad hooks point the next backward at the views
        else:
            fused.zero_grad()
        ref_opt.zero_grad()
    assert_states_close(opt, ref_opt, TOL)
