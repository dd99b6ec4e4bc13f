"""Scenario builders for ``test_scaling.py``: PP / EP gradient scaling, run inside the ranks.

Params start at zero and every grad is a constant (per param, and per EP rank for per-rank
experts), the optimizer is plain SGD with lr=1: after one step a param holds exactly
``-c x scale x clip_coef`` (one fp32 rounding), so the test reads each param's effective scale off
the update and compares it with hand-computed numbers, and the norm has a closed form.

Keys say what a param is expected to be: ``dense/...`` (never EP-scaled) or ``expert/...``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._workers_common import Scenario, Setup, build_module
from ._workers_norms import _dgrad, _dparam, _mesh, _world_group


def _const(shape, value):
    return torch.full(shape, float(value), dtype=torch.float32)


class _Layout:
    """(key, module name, param) triples with their constant grads; builds the Setup."""

    def __init__(self):
        self.entries = []  # (key, module name or None, param, grad fn)

    def plain(self, key, name, shape, c):
        p = nn.Parameter(torch.zeros(shape))
        self.entries.append((key, name, p, lambda: _const(shape, c)))
        return p

    def dtensor(self, key, name, shape, c, mesh, spec):
        p = _dparam(torch.zeros(shape), mesh, spec)
        self.entries.append((key, name, p, lambda: _dgrad(_const(shape, c), mesh, spec)))
        return p

    def setup(self, *, groups, fused_kwargs, step_kwargs, dense_scale, expert_scale, marked=(), model_parts=True):
        named = [(key, p) for key, _, p, _ in self.entries]

        def set_grads(t):
            for _, _, p, grad in self.entries:
                p.grad = grad()

        parts = []
        if model_parts:
            module = build_module([(name, p) for _, name, p, _ in self.entries if name is not None])
            from compiled_step.experts import mark_experts

            for prefix in marked:
                mark_experts(module.get_submodule(prefix))
            parts = [module]
        scales = {key: (expert_scale if key.startswith("expert/") else dense_scale) for key, _ in named}
        return Setup(
            named=named,
            model_parts=parts,
            set_grads=set_grads,
            opt_name="SGD",
            opt_groups=[([k for k, _ in named], dict(lr=1.0))],
            fused_kwargs=fused_kwargs,
            step_kwargs=step_kwargs,
            scales=scales,
            groups=groups,
        )


def pp_scaling(rank, world_size, num_label_tokens=None, dp_group_size=None, pp=True, as_tensor=False):
    """A (pp, dp) mesh; each stage holds different plain params and a DTensor on its dp submesh.
    With PP on and both given, grads are divided by num_label_tokens / dp_group_size."""
    mesh = _mesh((2, world_size // 2), ("pp", "dp"))
    # Without PP the two pp rows hold the same params (plain DP replicas), so every rank has the
    # whole model and the norm is global without a PP reduction.
    stage = mesh.get_coordinate()[0] if pp else 0
    layout = _Layout()
    layout.plain(f"dense/stage{stage}.w", "w", (3, 2) if stage == 0 else (5,), 1.0 + stage)
    layout.plain(f"dense/stage{stage}.b", "b", (2,), 0.5)
    layout.dtensor(f"dense/stage{stage}.sharded", "sharded", (4, 3), 2.0 - stage, mesh["dp"], "S0")
    tokens = num_label_tokens
    if as_tensor and tokens is not None:
        tokens = torch.tensor(tokens)  # a 0-d int64 tensor, as counted on the device
    divisor_applies = pp and num_label_tokens is not None and dp_group_size is not None
    scale = dp_group_size / num_label_tokens if divisor_applies else 1.0
    groups = {"dp": mesh.get_group("dp")}
    fused = {}
    if pp:
        fused = dict(device_mesh=mesh, pp_axis_name="pp")
        groups["pp"] = mesh.get_group("pp")
    return layout.setup(
        groups=groups,
        fused_kwargs=fused,
        step_kwargs=dict(num_label_tokens=tokens, dp_group_size=dp_group_size),
        dense_scale=scale,
        expert_scale=scale,
    )


def ep_scaling(rank, world_size, dims=("ep_shard", "ep"), dp_group_size=8, etp=1, model_parts=True):
    """moe_mesh (2, 2) with ``dims``; experts recognised four ways: a DTensor on moe_mesh (mesh
    axis), plain per-rank tensors named ``...mlp.experts.gate_up_linear.weight0`` and
    ``...moe.experts.down_linear.bias3`` (pattern), and a ``mark_experts`` module. Near-miss names
    and a DTensor on a dp-only mesh stay dense. Expert grads are divided by
    (dp_group_size / ep_shard_size) x etp, where ep_shard_size is 2 with an 'ep_shard' dim, else 1."""
    moe_mesh = _mesh((2, world_size // 2), dims)
    dp_mesh = _mesh((world_size,), ("dp",))
    coord = moe_mesh.get_coordinate()[dims.index("ep")]
    layout = _Layout()
    layout.plain("dense/dense.weight", "dense.weight", (4, 3), 1.0)
    layout.plain("dense/near.0", "near.layers.0.mlp.experts.gate_up_linear.weight", (2, 2), 1.5)  # no index
    layout.plain("dense/near.1", "near.layers.0.mlp.shared_experts.down_linear.weight0", (2, 2), 2.5)
    layout.plain("dense/near.2", "near.layers.0.attn.experts.down_linear.weight0", (3,), 0.5)  # not mlp/moe
    layout.plain("dense/near.3", "near.layers.0.xmlp.experts.down_linear.weight0", (3,), 0.25)  # not at a dot
    layout.dtensor("dense/dp_sharded", "dp_sharded", (4, 4), 0.75, dp_mesh, "S0")
    if model_parts:
        layout.plain(f"expert/mlp@ep{coord}", "layers.0.mlp.experts.gate_up_linear.weight0", (2, 3, 2), 1.0 + coord)
        layout.plain(f"expert/moe@ep{coord}", "layers.1.moe.experts.down_linear.bias3", (2, 2), 2.0 + coord)
        layout.plain(f"expert/marked@ep{coord}", "custom.router.w", (3, 2), 0.25 * (1 + coord))
    spec = "S1,S0" if dims[0] == "ep_shard" else "R,S0"
    layout.dtensor("expert/moe_dt", "moe_dt.w", (4, 2, 3), 3.0, moe_mesh, spec)
    ep_shard_size = 2 if "ep_shard" in dims else 1
    expert_scale = 1.0 if dp_group_size is None else 1.0 / ((dp_group_size / ep_shard_size) * etp)
    groups = {"world": _world_group(), "ep": moe_mesh.get_group("ep")}
    if spec == "S1,S0":
        groups["ep_shard"] = moe_mesh.get_group("ep_shard")
    fused = dict(moe_mesh=moe_mesh, ep_axis_name="ep")
    if etp != 1:
        fused["expert_tp_replication_factor"] = etp
    return layout.setup(
        groups=groups,
        fused_kwargs=fused,
        step_kwargs=dict(dp_group_size=dp_group_size),
        dense_scale=1.0,
        expert_scale=expert_scale,
        marked=("custom",) if model_parts else (),
        model_parts=model_parts,
    )


def pp_ep_scaling(rank, world_size, as_tensor=False):
    """One (pp, ep) mesh as device_mesh and moe_mesh: every grad / (tokens / dp), experts also
    / (dp / 1) (no 'ep_shard' dim). tokens=40, dp=4: dense 1/10, experts 1/40."""
    mesh = _mesh((2, world_size // 2), ("pp", "ep"))
    stage, coord = mesh.get_coordinate()
    layout = _Layout()
    layout.plain(f"dense/stage{stage}.w", "w", (3, 3) if stage else (2, 5), 1.0 + stage)
    layout.plain(f"expert/stage{stage}.mlp@ep{coord}", "layers.0.mlp.experts.down_linear.weight1", (2, 2, 2), 1.0 + coord)
    layout.dtensor(f"expert/stage{stage}.moe_dt", "moe_dt", (2, 3), 2.0, mesh["ep"], "S0")
    tokens = torch.tensor(40.0) if as_tensor else 40
    return layout.setup(
        groups={"ep": mesh.get_group("ep"), "pp": mesh.get_group("pp")},
        fused_kwargs=dict(device_mesh=mesh, pp_axis_name="pp", moe_mesh=mesh, ep_axis_name="ep"),
        step_kwargs=dict(num_label_tokens=tokens, dp_group_size=4),
        dense_scale=4 / 40,
        expert_scale=4 / 40 / 4,
    )


_F = ("scale_grads_and_clip_grad_norm",)

SCENARIOS = [
    # PP divisor: num_label_tokens / dp_group_size = 60 / 2 = 30, only with PP on and both given.
    Scenario("scale_pp_int", 4, pp_scaling, dict(num_label_tokens=60, dp_group_size=2), max_grad_norm=None,
             steps=1, functional=_F),
    Scenario("scale_pp_tensor", 4, pp_scaling, dict(num_label_tokens=60, dp_group_size=2, as_tensor=True),
             max_grad_norm=None, steps=1, functional=_F),
    Scenario("scale_pp_clipped", 4, pp_scaling, dict(num_label_tokens=60, dp_group_size=2), max_grad_norm=0.1,
             steps=1, functional=_F),
    Scenario("scale_pp_tokens_only", 4, pp_scaling, dict(num_label_tokens=60), max_grad_norm=None, steps=1,
             functional=_F),
    Scenario("scale_pp_dp_only", 4, pp_scaling, dict(dp_group_size=2), max_grad_norm=None, steps=1, functional=_F),
    Scenario("scale_pp_off", 4, pp_scaling, dict(num_label_tokens=60, dp_group_size=2, pp=False),
             max_grad_norm=None, steps=1, functional=_F),
    # EP ratio: (dp_group_size / ep_shard_size) x expert_tp_replication_factor.
    Scenario("scale_ep_shard", 4, ep_scaling, dict(), max_grad_norm=None, steps=1, functional=_F),
    Scenario("scale_ep_shard_etp3", 4, ep_scaling, dict(etp=3), max_grad_norm=None, steps=1, functional=_F),
    Scenario("scale_ep_no_shard_dim", 4, ep_scaling, dict(dims=("dp", "ep"), dp_group_size=4), max_grad_norm=None,
             steps=1, functional=_F),
    Scenario("scale_ep_no_shard_dim_etp2", 4, ep_scaling, dict(dims=("dp", "ep"), dp_group_size=4, etp=2),
             max_grad_norm=None, steps=1, functional=_F),
    Scenario("scale_ep_no_dp_group_size", 4, ep_scaling, dict(dp_group_size=None), max_grad_norm=None, steps=1,
             functional=_F),
    Scenario("scale_ep_clipped", 4, ep_scaling, dict(etp=3), max_grad_norm=0.5, steps=1, functional=_F),
    # Experts recognised by their DTensor mesh axis alone, without model_parts.
    Scenario("scale_ep_dtensor_without_model_parts", 4, ep_scaling, dict(model_parts=False), max_grad_norm=None,
             steps=1, functional=()),
    # PP and EP together.
    Scenario("scale_pp_ep", 4, pp_ep_scaling, dict(), max_grad_norm=None, steps=1, functional=_F),
    Scenario("scale_pp_ep_tensor_clipped", 4, pp_ep_scaling, dict(as_tensor=True), max_grad_norm=0.2, steps=1,
             functional=_F),
]
