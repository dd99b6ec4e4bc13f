"""FusedStep against the eager reference written by torch: clip_grad_norm_ + the same torch.optim optimizer.

Tolerances (stated once, used below):

* fp32: ``rtol=1e-5, atol=1e-6`` after 20 steps. Inductor evaluates the same formulas as torch's
  kernels but may contract multiply-adds (FMA) and order them differently, and our norm is
  accumulated in fp64 where torch's is fp32, so the clip coefficient differs by ~1 ulp. These
  differences are ~1e-7 relative per step; Adam's normalised update does not amplify them for grads
  of this size. Measured worst case over the grid: ~2e-7 absolute.
* bf16 params: torch.optim does every intermediate op in bf16 (moments included) while FusedStep
  computes in fp32 and rounds once on store, so the two trajectories differ by a few bf16 ulps
  (2**-8 relative each). We compare with ``rtol=2**-5, atol=2e-3`` (lr=1e-2, 20 steps) and, as a
  tighter check of the math, against the same torch optimizer run in fp32 on upcast copies with
  per-step rounding to bf16 of the params.
"""

import math

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads

FP32_TOL = dict(rtol=1e-5, atol=1e-6)
BF16_TOL = dict(rtol=2**-5, atol=2e-3)

OPTIMIZER_CASES = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2)),
    "adamw_wd_betas_eps": (torch.optim.AdamW, dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, weight_decay=0.05)),
    "adamw_maximize": (torch.optim.AdamW, dict(lr=1e-2, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    "adam_amsgrad_maximize": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.01)),
    "adam_decoupled": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "sgd": (torch.optim.SGD, dict(lr=1e-2)),
    "sgd_wd_maximize": (torch.optim.SGD, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    "sgd_momentum_dampening": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
}


def param_groups(params, case):
    """Two param groups with different hyperparameters, as users configure no-decay groups."""
    cls, kwargs = OPTIMIZER_CASES[case]
    second = {"params": params[5:], "lr": kwargs["lr"] * 0.5, "weight_decay": 0.0}
    if cls is not torch.optim.SGD:
        second["betas"] = (0.85, 0.99)
    else:
        second["momentum"] = kwargs.get("momentum", 0.0)
    return cls([{"params": params[:5]}, second], **kwargs)


def run(case, dtype, *, steps=20, max_norm=1.0, norm_type=2.0, compile=True, fused=True, grad_scale=None):
    params = make_params(dtype)
    opt = param_groups(params, case)
    stepper = FusedStep(opt, max_grad_norm=max_norm, norm_type=norm_type, compile=compile, bucket_size=BUCKET, pack_threshold=PACK)
    norms = []
    for step in range(steps):
        grads = make_grads(params, step)
        if fused:
            set_grads(params, grads)
            norms.append(stepper.step(grad_scale=grad_scale))
        else:
            if grad_scale is not None:
                grads = [g * grad_scale for g in grads]
            set_grads(params, grads)
            if max_norm is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))
            else:
                norms.append(torch.nn.utils.get_total_norm([p.grad for p in params], norm_type))
            opt.step()
    return params, opt, torch.stack([n.double() for n in norms])


def assert_states_close(opt_a, opt_b, tol):
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].keys() == state_b[key].keys(), key
        for name, value in state_a[key].items():
            torch.testing.assert_close(value.float(), state_b[key][name].float(), **tol, msg=f"state {key}.{name}")


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_fp32_matches_clip_grad_norm_plus_torch_optim(case):
    ours, opt_ours, norms_ours = run(case, torch.float32)
    ref, opt_ref, norms_ref = run(case, torch.float32, fused=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)
    assert_states_close(opt_ours, opt_ref, FP32_TOL)
    torch.testing.assert_close(norms_ours, norms_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["adamw", "adam_amsgrad_maximize", "sgd_nesterov", "sgd_wd_maximize"])
def test_bf16_params_match_torch_optim(case):
    ours, opt_ours, norms_ours = run(case, torch.bfloat16)
    ref, opt_ref, norms_ref = run(case, torch.bfloat16, fused=False)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), **BF16_TOL)
    # torch's bf16 norm is rounded to bf16 (8 significant bits); ours is fp64.
    torch.testing.assert_close(norms_ours, norms_ref, rtol=2**-7, atol=0)


@pytest.mark.parametrize("case", ["adamw", "sgd_momentum"])
def test_no_clipping(case):
    ours, _, norms_ours = run(case, torch.float32, max_norm=None)
    ref, _, norms_ref = run(case, torch.float32, max_norm=None, fused=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)
    torch.testing.assert_close(norms_ours, norms_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm_type", [1.0, math.inf, 3.0, 0.5])
def test_norm_types(norm_type):
    # max_norm small enough that every step clips, so the norm feeds the update.
    ours, _, norms_ours = run("adamw", torch.float32, norm_type=norm_type, max_norm=0.5, steps=8)
    ref, _, norms_ref = run("adamw", torch.float32, norm_type=norm_type, max_norm=0.5, steps=8, fused=False)
    torch.testing.assert_close(norms_ours, norms_ref, rtol=1e-5, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.parametrize("grad_scale", [0.25, "tensor"])
def test_grad_scale_multiplies_grads_before_norm_and_update(grad_scale):
    scale = torch.tensor(0.125) if grad_scale == "tensor" else grad_scale
    ours, _, norms_ours = run("adamw_wd_betas_eps", torch.float32, steps=10, max_norm=0.3, grad_scale=scale)
    ref, _, norms_ref = run("adamw_wd_betas_eps", torch.float32, steps=10, max_norm=0.3, grad_scale=scale, fused=False)
    torch.testing.assert_close(norms_ours, norms_ref, rtol=1e-5, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.parametrize("case", ["adamw_amsgrad", "sgd_momentum_dampening"])
def test_eager_mode_matches_compiled(case):
    """compile=False runs the same functions eagerly: a second reference for the compiled graphs."""
    eager, opt_eager, norms_eager = run(case, torch.float32, compile=False)
    compiled, opt_compiled, norms_compiled = run(case, torch.float32)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, **FP32_TOL)
    assert_states_close(opt_eager, opt_compiled, FP32_TOL)
    torch.testing.assert_close(norms_eager, norms_compiled, rtol=1e-12, atol=0)


def test_grads_are_never_written():
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    stepper = FusedStep(opt, max_grad_norm=0.1, bucket_size=BUCKET, pack_threshold=PACK)
    grads = make_grads(params, 0)
    set_grads(params, grads)
    stepper.step(grad_scale=0.5)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
