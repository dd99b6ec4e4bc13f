"""NeMo Automodel's functional API, single process, against torch's clip_grad_norm_ and hand-computed scales.

Tolerance: the norm is fp64 here and fp32 in torch, so norms agree to ~1e-7 relative (rtol=1e-6), and
clipped grads to one fp32 rounding of the coefficient (rtol=1e-6).
"""

import math

import pytest
import torch

import compiled_step
from compiled_step import _TE_EXPERT_PARAM_PATTERN, _clip_grad_norm_impl, clip_grad_norm, mark_experts
from compiled_step import scale_grads_and_clip_grad_norm
from conftest import make_grads, make_params, set_grads


def _pair(seed=0):
    a, b = make_params(seed=seed), make_params(seed=seed)
    grads = make_grads(a, 0)
    set_grads(a, grads)
    set_grads(b, grads)
    return a, b


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_clip_grad_norm_impl_matches_torch(norm_type):
    ours, ref = _pair()
    total = _clip_grad_norm_impl(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    assert total.dtype == torch.float64 and total.dim() == 0
    torch.testing.assert_close(total.float(), expected, rtol=1e-6, atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_on_model_parts_and_none():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    frozen = model[2].bias
    frozen.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    assert clip_grad_norm(None, [model]) == 0.0
    assert all(torch.equal(p.grad, torch.full_like(p, 2.0)) for p in model.parameters())  # untouched
    total = clip_grad_norm(1.0, [model])
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(total, torch.tensor(2.0 * math.sqrt(n_trainable), dtype=torch.float64))
    assert torch.equal(frozen.grad, torch.full_like(frozen, 2.0))  # not a trainable param: not clipped


def test_scale_grads_pp_and_ep_single_pass():
    # PP on (without a mesh the norm is not reduced, as in NeMo Automodel), 12 tokens over dp=3 -> divide by 4.
    model = torch.nn.ModuleDict({
        "dense": torch.nn.Linear(3, 3),
        "moe": mark_experts(torch.nn.Linear(3, 3)),
    })
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    total = scale_grads_and_clip_grad_norm(
        None, [model], pp_enabled=True, pp_axis_name="pp", num_label_tokens=12, dp_group_size=3
    )
    assert total == 0.0
    for p in model["dense"].parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.25))
    # No moe_mesh: the EP ratio does not apply (seed semantics), experts get the PP scale only.
    for p in model["moe"].parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.25))


def test_pp_scale_with_tensor_token_count_and_clipping():
    model = torch.nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    total = scale_grads_and_clip_grad_norm(
        0.5, [model], pp_enabled=True, pp_axis_name="pp", num_label_tokens=torch.tensor(6), dp_group_size=2
    )
    n = sum(p.numel() for p in model.parameters())
    expected_norm = 1.0 * math.sqrt(n)  # grads 3 / (6 / 2) = 1
    torch.testing.assert_close(total, torch.tensor(expected_norm, dtype=torch.float64))
    coef = 0.5 / (expected_norm + 1e-6)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, coef), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad,error", [(True, TypeError), (1.0, TypeError), (0, ValueError), (-2, ValueError)])
def test_expert_tp_replication_factor_is_validated(bad, error):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(error, match="expert_tp_replication_factor"):
        scale_grads_and_clip_grad_norm(1.0, [model], expert_tp_replication_factor=bad)
    with pytest.raises(error, match="expert_tp_replication_factor"):
        compiled_step.FusedStep(torch.optim.SGD(model.parameters(), lr=0.1), expert_tp_replication_factor=bad)


@pytest.mark.parametrize(
    "name,matches",
    [
        ("model.layers.3.mlp.experts.gate_up_linear.weight0", True),
        ("model.layers.3.mlp.experts.down_linear.bias12", True),
        ("layers.0.moe.experts.gate_up_linear.weight7", True),
        ("moe.experts.down_linear.weight1", True),
        ("model.layers.3.mlp.gate_up_linear.weight0", False),
        ("model.layers.3.attn.experts.down_linear.weight0", False),
        ("model.layers.3.mlp.experts.gate_up_linear.weight", False),
    ],
)
def test_expert_name_pattern(name, matches):
    assert bool(_TE_EXPERT_PARAM_PATTERN.search(name)) is matches


def test_bad_norm_arguments_raise_before_clipping():
    ours, _ = _pair()
    before = [p.grad.clone() for p in ours]
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        _clip_grad_norm_impl(ours, 1.0, norm_type=0.0)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        _clip_grad_norm_impl(ours, -1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, ours))


def test_error_if_nonfinite():
    ours, _ = _pair()
    ours[0].grad[0, 0] = math.nan
    with pytest.raises(RuntimeError, match="non-finite"):
        _clip_grad_norm_impl(ours, 1.0, error_if_nonfinite=True)
