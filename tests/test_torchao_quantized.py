"""torchao's quantized Adam/AdamW (``rules/quantized_adam.py``; 8-bit, 4-bit and FP8 state):
FusedStep(torchao.optim.AdamW8bit / AdamW4bit / AdamWFp8) against torchao's own ``step()`` after eager
``torch.nn.utils.clip_grad_norm_``, with torchao's state format kept. The tests of the shared math and lifecycle
(switching, several optimizers, bfloat16, offload, schedules, health) run on the 8-bit format; parity,
checkpoints, the non-finite skip, the layout and the refusals run on each format.

The reference is always torchao's step on a twin model with the same grads; our code is never the reference.

Tolerances (float32). FusedStep computes torchao's float32 ops in torchao's order (its maps, its quantization,
the float32 bias corrections), so on this CPU the runs below come out bit-identical. The one input computed
differently is the clip coefficient: float64 rounded to float32 in FusedStep, float32 ops in
``clip_grad_norm_``; its last bit may differ, which can move a value across a rounding boundary of the
quantization map. So the checks allow:

* codes: equal, except at most ``CODE_FLIPS`` (0.1%) of a state tensor's codes differing by 1 (4-bit codes
  unpacked; FP8 codes as their bits, where 1 apart is the next float8 value of the same sign);
* scales (a block's max |x|), dequantized state, plain small-param state and params: ``rtol=1e-5,
  atol=1e-6`` (``TOL``): a last-bit difference of the coefficient is 6e-8 relative, and the update's
  ops add a few ulps; a code flip (never seen here) would move its one element by a map step, ~1% of its
  block's scale, beyond this bound: such a flip fails the test, as it should be looked at.

A round trip with no update in between (adoption into FusedStep's buffers, then ``state_dict()``) is exact.
"""

import copy
import io
import math
import subprocess
import sys

import pytest
import torch

torchao_optim = pytest.importorskip("torchao.optim")

from compiled_step import FusedStep  # noqa: E402
from compiled_step.rules import RULES, conformance_errors, declaration_errors, rule_for  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
CODE_FLIPS = 1e-3
STEPS = 6
MAX_NORM = 1.0
# Quantized state: 64x128 (two of them: one stack) and 32x256; plain state: a bias of 64 and a 7x9 matrix
# (fewer than 4096 elements), and 4097 elements (not whole blocks of 256 or 128).
SHAPES = [(64, 128), (64,), (32, 256), (64, 128), (7, 9), (4097,)]
QUANTIZED = [0, 2, 3]
# Each format's AdamW, its state class and its default block size.
FORMATS = {"8bit": ("AdamW8bit", "OptimState8bit", 256), "4bit": ("AdamW4bit", "OptimState4bit", 128),
           "fp8": ("AdamWFp8", "OptimStateFp8", 256)}
_STATE_CLASSES = (torchao_optim.subclass_8bit.OptimState8bit, torchao_optim.subclass_4bit.OptimState4bit,
                  torchao_optim.subclass_fp8.OptimStateFp8)


def _adamw(fmt):
    return getattr(torchao_optim, FORMATS[fmt][0])


def _params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, step):
    """Large grads on even steps (clipping at MAX_NORM active), small ones on odd steps (no clipping)."""
    gen = torch.Generator().manual_seed(1000 + step)
    scale = 3.0 if step % 2 == 0 else 1e-3
    return [torch.randn(p.shape, generator=gen) * scale for p in params]


def _write(params, grads):
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _groups(params, lrs=(1e-2, 3e-3), weight_decays=(0.1, 0.0)):
    """Two param groups of different lr and weight decay."""
    half = len(params) // 2
    return [dict(params=params[:half], lr=lrs[0], weight_decay=weight_decays[0]),
            dict(params=params[half:], lr=lrs[1], weight_decay=weight_decays[1])]


def _torchao_step(params, opt):
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    opt.step()
    return norm


def _codes(state):
    """A quantized state tensor's codes, one integer per element: 4-bit codes unpacked, FP8 codes as their bits."""
    codes = state.codes
    if codes.dtype == torch.float8_e4m3fn:
        return codes.view(torch.uint8).int()
    if isinstance(state, torchao_optim.subclass_4bit.OptimState4bit):
        return torch.stack([codes >> 4, codes & 0b1111], dim=-1).int()
    return codes.int()


def _assert_codes_close(ours, ref, what):
    diff = (_codes(ours) - _codes(ref)).abs()
    flips = int((diff != 0).sum())
    assert int(diff.max()) <= 1 and flips <= CODE_FLIPS * diff.numel(), f"{what}: {flips} codes differ"


def _assert_state_close(opt, ref_opt, params, ref_params):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        ours, ref = opt.state[p], ref_opt.state[q]
        assert ours.keys() == ref.keys(), i
        assert float(ours["step"]) == float(ref["step"]), i
        for key in ours.keys() - {"step"}:
            a, b = ours[key], ref[key]
            assert type(a) is type(b), (i, key)
            if isinstance(b, _STATE_CLASSES):
                assert getattr(a, "signed", None) == getattr(b, "signed", None) and a.block_size == b.block_size
                assert a.dtype == b.dtype and a.shape == b.shape and a.codes.dtype == b.codes.dtype
                _assert_codes_close(a, b, f"param {i} {key}")
                torch.testing.assert_close(a.scale, b.scale, **TOL)
                torch.testing.assert_close(a.dequantize(), b.dequantize(), **TOL)
            else:
                torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"param {i} {key}: {m}")


def _assert_params_close(params, ref_params):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"param {i}: {m}")


def _state_snapshot(opt, params):
    """Every state tensor's bits (codes, scales and plain tensors), and the params'."""
    snap = [p.detach().clone() for p in params]
    for p in params:
        for key, value in sorted(opt.state[p].items()):
            if isinstance(value, _STATE_CLASSES):
                snap += [value.codes.clone(), value.scale.clone()]
            else:
                snap.append(value.detach().clone())
    return snap


def _assert_bit_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _saved_and_loaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_rule_conforms_and_is_registered_for_torchao_types(fmt):
    adamw = _adamw(fmt)
    adam = getattr(torchao_optim, adamw.__name__.replace("AdamW", "Adam"))
    rule = rule_for(adamw(_params(shapes=[(8,)])))
    assert RULES[adamw] is rule and RULES[adam] is rule and rule.NAME == f"adam{fmt}"
    assert conformance_errors(rule) == []
    assert declaration_errors(rule, [rule.Variant(fmt, FORMATS[fmt][2]), rule.Variant(fmt, 64),
                                     rule.Variant(fmt, 64, True)]) == []


def test_compiled_step_imports_and_runs_without_torchao():
    code = ("import sys; sys.modules['torchao'] = None\n"  # importing torchao now raises ImportError
            "import torch, compiled_step\n"
            "from compiled_step.rules import rule_for\n"
            "rule_for(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]))\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def _hard_values(qmap, signed):
    """Every map entry and midpoint, their float neighbours two steps each way, powers of ten (the 8-bit maps'
    band edges) and their neighbours, zero, 1 and tiny values; both signs for a signed map."""
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    points = torch.cat([qmap, (qmap[1:] + qmap[:-1]) / 2, torch.tensor([10.0 ** k for k in range(-9, 1)])])
    near = [points]
    for direction in (up, down):
        once = torch.nextafter(points, direction)
        near += [once, torch.nextafter(once, direction)]
    values = torch.cat(near + [torch.tensor([0.0, 1.0, 1e-30, 1e-45])])
    values = torch.cat([values, -values]) if signed else values[~(values < 0)]
    return values.clamp(-1.0, 1.0)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_map_codes_are_torchaos_on_every_entry_midpoint_and_neighbour(fmt, signed):
    """``_quantize``'s codes for a map format (the 8-bit maps' computed floor code included) against torchao's
    own ``quantize_8bit_with_qmap``/``quantize_4bit_with_qmap``: exact on the hard values and 2 M log-uniform and
    uniform ones. Each set is one block holding 1.0, so its scale is 1 and the values are the map's inputs."""
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap

    from compiled_step.rules import quantized_adam

    form = quantized_adam.FORMATS[fmt]
    qmap = torch.tensor(form.qmaps[signed], dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.exp(torch.empty(1_000_000).uniform_(-25, 0, generator=gen))
    uniform = torch.rand(1_000_000, generator=gen)
    if signed:
        magnitudes = magnitudes * (torch.randint(0, 2, magnitudes.shape, generator=gen) * 2 - 1)
        uniform = uniform * 2 - 1
    reference = quantize_8bit_with_qmap if fmt == "8bit" else quantize_4bit_with_qmap
    for values in (_hard_values(qmap, signed), magnitudes, uniform):
        values = torch.cat([values, torch.ones(1)])
        codes, scale = quantized_adam._quantize(form, values.reshape(1, 1, -1), signed)
        assert float(scale) == 1.0
        ours, theirs = codes.flatten(), reference(values, qmap)
        wrong = (ours != theirs).nonzero().flatten()
        assert wrong.numel() == 0, [(float(values[i]), int(ours[i]), int(theirs[i])) for i in wrong[:5]]


@pytest.mark.parametrize("optimizer,options", [
    ("AdamW8bit", dict()),
    ("Adam8bit", dict()),
    ("AdamW4bit", dict()),
    ("AdamWFp8", dict()),
    ("AdamW4bit", dict(block_size=256)),  # a block size not the format's default: what optim="adamw_torch_4bit" builds
], ids=["adamw", "adam_l2", "adamw_4bit", "adamw_fp8", "adamw_4bit_block256"])
def test_fused_step_matches_torchao(optimizer, options):
    cls = getattr(torchao_optim, optimizer)
    state_class = next(c for adamw, c, _ in FORMATS.values() if adamw == optimizer.replace("Adam8", "AdamW8"))
    ours, ref = _params(), _params()
    opt, ref_opt = cls(_groups(ours), **options), cls(_groups(ref), **options)
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False)
    for step in range(STEPS):
        grads = _grads(ours, step)
        _write(ours, grads)
        _write(ref, grads)
        ref_norm = _torchao_step(ref, ref_opt)
        norm = fused.step()
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
        _assert_params_close(ours, ref)
        _assert_state_close(opt, ref_opt, ours, ref)
    # torchao's format is kept: its state class over views of FusedStep's buffers for the quantized params.
    for i, p in enumerate(ours):
        kind = type(opt.state[p]["exp_avg"]).__name__
        assert kind == (state_class if i in QUANTIZED else "Tensor"), (i, kind)
    codes = opt.state[ours[0]]["exp_avg"].codes
    assert codes._base is not None or codes.untyped_storage().nbytes() > codes.numel()  # a view of a buffer


def test_switching_between_torchao_and_fused_steps_matches_torchao():
    ours, ref = _params(), _params()
    opt, ref_opt = torchao_optim.AdamW8bit(_groups(ours)), torchao_optim.AdamW8bit(_groups(ref))
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False)
    for step in range(STEPS):
        grads = _grads(ours, step)
        _write(ours, grads)
        _write(ref, grads)
        _torchao_step(ref, ref_opt)
        if step in (1, 2, 4):  # torchao's own step on FusedStep's state (its views), then the fused step again
            _torchao_step(ours, opt)
        else:
            fused.step()
        _assert_params_close(ours, ref)
        _assert_state_close(opt, ref_opt, ours, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_non_finite_grad_leaves_params_and_quantized_state_bit_identical(fmt):
    params = _params()
    opt = _adamw(fmt)(_groups(params))
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False)
    for step in range(2):
        _write(params, _grads(params, step))
        fused.step()
    before = _state_snapshot(opt, params)
    grads = _grads(params, 2)
    grads[2][3, 5] = math.inf
    _write(params, grads)
    fused.step()
    assert int(fused.skipped_steps) == 1
    _assert_bit_identical(_state_snapshot(opt, params), before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoints_between_torchao_and_fused_step(fmt):
    ref, ours = _params(), _params()
    ref_opt = _adamw(fmt)(_groups(ref))
    for step in range(2):
        _write(ref, _grads(ref, step))
        _torchao_step(ref, ref_opt)
    with torch.no_grad():
        for p, q in zip(ours, ref):
            p.copy_(q)
    saved = _saved_and_loaded(ref_opt.state_dict())
    opt = _adamw(fmt)(_groups(ours))
    opt.load_state_dict(saved)
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False)

    # Zero updates: a skipped step adopts the loaded state into FusedStep's buffers; state_dict() then gives it
    # back bit for bit, and a fresh torchao optimizer loads it.
    grads = _grads(ours, 2)
    grads[0][0, 0] = math.nan
    _write(ours, grads)
    fused.step()
    codes = opt.state[ours[0]]["exp_avg"].codes
    assert codes.untyped_storage().data_ptr() != saved["state"][0]["exp_avg"].codes.untyped_storage().data_ptr()
    round_trip = _saved_and_loaded(fused.state_dict())
    assert round_trip["state"].keys() == saved["state"].keys()
    for index, st in saved["state"].items():
        back = round_trip["state"][index]
        assert back.keys() == st.keys()
        for key, value in st.items():
            if isinstance(value, _STATE_CLASSES):
                assert torch.equal(back[key].codes, value.codes) and torch.equal(back[key].scale, value.scale)
            else:
                assert back[key].dtype == value.dtype and torch.equal(back[key], value), (index, key)
    fresh_params = _params()
    fresh = _adamw(fmt)(_groups(fresh_params))
    fresh.load_state_dict(round_trip)  # FusedStep's state dict (its "fused_step" entry is ignored)

    # Fused steps from the loaded state match torchao's steps from its own.
    for step in range(2, 5):
        grads = _grads(ours, step)
        _write(ours, grads)
        _write(ref, grads)
        _torchao_step(ref, ref_opt)
        fused.step()
        _assert_params_close(ours, ref)
        _assert_state_close(opt, ref_opt, ours, ref)

    # FusedStep's state dict, saved and loaded, into a fresh torchao optimizer, which steps on as the reference.
    saved = _saved_and_loaded(fused.state_dict())
    again = _params()
    with torch.no_grad():
        for p, q in zip(again, ours):
            p.copy_(q)
    again_opt = _adamw(fmt)(_groups(again))
    again_opt.load_state_dict(saved)
    _assert_state_close(again_opt, ref_opt, again, ref)
    grads = _grads(ours, 5)
    _write(again, grads)
    _write(ref, grads)
    _torchao_step(again, again_opt)
    _torchao_step(ref, ref_opt)
    _assert_params_close(again, ref)
    _assert_state_close(again_opt, ref_opt, again, ref)


def test_several_optimizers_with_torch_adamw_beside():
    ours, ref = _params(shapes=[(64, 128), (64,)]), _params(shapes=[(64, 128), (64,)])
    extra, ref_extra = _params(seed=1, shapes=[(8, 6), (6,)]), _params(seed=1, shapes=[(8, 6), (6,)])
    opts = [torchao_optim.AdamW8bit(ours, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(extra, lr=1e-3)]
    ref_opts = [torchao_optim.AdamW8bit(ref, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(ref_extra, lr=1e-3)]
    fused = FusedStep(opts, max_grad_norm=MAX_NORM, compile_notice=False)
    for step in range(3):
        grads = _grads(ours + extra, step)
        _write(ours + extra, grads)
        _write(ref + ref_extra, grads)
        torch.nn.utils.clip_grad_norm_(ref + ref_extra, MAX_NORM)
        for o in ref_opts:
            o.step()
        fused.step()
        _assert_params_close(ours + extra, ref + ref_extra)
        _assert_state_close(opts[0], ref_opts[0], ours, ref)


def _refused(opt, params, match):
    """FusedStep refuses ``opt`` at construction, or else at its step, with ``match``, leaving everything as it was."""
    before = _state_snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False)
        fused.step()
    _assert_bit_identical(_state_snapshot(opt, params), before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_block_size_that_does_not_divide_into_codes_is_refused(fmt):
    params = _params(shapes=[(64, 128)])
    _refused(_adamw(fmt)(params, block_size=0), params, "block_size must be a positive")
    if fmt == "4bit":  # two codes per byte
        _refused(_adamw(fmt)(params, block_size=127), params, "block_size must be a positive even int")


def test_what_is_not_supported_is_refused_before_anything_changes():
    params = _params(shapes=[(64, 128)])
    _refused(torchao_optim.Adam8bit(params, amsgrad=True), params, "amsgrad=True is not supported")

    transposed = [torch.nn.Parameter(torch.randn(128, 64).t())]
    _refused(torchao_optim.AdamW8bit(transposed), transposed, "must be contiguous")

    # State of another form than torchao makes for the param (a plain tensor where it quantizes), at the step.
    params = _params(shapes=[(64, 128)])
    opt = torchao_optim.AdamW8bit(params)
    fused = FusedStep(opt, compile_notice=False)
    opt.state[params[0]].update(step=torch.tensor(1.0), exp_avg=torch.zeros(64, 128), exp_avg_sq=torch.zeros(64, 128))
    _write(params, _grads(params, 0))
    before = _state_snapshot(opt, params)
    with pytest.raises(ValueError, match="expects an OptimState8bit"):
        fused.step()
    _assert_bit_identical(_state_snapshot(opt, params), before)


def test_partial_dtensor_params_are_refused():
    """DTensor shards are updated per local shard, as torchao does (``tests/distributed/test_torchao_fsdp2.py``);
    a param of partial values is not a shard, and is refused before any state exists."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        param = torch.nn.Parameter(DTensor.from_local(torch.randn(64, 128), mesh, [Partial()]))
        param.grad = torch.ones_like(param)
        opt = torchao_optim.AdamW8bit([param])
        with pytest.raises(ValueError, match="holds partial values"):
            FusedStep(opt, compile_notice=False).step()
        assert not opt.state
    finally:
        dist.destroy_process_group()


def test_the_8bit_state_is_laid_out_in_uint8_codes_and_float32_scales():
    from compiled_step import planning
    from compiled_step.storage import lay_out_state

    rule = rule_for(torchao_optim.AdamW8bit(_params(shapes=[(8,)])))
    params = [torch.zeros(64, 128), torch.zeros(64), torch.zeros(64, 128)]
    (group,) = planning.build_plan([params], matrix_groups={0: rule}).groups
    layout = lay_out_state(group, rule, rule.Variant("8bit", 256))
    codes, scale, plain = layout["exp_avg_codes"], layout["exp_avg_scale"], layout["exp_avg"]
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float32 and plain.dtype == torch.float32
    assert [t is not None for t in codes.tensors] == [True, False, True]
    assert [t.shape for t in scale.tensors if t is not None] == [(32,), (32,)]  # 8192 / 256 blocks each
    assert [t is not None for t in plain.tensors] == [False, True, False]
    # 1 byte per element for the codes (and a padding element per stacked tensor), 4 bytes per block of 256.
    assert codes.rows * planning.ROW <= 2 * (8192 + planning.ROW)
    assert scale.rows * planning.ROW <= 2 * 2 * planning.ROW


@pytest.mark.parametrize("fmt,codes_shape,blocks", [("4bit", (4096,), 64), ("fp8", (64, 128), 32)])
def test_the_4bit_and_fp8_state_is_laid_out_in_uint8_codes_and_float32_scales(fmt, codes_shape, blocks):
    """4-bit: two codes per byte, flat (torchao's ``[numel / 2]`` codes), a scale per 128 elements. FP8: the
    float8 codes' bits in uint8 buffers (the engine holds no float8 buffer), a scale per 256 elements (the state
    torchao sees, float8_e4m3fn codes over those bytes, is checked in test_fused_step_matches_torchao)."""
    from compiled_step import planning
    from compiled_step.storage import lay_out_state

    rule = rule_for(_adamw(fmt)(_params(shapes=[(8,)])))
    params = [torch.zeros(64, 128), torch.zeros(64), torch.zeros(64, 128)]
    (group,) = planning.build_plan([params], matrix_groups={0: rule}).groups
    layout = lay_out_state(group, rule, rule.Variant(fmt, FORMATS[fmt][2]))
    codes, scale = layout["exp_avg_codes"], layout["exp_avg_scale"]
    assert codes.dtype == torch.uint8 and scale.dtype == torch.float32
    assert [t.shape for t in codes.tensors if t is not None] == [codes_shape, codes_shape]
    assert [t.shape for t in scale.tensors if t is not None] == [(blocks,), (blocks,)]


def test_bfloat16_params_match_torchao_unclipped():
    """bfloat16 params: torchao's plain state is bfloat16 (``zeros_like``) and its 8-bit state says bfloat16; the
    math is float32 either way. Unclipped: ``clip_grad_norm_`` rounds a clipped bfloat16 grad to bfloat16 in place,
    where FusedStep scales it in float32."""
    shapes = [(64, 128), (64,), (7, 9)]
    ours, ref = ([torch.nn.Parameter(p.detach().bfloat16()) for p in _params(shapes=shapes)] for _ in range(2))
    opt, ref_opt = torchao_optim.AdamW8bit(_groups(ours)), torchao_optim.AdamW8bit(_groups(ref))
    fused = FusedStep(opt, compile_notice=False)
    for step in range(3):
        grads = [g.bfloat16() for g in _grads(ours, step)]
        _write(ours, grads)
        _write(ref, grads)
        ref_opt.step()
        fused.step()
        _assert_params_close(ours, ref)
        _assert_state_close(opt, ref_opt, ours, ref)
    assert opt.state[ours[1]]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[ours[0]]["exp_avg"].dtype == torch.bfloat16  # OptimState8bit's appearance dtype


def test_offloaded_state_matches_torchao(monkeypatch):
    """offload_optimizer_state: the 8-bit state users see lives in the host copy of the buffers (CPU buffers stand
    in for the device's, as in test_offload.py); the codes and scales go in and out like any state key."""
    from compiled_step import storage

    monkeypatch.setattr(storage, "offloads_state", lambda device: True)
    ours, ref = _params(), _params()
    opt, ref_opt = torchao_optim.AdamW8bit(_groups(ours)), torchao_optim.AdamW8bit(_groups(ref))
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False, offload_optimizer_state=True)
    for step in range(3):
        grads = _grads(ours, step)
        _write(ours, grads)
        _write(ref, grads)
        _torchao_step(ref, ref_opt)
        fused.step()
        assert all(gb.offloaded for gb in fused.engine.storage.groups)
        _assert_params_close(ours, ref)
        _assert_state_close(opt, ref_opt, ours, ref)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_an_lr_and_weight_decay_schedule_compiles_no_graph_after_the_first_step():
    """Hyperparameters are data in FusedStep's table: a scheduler changing lr every step and a weight decay changed
    mid-run must not recompile. Only FusedStep's own steps are counted (torchao compiles its step per shape, and
    recompiles on a new weight decay: it is a Python float there). Dynamo's caches are emptied first, so the first
    step's compiles show in the count as well (earlier tests compiled the same graphs)."""
    torch._dynamo.reset()
    ours, ref = _params(), _params()
    opt, ref_opt = torchao_optim.AdamW8bit(_groups(ours)), torchao_optim.AdamW8bit(_groups(ref))
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1.0 + s)) for o in (opt, ref_opt)]
    by_fused = []
    for step in range(STEPS):
        if step == 3:
            for o in (opt, ref_opt):
                o.param_groups[0]["weight_decay"] = 0.05
        grads = _grads(ours, step)
        _write(ours, grads)
        _write(ref, grads)
        _torchao_step(ref, ref_opt)
        before = _graphs_compiled()
        fused.step()
        by_fused.append(_graphs_compiled() - before)
        for s in schedules:
            s.step()
        _assert_params_close(ours, ref)
        _assert_state_close(opt, ref_opt, ours, ref)
    assert by_fused[0] > 0 and by_fused[1:] == [0] * (STEPS - 1), by_fused
    assert opt.param_groups[1]["lr"] < 3e-3 / 5  # the schedule did move the lr


def test_health_options_run_with_the_8bit_state():
    """param_norms and spike skipping with AdamW8bit: each param's pre-clip norm against torch's vector_norm of its
    grad (float64 accumulation both: rtol 1e-6), and a skipped spike leaves the 8-bit state bit-identical while the
    applied steps follow torchao's."""
    ours, ref = _params(), _params()
    opt, ref_opt = torchao_optim.AdamW8bit(_groups(ours)), torchao_optim.AdamW8bit(_groups(ref))
    window = 4
    fused = FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False, param_norms=True, skip_spike_sigma=3.0,
                      spike_window=window)
    skipped = []
    for step in range(window + 3):
        spike = step == window + 1
        gen = torch.Generator().manual_seed(2000 + step)
        scale = (100.0 if spike else 1.0) * (1 + 0.05 * math.sin(step))
        grads = [torch.randn(p.shape, generator=gen) * scale for p in ours]
        _write(ours, grads)
        before = _state_snapshot(opt, ours)
        fused.step()
        norms = fused.param_norms.tolist()
        expected = [float(torch.linalg.vector_norm(g.double())) for g in grads]
        assert norms == pytest.approx(expected, rel=1e-6)
        if int(fused.spike_skipped_steps) > len(skipped):
            skipped.append(step)
            _assert_bit_identical(_state_snapshot(opt, ours), before)
        else:
            _write(ref, grads)
            _torchao_step(ref, ref_opt)
            _assert_params_close(ours, ref)
            _assert_state_close(opt, ref_opt, ours, ref)
    assert skipped == [window + 1]
