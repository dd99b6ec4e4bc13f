"""PP / EP gradient scaling (NeMo Automodel's ``scale_grads_and_clip_grad_norm`` semantics) against
hand-computed values, on real gloo processes (world 4; the scenarios are in ``_workers_scaling``).

* PP: with ``pp_axis_name`` given and both ``num_label_tokens`` and ``dp_group_size``, every grad is
  divided by ``num_label_tokens / dp_group_size`` (also with ``num_label_tokens`` as a 0-d tensor);
  not when PP is off or either is missing.
* EP: with ``moe_mesh`` and ``dp_group_size``, expert grads are further divided by
  ``(dp_group_size / ep_shard_size) * expert_tp_replication_factor``, ``ep_shard_size`` being the size
  of moe_mesh's ``"ep_shard"`` dim, or 1 without one.
* Experts are recognised by their DTensor mesh axis (also without ``model_parts``), by name
  (``mlp`` and ``moe`` blocks) and by ``mark_experts``; near-miss names are not experts.

Params start at 0, grads are constants and the optimizer is SGD(lr=1), so after one step each param
holds ``-c * scale * clip_coef`` and the total norm is ``sqrt(sum_k n_k (c_k scale_k)^2)``. The
expected scales below are written out by hand from the formulas above, independent of the code
under test (and of the scales the workers declare for the generic checks, which run here too).

Tolerances: the norm to 1e-12 relative (float64 accumulation of exact constants); each param's
effective scale to 1e-6 relative (the update multiplies by fp32(scale x coef) and rounds the
product to fp32: <= 2 fp32 ulps, 1.2e-7).
"""

from __future__ import annotations

import math

import pytest
import torch

from . import _workers_common as common
from ._workers_scaling import SCENARIOS

WORLD = 4

# scenario -> (dense scale, expert scale), by hand.
EXPECTED = {
    "scale_pp_int": (1 / 30, 1 / 30),  # 60 tokens / dp 2 = 30
    "scale_pp_tensor": (1 / 30, 1 / 30),  # same, tokens as a 0-d int64 tensor
    "scale_pp_clipped": (1 / 30, 1 / 30),
    "scale_pp_tokens_only": (1.0, 1.0),  # no dp_group_size: no PP scaling
    "scale_pp_dp_only": (1.0, 1.0),  # no num_label_tokens: no PP scaling
    "scale_pp_off": (1.0, 1.0),  # both given, PP off: no scaling
    "scale_ep_shard": (1.0, 1 / 4),  # dp 8 / ep_shard 2 = 4
    "scale_ep_shard_etp3": (1.0, 1 / 12),  # (8 / 2) x 3
    "scale_ep_no_shard_dim": (1.0, 1 / 4),  # dp 4 / 1
    "scale_ep_no_shard_dim_etp2": (1.0, 1 / 8),  # (4 / 1) x 2
    "scale_ep_no_dp_group_size": (1.0, 1.0),  # no dp_group_size: no EP scaling
    "scale_ep_clipped": (1.0, 1 / 12),
    "scale_ep_dtensor_without_model_parts": (1.0, 1 / 4),
    "scale_pp_ep": (1 / 10, 1 / 40),  # 40 tokens / dp 4 = 10; experts also / (4 / 1)
    "scale_pp_ep_tensor_clipped": (1 / 10, 1 / 40),
}

# Keys the workers give experts (per EP rank where they are plain per-rank tensors).
EXPERT_KINDS = {"mlp", "moe", "marked", "moe_dt"}

_NAMES = [sc.name for sc in SCENARIOS]
_FUNCTIONAL = [sc.name for sc in SCENARIOS if sc.functional]


@pytest.fixture(scope="module")
def world():
    return common.results(WORLD)


def _expected_scale(name: str, key: str) -> float:
    dense, expert = EXPECTED[name]
    return expert if key.startswith("expert/") else dense


def _constants(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for key, g in grads.items():
        values = g.unique()
        assert values.numel() == 1, f"{key}: grads should be constant"
        out[key] = float(values)
    return out


def _closed_form_norm(name: str, grads: dict[str, torch.Tensor]) -> float:
    c = _constants(grads)
    return math.sqrt(sum(g.numel() * (c[k] * _expected_scale(name, k)) ** 2 for k, g in grads.items()))


def _coef(norm: float, max_grad_norm) -> float:
    return 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))


def test_expected_table_covers_every_scenario():
    assert set(EXPECTED) == set(_NAMES)


@pytest.mark.parametrize("name", _NAMES)
def test_norm_and_per_param_scale_match_hand_computed(world, name):
    sc = common.scenario(name)
    recs = common.records(world, name)
    (step,) = common.merged_steps(recs)
    norm = _closed_form_norm(name, step["grads"])
    for rank, n in enumerate(step["norms"]):
        assert abs(float(n) - norm) <= 1e-12 * norm, f"rank {rank}: norm {float(n)!r}, by hand {norm!r}"
    coef = _coef(norm, sc.max_grad_norm)
    if sc.max_grad_norm is not None:
        assert coef < 0.9, "the clipped scenarios must really clip"
    c = _constants(step["grads"])
    before = common.merge([r["before"] for r in recs], "before")
    wrong = {}
    for key, after in step["after"].items():
        assert before[key].abs().max() == 0
        effective = -after / (c[key] * coef)  # SGD lr=1 from 0: after = -c * scale * coef
        expected = _expected_scale(name, key)
        err = (effective.double() - expected).abs().max().item() / expected
        if err > 1e-6:
            wrong[key] = (effective.flatten()[0].item(), expected)
    assert not wrong, f"{name}: (effective, expected) scale per param: {wrong}"


@pytest.mark.parametrize("name", _NAMES)
def test_expert_recognition(world, name):
    """Which params were treated as experts, read off their scale (EP-scaled scenarios only)."""
    dense, expert = EXPECTED[name]
    if dense == expert:
        pytest.skip("experts and dense params are scaled alike here")
    recs = common.records(world, name)
    (step,) = common.merged_steps(recs)
    c = _constants(step["grads"])
    coef = _coef(_closed_form_norm(name, step["grads"]), common.scenario(name).max_grad_norm)
    treated = {
        key for key, after in step["after"].items() if abs(-after.flatten()[0].item() / (c[key] * coef) - expert) < 1e-6 * expert
    }
    assert treated == {k for k in step["after"] if k.startswith("expert/")}
    kinds = {k.split("/", 1)[1].split("@")[0].split(".")[-1] for k in treated}
    if "scale_ep" in name and "without_model_parts" not in name:
        assert kinds == EXPERT_KINDS  # mesh axis, mlp pattern, moe pattern, marker


@pytest.mark.parametrize("name", _NAMES)
def test_generic_reference_and_collectives(world, name):
    common.check_fused(world, name)
    common.check_collectives(world, name)


@pytest.mark.parametrize("name", _FUNCTIONAL)
def test_functional_scale_grads_and_clip_grad_norm(world, name):
    """NeMo Automodel's function: grads scaled (and clipped) in place to c x scale x coef by hand; the
    norm by hand, or 0.0 without max_grad_norm."""
    if not world[0]["__functional_api__"]:
        pytest.skip("compiled_step.nemo_compat is not there yet")
    sc = common.scenario(name)
    recs = common.records(world, f"{name}/scale_grads_and_clip_grad_norm")
    grads = common.merge([r["grads"] for r in recs], "grads")
    after = common.merge([r["after"] for r in recs], "grads after")
    norm = _closed_form_norm(name, grads)
    coef = _coef(norm, sc.max_grad_norm)
    for rank, r in enumerate(recs):
        expected_norm = 0.0 if sc.max_grad_norm is None else norm
        assert abs(float(r["norm"]) - expected_norm) <= 1e-12 * norm, f"rank {rank}: {float(r['norm'])} vs {expected_norm}"
    c = _constants(grads)
    for key, g in after.items():
        expected = c[key] * _expected_scale(name, key) * coef
        err = (g.double() - expected).abs().max().item() / expected
        assert err <= 1e-6, f"{key}: grad {g.flatten()[0].item()} vs {expected} by hand"
    common.check_functional(world, name, "scale_grads_and_clip_grad_norm")


# ------------------------------------------------------------------------------------------------
# expert_tp_replication_factor validation: no process group needed (checked at construction).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,error", [(True, TypeError), (False, TypeError), (1.0, TypeError), ("2", TypeError),
                                         (0, ValueError), (-1, ValueError)])
def test_expert_tp_replication_factor_is_validated_at_construction(value, error):
    from compiled_step import FusedStep

    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(error, match="expert_tp_replication_factor"):
        FusedStep(torch.optim.SGD([p], lr=0.1), compile=False, expert_tp_replication_factor=value)


@pytest.mark.parametrize("value,error", [(True, TypeError), (0, ValueError)])
def test_functional_validates_expert_tp_replication_factor(value, error):
    nemo_compat = pytest.importorskip("compiled_step.nemo_compat")
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.ones(2, 2)
    with pytest.raises(error, match="expert_tp_replication_factor"):
        nemo_compat.scale_grads_and_clip_grad_norm(1.0, [model], expert_tp_replication_factor=value)
    assert torch.equal(model.weight.grad, torch.ones(2, 2)), "nothing may change before the error"
