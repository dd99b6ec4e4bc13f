"""Two grad-zeroing corners the differential harness (tests/test_differential.py) found on 105de62.

Reference: eager ``torch.optim`` + ``clip_grad_norm_`` on a copy of the params. Tolerance: relative 1e-6 for the
norm and the clipped params (FusedStep's norm and clip coefficient are fp64, torch's fp32: they differ in the last
fp32 bits; the defect's error is 8e-3 relative), exact where nothing is clipped. The functions run with
``compile=False``: the corners are in the binding, not in the compiled math.
"""

from __future__ import annotations

import torch

from compiled_step import FusedStep


def _backward(params, which, factor=3.0):
    sum((p * factor).sum() for i, p in enumerate(params) if i in which).backward()


def _eager_step(params, optimizer):
    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
    optimizer.step()


def test_a_grad_set_to_none_while_optimizer_step_stepped_does_not_reach_the_next_norm():
    """A param without a grad at the first fused step; then optimizer.step() steps with grads set to None between
    steps; then a fused step where that param gets no grad. Its buffer region still held the grad autograd wrote
    while optimizer.step() stepped, and 105de62 counted it in the norm (the other params were clipped by 6.76
    instead of 6.71)."""
    ps = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5))]
    qs = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5))]
    opt, ref = torch.optim.SGD(ps, lr=0.1), torch.optim.SGD(qs, lr=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False, compile_notice=False)
    _backward(ps, {1}), _backward(qs, {1})
    fused.step(), _eager_step(qs, ref)  # ps[0] has no grad: skipped, as torch skips it
    fused.zero_grad(), ref.zero_grad()
    _backward(ps, {0, 1}), _backward(qs, {0, 1})
    _eager_step(ps, opt), _eager_step(qs, ref)  # the fused side's optimizer steps itself
    opt.zero_grad(), ref.zero_grad()  # grads set to None
    _backward(ps, {1}), _backward(qs, {1})  # ps[0] gets no grad
    norm = fused.step()
    expected = torch.nn.utils.clip_grad_norm_([q for q in qs if q.grad is not None], 1.0)
    ref.step()
    torch.testing.assert_close(norm.item(), expected.item(), rtol=1e-6, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


def test_fused_zero_grad_zeroes_params_added_since_the_last_step():
    """``fused.zero_grad()`` between ``optimizer.add_param_group`` and the next step zeroes the new params' grads,
    as ``optimizer.zero_grad(set_to_none=False)`` does (105de62 left them, and the next backward accumulated)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    fused = FusedStep(opt, compile=False, compile_notice=False)
    p.sum().backward()
    fused.step()
    fused.zero_grad()
    new = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [new]})
    new.sum().backward()
    fused.zero_grad()
    assert torch.equal(new.grad, torch.zeros(2))
    (2 * new).sum().backward()
    fused.step()
    assert torch.equal(new, torch.ones(2) - 0.1 * 2)
