"""Grads freed between steps, params changed under FusedStep's feet: no copies, nothing silently wrong.

Trainers free the grads after each step (HF Trainer: ``model.zero_grad()``; Accelerate:
``zero_grad(set_to_none=True)``). A hook on each param points the grad back at FusedStep's buffer
before autograd writes it (``grad_restore.py``), so no step copies a grad, and a param that gets no
grad stays inactive as in ``torch.optim``. Also here: autograd's version counters, ``model.to(dtype)``
after the state exists, and ``p.data`` replaced on params that FusedStep does not move.

Reference: eager ``clip_grad_norm_`` + the same ``torch.optim`` optimizer, grads zeroed the same way.
Tolerance ``rtol=1e-5, atol=1e-6`` (fp32), as in test_parity.py: the fp64 norm and fused arithmetic
differ from torch's in the last bits.
"""

from __future__ import annotations

import gc
import io
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compiled_step import FusedStep
from test_replay import _eager_step, _loss, _model  # the same model, batches and eager reference

TOL = dict(rtol=1e-5, atol=1e-6)


def _pair(**options):
    model, ref = _model(), _model()
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), max_grad_norm=1.0,
                      model_parts=[model], compile_notice=False, **options)
    return model, fused, ref, torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)


def _assert_close(model, ref):
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("how", ["model.zero_grad()", "optimizer.zero_grad(set_to_none=True)",
                                 "fused.zero_grad(set_to_none=True)"])
def test_grads_set_to_none_every_step_are_never_copied_and_match_eager(how):
    model, fused, ref, ref_opt = _pair()
    copies = []
    for step in range(6):
        _loss(model, step).backward()
        _loss(ref, step).backward()
        fused.step()
        _eager_step(ref, ref_opt)
        copies.append(len(fused.last_step_copied_grads))
        assert all(p.grad is not None for p in model.parameters())
        if how == "model.zero_grad()":
            model.zero_grad()
        elif how.startswith("optimizer"):
            fused.optimizer.zero_grad(set_to_none=True)
        else:
            fused.zero_grad(set_to_none=True)
        ref_opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert copies == [0] * 6
    _assert_close(model, ref)


class _GradBufferOps(TorchDispatchMode):
    """Records each ATen op that reads or writes a given set of storages, as (op name, bytes of those
    storages it touched: each distinct tensor among its arguments and outputs once, so an in-place op's
    ``self`` and its output, the same tensor, count once)."""

    def __init__(self, storages: set[int]):
        super().__init__()
        self.storages, self.ops = storages, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        touched = {id(t): t for t in flat
                   if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages}
        if touched:
            self.ops.append((func.overloadpacket.__name__,
                             sum(t.numel() * t.element_size() for t in touched.values())))
        return out


@pytest.mark.parametrize("flat_params", [True, False], ids=["moved_in", "left_in_place"])
def test_a_freed_grad_costs_one_copy_into_the_buffer_in_backward(flat_params):
    """Grads set to None (HF Trainer's ``model.zero_grad()``): backward computes each grad anyway, so the
    cheapest way into the buffer is one copy of it (read N, write N bytes), not zeroing the view and
    letting autograd accumulate into it (write N, then read 2N and write N). A second backward before
    the step accumulates in place, as after ``fused.zero_grad()``. Counted by a TorchDispatchMode on the
    ops that touch the grad buffers' storages, each param's view once per op: one copy_ per param now;
    zero_ and add_ per param before."""
    model, fused, ref, ref_opt = _pair(flat_params=flat_params)
    _loss(model, 0).backward()
    _loss(ref, 0).backward()
    fused.step()
    _eager_step(ref, ref_opt)
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    grad_bytes = [p.numel() * p.element_size() for p in model.parameters()]
    model.zero_grad()
    ref_opt.zero_grad()
    with _GradBufferOps(storages) as first:
        _loss(model, 1).backward()
    assert sorted(first.ops) == sorted(("copy_", n) for n in grad_bytes)
    with _GradBufferOps(storages) as second:  # accumulation: autograd adds into the installed view
        _loss(model, 2).backward()
    assert [name for name, _ in second.ops] == ["add_"] * len(grad_bytes)
    _loss(ref, 1).backward()
    _loss(ref, 2).backward()
    fused.step()
    _eager_step(ref, ref_opt)
    assert fused.last_step_copied_grads == ()
    _assert_close(model, ref)


def test_a_grad_with_a_graph_keeps_it_as_in_torch():
    """backward(create_graph=True) after the grads were freed: torch gives each param a grad that has a
    graph (for a gradient penalty); FusedStep must not swap it for its buffer's view, which has none.
    The step then copies it in, as any grad that is not the view."""
    model, fused, ref, ref_opt = _pair()
    _loss(model, 0).backward()
    fused.step()
    model.zero_grad()
    _loss(model, 1).backward(create_graph=True)
    assert all(p.grad.requires_grad for p in model.parameters())
    model.zero_grad()  # break the param -> grad -> graph -> param cycle


def test_a_param_without_a_grad_stays_inactive_as_in_torch():
    """backward(inputs=...) without the last layer: its grads stay None and torch.optim skips it (no
    weight decay, no moment decay, no step); FusedStep too. torch.autograd.grad never fills .grad."""
    model, fused, ref, ref_opt = _pair()
    for step in range(4):
        if step == 2:
            first = list(model[0].parameters())
            _loss(model, step).backward(inputs=first)
            _loss(ref, step).backward(inputs=list(ref[0].parameters()))
            assert model[2].weight.grad is None and model[2].bias.grad is None
        else:
            _loss(model, step).backward()
            _loss(ref, step).backward()
        fused.step()
        _eager_step(ref, ref_opt)
        model.zero_grad()
        ref_opt.zero_grad()
        assert fused.last_step_copied_grads == ()
    torch.autograd.grad(_loss(model, 9), list(model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    _assert_close(model, ref)
    ours, theirs = fused.optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    for k in theirs:
        assert float(ours[k]["step"]) == float(theirs[k]["step"]), k  # 3 for the last layer, 4 before


def test_the_hooks_go_with_their_fused_step_and_never_warn_when_a_param_is_pickled():
    model, fused, _, _ = _pair()
    _loss(model, 0).backward()
    fused.step()
    assert all(p._backward_hooks and p._post_accumulate_grad_hooks for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns for a hook it cannot serialize, unless marked
        torch.save(model[0].weight, io.BytesIO())
    del fused
    gc.collect()
    assert not any(p._backward_hooks or p._post_accumulate_grad_hooks for p in model.parameters())
    model.zero_grad()
    _loss(model, 1).backward()  # nothing of FusedStep's left to act
    assert all(p.grad is not None for p in model.parameters())


def test_a_graph_that_saved_a_param_before_the_step_raises_in_backward_as_in_torch():
    """torch.optim's in-place update bumps each param's version counter; so does FusedStep, whose
    compiled update writes the flat buffer, which autograd cannot see."""
    for stepper in ("fused", "eager"):
        model, fused, ref, ref_opt = _pair()
        net = model if stepper == "fused" else ref
        _loss(net, 0).backward()
        loss = _loss(net, 1)  # saves the weights for its backward
        fused.step() if stepper == "fused" else ref_opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_model_cast_to_another_dtype_after_its_state_exists_raises_as_torch_does():
    model, fused, ref, ref_opt = _pair()
    for net, step_fn in ((model, fused.step), (ref, ref_opt.step)):
        _loss(net, 0).backward()
        step_fn()
    before = [p.detach().clone() for p in model.parameters()]
    model.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    model(x).sum().backward()
    ref(x).sum().backward()
    with pytest.raises(RuntimeError):
        ref_opt.step()  # eager AdamW: "expected dtype float ... but got BFloat16"
    with pytest.raises(ValueError, match="0.weight is torch.bfloat16 but its optimizer state 'exp_avg' is "
                                         "torch.float32"):
        fused.step()
    state = fused.optimizer.state[model[0].weight]
    assert state["exp_avg"].dtype == torch.float32  # the state was not cast
    assert all(torch.equal(p.float(), b.bfloat16().float()) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("options", [dict(flat_params=False), dict(flat_params=False, pack_threshold=0)],
                         ids=["staged", "bucketed"])
def test_replaced_data_of_params_that_are_not_moved_in_is_followed(options):
    """p.data replaced on params FusedStep updates where they are (staged through the flat buffer, or
    bucketed): the step must update the new storage, as torch.optim does, not the old one."""
    model, fused, ref, ref_opt = _pair(**options)
    for step in range(4):
        if step == 2:
            for p, q in zip(model.parameters(), ref.parameters()):
                p.data = p.data.clone() * 0.5
                q.data = q.data.clone() * 0.5
        _loss(model, step).backward()
        _loss(ref, step).backward()
        fused.step()
        _eager_step(ref, ref_opt)
        fused.zero_grad()
        ref_opt.zero_grad()
    _assert_close(model, ref)
