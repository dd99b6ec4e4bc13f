"""The CUDA-only layer: no host sync in the steady-state step, CUDA-graph replay, device-tensor
hyperparameters, optimizer-state offload. Skipped without CUDA (they need a GPU to mean anything).

Reference: eager ``clip_grad_norm_`` + the same ``torch.optim`` optimizer on CUDA copies of the params
(``capturable=True`` with a tensor lr where the test is about device-tensor hyperparameters). fp32
tolerance ``rtol=1e-5, atol=1e-6`` as in test_parity.py; bf16 ``rtol=2**-5`` as there (torch rounds
every op to bf16, FusedStep once per stored tensor).
"""

from __future__ import annotations

import copy
import importlib.util
import threading

import pytest
import torch

from compiled_step import FusedStep, compiling, cuda_graphs, program
from conftest import BUCKET, PACK, make_grads, make_params, write_grads

try:  # tests/ imported as a package (a tests/__init__.py exists)
    from .distributed.harness import run_distributed
except ImportError:  # pytest's default rootdir-relative import: tests/ itself is on sys.path
    from distributed.harness import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -5, atol=1e-2)}

OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    "sgd": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
}


def _cuda_params(dtype, device="cuda"):
    return [torch.nn.Parameter(p.detach().to(device, dtype)) for p in make_params()]


def _device_grads(params, steps):
    """Each step's grads, made on the params' device before any sync-debug window: a copy from
    pageable host memory blocks, and under ``set_sync_debug_mode("error")`` it raises."""
    return {step: [g.to(p.device, p.dtype) for p, g in zip(params, make_grads(params, step))] for step in steps}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_steady_state_step_does_not_sync_the_device(name, dtype):
    cls, kwargs = OPTIMIZERS[name]
    params = _cuda_params(dtype)
    opt = cls(params, **kwargs)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    grads = _device_grads(params, range(6))
    for step in range(2):  # step 0 compiles and records, step 1 captures (both may sync)
        write_grads(params, grads[step])
        fused.step()
        sched.step()
        fused.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            write_grads(params, grads[step])
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
        write_grads(ours, grads)
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
        write_grads(ours, grads)
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
        write_grads(ours, grads)
        write_grads(ref, grads)
        fused.step()
        ref_fused.step()
        for state in opt.state.values():
            assert all(t.device.type == "cpu" for t in state.values() if isinstance(t, torch.Tensor))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_a_cpu_grad_scale_tensor_does_not_sync():
    """A CPU tensor ``grad_scale`` (a GradScaler-style scale kept on the host) is read on the host:
    no blocking host-to-device copy per step."""
    params = _cuda_params(torch.float32)
    fused = FusedStep(torch.optim.AdamW(params, lr=1e-2), max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    grads = _device_grads(params, range(5))
    scale = torch.tensor(0.5)
    for step in range(2):
        write_grads(params, grads[step])
        fused.step(grad_scale=scale)
        fused.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            write_grads(params, grads[step])
            norm = fused.step(grad_scale=scale)
            fused.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(norm) and fused.cuda_graph_captured


# ---------------------------------------------------------------------- the capture itself


def _eager(label, fn, *args):
    return program.Call(label, program.EAGER, fn, args)


def test_a_failed_capture_leaves_the_current_stream_as_it_was():
    """torch.cuda.graph's __exit__ skips restoring the stream when capture_end raises; ours restores it
    (a capture whose calls raise, and one invalidated by a host sync), and the process stays usable."""
    x = torch.zeros(4, device="cuda")
    compiler = compiling.Compiler(enabled=False)
    before = torch.cuda.current_stream()

    def add_then_raise():
        x.add_(1)
        raise ValueError("the calls raised")

    with pytest.raises(ValueError, match="the calls raised"):
        cuda_graphs.capture_cuda_graph([_eager("add, raise", add_then_raise)], compiler, x.device)
    assert torch.cuda.current_stream() == before
    with pytest.raises(RuntimeError):  # .item() syncs: not permitted while the stream is capturing
        cuda_graphs.capture_cuda_graph([_eager("sync", lambda: x.sum().item())], compiler, x.device)
    assert torch.cuda.current_stream() == before
    graph = cuda_graphs.capture_cuda_graph([_eager("add", x.add_, 1)], compiler, x.device)
    x.zero_()
    graph.replay()
    graph.replay()
    assert x.tolist() == [2.0] * 4


def test_another_thread_touching_cuda_does_not_break_the_capture():
    """thread_local capture mode: a thread pinning host memory (what a DataLoader pin_memory thread
    does: cudaHostAlloc, "unsafe" during a capture in the default global mode) runs during the capture."""
    x = torch.zeros(4, device="cuda")

    def add_while_another_thread_pins():
        x.add_(1)
        thread = threading.Thread(target=lambda: torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True))
        thread.start()
        thread.join()
        x.add_(1)

    graph = cuda_graphs.capture_cuda_graph([_eager("add, pin elsewhere, add", add_while_another_thread_pins)],
                                           compiling.Compiler(enabled=False), x.device)
    x.zero_()
    graph.replay()
    assert x.tolist() == [2.0] * 4


def test_a_capture_that_records_no_kernel_is_an_error():
    cpu = torch.zeros(4)
    with pytest.raises(RuntimeError, match="captured no kernel"):
        cuda_graphs.capture_cuda_graph([_eager("work on the CPU only", cpu.add_, 1)], compiling.Compiler(enabled=False),
                                       torch.device("cuda", 0))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_params_on_another_device_than_the_current_one_are_captured_and_updated():
    """Params on cuda:1, cuda:0 current: captured on cuda:1 (on cuda:0 the graphs came out empty and
    nothing was updated from the capture on)."""
    torch.cuda.set_device(0)
    ours, ref = _cuda_params(torch.float32, "cuda:1"), _cuda_params(torch.float32, "cuda:1")
    opt, ref_opt = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step, grads in _device_grads(ours, range(6)).items():
        write_grads(ours, grads)
        for q, g in zip(ref, grads):
            q.grad = g.clone()
        fused.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        fused.zero_grad()
    assert fused.cuda_graph_captured and torch.cuda.current_device() == 0
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("current, where, options", [
    (0, "cuda:1", dict(cuda_graphs=False)),
    (1, "cuda:0", dict(offload_optimizer_state=True)),
])
def test_params_off_the_current_device_get_their_own_storage_aliases_there(current, where, options):
    """``model.to("cuda:1")`` without ``torch.cuda.set_device``: the aliased params' own-storage aliases
    (``storage.own_storage_alias``, through DLPack, which torch >= 2.9 refuses off the current device)
    are made on the params' device at the first step, uncaptured and with offloaded state too."""
    torch.cuda.set_device(current)
    try:
        ours, ref = _cuda_params(torch.float32, where), _cuda_params(torch.float32, where)
        opt, ref_opt = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2)
        fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, **options)
        for step, grads in _device_grads(ours, range(4)).items():
            write_grads(ours, grads)
            for q, g in zip(ref, grads):
                q.grad = g.clone()
            fused.step()
            torch.nn.utils.clip_grad_norm_(ref, 1.0)
            ref_opt.step()
            fused.zero_grad()
        assert torch.cuda.current_device() == current
        flat = [(gb.params.data_ptr(), gb.params.data_ptr() + gb.params.nbytes) for gb in fused.engine.storage.groups]
        aliased = [p for p in ours if any(lo <= p.data_ptr() < hi for lo, hi in flat)]
        assert aliased and all(p.device == torch.device(where) for p in ours)  # the aliases were made, there
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL[torch.float32])
    finally:
        torch.cuda.set_device(0)


# ---------------------------------------------------------------------- FP8 under FSDP2, one GPU


def _fp8_no_sync_worker(rank: int, world_size: int) -> dict:
    """torchao Float8Linear weights under FSDP2 on one GPU, default group "cpu:gloo,cuda:nccl" (what
    init_process_group() makes on a GPU machine): the norm and amax all-reduces are NCCL, hence
    captured; the steady-state step, FP8 scales stored included, does not sync."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training, precompute_float8_dynamic_scale_for_fsdp

    torch.cuda.set_device(0)
    mesh = init_device_mesh("cuda", (world_size,))
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)).cuda()
    convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0, model_parts=[model])
    params = list(model.parameters())
    grads = [[torch.randn(p.to_local().shape, device="cuda") for p in params] for _ in range(6)]
    for p, g in zip(params, grads[0]):
        p.grad = DTensor.from_local(g.clone(), mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    for step in range(6):  # step 0 compiles and records, step 1 captures (both may sync)
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # a sync raises; the harness reports it
        for p, g in zip(params, grads[step]):
            p.grad.to_local().copy_(g)  # device to device, into FusedStep's grad buffers
        fused.step()
        fused.zero_grad()
    torch.cuda.set_sync_debug_mode("default")
    out = {}
    segments = cuda_graphs._segments(fused.program.calls, fused.program.compiler)
    out["collectives_captured"] = [s.capturable for s in segments for c in s.calls if c.runs_as == "collective"]
    out["captured"] = fused.cuda_graph_captured
    out["stored"] = [float(layer.weight._local_tensor._precomputed_scale) for layer in model]
    for layer in model:
        layer.weight._local_tensor._precomputed_scale = None
    precompute_float8_dynamic_scale_for_fsdp(model)  # torchao's own, on the same weights
    out["theirs"] = [float(layer.weight._local_tensor._precomputed_scale) for layer in model]
    return out


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_fp8_steady_state_step_does_not_sync_and_stores_torchaos_scales():
    (res,) = run_distributed(_fp8_no_sync_worker, world_size=1, backend="cpu:gloo,cuda:nccl", timeout=300)
    assert res["captured"]
    assert res["collectives_captured"] and all(res["collectives_captured"])  # NCCL found behind "cpu:gloo,cuda:nccl"
    assert res["stored"] == res["theirs"]  # torchao's formula on the same weights: bit equality
