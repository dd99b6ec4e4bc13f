"""Tests for compiled_step.lifecycle.offload.

Round-trip checks compare raw bytes (``view(torch.uint8)``), so NaN payloads and -0.0
count: the reference is the module's own state captured before the move, and the
tolerance is zero because a device move is a copy, not arithmetic.

On a CPU-only machine real moves are CPU -> CPU; the accelerator path is exercised with a
recording stand-in for ``move_to_device`` (the "fake device" checks) and, where CUDA
exists, with a real CUDA round trip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compiled_step.lifecycle.offload import ScopedModuleOffloading, move_to_device, release_device_cache


class _WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)  # running_mean/var/num_batches_tracked buffers
        self.register_buffer("scratch", torch.tensor([float("nan"), -0.0, 1.5, float("inf")]), persistent=False)
        self.bf16_weight = nn.Parameter(torch.randn(5, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x))


def _snapshot_bytes(model: nn.Module) -> dict[str, bytes]:
    state = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        state[name] = t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        if getattr(t, "grad", None) is not None:
            state[name + ".grad"] = t.grad.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return state


def _devices(model: nn.Module) -> set[str]:
    return {str(t.device) for t in list(model.parameters()) + list(model.buffers())}


def _model_with_grads() -> nn.Module:
    torch.manual_seed(0)
    model = _WithBuffers()
    model(torch.randn(6, 4)).sum().backward()  # also advances BatchNorm's running stats
    model.bf16_weight.grad = torch.randn(5, dtype=torch.bfloat16)
    return model


def test_cpu_round_trip_is_bit_exact_for_params_buffers_and_grads():
    model = _model_with_grads()
    before = _snapshot_bytes(model)
    buffer_ids = {name: id(b) for name, b in model.named_buffers()}
    with ScopedModuleOffloading(model, enabled=True, device="cpu") as scope:
        assert scope.model is model
        assert _devices(model) == {"cpu"}
        assert _snapshot_bytes(model) == before
    assert _snapshot_bytes(model) == before
    # Buffers are moved by rebinding .data, so the buffer objects themselves survive.
    assert {name: id(b) for name, b in model.named_buffers()} == buffer_ids


class _MoveRecorder:
    """Stands in for a model's own ``to`` (an instance attribute): records the target devices instead of
    moving (a fake accelerator), so the library itself is observed through what it asks the model."""

    def __init__(self, model: nn.Module, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on
        self.model = model
        model.to = self

    def __call__(self, device, *args, **kwargs) -> nn.Module:
        self.calls.append(str(torch.device(device)))
        if self.fail_on is not None and str(torch.device(device)) == self.fail_on:
            raise RuntimeError(f"simulated failure moving to {device}")
        return self.model


def test_enabled_moves_to_accelerator_on_enter_and_back_on_exit(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
    model = nn.Linear(2, 2)
    recorder = _MoveRecorder(model)
    with ScopedModuleOffloading(model, enabled=True):  # seed signature: device from the accelerator
        assert recorder.calls == ["cuda"]
    assert recorder.calls == ["cuda", "cpu"]


def test_disabled_is_a_no_op():
    model = _model_with_grads()
    recorder = _MoveRecorder(model)
    before = _snapshot_bytes(model)
    with ScopedModuleOffloading(model):  # enabled defaults to False, as in NeMo Automodel
        pass
    with pytest.raises(KeyError):
        with ScopedModuleOffloading(model, enabled=False):
            raise KeyError("body error")
    assert recorder.calls == []
    assert _snapshot_bytes(model) == before


def test_body_exception_propagates_and_module_is_moved_back():
    model = nn.Linear(2, 2)
    recorder = _MoveRecorder(model)
    marker = ValueError("from the body")
    with pytest.raises(ValueError) as info:
        with ScopedModuleOffloading(model, enabled=True, device="cuda:1"):
            raise marker
    assert info.value is marker
    assert recorder.calls == ["cuda:1", "cpu"]


def test_body_exception_with_real_cpu_move_keeps_values():
    model = _model_with_grads()
    before = _snapshot_bytes(model)
    with pytest.raises(ZeroDivisionError):
        with ScopedModuleOffloading(model, enabled=True, device="cpu"):
            1 / 0
    assert _devices(model) == {"cpu"}
    assert _snapshot_bytes(model) == before


def test_failed_enter_moves_back_before_reraising():
    model = nn.Linear(2, 2)
    recorder = _MoveRecorder(model, fail_on="cuda:0")
    body_ran = False
    with pytest.raises(RuntimeError, match="simulated failure"):
        with ScopedModuleOffloading(model, enabled=True, device="cuda:0"):
            body_ran = True
    assert not body_ran
    assert recorder.calls == ["cuda:0", "cpu"]


def test_enabled_without_accelerator_raises_before_moving(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    model = nn.Linear(2, 2)
    recorder = _MoveRecorder(model)
    with pytest.raises(RuntimeError, match="needs an accelerator"):
        ScopedModuleOffloading(model, enabled=True)
    assert recorder.calls == []


def test_bad_arguments_raise_before_any_move():
    model = _model_with_grads()
    before = _snapshot_bytes(model)
    with pytest.raises(TypeError, match="nn.Module"):
        ScopedModuleOffloading(object(), enabled=True, device="cpu")
    with pytest.raises(TypeError, match="enabled"):
        ScopedModuleOffloading(model, enabled=1, device="cpu")
    with pytest.raises(ValueError, match="meta"):
        ScopedModuleOffloading(model, enabled=True, device="meta")
    with pytest.raises(ValueError, match="meta"):
        move_to_device(model, "meta")
    with pytest.raises(TypeError, match="device"):
        move_to_device(model, 1.5)
    with pytest.raises(TypeError, match="nn.Module"):
        move_to_device(torch.zeros(3), "cpu")
    assert _snapshot_bytes(model) == before
    assert _devices(model) == {"cpu"}


class _CacheSpy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_release_device_cache_empties_only_available_accelerators(monkeypatch):
    spy = _CacheSpy()
    monkeypatch.setattr(torch.cuda, "empty_cache", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    release_device_cache(["cpu", "meta"])
    assert spy.calls == 0  # CPU and meta have no caching allocator
    release_device_cache(["cuda", "cuda", "cpu"])
    assert spy.calls == 1  # once per device type, not per tensor
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release_device_cache(["cuda"])
    assert spy.calls == 1  # an unavailable backend is not touched
    release_device_cache(["no_such_backend"])  # unknown types are skipped, not an error


def test_cpu_only_move_does_not_touch_cuda_cache(monkeypatch):
    # NeMo Automodel calls torch.cuda.empty_cache unconditionally; a CPU-only move here must not.
    spy = _CacheSpy()
    monkeypatch.setattr(torch.cuda, "empty_cache", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    move_to_device(nn.Linear(2, 2), torch.device("cpu"))
    assert spy.calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a real accelerator round trip")
def test_cuda_round_trip_is_bit_exact():
    model = _model_with_grads()
    before = _snapshot_bytes(model)
    with ScopedModuleOffloading(model, enabled=True, device="cuda"):
        assert _devices(model) == {"cuda:0"}
        assert _snapshot_bytes(model) == before
    assert _devices(model) == {"cpu"}
    assert _snapshot_bytes(model) == before


# ---------------------------------------------------------------------- FusedStep's optimizer-state offload
#
# offload_out frees each state buffer's storage after a step and offload_in reallocates it before the
# next. The buffers are views one row into their storage (storage.LEAD / ROW), so the reallocation must
# cover that row as well as the view. Without an accelerator the mechanism is run two ways: on meta
# tensors (storages with a size and no memory: a too-small allocation shows as a size, and the copy in
# writes nowhere), and through FusedStep with CPU buffers standing in for the device buffers.


def _offloaded_group(rows: int, device: str, keys=("exp_avg", "exp_avg_sq")):
    """A group's offload-relevant part, laid out as storage.GroupBuffers lays it out: [rows, ROW] work
    buffers one row into their storage on ``device``, and host copies of the same layout."""
    from types import SimpleNamespace

    from compiled_step import storage

    work = {k: storage._row_buffer(rows, torch.float32, torch.device(device)) for k in keys}
    home = {k: storage._row_buffer(rows, torch.float32, torch.device("cpu")) for k in keys}
    return SimpleNamespace(offloaded=True, state=work, state_home=home)


def test_offload_in_reallocates_the_whole_storage_its_views_span():
    from types import SimpleNamespace

    from compiled_step.lifecycle.offload import offload_in

    group = _offloaded_group(rows=3, device="meta")
    # Independent of the library's arithmetic: a contiguous view ends at offset + numel elements. The storage as
    # built may hold more (``storage._row_buffer`` places the view within its page, leaving slack behind it).
    spans = {k: (w.storage_offset() + w.numel()) * w.element_size() for k, w in group.state.items()}
    for key, work in group.state.items():
        assert work.untyped_storage().nbytes() >= spans[key]
        work.untyped_storage().resize_(0)  # what offload_out leaves (it copies out first; meta has no data)
    offload_in([group], SimpleNamespace(offloaded=False))
    for key, work in group.state.items():
        assert work.storage_offset() > 0  # the layout this test is about: a view at a storage offset
        assert work.untyped_storage().nbytes() == spans[key], (
            f"{key}: reallocated {work.untyped_storage().nbytes()} bytes, the view spans {spans[key]}")


def _offload_vs_eager(monkeypatch, steps: int = 4):
    from compiled_step import FusedStep, storage
    from conftest import BUCKET, PACK, make_grads, make_params, set_grads, write_grads

    monkeypatch.setattr(storage, "offloads_state", lambda device: True)  # CPU buffers stand in for the device's

    ours, ref = make_params(), make_params()
    opt = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, offload_optimizer_state=True)
    released = []
    for t in range(steps):
        grads = make_grads(ours, t)
        write_grads(ours, grads)  # into FusedStep's grad buffers from step 1 on
        set_grads(ref, grads)
        fused.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        groups = fused.engine.storage.groups
        released.append([w.untyped_storage().nbytes() for gb in groups for w in gb.state.values()])
        assert all(gb.offloaded for gb in groups)  # the stand-in really took the offload path
    return ours, ref, opt, ref_opt, released


def test_offloaded_steps_with_cpu_stand_in_match_eager(monkeypatch):
    """Several steps through offload_in / update / offload_out match eager clip + AdamW. Tolerance: fp32
    rtol=1e-5, atol=1e-6 as in test_parity.py (one fused pass vs torch's op-by-op rounding); the offload
    copies themselves are exact."""
    from compiled_step.lifecycle import offload

    spans = []
    real_offload_in = offload.offload_in

    def offload_in_and_measure(groups, buffers):
        real_offload_in(groups, buffers)
        spans.append([(w.untyped_storage().nbytes(), (w.storage_offset() + w.numel()) * w.element_size())
                      for gb in groups for w in gb.state.values()])

    monkeypatch.setattr(offload, "offload_in", offload_in_and_measure)  # fused_step calls offload.offload_in
    ours, ref, opt, ref_opt, released = _offload_vs_eager(monkeypatch)
    assert len(spans) == 4 and all(have == need for step in spans for have, need in step)
    assert all(n == 0 for step in released for n in step)  # freed between steps
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, ref):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], ref_opt.state[b][key], rtol=1e-5, atol=1e-6)
        assert float(opt.state[a]["step"]) == float(ref_opt.state[b]["step"]) == 4.0
