"""The training-health options on CUDA: no host sync, CUDA-graph replay. Skipped without CUDA.

References as in test_param_norms.py (per-param ``vector_norm`` in float64, rtol 1e-12), test_spike_skip.py
(bit-identical skipped steps) and test_zclip.py (``ReferenceZClip``, 1e-12); params against eager
``clip_grad_norm_`` + ``torch.optim.AdamW`` on the applied steps at fp32 tolerance (test_parity.py).
"""

from __future__ import annotations

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, write_grads
from test_zclip import ReferenceZClip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = dict(rtol=1e-5, atol=1e-6)
OPTIONS = dict(param_norms=True, skip_spike_sigma=3.0, spike_window=8, adaptive_clip="zclip", zclip_warmup=4)


def _cuda_params():
    return [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]


def _grads(params, step, spike):
    return [g.cuda() * (10.0 if spike else 1.0) for g in make_grads(params, step)]


def test_steady_state_step_with_every_option_does_not_sync_the_device():
    params = _cuda_params()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, **OPTIONS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    # Grads and device losses are made before the sync-debug window: a copy from pageable host memory (g.cuda(),
    # torch.tensor(x, device="cuda")) blocks, and under set_sync_debug_mode("error") it would raise by itself.
    grads = {step: _grads(params, step, step == 13) for step in range(16)}
    losses = {step: torch.tensor(2.0 - step / 100, device="cuda") if step % 3 else 1.5  # a tensor, or a number
              for step in range(16)}
    for step in range(2):  # step 0 compiles and records, step 1 captures (both may sync)
        write_grads(params, grads[step])
        fused.step(loss=torch.tensor(2.0, device="cuda"))
        sched.step()
        fused.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 16):
            write_grads(params, grads[step])
            fused.step(loss=losses[step] if step != 7 else None)
            sched.step()
            fused.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fused.cuda_graph_captured
    assert fused.spike_skipped_steps.item() == 1  # step 13, read after the sync check
    assert fused.param_norms.device.type == "cuda"


def test_cuda_graph_replay_with_every_option_matches_the_references():
    ours, ref = _cuda_params(), _cuda_params()
    opt = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=8.0, bucket_size=BUCKET, pack_threshold=PACK, **OPTIONS)
    zclip = ReferenceZClip(max_grad_norm=8.0, warmup_steps=4)
    spikes = {12, 17}  # both after the 8-step window is full
    for step in range(20):
        grads = _grads(ours, step, step in spikes)
        write_grads(ours, grads)
        before = [p.detach().clone() for p in ours]
        total = fused.step().item()
        ref_norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
        torch.testing.assert_close(fused.param_norms, ref_norms, rtol=1e-12, atol=0)
        if step in spikes:
            assert all(torch.equal(a, b) for a, b in zip(before, ours)), f"step {step}"
            continue
        coef = zclip.step(total)
        assert fused.clip_coef.item() == pytest.approx(coef, rel=1e-12, abs=0), f"step {step}"
        for p, g in zip(ref, grads):
            p.grad = g * coef
        ref_opt.step()
        fused.zero_grad()
    assert fused.cuda_graph_captured
    assert fused.spike_skipped_steps.item() == 2
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
