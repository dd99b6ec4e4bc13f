"""Non-finite norms skip the step without a host sync; huge grads; bad input raises before any change."""

import math

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads


def snapshot(params, opt):
    state = {
        i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for i, p in enumerate(params)
        if p in opt.state
    }
    return [p.detach().clone() for p in params], state


def assert_bit_identical(before, params, opt):
    old_params, old_state = before
    for a, b in zip(old_params, params):
        assert torch.equal(a, b.detach()), "a param changed"
    new_state = {i: opt.state[p] for i, p in enumerate(params) if p in opt.state}
    assert old_state.keys() == new_state.keys()
    for i in old_state:
        assert old_state[i].keys() == new_state[i].keys()
        for k, v in old_state[i].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, new_state[i][k]), f"state {i}.{k} changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_norm_skips_step_bit_identically(bad, dtype):
    params = make_params(dtype)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(2):
        set_grads(params, make_grads(params, step))
        stepper.step()
    grads = make_grads(params, 2)
    grads[5].view(-1)[3] = bad
    set_grads(params, grads)
    before = snapshot(params, opt)
    total = stepper.step()
    assert not torch.isfinite(total)
    assert_bit_identical(before, params, opt)
    assert stepper.skipped_steps.item() == 1 and not stepper.last_step_finite.item()
    # The next finite step proceeds from the untouched state, like a run that never saw the bad batch.
    set_grads(params, make_grads(params, 3))
    stepper.step()
    assert stepper.skipped_steps.item() == 1 and stepper.last_step_finite.item()
    assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_skip_matches_reference_that_never_saw_the_bad_batch():
    ours, ref = make_params(), make_params()
    opt = torch.optim.SGD(ours, lr=1e-2, momentum=0.9)
    opt_ref = torch.optim.SGD(ref, lr=1e-2, momentum=0.9)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(6):
        grads = make_grads(ours, step)
        if step in (0, 3):  # a bad first step (momentum buffers not yet created) and a later one
            grads[0].view(-1)[0] = math.nan
            set_grads(ours, grads)
            stepper.step()
            continue
        set_grads(ours, grads)
        set_grads(ref, grads)
        stepper.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        opt_ref.step()
    assert stepper.skipped_steps.item() == 2
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # fp32 tolerance, see test_parity.py


def test_error_if_nonfinite_raises_and_changes_nothing():
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, error_if_nonfinite=True)
    set_grads(params, make_grads(params, 0))
    stepper.step()
    grads = make_grads(params, 1)
    grads[2].fill_(math.inf)
    set_grads(params, grads)
    before = snapshot(params, opt)
    with pytest.raises(RuntimeError, match="non-finite"):
        stepper.step()
    assert_bit_identical(before, params, opt)


def test_fresh_optimizer_with_nonfinite_first_step_creates_no_state():
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, error_if_nonfinite=True)
    grads = make_grads(params, 0)
    grads[0].view(-1)[0] = math.nan
    set_grads(params, grads)
    with pytest.raises(RuntimeError):
        stepper.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_huge_gradients_give_a_finite_norm_and_a_clipped_step(norm_type):
    # 6e31**2 = 3.6e63 overflows fp32; NeMo scales by the max, FusedStep accumulates in fp64.
    params = [torch.nn.Parameter(torch.zeros(1000)), torch.nn.Parameter(torch.zeros(37))]
    opt = torch.optim.SGD(params, lr=1.0)
    stepper = FusedStep(opt, max_grad_norm=1.0, norm_type=norm_type, bucket_size=BUCKET, pack_threshold=PACK)
    grads = [torch.full((1000,), 6e31), torch.full((37,), -6e31)]
    set_grads(params, grads)
    total = stepper.step()
    flat = torch.cat([g.double() for g in grads])
    expected = torch.linalg.vector_norm(flat / 6e31, norm_type) * 6e31  # exact scaled fp64 reference
    assert torch.isfinite(total)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    update = torch.cat([p.detach().double() for p in params])
    torch.testing.assert_close(torch.linalg.vector_norm(update, norm_type), torch.tensor(1.0, dtype=torch.float64),
                               rtol=1e-5, atol=0)  # clipped to max_norm (fp32 update)


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_large_p_norm_neither_overflows_nor_underflows(magnitude):
    # p = 12: |g|^p leaves the fp64 range for 1e30 (1e360) and 1e-30 (1e-360); the scaled norm does not.
    params = [torch.nn.Parameter(torch.zeros(64)) for _ in range(5)]
    opt = torch.optim.SGD(params, lr=0.0)
    stepper = FusedStep(opt, norm_type=12.0, bucket_size=BUCKET, pack_threshold=PACK)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.rand(64, generator=gen) * magnitude for _ in params]
    set_grads(params, grads)
    total = stepper.step()
    flat = torch.cat([g.double() for g in grads])
    top = flat.abs().max()
    expected = top * ((flat / top).abs() ** 12).sum() ** (1 / 12)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- bad input


def _opt(params=None, cls=torch.optim.AdamW, **kwargs):
    return cls(params if params is not None else make_params(), lr=1e-2, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=True), TypeError, "max_grad_norm must be a positive number"),
        (dict(norm_type=0.0), ValueError, "norm_type must be > 0"),
        (dict(norm_type=-2.0), ValueError, "norm_type must be > 0"),
        (dict(norm_type=math.nan), ValueError, "norm_type must be > 0"),
        (dict(norm_type="fro"), TypeError, "norm_type must be a number"),
        (dict(bucket_size=0), ValueError, "bucket_size must be an int >= 1"),
    ],
)
def test_bad_options_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedStep(_opt(), **kwargs)


def test_unsupported_optimizers_raise():
    params = make_params()
    with pytest.raises(TypeError, match="FusedStep supports torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD"):
        FusedStep(torch.optim.RMSprop(params, lr=1e-2))

    class MyAdamW(torch.optim.AdamW):
        pass

    with pytest.raises(TypeError, match="exact types"):
        FusedStep(MyAdamW(params, lr=1e-2))
    with pytest.raises(ValueError, match="differentiable=True"):
        FusedStep(torch.optim.AdamW(params, lr=1e-2, differentiable=True))
    with pytest.raises(ValueError, match="differentiable=True"):
        FusedStep(torch.optim.SGD(params, lr=1e-2, differentiable=True))


def test_complex_params_raise():
    with pytest.raises(TypeError, match="complex params"):
        FusedStep(_opt([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]))


def test_tensor_lr_on_cpu_is_read_and_meta_tensor_is_refused():
    """A CPU tensor lr is read on the host (as torch.optim does); a tensor on an accelerator is used on
    the device (tests/test_cuda.py); a meta tensor holds no value and is refused before any change."""
    params = make_params()
    stepper = FusedStep(_opt(params), bucket_size=BUCKET, pack_threshold=PACK)
    stepper.optimizer.param_groups[0]["lr"] = torch.tensor(1e-3)
    set_grads(params, make_grads(params, 0))
    stepper.step()  # a CPU tensor lr is read on the host like torch.optim does
    stepper.optimizer.param_groups[0]["lr"] = torch.tensor(1e-3, device="meta")
    before = snapshot(params, stepper.optimizer)
    with pytest.raises(ValueError, match="is a tensor on meta, which holds no value"):
        stepper.step()
    assert_bit_identical(before, params, stepper.optimizer)


def _stepper_after_one_step():
    params = make_params()
    opt = _opt(params)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    set_grads(params, make_grads(params, 0))
    stepper.step()
    return params, opt, stepper


def test_sparse_grad_raises_before_any_change():
    params, opt, stepper = _stepper_after_one_step()
    set_grads(params, make_grads(params, 1))
    params[1].grad = torch.randn(params[1].shape).to_sparse()
    before = snapshot(params, opt)
    with pytest.raises(TypeError, match="sparse grads are not supported"):
        stepper.step()
    assert_bit_identical(before, params, opt)


def test_grad_shape_mismatch_raises_before_any_change():
    params, opt, stepper = _stepper_after_one_step()
    set_grads(params, make_grads(params, 1))
    # The grad setter refuses a wrong shape, so change the param under its grad instead.
    params[7].data = torch.zeros(14)
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"grad shape \(13,\) differs from param shape \(14,\)"):
        stepper.step()
    assert_bit_identical(before, params, opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_grad_device_mismatch_raises_before_any_change_cuda():
    params, opt, stepper = _stepper_after_one_step()
    set_grads(params, make_grads(params, 1))
    grads = [p.grad for p in params]
    for p in params:
        p.data = p.data.cuda()  # the grads stay on the CPU
    assert all(p.grad is g for p, g in zip(params, grads))
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match="grad is on cpu but the param is on cuda"):
        stepper.step()
    assert_bit_identical(before, params, opt)


# ------------------------------------------------------------------------------- host syncs


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that reads a tensor's value on the host (a device sync on an accelerator)."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# The training-health options (issue 18): per-param norms, spike windows with a loss, ZClip; all together.
_HEALTH = {
    "default": {},
    "health": dict(param_norms=True, skip_spike_sigma=3.0, spike_window=2, adaptive_clip="zclip", zclip_warmup=2),
}


@pytest.mark.parametrize("health", list(_HEALTH))
@pytest.mark.parametrize("cls,kwargs", [(torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
                                        (torch.optim.SGD, dict(lr=1e-2, momentum=0.9))])
def test_step_reads_no_tensor_value_on_the_host(cls, kwargs, health):
    # The orchestration (plan, norm stage, tables, state, counters) is the same with compile=False;
    # a mode cannot see inside compiled graphs, which cannot sync anyway.
    params = make_params()
    opt = cls(params, **kwargs)
    stepper = FusedStep(opt, max_grad_norm=1.0, compile=False, bucket_size=BUCKET, pack_threshold=PACK,
                        **_HEALTH[health])
    for step in range(6):  # windows full from step 2, ZClip's EMA from step 2: every path of the finish
        grads = make_grads(params, step, scale=30.0 if step == 4 else 3.0)  # step 4: a spike
        if step == 1:
            grads[0].view(-1)[0] = math.nan  # the skip path, too
        set_grads(params, grads)
        loss = dict(loss=torch.tensor(1.0 + step) if step % 2 else 2.5) if health != "default" else {}
        with _HostReads() as reads:
            # A number: a CPU grad_scale tensor is read on the host on purpose (main, 26a6eee: no per-step
            # copy for CUDA params), which the mode would count though it is no device sync.
            stepper.step(grad_scale=0.5, **loss)
        assert reads.calls == [], f"step {step} read tensor values on the host: {reads.calls}"
    if health != "default":
        assert stepper.skipped_steps.item() == 1 and stepper.spike_skipped_steps.item() >= 1
    # The mode does see such reads (a check that can fail):
    with _HostReads() as reads:
        stepper.skipped_steps.item()
    assert reads.calls == ["item"]


# The CUDA sync check is tests/test_cuda.py::test_steady_state_step_does_not_sync_the_device (4 optimizers x 2 dtypes).
