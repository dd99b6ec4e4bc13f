"""Adaptive clipping (``adaptive_clip="zclip"``), on the device.

Reference: ``ReferenceZClip`` below, a plain-Python re-implementation of bluorion-com/ZClip's ``ZClip``
(``zclip/zclip.py``: ``mode="zscore"``, ``clip_option="adaptive_scaling"``, ``clip_factor=1.0``, its
defaults) that takes the total norm instead of computing it from a model. It is fed the total norms
FusedStep returns, so the clip coefficients must agree to 1e-12 (float64 arithmetic in another
order: the warm-up mean and variance are ``sum()`` reductions on the device). Training parity: eager
``torch.optim.AdamW`` on grads multiplied by the reference's coefficient, at the fp32 tolerance of
test_parity.py. The last test trains against the ``zclip`` package itself (pinned in the test extra).
"""

import copy
import math

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params

COEF_RTOL = 1e-12
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 parity, as test_parity.py


class ReferenceZClip:
    """bluorion-com/ZClip's ``ZClip.step`` in z-score mode with adaptive scaling, given the total norm.

    Returns the coefficient the reference multiplies the grads by: torch's ``clip_grad_norm_`` with
    ``max_grad_norm`` while collecting the warm-up norms (no clip without one), then
    ``apply_in_place_clipping``'s ``effective / (norm + 1e-6)`` where the norm exceeds the effective
    threshold (``min`` of ZClip's and ``max_grad_norm``).
    """

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=None, eps=1e-6, warmup_steps=25):
        self.alpha, self.z_thresh, self.max_grad_norm = alpha, z_thresh, max_grad_norm
        self.eps, self.warmup_steps = eps, warmup_steps
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _initialize_ema(self):
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
        self.initialized = True
        self.buffer = []

    def _update_ema(self, grad_norm):
        self.mean = self.alpha * self.mean + (1 - self.alpha) * grad_norm
        self.var = self.alpha * self.var + (1 - self.alpha) * (grad_norm - self.mean) ** 2

    def _compute_clip_val(self, grad_norm):
        std = self.var ** 0.5
        z = (grad_norm - self.mean) / (std + self.eps)
        if z > self.z_thresh:
            eta = z / self.z_thresh
            return self.mean + (self.z_thresh * std) / eta
        return None

    def step(self, total_norm: float) -> float:
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self._initialize_ema()
            if self.max_grad_norm is None:
                return 1.0
            return min(1.0, self.max_grad_norm / (total_norm + 1e-6))  # torch's clip_grad_norm_
        clip_val = self._compute_clip_val(total_norm)
        effective = clip_val if clip_val is not None else total_norm
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        coef = effective / (total_norm + 1e-6) if total_norm > effective else 1.0
        self._update_ema(clip_val if clip_val is not None else total_norm)
        return coef


def norm_sequence(n=200):
    """A drifting norm with noise, spikes of 3-20x, and a plateau shift (the EMA must follow it)."""
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(n, generator=gen, dtype=torch.float64).tolist()
    spikes = {30: 20.0, 31: 6.0, 57: 3.0, 90: 12.0, 140: 4.0, 141: 4.0, 142: 4.0, 180: 9.0}
    return [(2.0 + 0.5 * math.sin(t / 15) + (1.0 if t > 110 else 0.0)) * (1 + 0.05 * noise[t]) * spikes.get(t, 1.0)
            for t in range(n)]


def grads_with_norm(params, step, norm):
    grads = make_grads(params, step)
    total = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
    return [(g.double() * (norm / total)).float() for g in grads]


def _fused(params, max_grad_norm, **options):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    return opt, FusedStep(opt, max_grad_norm=max_grad_norm, bucket_size=BUCKET, pack_threshold=PACK,
                          compile_notice=False, adaptive_clip="zclip", **options)


@pytest.mark.parametrize("max_grad_norm", [None, 2.6], ids=["zclip_only", "with_max_grad_norm"])
def test_clip_coefficients_of_200_steps_equal_the_reference(max_grad_norm):
    params = make_params()
    opt, fused = _fused(params, max_grad_norm)
    ref = ReferenceZClip(max_grad_norm=max_grad_norm)
    kinds = set()
    for step, norm in enumerate(norm_sequence()):
        for p, g in zip(params, grads_with_norm(params, step, norm)):
            p.grad = g
        total = fused.step().item()
        mean_before = ref.mean
        expected = ref.step(total)
        assert fused.clip_coef.item() == pytest.approx(expected, rel=COEF_RTOL, abs=0), f"step {step}"
        if mean_before is not None and expected < 1:  # which threshold won (the sequence must show both)
            kinds.add("max_grad_norm" if max_grad_norm and expected == pytest.approx(
                max_grad_norm / (total + 1e-6), rel=1e-14) else "zclip")
    state = fused.state_dict()["fused_step"]
    assert state["zclip_mean"].item() == pytest.approx(ref.mean, rel=COEF_RTOL)
    assert state["zclip_var"].item() == pytest.approx(ref.var, rel=COEF_RTOL)
    assert kinds == ({"zclip", "max_grad_norm"} if max_grad_norm else {"zclip"})


def test_training_follows_the_reference_coefficients():
    params, ref_params = make_params(), make_params()
    opt, fused = _fused(params, 3.0, zclip_warmup=10)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1)
    ref = ReferenceZClip(max_grad_norm=3.0, warmup_steps=10)
    clipped = 0
    for step, norm in enumerate(norm_sequence(60)):
        grads = grads_with_norm(params, step, norm)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        total = torch.linalg.vector_norm(torch.stack([q.grad.double().norm() for q in ref_params])).item()
        coef = ref.step(total)
        clipped += coef < 1
        for q in ref_params:
            q.grad.mul_(coef)
        ref_opt.step()
    assert clipped >= 5  # 8 of the 60 steps are clipped (ZClip's spikes and max_grad_norm)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("stop", [6, 40], ids=["mid_warmup", "mid_ema"])
def test_resume_from_state_dict_continues_identically(stop):
    params = make_params()
    opt, fused = _fused(params, None, zclip_warmup=10)
    norms = norm_sequence(60)

    def run(params, fused, steps):
        for step in steps:
            for p, g in zip(params, grads_with_norm(params, step, norms[step])):
                p.grad = g
            fused.step()

    run(params, fused, range(stop))
    saved = ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()), fused.state_dict()["fused_step"])
    run(params, fused, range(stop, 60))
    resumed = [torch.nn.Parameter(t.clone()) for t in saved[0]]
    opt2, fused2 = _fused(resumed, None, zclip_warmup=10)
    opt2.load_state_dict(saved[1])
    fused2.load_state_dict(saved[2])
    run(resumed, fused2, range(stop, 60))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    end, end2 = fused.state_dict()["fused_step"], fused2.state_dict()["fused_step"]
    for key in end:
        assert torch.equal(end[key], end2[key]), key


def test_spike_skips_stay_out_of_zclip_statistics():
    """With both options, a skipped step is invisible to ZClip, as to everything else: the reference
    sees only the applied steps' norms."""
    params = make_params()
    opt, fused = _fused(params, None, zclip_warmup=5, skip_spike_sigma=3.0, spike_window=8)
    ref = ReferenceZClip(warmup_steps=5)
    skipped = []
    for step, norm in enumerate(norm_sequence(100)):
        for p, g in zip(params, grads_with_norm(params, step, norm)):
            p.grad = g
        count = fused.state_dict()["fused_step"]["spike_skipped_steps"].item()
        total = fused.step().item()
        if fused.spike_skipped_steps.item() > count:
            skipped.append(step)
            continue
        assert fused.clip_coef.item() == pytest.approx(ref.step(total), rel=COEF_RTOL, abs=0), f"step {step}"
    # The big spikes, and noisy steps a window of 8 calls spikes: the point is that none reached ZClip.
    assert {30, 31, 90} <= set(skipped) and len(skipped) < 30
    assert fused.state_dict()["fused_step"]["zclip_mean"].item() == pytest.approx(ref.mean, rel=COEF_RTOL)


def test_training_matches_the_zclip_package():
    """Against the reference code itself (the ``zclip`` package, pinned in the test extra): ``ZClip.step(model)``
    norms and clips the grads in place in fp32 (``.item()``), so agreement is at fp32 tolerance."""
    import zclip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    ref_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=5.0, adaptive_clip="zclip", zclip_warmup=8, compile_notice=False)
    ref = zclip.ZClip(alpha=0.97, z_thresh=2.5, max_grad_norm=5.0, warmup_steps=8)
    norms = norm_sequence(60)
    for step in range(60):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for m in (model, ref_model):
            (m(x).pow(2).sum() * norms[step]).backward()
        fused.step()
        ref.step(ref_model)
        ref_opt.step()
        fused.zero_grad()
        ref_opt.zero_grad()
    state = fused.state_dict()["fused_step"]
    assert state["zclip_mean"].item() == pytest.approx(ref.mean, rel=1e-5)
    assert state["zclip_var"].item() == pytest.approx(ref.var, rel=1e-4)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)
