"""float32 moments for bfloat16 params (``compiled_step.fp32_moments``): what DeepSpeed's CPU Adam keeps by default.

FusedStep keeps the moments float32 through the step, ``state_dict()``, ``load_state_dict()`` and ``torch.save``, and
rounds the params to bfloat16.

Reference. Eager torch.optim on the CPU refuses moments of another dtype than the grads, so the reference is torch's
own step on float32 copies: ``torch.optim.AdamW`` (single-tensor) steps float32 copies of the bfloat16 params with
float32 moments and the bfloat16 grads widened, after ``clip_grad_norm_``; the params are then rounded to nearest
bfloat16, which is what they hold.

Tolerance. FusedStep's float32 update is torch's formula to ~1 float32 ulp (``test_parity.py``), and its clip
coefficient comes from a float64 norm where torch's is float32, another ulp. The moments are float32 on both sides
and never rounded: ``rtol=1e-5``. A param's rounding to bfloat16 flips on such an ulp only when its value lies within
2**-16 relative of a bfloat16 rounding midpoint: at most 2% of param elements may differ, each by one bfloat16 ulp
(``rtol=2**-7``), after 6 steps.
"""

import copy
import math

import pytest
import torch

from compiled_step import FusedStep, fp32_moments
from conftest import make_grads, make_params, write_grads

STEPS = 6
MOMENTS = ("exp_avg", "exp_avg_sq")


def _assert_params_close(p: torch.Tensor, ref32: torch.Tensor) -> None:
    assert p.dtype == torch.bfloat16
    ref = ref32.bfloat16()
    differ = (p != ref).sum().item()
    assert differ <= max(1, p.numel() // 50), f"{differ} of {p.numel()} param elements differ"
    torch.testing.assert_close(p.float(), ref.float(), rtol=2**-7, atol=0)


def _runs(options, clip=1.0, steps=STEPS):
    ours = make_params(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = fp32_moments(torch.optim.AdamW(ours, lr=1e-2, **options))
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False, **options)
    fused = FusedStep(opt, max_grad_norm=clip, compile_notice=False)
    for step in range(steps):
        grads = make_grads(ours, step, scale=3.0 if step % 2 else 0.02)  # bfloat16; clipped on odd steps only
        write_grads(ours, grads)
        write_grads(ref, [g.float() for g in grads])
        norm = fused.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip is not None else math.inf)
        ref_opt.step()
        with torch.no_grad():
            for q in ref:
                q.copy_(q.bfloat16().float())  # what a bfloat16 param holds
        yield step, ours, ref, opt, ref_opt, fused, norm, ref_norm


@pytest.mark.parametrize("options", [dict(), dict(weight_decay=0.1, maximize=True)], ids=["defaults", "decay_max"])
def test_fp32_moments_match_torch_adamw_on_float32_copies(options):
    clipped = 0
    for step, ours, ref, opt, ref_opt, fused, norm, ref_norm in _runs(options):
        clipped += float(ref_norm) > 1.0
        torch.testing.assert_close(norm.float(), ref_norm, rtol=1e-5, atol=0)
        for p, q in zip(ours, ref):
            _assert_params_close(p, q)
            for key in MOMENTS:
                assert opt.state[p][key].dtype == torch.float32
                torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-12)
            assert float(opt.state[p]["step"]) == step + 1
    assert 0 < clipped < STEPS  # the clip was active on some steps only


def _stepped(steps=2):
    params = make_params(torch.bfloat16)
    opt = fp32_moments(torch.optim.AdamW(params, lr=1e-2))
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False)
    for step in range(steps):
        write_grads(params, make_grads(params, step))
        fused.step()
    return params, opt, fused


def test_a_checkpoint_keeps_the_float32_moments_unrounded(tmp_path):
    """torch's load_state_dict casts the moments to the params' dtype, bfloat16: their low bits would be lost."""
    params, opt, fused = _stepped()
    saved = fused.state_dict()
    assert {v.dtype for st in saved["state"].values() for k, v in st.items() if k != "step"} == {torch.float32}
    torch.save(saved, tmp_path / "ckpt.pt")

    # A fresh process: a new bfloat16 model, its optimizer made as the first run made it, the checkpoint loaded.
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = fp32_moments(torch.optim.AdamW(params2, lr=1e-2))
    fused2 = FusedStep(opt2, max_grad_norm=1.0, compile_notice=False)
    fused2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for p, q in zip(params, params2):
        for key in MOMENTS:
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(opt2.state[q][key], opt.state[p][key])  # not rounded through bfloat16
    for step in (2, 3):  # both runs go on bit-identical, and the dtypes stay
        for ps in (params, params2):
            write_grads(ps, make_grads(ps, step))
        fused.step()
        fused2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        for key in MOMENTS:
            assert opt2.state[q][key].dtype == torch.float32
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_loading_into_the_wrapped_optimizer_directly_keeps_them_float32_too():
    params, opt, fused = _stepped()
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)  # not through FusedStep: torch's cast, then FusedStep's hook puts the saved ones back
    for i, st in enumerate(opt.state.values()):
        for key in MOMENTS:
            assert st[key].dtype == torch.float32 and torch.equal(st[key], saved["state"][i][key])
    write_grads(params, make_grads(params, 5))
    fused.step()
    assert all(st[k].dtype == torch.float32 for st in opt.state.values() for k in MOMENTS)


def test_fp32_moments_refuses_what_it_does_not_cover_before_changing_anything():
    sgd = torch.optim.SGD(make_params(torch.bfloat16), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="Adam and AdamW"):
        fp32_moments(sgd)
    doubles = torch.optim.AdamW(make_params(torch.float64), lr=0.1)
    with pytest.raises(ValueError, match="float64"):
        fp32_moments(doubles)
    assert not doubles.state and not doubles._optimizer_step_pre_hooks


def test_float32_params_keep_float32_moments():
    params = make_params()
    opt = fp32_moments(torch.optim.AdamW(params, lr=1e-2))
    assert all(st[k].dtype == torch.float32 for st in opt.state.values() for k in MOMENTS)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (the deepspeed extra); CI does not install it")
def test_unclipped_steps_match_deepspeeds_cpu_adam_with_its_float32_states(monkeypatch):
    """DeepSpeedCPUAdam (bfloat16 params, fp32_optimizer_states=True, AdamW mode): its own C++ arithmetic, rounding
    the params to bfloat16 to nearest (its float -> bf16 store). Tolerance as above for the params. Its moments: it
    takes ``1 - beta2`` in float32 from beta2 rounded to float32 (1 - fl(0.999) is 1.3e-5 relative off 0.001, which
    torch computes in float64), so exp_avg_sq sits up to ~1.3e-5 relative off torch's: rtol 3e-5."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    # contiguous params only: DeepSpeed walks a param's and its grad's memory in the same order whatever their strides
    ours = make_params(torch.bfloat16, transposed_index=None)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = fp32_moments(torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1))
    ds = DeepSpeedCPUAdam(theirs, lr=1e-2, weight_decay=0.1, adamw_mode=True)
    fused = FusedStep(opt, max_grad_norm=None, compile_notice=False)
    for step in range(3):
        grads = make_grads(ours, step, scale=0.02)
        write_grads(ours, grads)
        write_grads(theirs, grads)
        fused.step()
        ds.step()
    for p, q in zip(ours, theirs):
        _assert_params_close(p, q.float())
        for key in MOMENTS:
            torch.testing.assert_close(opt.state[p][key], ds.state[q][key], rtol=3e-5, atol=1e-12)


def test_an_optimizer_not_given_fp32_moments_loads_and_refuses_as_torch_does(tmp_path):
    """float32 moments of bfloat16 params are the user's choice (``fp32_moments``). A plain optimizer loads them as
    torch does, rounded to bfloat16, and float32 moments it was not given (``model.to(bfloat16)`` after its state
    was made) are refused before anything changes, as torch's step refuses them."""
    params, opt, fused = _stepped()
    saved = fused.state_dict()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(params2, lr=1e-2)
    fused2 = FusedStep(plain, max_grad_norm=1.0, compile_notice=False)
    fused2.load_state_dict(saved)
    for p, q in zip(params, params2):
        for key in MOMENTS:
            assert plain.state[q][key].dtype == torch.bfloat16
            assert torch.equal(plain.state[q][key], opt.state[p][key].bfloat16())

    floats = make_params()
    opt3 = torch.optim.AdamW(floats, lr=1e-2)
    fused3 = FusedStep(opt3, max_grad_norm=1.0, compile_notice=False)
    write_grads(floats, make_grads(floats, 0))
    fused3.step()
    with torch.no_grad():
        for p in floats:
            p.data = p.data.bfloat16()
            p.grad = None
    write_grads(floats, make_grads(floats, 1))
    before = [p.detach().clone() for p in floats]
    with pytest.raises(ValueError, match="compiled_step.fp32_moments"):
        fused3.step()
    assert all(torch.equal(p, b) for p, b in zip(floats, before))
    assert all(st[k].dtype == torch.float32 for st in opt3.state.values() for k in MOMENTS)
