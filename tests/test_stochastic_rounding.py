"""Stochastic rounding of bfloat16 stores (``FusedStepConfig.stochastic_rounding``; torchao's
``bf16_stochastic_round``) for Adam/AdamW: bfloat16 params, and bfloat16 moments (``bf16_moments``).

What it must be: unbiased, deterministic under a seed (the random bits are a hash of the seed, each tensor's
step count, the element's place and the store: ``rules.common.random_bits16``), continued by a resume, the
same on every rank for replicated params, and bit-identical on a skipped step.

Reference for the bias: the same AdamW run with float32 params and state (torch's own single-tensor step).
With a constant grad and no weight decay, AdamW's update is about ``lr`` a step, independent of the param,
so the float32 run is the exact trajectory the bfloat16 one rounds. At ``lr=1e-3`` a bfloat16 param near 1.0
(ulp 2**-8 below 1, 2**-7 above) never moves with round-to-nearest; rounded stochastically, its error after
``STEPS`` steps is a sum of independent zero-mean errors of variance <= ulp**2 / 4 each, so the mean over
``N`` elements has standard deviation <= sqrt(STEPS) * ulp / 2 / sqrt(N): we bound it at 6 of them.
"""

import math

import pytest
import torch

from compiled_step import FusedStep, bf16_moments
from compiled_step.rules.common import bf16_stochastic, random_bits16

N = 4096
STEPS = 48
LR = 1e-3
ULP = 2.0**-7  # the larger of the two bfloat16 ulps around 1.0


def _bound(steps=STEPS, n=N, ulp=ULP):
    return 6 * math.sqrt(steps) * ulp / 2 / math.sqrt(n)


def _run(dtype, steps=STEPS, moments=False, **options):
    """AdamW on one param of N ones with a constant grad; returns (param, optimizer, fused)."""
    p = torch.nn.Parameter(torch.ones(N, dtype=dtype))
    opt = torch.optim.AdamW([p], lr=LR, weight_decay=0.0, foreach=False)
    if moments:
        bf16_moments(opt)
    fused = FusedStep(opt, compile_notice=False, **options) if options is not None else None
    for _ in range(steps):
        p.grad = torch.full_like(p, 0.5)
        fused.step()
    return p, opt, fused


def _float32_reference(steps=STEPS):
    p = torch.nn.Parameter(torch.ones(N))
    opt = torch.optim.AdamW([p], lr=LR, weight_decay=0.0, foreach=False)
    for _ in range(steps):
        p.grad = torch.full_like(p, 0.5)
        opt.step()
    return p.detach()


@pytest.mark.parametrize("layout", [dict(), dict(pack_threshold=0, bucket_size=4)], ids=["flat", "bucketed"])
def test_bf16_params_rounded_stochastically_are_unbiased_where_nearest_stalls(layout):
    exact = _float32_reference()
    assert float(exact.mean()) < 1 - 0.9 * STEPS * LR  # the float32 run moved ~lr a step
    nearest, *_ = _run(torch.bfloat16, **layout)
    assert torch.equal(nearest, torch.ones_like(nearest))  # round-to-nearest never moves: every update < ulp/2
    stochastic, *_ = _run(torch.bfloat16, stochastic_rounding="params", **layout)
    error = (stochastic.float() - exact).mean().item()
    assert abs(error) <= _bound(), f"mean error {error} over {N} elements, bound {_bound()}"
    assert stochastic.unique().numel() > 1  # elements round independently


def test_bf16_moments_rounded_stochastically_are_unbiased():
    """exp_avg_sq of a constant grad g grows as (1 - beta2**t) * g**2, by less than half its ulp per step after a
    few steps; its mean error against the float32 run's stays within the same bound."""
    exact_p = torch.nn.Parameter(torch.ones(N))
    exact = torch.optim.AdamW([exact_p], lr=LR, foreach=False)
    for _ in range(STEPS):
        exact_p.grad = torch.full_like(exact_p, 0.5)
        exact.step()
    v_exact = exact.state[exact_p]["exp_avg_sq"]
    p, opt, _ = _run(torch.float32, moments=True, stochastic_rounding="state")
    v = opt.state[p]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    ulp = 2.0 ** (math.floor(math.log2(float(v_exact[0]))) - 7)
    error = (v.float() - v_exact).mean().item()
    assert abs(error) <= _bound(ulp=ulp), (error, _bound(ulp=ulp))
    _, nearest_opt, _ = _run(torch.float32, moments=True)  # to nearest: every element off by the same ~1 ulp
    nearest_error = (nearest_opt.state[nearest_opt.param_groups[0]["params"][0]]["exp_avg_sq"].float() - v_exact)
    assert abs(nearest_error.mean().item()) > 2 * _bound(ulp=ulp)


@pytest.mark.parametrize("layout", [dict(), dict(pack_threshold=0, bucket_size=4)], ids=["flat", "bucketed"])
def test_compiled_rounding_is_bit_identical_to_the_eager_functions(layout):
    """The compiled graphs draw the same bits as the same functions run eagerly (compile=False)."""
    compiled, *_ = _run(torch.bfloat16, steps=3, stochastic_rounding="params", **layout)
    eager, *_ = _run(torch.bfloat16, steps=3, stochastic_rounding="params", compile=False, **layout)
    assert torch.equal(compiled, eager)


def test_the_same_seed_gives_bit_identical_runs_and_another_seed_another():
    a, *_ = _run(torch.bfloat16, steps=6, stochastic_rounding="params", stochastic_rounding_seed=7)
    b, *_ = _run(torch.bfloat16, steps=6, stochastic_rounding="params", stochastic_rounding_seed=7)
    c, *_ = _run(torch.bfloat16, steps=6, stochastic_rounding="params", stochastic_rounding_seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_a_resume_continues_the_same_random_sequence():
    straight, *_ = _run(torch.bfloat16, steps=6, stochastic_rounding="params")
    p, opt, fused = _run(torch.bfloat16, steps=3, stochastic_rounding="params")
    saved = fused.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=LR, weight_decay=0.0, foreach=False)
    fused2 = FusedStep(opt2, compile_notice=False, stochastic_rounding="params")
    fused2.load_state_dict(saved)
    for _ in range(3):
        q.grad = torch.full_like(q, 0.5)
        fused2.step()
    assert torch.equal(q, straight)


def test_a_skipped_step_leaves_everything_bit_identical():
    p, opt, fused = _run(torch.bfloat16, steps=3, stochastic_rounding=("params", "state"))
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    p.grad = torch.full_like(p, float("nan"))
    fused.step()
    assert int(fused.skipped_steps) == 1
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


def test_the_rounding_is_unbiased_per_value_and_exact_on_representable_values():
    """bf16_stochastic itself: a value 1/4 of the way between two bfloat16 neighbours rounds up a quarter of the
    time (binomial bound), and a bfloat16 value (a skipped store) rounds to itself whatever the bits."""
    lo = torch.tensor(1.0, dtype=torch.bfloat16).float()
    x = torch.full((1 << 16,), float(lo) + 0.25 * ULP)
    bits = random_bits16(torch.tensor([3], dtype=torch.int64), torch.tensor(5.0), 0, torch.arange(x.numel()))
    up = (bf16_stochastic(x, bits).float() > lo).float().mean().item()
    assert abs(up - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / x.numel())
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(bf16_stochastic(exact, random_bits16(torch.tensor([1]), torch.tensor(0.0), 0,
                                                            torch.arange(1000))), exact.bfloat16())
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = bf16_stochastic(special, torch.full((3,), 65535, dtype=torch.int32)).float()
    assert out[0] == float("inf") and out[1] == -float("inf") and out[2].isnan()


def test_what_cannot_round_stochastically_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match="expected some of"):
        FusedStep(torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))]), stochastic_rounding="moments")
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    fused = FusedStep(torch.optim.SGD([p], lr=0.1, momentum=0.9), stochastic_rounding="params", compile_notice=False)
    with pytest.raises(ValueError, match="not offered for sgd"):
        fused.step()
    assert torch.equal(p, torch.ones_like(p)) and not fused.optimizer.state
    q = torch.nn.Parameter(torch.ones(3))
    q.grad = torch.ones_like(q)
    fused = FusedStep(torch.optim.AdamW([q]), stochastic_rounding="params", compile_notice=False)
    with pytest.raises(ValueError, match="no param"):
        fused.step()
    assert torch.equal(q, torch.ones_like(q))
