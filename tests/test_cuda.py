"""The CUDA-only layer: no host sync in the steady-state step, CUDA-graph replay, device-tensor
hyperparameters, optimizer-state offload. Skipped without CUDA (they need a GPU to mean anything).

Reference: eager ``clip_grad_norm_`` + the same ``torch.optim`` optimizer on CUDA copies of the params
(``capturable=True`` with a tensor lr where the test is about device-tensor hyperparameters). fp32
tolerance ``rtol=1e-5, atol=1e-6`` as in test_parity.py; bf16 ``rtol=2**-5`` as there (torch rounds
every op to bf16, FusedStep once per stored tensor).
"""

from __future__ import annotations

import copy

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -5, atol=1e-2)}

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "sgd": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
}


def _cuda_params(dtype):
    return [torch.nn.Parameter(p.detach().to("cuda", dtype)) for p in make_params()]


def _write_grads(params, step):
    """Grads written into p.grad in place when it exists (FusedStep's persistent buffers)."""
    for p, g in zip(params, make_grads(params, step)):
        g = g.to(p.device, p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_steady_state_step_does_not_sync_the_device(name, dtype):
    cls, kwargs = OPTIMIZERS[name]
    params = _cuda_params(dtype)
    opt = cls(params, **kwargs)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(2):  # step 0 compiles and records, step 1 captures (both may sync)
        _write_grads(params, step)
        fused.step()
        sched.step()
        fused.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            _write_grads(params, step)
            norm = fused.step()
            sched.step()
            fused.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(norm)
    assert fused.cuda_graph_captured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_graph_replay_matches_eager_torch(name, dtype):
    """Schedulers, a skipped step and load_state_dict, replayed as CUDA graphs."""
    cls, kwargs = OPTIMIZERS[name]
    ours, ref = _cuda_params(dtype), _cuda_params(dtype)
    opt, ref_opt = cls(ours, **kwargs), cls(ref, **kwargs)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 2, gamma=0.5)
    for step in range(10):
        grads = [g.to("cuda", dtype) for g in make_grads(ours, step)]
        if step == 5:
            grads[0].view(-1)[0] = float("nan")  # skipped: the reference never sees this batch
        _write_grads_values(ours, grads)
        fused.step()
        if step != 5:
            for p, g in zip(ref, grads):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
        if step == 7:  # both resume from the reference's checkpoint
            state = copy.deepcopy(ref_opt.state_dict())
            opt.load_state_dict(state)
            ref_opt.load_state_dict(copy.deepcopy(state))
        sched.step()
        ref_sched.step()
        fused.zero_grad()
    assert int(fused.skipped_steps) == 1
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[dtype])


def _write_grads_values(params, grads):
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def test_grads_set_to_none_are_copied_into_the_captured_buffers():
    """optimizer.zero_grad() (set_to_none=True) between replayed steps: the new grads are copied in
    before the replay, never ignored."""
    ours, ref = _cuda_params(torch.float32), _cuda_params(torch.float32)
    opt, ref_opt = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(6):
        grads = [g.cuda() for g in make_grads(ours, step)]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        opt.zero_grad()  # set_to_none=True
    assert fused.cuda_graph_captured
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])


def test_device_tensor_lr_is_used_on_the_device_like_capturable_adamw():
    ours, ref = _cuda_params(torch.float32), _cuda_params(torch.float32)
    lr, ref_lr = torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")
    opt = torch.optim.AdamW(ours, lr=lr, capturable=True)
    ref_opt = torch.optim.AdamW(ref, lr=ref_lr, capturable=True)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(6):
        grads = [g.cuda() for g in make_grads(ours, step)]
        _write_grads_values(ours, grads)
        for q, g in zip(ref, grads):
            q.grad = g.clone()
        fused.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        lr.mul_(0.7)  # changed in place on the device, as a tensor-lr scheduler does
        ref_lr.mul_(0.7)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])


def test_offloaded_state_lives_on_the_cpu_between_steps_and_matches():
    ours, ref = _cuda_params(torch.float32), _cuda_params(torch.float32)
    opt, ref_opt = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK,
                      offload_optimizer_state=True)
    ref_fused = FusedStep(ref_opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(4):
        grads = [g.cuda() for g in make_grads(ours, step)]
        _write_grads_values(ours, grads)
        _write_grads_values(ref, grads)
        fused.step()
        ref_fused.step()
        for state in opt.state.values():
            assert all(t.device.type == "cpu" for t in state.values() if isinstance(t, torch.Tensor))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
