"""float64 params take a float64 step: FusedStep against eager ``clip_grad_norm_`` + ``torch.optim``, both in float64.

Reference: eager ``torch.nn.utils.clip_grad_norm_`` and the same ``torch.optim`` optimizer on copies of the params
(torch's single-tensor CPU path, every op in float64, its scalars Python floats).

Tolerance, and why: ``relative_error <= 1e-12`` over 6 steps (max |ours - torch| over max |torch|, per tensor).
Both sides evaluate the same float64 formulas; they differ only in the order of operations (Inductor may contract
multiply-adds into FMAs, the norm sums in another order, ``(c * m) / d`` against ``c * (m / d)``), about 1e-16
relative per operation, so a few 1e-15 after 6 steps of a few dozen operations. 1e-12 leaves a wide margin and is
five orders below what a single float32 intermediate (a float32 table, clip coefficient, scale or update) gives:
1e-7 relative, which is what these tests catch.

Plain SGD with lr=1.0 from zero params is exact on both sides (``p - 1.0 * g`` from ``p = 0``), so it is compared
bit for bit.

Muon: ``torch.optim.Muon`` accepts float64 params; its momentum buffer and update are float64 and only the
Newton-Schulz iteration runs in bfloat16 (its input is the float64 update cast to bfloat16). FusedStep matches
that: the momentum buffers to 1e-12, and the params too, since the Newton-Schulz output is torch's bfloat16 values
bit for bit on these inputs (see tests/test_muon.py) and the update that applies it is float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, SHAPES, write_grads

STEPS = 6
REL_TOL = 1e-12

CASES = {
    "adamw_wd": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam_amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd_lr1": (torch.optim.SGD, dict(lr=1.0)),
}


def _params(seed=0, shapes=SHAPES):
    """float64 params with values that float32 cannot hold (one transposed, dense but not contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if i == 4:
            t = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).t()
        params.append(torch.nn.Parameter(t))
    return params


def _grads(params, step):
    """float64 grads, large enough that clipping at 1.0 is active."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 3.0 for p in params]


def _optimizer(cls, kwargs, params):
    """Two param groups with different hyperparameters, so each group's row of hyperparameters is read."""
    second = {"params": params[5:], "lr": kwargs["lr"] * 0.5}
    return cls([{"params": params[:5]}, second], **kwargs)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return (ours.double() - ref.double()).abs().max().item() / scale if scale else (ours != ref).any().item()


def assert_close_relative(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = REL_TOL) -> None:
    err = relative_error(ours, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("clip", [None, 1.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_torch_optim_to_float64_precision(case, clip):
    cls, kwargs = CASES[case]
    ours, ref = _params(), _params()
    opt, ref_opt = _optimizer(cls, kwargs, ours), _optimizer(cls, kwargs, ref)
    fused = FusedStep(opt, max_grad_norm=clip, bucket_size=BUCKET, pack_threshold=PACK, compile_notice=False)
    for step in range(STEPS):
        grads = _grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        norm = fused.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip is not None else math.inf)
        ref_opt.step()
        assert_close_relative(norm.reshape(()), ref_norm, f"step {step}: total norm")
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert p.dtype == torch.float64
        assert_close_relative(p.detach(), q.detach(), f"param {i}")
        for key, value in ref_opt.state[q].items():
            assert_close_relative(opt.state[p][key], value, f"param {i}: state {key!r}")


def test_sgd_lr_one_is_exact():
    """The issue's repro: one SGD step with lr=1.0 from zero params gives exactly -grad, as torch's does."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(256, dtype=torch.float64))
    u = torch.randn(256, generator=gen, dtype=torch.float64)
    ref = torch.nn.Parameter(torch.zeros(256, dtype=torch.float64))
    fused = FusedStep(torch.optim.SGD([p], lr=1.0), compile_notice=False)
    p.grad, ref.grad = u.clone(), u.clone()
    fused.step()
    torch.optim.SGD([ref], lr=1.0).step()
    assert torch.equal(ref.detach(), -u)  # the reference itself is exact
    assert torch.equal(p.detach(), ref.detach()), f"max |p + u| = {(p + u).abs().max().item():.3g}"


MUON_SHAPES = [(16, 32), (32, 16), (16, 32), (24, 24)]


@pytest.mark.parametrize("clip", [None, 1.0], ids=["unclipped", "clipped"])
def test_float64_muon_matches_torch_muon(clip):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in MUON_SHAPES]
    ref = copy.deepcopy(ours)
    kwargs = dict(lr=2e-2, weight_decay=0.1, momentum=0.9, nesterov=True)
    opt, ref_opt = torch.optim.Muon(ours, **kwargs), torch.optim.Muon(ref, **kwargs)
    fused = FusedStep(opt, max_grad_norm=clip, compile_notice=False)
    for step in range(STEPS):
        grads = _grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        norm = fused.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip is not None else math.inf)
        ref_opt.step()
        assert_close_relative(norm.reshape(()), ref_norm, f"step {step}: total norm")
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert p.dtype == torch.float64
        assert_close_relative(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                              f"matrix {i}: momentum_buffer")
        assert_close_relative(p.detach(), q.detach(), f"matrix {i}")


def test_float32_and_float64_groups_in_one_plan_each_keep_their_precision():
    """One optimizer, a float32 and a float64 param group: the plan's table is float64, and the float32 group reads
    its scalars rounded to float32, as from a float32 table. Unclipped, so that torch's float32 norm of the float32
    grads does not enter the float64 group's step. Tolerances: float64 as above; float32 as tests/test_parity.py's
    (``rtol=1e-5, atol=1e-6``: FMA contraction and operation order, ~1e-7 relative per step)."""
    def make():
        params = _params()
        return [p if i < 5 else torch.nn.Parameter(p.detach().float()) for i, p in enumerate(params)]

    ours, ref = make(), make()
    opt = torch.optim.AdamW([{"params": ours[:5]}, {"params": ours[5:]}], lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": ref[:5]}, {"params": ref[5:]}], lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=None, bucket_size=BUCKET, pack_threshold=PACK, compile_notice=False)
    for step in range(STEPS):
        grads = [g.to(p.dtype) for g, p in zip(_grads(ours, step), ours)]
        write_grads(ours, grads)
        write_grads(ref, grads)
        fused.step()
        ref_opt.step()
    for i, (p, q) in enumerate(zip(ours, ref)):
        if p.dtype == torch.float64:
            assert_close_relative(p.detach(), q.detach(), f"float64 param {i}")
        else:
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [True, False])
def test_nemo_compat_clip_grad_norm_clips_float64_grads_in_float64(foreach):
    """The seed's ``clip_grad_norm`` (``nemo_compat``) multiplies the grads in place: float64 grads by a float64
    coefficient, as ``clip_grad_norm_`` does, so they agree to float64 precision (1e-12, as above)."""
    from compiled_step.nemo_compat import clip_grad_norm

    ours, ref = _params(), _params()
    for p, q, g in zip(ours, ref, _grads(ours, 0)):
        p.grad, q.grad = g.clone(), g.clone()
    model = torch.nn.Module()
    model.params = torch.nn.ParameterList(ours)
    total = clip_grad_norm(1.0, [model], foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert_close_relative(torch.as_tensor(total).reshape(()), expected, "total norm")
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert_close_relative(p.grad, q.grad, f"grad {i}")
