"""Tests for compiled_step.lifecycle.fp8: the first-microbatch flag, its hooks, FP8 scales.

Scale references and tolerances:

* An independent scalar reference (``_scalar_reference_scale``): Python float (IEEE
  double) division ``fp8_max / max(amax, eps)``, rounded to float32 by numpy. The code under
  test does the same IEEE operations in float64 followed by one rounding to float32, so the
  tolerance is **zero** (bit equality).
* torchao 0.18's ``precompute_float8_dynamic_scale_for_fsdp`` on real FSDP2-sharded
  ``Float8Linear`` modules (2 gloo ranks), when torchao is installed: again bit equality,
  since we reproduce its formula, not approximate it.
"""

from __future__ import annotations

import importlib.util
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from compiled_step.lifecycle.fp8 import (
    FP8_SCALE_EPS,
    FirstMicrobatchFlag,
    default_first_microbatch_flag,
    feed_first_microbatch_flag,
    find_float8_fsdp_weights,
    fp8_scales_from_amax,
    fp8_weight_amax,
    precompute_fp8_scales_for_fsdp,
    prepare_after_first_microbatch,
    store_fp8_scales_for_fsdp,
)
from compiled_step.lifecycle.fsdp import accumulate, prepare_for_grad_accumulation

try:  # tests/ imported as a package (a tests/__init__.py exists)
    from .distributed.harness import run_distributed
except ImportError:  # pytest's default rootdir-relative import: tests/ itself is on sys.path
    from distributed.harness import run_distributed

HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None
NO_TORCHAO = "torchao is not installed (optional: pip install --no-deps torchao==0.18.0)"


@pytest.fixture(autouse=True)
def _reset_default_flag():
    default_first_microbatch_flag().reset()
    yield
    default_first_microbatch_flag().reset()


# ----------------------------------------------------------------------------------------
# First-microbatch flag
# ----------------------------------------------------------------------------------------


def test_flag_lifecycle_true_false_false_then_none():
    flag = FirstMicrobatchFlag()
    assert flag.value is None
    values = []
    for _step in range(2):
        flag.begin_step()
        for i in range(3):
            values.append(flag.value)
            if i == 0:
                flag.after_first_microbatch()
        flag.reset()  # after the optimizer step
        values.append(flag.value)
    assert values == [True, False, False, None] * 2


def test_flag_refuses_false_outside_a_step():
    flag = FirstMicrobatchFlag()
    with pytest.raises(RuntimeError, match="outside a step"):
        flag.after_first_microbatch()
    assert flag.value is None  # unchanged by the refused call


def test_driver_drives_flag_and_reset_after_step():
    flag = FirstMicrobatchFlag()
    seen = []
    for _step in range(2):
        with accumulate([nn.Linear(2, 2)], 3, fp8_flag=flag) as acc:
            for _ in acc.microbatches():
                seen.append(flag.value)
        flag.reset()  # what FusedStep.step does after the update
        seen.append(flag.value)
    assert seen == [True, False, False, None] * 2


def test_seed_prepare_after_first_microbatch_uses_default_flag():
    flag = default_first_microbatch_flag()
    prepare_for_grad_accumulation([nn.Linear(2, 2)])  # NeMo Automodel sets the flag True here
    assert flag.value is True
    prepare_after_first_microbatch()
    assert flag.value is False
    prepare_after_first_microbatch()  # idempotent within a step, as in NeMo Automodel
    assert flag.value is False
    flag.reset()
    with pytest.raises(RuntimeError):
        prepare_after_first_microbatch()  # deviation from NeMo Automodel: no False outside a step


class _TELike(nn.Module):
    """Stands in for a TransformerEngine module: forward takes is_first_microbatch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls: list[object] = []

    def forward(self, x, is_first_microbatch=None):
        self.calls.append(is_first_microbatch)
        return self.lin(x)


class _KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[object] = []

    def forward(self, x, *, is_first_microbatch=None):
        self.calls.append(is_first_microbatch)
        return x


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _TELike()
        self.b = _KeywordOnly()
        self.plain = nn.Linear(2, 2)

    def forward(self, x):
        return self.plain(self.b(self.a(x)))


def test_hook_feeds_the_flag_value_at_call_time():
    model = _Model()
    flag = FirstMicrobatchFlag()
    hooks = feed_first_microbatch_flag([model], flag)
    assert hooks.modules == [model.a, model.b]
    x = torch.randn(1, 2)
    model(x)  # outside a step
    flag.begin_step()
    model(x)
    flag.after_first_microbatch()
    model(x)
    model(x)
    flag.reset()
    model(x)  # e.g. eval after the optimizer step
    expected = [None, True, False, False, None]
    assert model.a.calls == expected
    assert model.b.calls == expected
    hooks.remove()
    flag.begin_step()
    model(x)
    assert model.a.calls[-1] is None  # the hook is gone: the forward's own default


def test_hook_explicit_argument_wins():
    module = _TELike()
    flag = FirstMicrobatchFlag()
    flag.begin_step()
    with feed_first_microbatch_flag(module, flag):
        module(torch.randn(1, 2), is_first_microbatch=False)
        module(torch.randn(1, 2), False)  # positional
        module(torch.randn(1, 2))
    assert module.calls == [False, False, True]


def test_hook_defaults_to_the_seed_flag_and_requires_a_target():
    module = _TELike()
    with feed_first_microbatch_flag([module]):
        prepare_for_grad_accumulation([module])
        module(torch.randn(1, 2))
    assert module.calls == [True]
    with pytest.raises(ValueError, match="is_first_microbatch"):
        feed_first_microbatch_flag([nn.Linear(2, 2)])
    with pytest.raises(TypeError):
        feed_first_microbatch_flag([module], flag=True)


# ----------------------------------------------------------------------------------------
# FP8 scales: pure function vs the independent scalar reference
# ----------------------------------------------------------------------------------------


def _round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (how torchao's clamp sees eps in that dtype)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).to(torch.float64))


def _scalar_reference_scale(amax: float, float8_dtype: torch.dtype, weight_dtype: torch.dtype) -> np.float32:
    eps = _round_to(FP8_SCALE_EPS, weight_dtype)
    fp8_max = float(torch.finfo(float8_dtype).max)
    clamped = amax if amax >= eps else eps  # NaN >= eps is False, so handle NaN first below
    if amax != amax:
        return np.float32(np.nan)
    scale = fp8_max / clamped if clamped != 0.0 else float("inf")
    if weight_dtype == torch.float16:
        scale = min(scale, float(torch.finfo(torch.float16).max))
    return np.float32(scale)


EDGE_AMAX = [0.0, 1e-30, 1e-12, 3e-12, 1e-8, 0.5, 1.0, 3.14159, 448.0, 1e4, 6e4, 3.0e38, float("inf")]


@pytest.mark.parametrize("float8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scales_match_scalar_reference_exactly(float8_dtype, weight_dtype):
    gen = torch.Generator().manual_seed(7)
    exponents = torch.randint(-14, 6, (64,), generator=gen)
    random = (torch.rand(64, generator=gen, dtype=torch.float64) * 10.0**exponents).tolist()
    values = [_round_to(v, weight_dtype) for v in EDGE_AMAX + random]  # amax are weight-dtype values
    amax = torch.tensor(values, dtype=weight_dtype)
    scales = fp8_scales_from_amax(amax, float8_dtype=float8_dtype)
    assert scales.dtype == torch.float32 and scales.shape == amax.shape
    expected = np.array([_scalar_reference_scale(v, float8_dtype, weight_dtype) for v in values], dtype=np.float32)
    # Tolerance 0: same IEEE float64 operations, one rounding to float32 (module docstring).
    np.testing.assert_array_equal(scales.numpy(), expected)


def test_scale_edge_cases_named():
    e4m3_max = float(torch.finfo(torch.float8_e4m3fn).max)
    assert e4m3_max == 448.0
    amax = torch.tensor([0.0, 1e-20, 448.0, float("inf"), 3.0e38], dtype=torch.float32)
    scales = fp8_scales_from_amax(amax)
    eps32 = _round_to(FP8_SCALE_EPS, torch.float32)
    assert scales[0] == np.float32(448.0 / eps32)  # zero amax: clamped to eps, finite
    assert scales[1] == scales[0]  # below eps: same clamp
    assert scales[2] == 1.0
    assert scales[3] == 0.0  # infinite amax
    assert 0.0 < float(scales[4]) < 1.6e-36  # huge amax: tiny but not flushed to zero
    # float16 weights: eps rounds to 0 in float16, so zero amax gives inf, capped at fp16 max.
    half = fp8_scales_from_amax(torch.tensor([0.0], dtype=torch.float16))
    assert half[0] == float(torch.finfo(torch.float16).max)
    # float64 amax of float32 weights: clamp in the weights' dtype, like torchao.
    from_f64 = fp8_scales_from_amax(torch.tensor([0.0], dtype=torch.float64), weight_dtype=torch.float32)
    assert from_f64[0] == scales[0]


def test_scales_bad_input():
    with pytest.raises(TypeError):
        fp8_scales_from_amax([1.0])
    with pytest.raises(ValueError, match="1-D"):
        fp8_scales_from_amax(torch.tensor(1.0))
    with pytest.raises(TypeError):
        fp8_scales_from_amax(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="float8_dtype"):
        fp8_scales_from_amax(torch.tensor([1.0]), float8_dtype=torch.float16)
    with pytest.raises(TypeError, match="weight_dtype"):
        fp8_scales_from_amax(torch.tensor([1.0]), weight_dtype=torch.int32)


def test_eager_amax_of_plain_weights():
    weights = [torch.randn(4, 3), torch.zeros(2), torch.tensor([-7.5, 2.0]), torch.empty(0, 5)]
    amax = fp8_weight_amax(weights)
    # Reference: max |w| by Python over the values; empty weight -> 0 (no contribution).
    expected = [max((abs(v) for v in w.flatten().tolist()), default=0.0) for w in weights]
    assert amax.tolist() == expected
    with pytest.raises(ValueError, match="one dtype"):
        fp8_weight_amax([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="empty"):
        fp8_weight_amax([])


def test_store_validates_before_writing():
    with pytest.raises(ValueError, match="entries"):
        store_fp8_scales_for_fsdp([], torch.ones(1))
    with pytest.raises(TypeError, match="float32"):
        store_fp8_scales_for_fsdp([], torch.ones(0, dtype=torch.float64))
    assert find_float8_fsdp_weights([nn.Linear(2, 2)]) == []


# ----------------------------------------------------------------------------------------
# FSDP2-sharded weights on 2 gloo ranks: eager amax on DTensors, and torchao parity
# ----------------------------------------------------------------------------------------


def _fp8_worker(rank: int, world_size: int, have_torchao: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    out: dict = {}
    try:
        # Uneven shards, including an out_features=1 layer whose second shard is empty.
        torch.manual_seed(3)
        plain = nn.Sequential(nn.Linear(8, 5), nn.Linear(5, 1), nn.Linear(1, 6))
        full = [p.detach().clone() for p in plain.parameters()]
        for layer in plain:
            fully_shard(layer, mesh=mesh)
        fully_shard(plain, mesh=mesh)
        amax = fp8_weight_amax(list(plain.parameters()))
        out["dtensor_amax"] = amax.tolist()
        out["dtensor_amax_ref"] = [float(t.abs().max()) for t in full]
        out["local_numels"] = [p.to_local().numel() for p in plain.parameters()]
    except Exception:
        out["dtensor_error"] = traceback.format_exc()

    if have_torchao:
        try:
            out["torchao"] = _torchao_parity(mesh)
        except Exception:
            out["torchao_error"] = traceback.format_exc()
    return out


def _torchao_parity(mesh) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training, precompute_float8_dynamic_scale_for_fsdp

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 4)).to(dtype)
        with torch.no_grad():
            model[2].weight.zero_()  # zero amax: exercises the eps clamp in the weights' dtype
            model[3].weight.mul_(1e5)  # large amax
        convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        targets = find_float8_fsdp_weights([model])

        precompute_float8_dynamic_scale_for_fsdp(model)
        theirs = [t.weight._local_tensor._precomputed_scale.clone() for t in targets]
        for t in targets:
            t.weight._local_tensor._precomputed_scale = None
        ours = precompute_fp8_scales_for_fsdp([model])
        stored = [t.weight._local_tensor._precomputed_scale for t in targets]

        # Where torchao reads: its pre-all-gather hook returns the scale it casts with.
        marker = torch.tensor([2.0, 4.0, 8.0], dtype=torch.float32)
        store_fp8_scales_for_fsdp(targets, marker)
        read_back = []
        for t in targets:
            _, metadata = t.weight._local_tensor.fsdp_pre_all_gather(mesh)
            # torchao 0.18 returns metadata (scale,); newer sources return {"scale": ...}.
            scale = metadata["scale"] if isinstance(metadata, dict) else metadata[0]
            read_back.append(float(scale))
        full_weights = [t.weight.full_tensor().detach().float() for t in targets]
        results[str(dtype)] = {
            "n_targets": len(targets),
            "theirs": [s.item() for s in theirs],
            "ours": ours.tolist(),
            "stored": [s.item() for s in stored],
            "read_back": read_back,
            "full_amax": [float(w.abs().max()) for w in full_weights],
        }
    return results


@pytest.fixture(scope="module")
def fp8_results() -> list[dict]:
    return run_distributed(_fp8_worker, world_size=2, args=(HAVE_TORCHAO,), timeout=180)


def test_eager_amax_on_uneven_fsdp_shards(fp8_results):
    for rank, res in enumerate(fp8_results):
        assert "dtensor_error" not in res, res.get("dtensor_error")
        # Reference: abs-max of the unsharded weight, computed before fully_shard; exact.
        assert res["dtensor_amax"] == res["dtensor_amax_ref"], rank
    assert fp8_results[1]["local_numels"][2] == 0  # the empty-shard case really occurred


@pytest.mark.skipif(not HAVE_TORCHAO, reason=NO_TORCHAO)
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_scales_match_torchao_precompute_on_fsdp(fp8_results, dtype):
    for rank, res in enumerate(fp8_results):
        assert "torchao_error" not in res, res.get("torchao_error")
        r = res["torchao"][dtype]
        assert r["n_targets"] == 3, r
        # Reference: torchao's precompute_float8_dynamic_scale_for_fsdp; tolerance 0.
        assert r["ours"] == r["theirs"], (rank, r)
        assert r["stored"] == r["ours"]
        # And the scalar reference from the unsharded weights (independent of both).
        weight_dtype = torch.float32 if dtype == "torch.float32" else torch.bfloat16
        expected = [float(_scalar_reference_scale(a, torch.float8_e4m3fn, weight_dtype)) for a in r["full_amax"]]
        assert r["ours"] == expected, (rank, r["ours"], expected)
        # torchao's all-gather hook casts with exactly the scale we stored.
        assert r["read_back"] == [2.0, 4.0, 8.0], r["read_back"]


def test_default_flag_is_shared_and_starts_none():
    assert default_first_microbatch_flag() is default_first_microbatch_flag()
    assert default_first_microbatch_flag().value is None
    assert dist.is_available()
