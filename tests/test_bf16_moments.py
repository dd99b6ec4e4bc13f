"""bf16 moments for torch's Adam/AdamW with float32 params (torchtitan's ``bf16_optimizer_states``).

The user makes the moments bfloat16 (``compiled_step.bf16_moments(optimizer)``, or their own pre-populated
``optimizer.state``, as torchtitan's step pre-hook does); FusedStep keeps them bfloat16 through the step, a
plan rebuild, ``state_dict()``, ``load_state_dict()`` and ``torch.save``.

Reference. On the CPU no eager torch path steps float32 params with bfloat16 moments (the single-tensor,
foreach and fused paths all raise on the dtype mismatch; only CUDA's fused kernel has a mixed-precision
path, ``FusedAdamMathFunctorMP``: moments loaded to float32, torch's math in float32, stored rounded to
nearest). So the reference is that kernel's semantics built from torch's own step: ``torch.optim.AdamW``
(single-tensor) steps float32 copies of the bfloat16 moments, which are then rounded to nearest bfloat16.

Tolerance. FusedStep's float32 update is torch's formula to ~1 float32 ulp (test_parity.py: ``rtol=1e-5``
after 20 steps). Rounding to bfloat16 keeps 8 bits, so a 1-ulp float32 difference flips a moment's rounding
only when its value lies within 2**-16 relative of a bfloat16 rounding midpoint: we allow at most 1% of
moment elements to differ, each by at most one bfloat16 ulp (``rtol=2**-7``). A flipped moment moves its
param's update by about ``lr * 2**-8``: params ``rtol=1e-5, atol=2e-5`` over 6 steps at ``lr=1e-2``.
"""

import copy
import math

import pytest
import torch

from compiled_step import FusedStep, bf16_moments
from conftest import make_grads, make_params, write_grads

STEPS = 6
MOMENTS = ("exp_avg", "exp_avg_sq")
PARAM_TOL = dict(rtol=1e-5, atol=2e-5)


def _round_moments_to_bf16(opt):
    """The reference's store: each moment rounded to nearest bfloat16 (kept in a float32 tensor for torch)."""
    for st in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in st:
                st[key].copy_(st[key].bfloat16().float())


def _assert_moments_close(ours: dict, ref: dict, keys=MOMENTS):
    for key in keys:
        a, b = ours[key], ref[key]
        assert a.dtype == torch.bfloat16, f"{key} is {a.dtype}"
        b = b.bfloat16()
        differ = (a != b).sum().item()
        assert differ <= max(1, a.numel() // 100), f"{key}: {differ} of {a.numel()} elements differ"
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=0)


def _runs(options, clip=1.0, steps=STEPS, amsgrad=False):
    """FusedStep(AdamW) with bf16 moments next to the reference; yields after each step."""
    ours, ref = make_params(), make_params()
    opt = bf16_moments(torch.optim.AdamW(ours, lr=1e-2, amsgrad=amsgrad, **options))
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, amsgrad=amsgrad, foreach=False, **options)
    fused = FusedStep(opt, max_grad_norm=clip, compile_notice=False)
    for step in range(steps):
        grads = make_grads(ours, step, scale=3.0 if step % 2 else 0.02)  # clipped on odd steps only
        write_grads(ours, grads)
        write_grads(ref, grads)
        norm = fused.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip is not None else math.inf)
        ref_opt.step()
        _round_moments_to_bf16(ref_opt)
        yield step, ours, ref, opt, ref_opt, fused, norm, ref_norm


@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, maximize=True)], ids=["defaults", "decay_max"])
def test_bf16_moments_match_torch_adamw_with_bf16_rounded_moments(options):
    clipped = 0
    for step, ours, ref, opt, ref_opt, fused, norm, ref_norm in _runs(options):
        clipped += float(ref_norm) > 1.0
        torch.testing.assert_close(norm.float(), ref_norm, rtol=1e-5, atol=0)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, **PARAM_TOL)
            _assert_moments_close(opt.state[p], ref_opt.state[q])
            assert float(opt.state[p]["step"]) == step + 1
    assert 0 < clipped < STEPS  # the clip was active on some steps only


def test_amsgrad_keeps_its_maximum_in_bf16_too():
    for step, ours, ref, opt, ref_opt, *_ in _runs({}, amsgrad=True, steps=3):
        pass
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **PARAM_TOL)
        _assert_moments_close(opt.state[p], ref_opt.state[q], keys=MOMENTS + ("max_exp_avg_sq",))


def _stepped(steps=2, **kwargs):
    params = make_params()
    opt = bf16_moments(torch.optim.AdamW(params, lr=1e-2))
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False, **kwargs)
    for step in range(steps):
        write_grads(params, make_grads(params, step))
        fused.step()
    return params, opt, fused


def _dtypes(opt):
    return {(i, k): v.dtype for i, st in enumerate(opt.state.values()) for k, v in st.items()}


def test_state_dict_save_load_and_resume_keep_every_state_dtype(tmp_path):
    """torchtitan #4615: torch's load_state_dict casts the moments to the params' dtype; a resume must not."""
    params, opt, fused = _stepped()
    saved = fused.state_dict()
    assert {v.dtype for st in saved["state"].values() for k, v in st.items() if k != "step"} == {torch.bfloat16}
    torch.save(saved, tmp_path / "ckpt.pt")

    # A fresh process: a new model, a plain AdamW (fp32 state when torch makes it), the checkpoint loaded.
    params2 = make_params()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2 = torch.optim.AdamW(params2, lr=1e-2)
    fused2 = FusedStep(opt2, max_grad_norm=1.0, compile_notice=False)
    fused2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert _dtypes(opt2) == _dtypes(opt)
    for step in (2, 3):  # both runs go on: bit-identical, and the dtypes stay
        for ps in (params, params2):
            write_grads(ps, make_grads(ps, step))
        fused.step()
        fused2.step()
    assert _dtypes(opt2) == _dtypes(opt)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        for key in MOMENTS:
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_loading_into_the_wrapped_optimizer_directly_keeps_bf16_too():
    params, opt, fused = _stepped()
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)  # not through FusedStep: torch's cast, then FusedStep's hook puts bf16 back
    assert all(st[k].dtype == torch.bfloat16 for st in opt.state.values() for k in MOMENTS)
    write_grads(params, make_grads(params, 5))
    fused.step()
    assert all(st[k].dtype == torch.bfloat16 for st in opt.state.values() for k in MOMENTS)


def test_a_plan_rebuild_keeps_bf16_moments():
    params, opt, fused = _stepped()
    before = {id(p): {k: opt.state[p][k].clone() for k in MOMENTS} for p in params}
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})  # a new param group: a new plan
    write_grads(params, [torch.zeros_like(p) for p in params])
    fused.step()
    for p in params:
        for k in MOMENTS:
            assert opt.state[p][k].dtype == torch.bfloat16
            assert opt.state[p][k].data_ptr() != before[id(p)][k].data_ptr()
    new = opt.param_groups[1]["params"][0]
    assert new not in opt.state  # no grad: no state, as torch


def test_a_nonfinite_step_leaves_bf16_moments_bit_identical():
    params, opt, fused = _stepped()
    before = [(p.detach().clone(), {k: opt.state[p][k].clone() for k in MOMENTS}) for p in params]
    grads = make_grads(params, 9)
    grads[3][0] = float("inf")
    write_grads(params, grads)
    fused.step()
    assert int(fused.skipped_steps) == 1
    for p, (value, moments) in zip(params, before):
        assert torch.equal(p, value)
        for k in MOMENTS:
            assert torch.equal(opt.state[p][k], moments[k])


def test_moments_of_two_dtypes_in_one_param_group_are_refused_before_anything_changes():
    params = make_params()
    opt = bf16_moments(torch.optim.AdamW(params, lr=1e-2))
    opt.state[params[1]]["exp_avg"] = torch.zeros_like(params[1])  # fp32 next to the others' bf16
    fused = FusedStep(opt, compile_notice=False)
    write_grads(params, make_grads(params, 0))
    values = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="'exp_avg' in bfloat16 and float32"):
        fused.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16


def test_bf16_moments_refuses_what_it_does_not_cover():
    with pytest.raises(TypeError, match="Adam and AdamW"):
        bf16_moments(torch.optim.SGD(make_params(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="float32 or bfloat16 params"):
        bf16_moments(torch.optim.AdamW(make_params(torch.float64), lr=0.1))


def test_several_optimizers_and_health_options_with_bf16_moments():
    """AdamW with bf16 moments beside SGD under one clip, with param_norms on: the same updates as the reference
    (one clip_grad_norm_ over both, then each optimizer), and the per-param norms torch computes."""
    ours, ref = make_params(), make_params()
    half = len(ours) // 2
    adamw = bf16_moments(torch.optim.AdamW(ours[:half], lr=1e-2))
    sgd = torch.optim.SGD(ours[half:], lr=1e-2, momentum=0.9)
    fused = FusedStep([adamw, sgd], max_grad_norm=1.0, param_norms=True, compile_notice=False)
    ref_adamw = torch.optim.AdamW(ref[:half], lr=1e-2, foreach=False)
    ref_sgd = torch.optim.SGD(ref[half:], lr=1e-2, momentum=0.9, foreach=False)
    for step in range(STEPS):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        fused.step()
        expected_norms = torch.stack([g.double().norm() for g in grads])
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_adamw.step()
        _round_moments_to_bf16(ref_adamw)
        ref_sgd.step()
        torch.testing.assert_close(fused.param_norms, expected_norms, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **PARAM_TOL)
    for p, q in zip(ours[:half], ref[:half]):
        _assert_moments_close(adamw.state[p], ref_adamw.state[q])
