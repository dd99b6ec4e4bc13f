"""torchao's ``_AdamW`` and ``bf16_stochastic_round`` in the fused step (``rules/torchao.py``,
``rules/quantized_adam.py``).

References are torchao's own steps (never our code), run with ``torch.compile`` replaced by the identity: its
``single_param_adam`` runs eagerly (the same float32 ops; compiling it per shape would cost each torch version's
suite time, and the compiled update's parity with compiled torchao is ``test_torchao_quantized.py``'s).

* ``_AdamW`` (plain state, torchao's math) on float32 params, 6 steps, clipping active on the even ones, against
  ``clip_grad_norm_`` + torchao's step: ``rtol=1e-5, atol=1e-6`` (the same float32 ops in the same order; the clip
  coefficient's last bit may differ, 6e-8 relative, and the update adds a few ulps). On bfloat16 params its state
  is bfloat16, as torchao makes it.
* ``bf16_stochastic_round=True`` on bfloat16 params (``_AdamW`` and ``AdamW8bit``): FusedStep draws its own
  counter-based bits (``FusedStepConfig.stochastic_rounding_seed``), not torchao's ``torch.randint``, so the
  check is statistical, not bit for bit. A constant grad of 1 makes every Adam update lr (m/sqrt(v) = 1 after
  bias correction; no decay), far under half a bfloat16 step (2**-9 below 1), so rounding to nearest never
  moves a param, and stochastic rounding moves each by lr per step on average. After ``STEPS`` steps from 1.0,
  each element's rounding errors are unbiased and each of variance at most ulp**2 / 4 (ulp = 2**-8 on
  [0.5, 1)), so the mean over N elements is within ``5 * sqrt(STEPS) * ulp / 2 / sqrt(N)`` (5 sigma, 1.1e-3)
  of the float32 result (torchao's own float32 run). torchao's own stochastic run meets the same bound, and
  round-to-nearest misses it by 9x: the check can fail.
* The same seed gives bit-identical runs, another seed other bits.
"""

import contextlib
import math
from unittest import mock

import pytest
import torch

torchao_optim = pytest.importorskip("torchao.optim")

from compiled_step import FusedStep  # noqa: E402
from compiled_step.rules import RULES, conformance_errors, declaration_errors, rule_for  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
STEPS, N, LR = 100, 8192, 1e-4
BOUND = 5 * math.sqrt(STEPS) * 2.0**-8 / 2 / math.sqrt(N)


def _eager():
    return mock.patch("torch.compile", lambda fn, **kwargs: fn)


def test_the_rule_conforms_and_is_registered_for_torchao_adamw():
    rule = rule_for(torchao_optim._AdamW([torch.nn.Parameter(torch.zeros(8))]))
    assert RULES[torchao_optim._AdamW] is rule and rule.NAME == "torchao_adamw"
    assert conformance_errors(rule) == []
    assert declaration_errors(rule, [rule.Variant("plain", 0), rule.Variant("plain", 0, True)]) == []


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 3.0 if step % 2 == 0 else 1e-3  # clipping at 1.0 active on even steps
    return [torch.randn(p.shape, generator=gen).to(p.dtype) * scale for p in params]


def test_adamw_plain_state_matches_torchao():
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 128), (64,), (7, 9)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = torchao_optim._AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref_opt = torchao_optim._AdamW(ref, lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False)
    for step in range(6):
        for p, q, g in zip(ours, ref, _grads(ours, step)):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            q.grad = g.clone()
        fused.step()
        with _eager():
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
    for i, (p, q) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"param {i}: {m}")
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key in ref_opt.state[q]:
            a, b = opt.state[p][key], ref_opt.state[q][key]
            assert type(a) is type(b) is torch.Tensor and a.dtype == b.dtype, (i, key)
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"param {i} {key}: {m}")


def test_adamw_keeps_bfloat16_state_for_bfloat16_params_as_torchao_does():
    ours = [torch.nn.Parameter(torch.randn(64, 128).bfloat16())]
    ref = [torch.nn.Parameter(ours[0].detach().clone())]
    opt, ref_opt = torchao_optim._AdamW(ours, lr=1e-2), torchao_optim._AdamW(ref, lr=1e-2)
    ours[0].grad, ref[0].grad = torch.ones_like(ours[0]), torch.ones_like(ref[0])
    FusedStep(opt, compile_notice=False).step()
    with _eager():
        ref_opt.step()
    for key, value in ref_opt.state[ref[0]].items():
        assert opt.state[ours[0]][key].dtype == value.dtype, key
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.bfloat16


_OPTIMIZERS = {"_AdamW": torchao_optim._AdamW, "AdamW8bit": torchao_optim.AdamW8bit}


def _constant_run(optimizer: str, stochastic: bool, fused: bool = True, seed: int = 0,
                  dtype=torch.bfloat16) -> torch.Tensor:
    """STEPS steps of grad 1 from params of 1.0; the params after them, as float32."""
    p = torch.nn.Parameter(torch.ones(N, dtype=dtype))
    opt = _OPTIMIZERS[optimizer]([p], lr=LR, weight_decay=0.0, bf16_stochastic_round=stochastic)
    p.grad = torch.ones_like(p)
    if fused:
        step = FusedStep(opt, compile_notice=False, stochastic_rounding_seed=seed).step
    else:
        torch.manual_seed(seed)  # torchao draws its bits from torch's generator
        step = opt.step
    with contextlib.nullcontext() if fused else _eager():  # FusedStep compiles; torchao's reference runs eagerly
        for _ in range(STEPS):
            step()
    return p.detach().float()


@pytest.mark.parametrize("optimizer", list(_OPTIMIZERS))
def test_stochastic_rounding_is_unbiased_like_torchaos(optimizer):
    exact = float(_constant_run("_AdamW", False, fused=False, dtype=torch.float32).mean())  # torchao, float32
    assert abs(exact - (1 - STEPS * LR)) < 1e-5  # each update is lr
    ours = _constant_run(optimizer, True)
    torchaos = _constant_run(optimizer, True, fused=False)
    nearest = _constant_run(optimizer, False)
    assert abs(float(ours.mean()) - exact) < BOUND, (float(ours.mean()), exact, BOUND)
    assert abs(float(torchaos.mean()) - exact) < BOUND, (float(torchaos.mean()), exact, BOUND)
    assert torch.equal(nearest, torch.ones(N))  # to nearest, an update of lr never moves a param
    assert abs(float(nearest.mean()) - exact) > 5 * BOUND
    # The same seed, the same bits; another seed, others.
    assert torch.equal(ours, _constant_run(optimizer, True))
    assert not torch.equal(ours, _constant_run(optimizer, True, seed=1))
