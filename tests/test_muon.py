"""Muon (``torch.optim.Muon``) in FusedStep, alone and next to AdamW under one global norm.

Reference: ``clip_grad_norm_`` over every param, then ``torch.optim.Muon.step()`` (and
``torch.optim.AdamW.step()``), eager, on copies of the params.

Tolerances, and why:

* Without clipping the Newton-Schulz input is the same on both sides, and FusedStep's batched,
  compiled Newton-Schulz gives torch's bfloat16 values bit for bit (Inductor's
  ``emulate_precision_casts``); what remains is the last update ``p * (1 - lr*wd) - lr*ratio*O``,
  rounded once instead of twice: ``rtol=1e-6`` (a few fp32 ulps). On torch < 2.13 this needs the bit-level
  bf16 rounding in ``rules/muon.py``. Bit for bit holds on these inputs; it is not guaranteed on every input,
  because torch's own CPU ``bmm`` over a batch can round differently from its single-matrix product (measured:
  one random 16x32 input in 18 gave outputs 0.006 apart, eager batched vs eager per matrix).
* With clipping, FusedStep's clip coefficient comes from an fp64 norm and torch's from an fp32 one:
  they differ in the last fp32 bits, which can flip the bfloat16 rounding of a Newton-Schulz input
  element, and torch's Newton-Schulz resolves its output to bfloat16 (8 bits). Such a flip moves an
  output element by about one bfloat16 ulp, so a param moves by ``lr * ratio * 2**-7`` at most (|O|
  entries stay below 2): ``atol = steps * lr * max_ratio * 2**-7``. The momentum buffers, which never
  go through bfloat16, and AdamW's params stay within the fp32 tolerance of test_parity.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compiled_step import FusedStep
from compiled_step.rules import RULES, conformance_errors, muon
from conftest import make_grads, write_grads

# Tall, wide and square matrices, some shapes repeated (one stack each).
SHAPES = [(16, 32), (32, 16), (16, 32), (24, 24), (32, 16), (8, 40), (24, 24)]
STEPS = 6


def _matrices(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _max_ratio(params, adjust_lr_fn):
    return max(muon.adjust_lr_ratio(tuple(p.shape), adjust_lr_fn) for p in params)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch(nesterov, adjust_lr_fn, clip):
    ours, ref = _matrices(), _matrices()
    kwargs = dict(lr=2e-2, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt, ref_opt = torch.optim.Muon(ours, **kwargs), torch.optim.Muon(ref, **kwargs)
    fused = FusedStep(opt, max_grad_norm=clip, compile_notice=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for step in range(STEPS):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        norm = fused.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip if clip is not None else math.inf)
        ref_opt.step()
        sched.step()
        ref_sched.step()
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    tol = dict(rtol=1e-6, atol=1e-6) if clip is None else \
        dict(rtol=0, atol=STEPS * 2e-2 * _max_ratio(ours, adjust_lr_fn) * 2 ** -7)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **tol)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-5 if clip else 1e-6)
    assert len(fused.program.calls) == 2 + 4  # Phase A, finish, one call per shape (4 shapes)


def test_state_loaded_into_torch_muon_continues_identically():
    """FusedStep trains 3 steps; torch's Muon takes over its state and params for 3 more, eagerly,
    next to FusedStep going on: unclipped, the two are the same to fp32 rounding."""
    ours = _matrices()
    opt = torch.optim.Muon(ours, lr=2e-2, weight_decay=0.1)
    fused = FusedStep(opt, compile_notice=False)
    for step in range(3):
        write_grads(ours, make_grads(ours, step))
        fused.step()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref_opt = torch.optim.Muon(ref, lr=2e-2, weight_decay=0.1)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3, 6):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        fused.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def _mixed(seed=0):
    """Muon on the matrices, AdamW on the rest (an embedding-like matrix, biases, a norm scale)."""
    gen = torch.Generator().manual_seed(seed)
    matrices = _matrices(seed)
    others = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(64, 16), (16,), (32,), (1,)]]
    return matrices, others


def test_muon_and_adamw_share_one_norm_and_a_nan_step_skips_both():
    (m_ours, a_ours), (m_ref, a_ref) = _mixed(), _mixed()
    muon_opt, adamw = torch.optim.Muon(m_ours, lr=2e-2), torch.optim.AdamW(a_ours, lr=1e-2, weight_decay=0.1)
    ref_muon, ref_adamw = torch.optim.Muon(m_ref, lr=2e-2), torch.optim.AdamW(a_ref, lr=1e-2, weight_decay=0.1)
    fused = FusedStep([muon_opt, adamw], max_grad_norm=1.0, compile_notice=False)
    assert fused.optimizers == (muon_opt, adamw)
    ours, ref = m_ours + a_ours, m_ref + a_ref
    for step in range(STEPS):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        if step == 3:
            a_ours[1].grad[0] = float("nan")
            before = [p.detach().clone() for p in ours]
            state = copy.deepcopy((muon_opt.state_dict(), adamw.state_dict()))
            fused.step()
            assert not bool(fused.last_step_finite) and int(fused.skipped_steps) == 1
            assert all(torch.equal(p, b) for p, b in zip(ours, before))
            _assert_same_state(muon_opt.state_dict(), state[0])
            _assert_same_state(adamw.state_dict(), state[1])
            continue
        norm = fused.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_muon.step()
        ref_adamw.step()
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    atol = STEPS * 2e-2 * _max_ratio(m_ours, None) * 2 ** -7  # see the module docstring
    for p, q in zip(m_ours, m_ref):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    for p, q in zip(a_ours, a_ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert float(adamw.state[a_ours[0]]["step"]) == STEPS - 1  # the skipped step counted nowhere


def _assert_same_state(a: dict, b: dict):
    for k, st in b["state"].items():
        for key, v in st.items():
            assert torch.equal(a["state"][k][key], v), (k, key)


def test_a_param_held_by_two_optimizers_is_refused():
    matrices, others = _mixed()
    with pytest.raises(ValueError, match=r"listed twice in the optimizers \(optimizers\[0\]\.param_groups\[0\]\[0\] "
                                         r"and optimizers\[1\]\.param_groups\[0\]\[4\]\)"):
        FusedStep([torch.optim.Muon(matrices), torch.optim.AdamW(others + matrices[:1])])


def test_every_registered_rule_satisfies_the_protocol():
    for optimizer_type, rule in RULES.items():
        assert conformance_errors(rule) == [], optimizer_type
    broken = type("Broken", (), dict(vars(muon)))  # a rule whose update takes *args
    broken.update_matrices = staticmethod(lambda *args: None)
    assert conformance_errors(broken), "a rule with an *args update must not conform"


def _compiled_frames(n_per_shape: int) -> tuple[int, int]:
    """Frames compiled by the first step, and by all 50 steps of a cosine LR schedule."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    shapes = [(16, 32), (32, 16), (24, 24), (8, 40)] * n_per_shape
    params = _matrices(shapes=shapes)
    opt = torch.optim.Muon(params, lr=2e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, backend=counter, compile_notice=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    first = None
    for step in range(50):
        write_grads(params, make_grads(params, step))
        fused.step()
        sched.step()
        first = counter.frame_count if first is None else first
    return first, counter.frame_count


def test_compile_count_is_flat_in_the_number_of_matrices_and_an_lr_schedule_recompiles_nothing():
    """16 and 256 matrices of 4 shapes compile the same graphs, once, over a 50-step cosine schedule."""
    few, many = _compiled_frames(4), _compiled_frames(64)
    assert few == many, (few, many)
    first, after_schedule = few
    assert first == after_schedule  # nothing recompiled by the schedule
    # Phase A, the finish, and the matrix update for wide and for tall matrices (a shape guard): not one per shape.
    assert first <= 4, first


def test_rounding_on_the_bits_is_torchs_bfloat16_cast():
    """The bit-level rounding torch < 2.13 needs (rules/muon.py) equals torch's own fp32 -> bfloat16 cast on
    values across the whole exponent range, ties, subnormals, signed zeros, the largest finite values (which
    round to infinity) and the infinities, compiled as well as eager."""
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(200_000, generator=gen) * torch.logspace(-44, 38, 200_000).clamp(max=3e38)
    # exact ties: the 16 dropped bits are 0x8000, with the kept last bit even and odd
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x00018000], dtype=torch.int64)
    ties = ties.to(torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 3.39e38,
                             float("inf"), float("-inf")])
    x = torch.cat([spread, ties, specials])
    expected = x.bfloat16()
    assert torch.equal(muon._round_to_bfloat16(x), expected)
    assert torch.equal(torch.compile(muon._round_to_bfloat16)(x), expected)
    assert torch.equal(muon._round_to_bfloat16(x).view(torch.int16), expected.view(torch.int16))  # -0.0 too


def test_a_stack_split_into_calls_matches_torch_and_compiles_nothing_more(monkeypatch):
    """A stack whose temporaries exceed the per-call budget runs as several calls of the same graph (the
    last one shorter); Newton-Schulz is per matrix, so the result is torch's as with one call (unclipped
    tolerance, see the module docstring)."""
    from torch._dynamo.testing import CompileCounter

    from compiled_step import matrices

    shapes = [(16, 32)] * 5 + [(32, 16)] * 3
    per_matrix = muon.call_bytes((16, 32), torch.float32)
    assert per_matrix == muon.call_bytes((32, 16), torch.float32)

    def run(floor):
        monkeypatch.setattr(matrices, "CALL_FLOOR", floor)
        ours, ref = _matrices(shapes=shapes), _matrices(shapes=shapes)
        kwargs = dict(lr=2e-2, weight_decay=0.1, momentum=0.9)
        opt, ref_opt = torch.optim.Muon(ours, **kwargs), torch.optim.Muon(ref, **kwargs)
        counter = CompileCounter()
        fused = FusedStep(opt, max_grad_norm=None, backend=counter, compile_notice=False)
        for step in range(3):
            grads = make_grads(ours, step)
            write_grads(ours, grads)
            write_grads(ref, grads)
            fused.step()
            ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-6)
        labels = [c.label for c in fused.program.calls if "matrix update" in c.label]
        return labels, counter.frame_count

    whole, whole_frames = run(matrices.CALL_FLOOR)
    assert len(whole) == 2  # one call per shape
    split, split_frames = run(2 * per_matrix)  # two matrices per call: 2 + 2 + 1 and 2 + 1
    assert [label.split(", ", 2)[2] for label in split] == [
        "2 matrices 16x32 (0..1 of 5)", "2 matrices 16x32 (2..3 of 5)", "1 matrices 16x32 (4..4 of 5)",
        "2 matrices 32x16 (0..1 of 3)", "1 matrices 32x16 (2..2 of 3)"]
    # A one-matrix call (here the last of each split stack) compiles a graph of its own per orientation, as a
    # lone-shape stack already did: copy_ into the [n, A, B] momentum view runs torch's internal-overlap check,
    # which guards on n == 1. Every other call of every stack runs the graph of the unsplit stacks.
    assert split_frames <= whole_frames + 2
