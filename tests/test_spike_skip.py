"""Spike skipping (``skip_spike_sigma``, ``spike_window``, ``step(loss=...)``), decided on the device.

Reference: a plain-Python window after OLMo-core's ``SkipStepOptimizer`` (``statistics.fmean`` and the
unbiased ``statistics.stdev``; a value is a spike when ``not (x - mean <= sigma * std)``), holding the
values of applied steps only, and deciding nothing before it is full. It is fed the total norms
FusedStep returns, so the windows must hold the very same floats. The injected spikes are 8-10x the
norm and the normal steps vary by 5 %, far from the threshold, so a last-bit difference between
``torch.std_mean`` and ``statistics`` cannot flip a decision. Trajectories are compared with eager
``clip_grad_norm_`` + ``torch.optim.AdamW`` stepping on the same steps (fp32 tolerance of test_parity.py);
a skipped step must leave params, optimizer state and step counts bit-identical.
"""

import collections
import copy
import math
import statistics

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params

SIGMA, WINDOW = 3.0, 8
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 parity, as test_parity.py


class ReferenceWindow:
    def __init__(self, size=WINDOW, sigma=SIGMA):
        self.size, self.sigma = size, sigma
        self.values = collections.deque(maxlen=size)

    def is_spike(self, x: float) -> bool:
        if len(self.values) < self.size:
            return False
        mean, std = statistics.fmean(self.values), statistics.stdev(self.values)
        return not (x - mean <= self.sigma * std)


def window_in_order(state: dict, key: str) -> list[float]:
    """A FusedStep window (a ring) as the list of its values, oldest first."""
    values, count = state[f"spike_{key}_window"].tolist(), int(state[f"spike_{key}_count"])
    if count < len(values):
        return values[:count]
    start = count % len(values)
    return values[start:] + values[:start]


def target_norm(step: int, spikes) -> float:
    return 4.0 * (1 + 0.05 * math.sin(step)) * (10.0 if step in spikes else 1.0)


def grads_with_norm(params, step, norm):
    """Random grads (a new direction every step) scaled to the given total norm."""
    grads = make_grads(params, step)
    total = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
    return [(g.double() * (norm / total)).float() for g in grads]


def snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state})


def same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys() and all(
        torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def _fused(params, **options):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return opt, FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, compile_notice=False,
                          skip_spike_sigma=SIGMA, spike_window=WINDOW, **options)


def test_exactly_the_injected_norm_spikes_are_skipped_bit_identically():
    spikes = {3, 14, 15, 27}  # 3: before the window is full, so not skipped
    params, ref_params = make_params(), make_params()
    opt, fused = _fused(params)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
    window = ReferenceWindow()
    skipped = []
    for step in range(40):
        grads = grads_with_norm(params, step, target_norm(step, spikes))
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = snapshot(params, opt)
        total = fused.step().item()
        spike = window.is_spike(total)
        if spike:
            skipped.append(step)
            assert same(before, snapshot(params, opt)), f"step {step} was skipped but something changed"
        else:
            window.values.append(total)
            assert not same(before, snapshot(params, opt)), f"step {step} was applied but nothing changed"
            torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
            ref_opt.step()
        assert window_in_order(fused.state_dict()["fused_step"], "norm") == list(window.values), f"step {step}"
    assert skipped == [14, 15, 27]
    assert fused.spike_skipped_steps.item() == 3 and fused.skipped_steps.item() == 0
    assert all(opt.state[p]["step"].item() == 37 for p in params)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOL)


def test_a_nonfinite_norm_is_skipped_as_nonfinite_and_stays_out_of_the_window():
    params = make_params()
    opt, fused = _fused(params, compile=False)
    window = ReferenceWindow()
    for step in range(12):
        grads = grads_with_norm(params, step, target_norm(step, ()))
        if step == 10:
            grads[2].view(-1)[0] = math.nan
        for p, g in zip(params, grads):
            p.grad = g
        total = fused.step().item()
        if math.isfinite(total):
            window.values.append(total)
    assert window_in_order(fused.state_dict()["fused_step"], "norm") == list(window.values)
    assert fused.skipped_steps.item() == 1 and fused.spike_skipped_steps.item() == 0


def _run(params, opt, fused, steps, spikes, losses=None):
    for step in steps:
        grads = grads_with_norm(params, step, target_norm(step, spikes))
        for p, g in zip(params, grads):
            p.grad = g
        fused.step(loss=None if losses is None else losses(step))


def test_resume_from_state_dict_mid_window_continues_identically():
    spikes = {14, 25}
    losses = lambda step: torch.tensor(2.0 + 0.1 * math.cos(step) + (5.0 if step == 22 else 0.0))  # noqa: E731
    params = make_params()
    opt, fused = _fused(params)
    _run(params, opt, fused, range(11), spikes, losses)  # 11 applied steps: the ring has wrapped to position 3
    saved = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()), fused.state_dict()["fused_step"])
    assert int(saved[2]["spike_norm_count"]) == 11
    _run(params, opt, fused, range(11, 30), spikes, losses)

    resumed = [torch.nn.Parameter(t.clone()) for t in saved[0]]
    opt2, fused2 = _fused(resumed)
    opt2.load_state_dict(saved[1])
    fused2.load_state_dict(saved[2])
    _run(resumed, opt2, fused2, range(11, 30), spikes, losses)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    end, end2 = fused.state_dict()["fused_step"], fused2.state_dict()["fused_step"]
    assert end.keys() == end2.keys()
    for key in end:
        assert torch.equal(end[key], end2[key]), key
    assert end["spike_skipped_steps"].item() == 3  # norms 14, 25 and the loss at 22


def test_the_loss_check_skips_exactly_the_loss_spikes():
    loss_spikes = {12, 13, 21}
    nan_step, unlogged = 30, {5, 17}  # a NaN loss is a spike (OLMo-core's comparison); some steps pass no loss

    def loss_at(step):
        value = 2.0 - step / 100 + 0.02 * math.sin(3 * step) + (1.5 if step in loss_spikes else 0.0)
        return math.nan if step == nan_step else value

    params, ref_params = make_params(), make_params()
    opt, fused = _fused(params)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
    norms, losses = ReferenceWindow(), ReferenceWindow()
    skipped = []
    for step in range(34):
        grads = grads_with_norm(params, step, target_norm(step, ()))
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        loss = None if step in unlogged else loss_at(step)
        before = snapshot(params, opt)
        total = fused.step(loss=None if loss is None else torch.tensor([loss], dtype=torch.float32)).item()
        loss32 = None if loss is None else torch.tensor(loss, dtype=torch.float32).item()  # what was passed
        spike = norms.is_spike(total) or (loss32 is not None and losses.is_spike(loss32))
        if spike:
            skipped.append(step)
            assert same(before, snapshot(params, opt)), f"step {step}"
            continue
        norms.values.append(total)
        if loss32 is not None:
            losses.values.append(loss32)
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref_opt.step()
        state = fused.state_dict()["fused_step"]
        assert window_in_order(state, "loss") == list(losses.values), f"step {step}"
        assert window_in_order(state, "norm") == list(norms.values), f"step {step}"
    assert skipped == [12, 13, 21, nan_step]
    assert fused.spike_skipped_steps.item() == 4 and fused.skipped_steps.item() == 0
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOL)


def test_loss_and_state_dict_are_validated_before_anything_changes():
    params = make_params()
    opt, fused = _fused(params, compile=False)
    _run(params, opt, fused, range(2), ())
    with pytest.raises(ValueError, match="one-element"):
        fused.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="tensor or a number"):
        fused.step(loss="1.0")
    plain = FusedStep(torch.optim.SGD(make_params(), lr=0.1), compile=False)
    with pytest.raises(ValueError, match="skip_spike_sigma"):
        plain.step(loss=1.0)
    state = fused.state_dict()["fused_step"]
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(KeyError, match="spike_norm_window"):
        fused.load_state_dict({k: v for k, v in state.items() if k != "spike_norm_window"})
    with pytest.raises(ValueError, match="spike_window"):
        fused.load_state_dict({**state, "spike_loss_window": torch.zeros(WINDOW + 1)})
    after = fused.state_dict()["fused_step"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="spike_window must be >= 2"):
        FusedStep(torch.optim.SGD(make_params(), lr=0.1), skip_spike_sigma=3.0, spike_window=1)
    with pytest.raises(ValueError, match="skip_spike_sigma"):
        FusedStep(torch.optim.SGD(make_params(), lr=0.1), skip_spike_sigma=-1.0)
