"""Scenario builders for ``test_sharded_norms.py``, run inside the ranks (see ``_workers_common``).

Every builder is deterministic (same params and grads when called again, so the functional API can
run on a fresh copy) and returns a ``Setup``: the params under global keys, how to give them grads,
the optimizer's param groups, FusedStep's distributed arguments and the process groups that step()
must reduce over (label -> group), exactly once each per step.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ._workers_common import Scenario, Setup, build_module, randn

INF = math.inf


@functools.cache
def _mesh(shape: tuple, names: tuple):
    """One mesh per (shape, names) per process: new 2-D meshes create new process groups."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _world_group():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_group()


def _placements(spec: str):
    """'S0,R' -> (Shard(0), Replicate()); 'P' is Partial()."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    out = []
    for item in spec.split(","):
        item = item.strip()
        if item == "R":
            out.append(Replicate())
        elif item == "P":
            out.append(Partial())
        else:
            out.append(Shard(int(item[1:])))
    return tuple(out)


def _dparam(full: torch.Tensor, mesh, spec: str) -> nn.Parameter:
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank built the same full tensor, so no broadcast is needed.
    return nn.Parameter(distribute_tensor(full, mesh, _placements(spec), src_data_rank=None))


def _dgrad(full: torch.Tensor, mesh, spec: str):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, mesh, _placements(spec), src_data_rank=None)


def _partial_grad(full: torch.Tensor, mesh, spec: str):
    """A grad DTensor with a Partial placement: each rank on the Partial dim holds a weighted
    summand of ``full`` (weights differ per rank and sum to 1), sharded as ``spec`` says elsewhere."""
    from torch.distributed.tensor import DTensor

    items = spec.split(",")
    local = _dgrad(full, mesh, ",".join("R" if s == "P" else s for s in items)).to_local()
    coord = mesh.get_coordinate()
    for dim, item in enumerate(items):
        if item == "P":
            n = mesh.size(dim)
            weights = [1.0 / n + (i - (n - 1) / 2) * 0.5 / n for i in range(n)]  # e.g. 0.375, 0.625
            local = local * weights[coord[dim]]
    return DTensor.from_local(local, mesh, _placements(spec), shape=full.shape, stride=full.stride(), run_check=False)


def _dtensor_setup(specs, mesh, *, seed, gmag=1.0, pmag=1.0, grad_specs=None, groups, opt="SGD", hyper=None,
                   second_group=(), fused_kwargs=None):
    """Params ``key -> (shape, placements, dtype)`` on ``mesh`` with random full values; grads random
    full tensors with the param's placements (or ``grad_specs[key]``, 'P' for Partial)."""
    named = []
    for i, (key, (shape, spec, dtype)) in enumerate(specs.items()):
        named.append((key, _dparam(randn(shape, seed + i, pmag, dtype), mesh, spec)))
    grad_specs = grad_specs or {}

    def set_grads(t):
        for i, (key, p) in enumerate(named):
            shape, spec, dtype = specs[key]
            full = randn(shape, seed + 1000 + 100 * t + i, gmag, dtype)
            gspec = grad_specs.get(key, spec)
            p.grad = _partial_grad(full, mesh, gspec) if "P" in gspec else _dgrad(full, mesh, gspec)

    first = [k for k, _ in named if k not in second_group]
    opt_groups = [(first, dict(hyper or {}))]
    if second_group:
        opt_groups.append((list(second_group), dict(hyper or {}, lr=0.05)))
    return Setup(
        named=named,
        model_parts=[build_module(named)],
        set_grads=set_grads,
        opt_name=opt,
        opt_groups=opt_groups,
        groups=groups,
        fused_kwargs=fused_kwargs or {},
    )


# ----------------------------------------------------------------------------------------------
# FSDP2 (fully_shard) and HSDP
# ----------------------------------------------------------------------------------------------


def _fsdp_model(seed: int, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    # The last Linear has one output row: its weight [1, 8] and bias [1] have an empty local shard
    # on every rank but the first.
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _backward_grads(model: nn.Module, rank: int, seed: int, gain: float, prefix: str = ""):
    def set_grads(t):
        model.zero_grad(set_to_none=True)
        x = randn((5, model[0].in_features), seed * 100 + 10 * t + rank)  # different data on every rank
        (model(x).pow(2).sum() * gain).backward()

    return set_grads


def fsdp(rank, world_size, opt="SGD"):
    """FSDP2 fully_shard Shard(0) on a 1-D mesh; weights and biases in two param groups (two
    sharding groups on one process group: one stacked all_reduce)."""
    mesh = _mesh((world_size,), ("dp",))
    model = _fsdp_model(7, mesh)
    named = list(model.named_parameters())
    weights = [k for k, _ in named if k.endswith("weight")]
    biases = [k for k, _ in named if k.endswith("bias")]
    hyper = dict(momentum=0.9) if opt == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    return Setup(
        named=named,
        model_parts=[model],
        set_grads=_backward_grads(model, rank, 7, gain=3.0),
        opt_name=opt,
        opt_groups=[(weights, hyper), (biases, dict(hyper, lr=hyper.get("lr", 0.1) / 2, weight_decay=0.0))],
        groups={"dp": mesh.get_group()},
    )


def hsdp(rank, world_size):
    """HSDP: fully_shard on a 2-D (replicate, shard) mesh; only the shard dim is reduced over."""
    mesh = _mesh((2, world_size // 2), ("replicate", "shard"))
    model = _fsdp_model(11, mesh)
    return Setup(
        named=list(model.named_parameters()),
        model_parts=[model],
        set_grads=_backward_grads(model, rank, 11, gain=3.0),
        opt_groups=[([k for k, _ in model.named_parameters()], dict(momentum=0.9))],
        groups={"shard": mesh.get_group("shard")},
    )


# ----------------------------------------------------------------------------------------------
# DTensor placements: mixed on one mesh, TP on (dp, tp), Partial grads, many meshes
# ----------------------------------------------------------------------------------------------

F32, F64 = torch.float32, torch.float64


def mixed_1d(rank, world_size, gmag=1.0, pmag=1.0):
    """Shard(0) (uneven), Shard(1), Replicate and float64 params on one 1-D mesh; a second param
    group whose only param has an empty shard on rank 1 (a sharding group with nothing local)."""
    mesh = _mesh((world_size,), ("tp",))
    specs = {
        "a": ((7, 3), "S0", F32),  # 4 / 3 rows
        "f": ((5, 2), "S0", F32),
        "h": ((3,), "S0", F32),
        "i": ((9,), "S0", F32),
        "j": ((2, 3), "S0", F32),  # 5 tensors in one sharding group: buckets of 4 + a padded one
        "b": ((3, 5), "S1", F32),
        "c": ((4,), "R", F32),
        "e": ((6,), "S0", F64),
        "d": ((1, 4), "S0", F32),  # empty on rank 1; alone in param group 1
    }
    return _dtensor_setup(
        specs, mesh, seed=100, gmag=gmag, pmag=pmag, groups={"tp": mesh.get_group()},
        hyper=dict(momentum=0.9), second_group=("d",),
    )


def tp_2d(rank, world_size, gmag=1.0, pmag=1.0, opt="SGD"):
    """TP on a 2-D (dp, tp) mesh: colwise Shard(0) / rowwise Shard(1) on tp, Replicate norms,
    FSDP x TP (Shard, Shard), FSDP only (Shard, Replicate), a float64 param and a param with
    empty shards on 3 of 4 ranks; two param groups."""
    mesh = _mesh((2, world_size // 2), ("dp", "tp"))
    specs = {
        "colwise.weight": ((8, 6), "R,S0", F32),
        "colwise.bias": ((8,), "R,S0", F32),
        "rowwise.weight": ((6, 8), "R,S1", F32),
        "rowwise.bias": ((6,), "R,R", F32),
        "norm.weight": ((6,), "R,R", F32),
        "fsdp_tp.weight": ((8, 6), "S0,S1", F32),
        "fsdp.weight": ((5, 4), "S0,R", F32),
        "tiny.weight": ((1, 6), "S0,S0", F32),  # rank 0 holds the row, ranks 1-3 hold nothing
        "fsdp_tp.bias64": ((6,), "S0,S0", F64),
    }
    hyper = dict(momentum=0.9) if opt == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    return _dtensor_setup(
        specs, mesh, seed=200, gmag=gmag, pmag=pmag, opt=opt, hyper=hyper,
        groups={"dp": mesh.get_group("dp"), "tp": mesh.get_group("tp")},
        second_group=("rowwise.bias", "norm.weight"),
    )


def partial_grads(rank, world_size):
    """Grads that arrive Partial (a replicated LoRA-A-like param, and a dp-sharded param whose grad
    is Partial over tp) are redistributed to the param's placements before the norm."""
    if world_size == 2:
        mesh = _mesh((2,), ("tp",))
        specs = {"lora_a": ((4, 6), "R", F32), "sharded": ((8, 6), "S0", F32), "other": ((5,), "S0", F32)}
        grad_specs = {"lora_a": "P", "sharded": "P"}
        groups = {"tp": mesh.get_group()}
    else:
        mesh = _mesh((2, world_size // 2), ("dp", "tp"))
        specs = {
            "lora_a": ((4, 6), "R,R", F32),
            "sharded": ((8, 6), "S0,R", F32),
            "colwise": ((6, 4), "R,S0", F32),
        }
        grad_specs = {"lora_a": "R,P", "sharded": "S0,P"}
        groups = {"dp": mesh.get_group("dp"), "tp": mesh.get_group("tp")}
    return _dtensor_setup(specs, mesh, seed=300, grad_specs=grad_specs, groups=groups, hyper=dict(momentum=0.9))


def many_meshes(rank, world_size):
    """Params on five meshes. Two 1-D whole-world meshes share the default process group, and a
    1-D submesh shares its parent's group: those partials go into the same all_reduce."""
    # Built once per process (like _mesh): DTensor treats meshes of equal layout and names as
    # equal and may hand a rebuilt param an earlier, equal mesh object (and its process groups).
    m1, m5, m2, m3, m4 = (_mesh((4,), ("a",)), _mesh((4,), ("b",)), _mesh((2, 2), ("x", "y")),
                          _mesh((2, 2), ("u", "v")), _mesh((2, 2), ("p", "q")))
    m2y = m2["y"]
    layout = [
        ("m1.w", (6, 3), m1, "S0"),
        ("m2.w", (8, 6), m2, "S0,S1"),
        ("m3.w", (4, 4), m3, "R,S0"),
        ("m2y.w", (5, 2), m2y, "S0"),
        ("m4.w", (5, 3), m4, "S0,R"),
        ("m5.w", (3, 3), m5, "S1"),
    ]
    named = [(key, _dparam(randn(shape, 400 + i), mesh, spec)) for i, (key, shape, mesh, spec) in enumerate(layout)]

    def set_grads(t):
        for i, ((key, shape, mesh, spec), (_, p)) in enumerate(zip(layout, named)):
            p.grad = _dgrad(randn(shape, 1400 + 100 * t + i), mesh, spec)

    return Setup(
        named=named,
        model_parts=[build_module(named)],
        set_grads=set_grads,
        opt_groups=[([k for k, _ in named], dict(momentum=0.9))],
        groups={
            "world": _world_group(),
            "m2.x": m2.get_group("x"),
            "m2.y": m2.get_group("y"),
            "m3.v": m3.get_group("v"),
            "m4.p": m4.get_group("p"),
        },
    )


# ----------------------------------------------------------------------------------------------
# Pipeline parallel: different layers (and param counts) per stage
# ----------------------------------------------------------------------------------------------

_STAGES = {
    0: [("l0.weight", (5, 4)), ("l0.bias", (5,)), ("l1.weight", (4, 5)), ("l1.bias", (4,)), ("l2.weight", (3, 4))],
    1: [("head.weight", (2, 3))],
}


def pp_plain(rank, world_size):
    """world 2: rank = stage; plain tensors (5 params on stage 0, 1 on stage 1), pp_axis_name='pp'."""
    mesh = _mesh((world_size,), ("pp",))
    stage = rank
    named = [(f"stage{stage}.{name}", nn.Parameter(randn(shape, 500 + 10 * stage + i)))
             for i, (name, shape) in enumerate(_STAGES[stage])]

    def set_grads(t):
        for i, (key, p) in enumerate(named):
            p.grad = randn(p.shape, 1500 + 100 * t + 10 * stage + i, 2.0)

    return Setup(
        named=named,
        model_parts=[build_module([(k.split(".", 1)[1], p) for k, p in named])],
        set_grads=set_grads,
        opt_groups=[([k for k, _ in named], dict(momentum=0.9))],
        fused_kwargs=dict(device_mesh=mesh, pp_axis_name="pp"),
        groups={"pp": mesh.get_group("pp")},
        pp_mesh=mesh,
    )


def pp_fsdp(rank, world_size):
    """world 4: a (pp, dp) mesh; each stage is a different model, fully_shard over its dp submesh;
    stage 1 has fewer params, one of them with an empty shard on one rank."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh((2, world_size // 2), ("pp", "dp"))
    stage = mesh.get_coordinate()[0]
    dp_mesh = mesh["dp"]
    torch.manual_seed(600 + stage)
    if stage == 0:
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5))
    else:
        model = nn.Sequential(nn.Linear(6, 1))  # weight [1, 6], bias [1]: empty on dp rank 1
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    named = [(f"stage{stage}.{k}", p) for k, p in model.named_parameters()]
    return Setup(
        named=named,
        model_parts=[model],
        set_grads=_backward_grads(model, rank, 600 + stage, gain=2.0),
        opt_groups=[([k for k, _ in named], dict(momentum=0.9))],
        fused_kwargs=dict(device_mesh=mesh, pp_axis_name="pp"),
        groups={"dp": mesh.get_group("dp"), "pp": mesh.get_group("pp")},
        pp_mesh=mesh["pp"],
    )


# ----------------------------------------------------------------------------------------------
# Expert parallel
# ----------------------------------------------------------------------------------------------

_DENSE = [("layers.0.attn.weight", (5, 6)), ("layers.0.attn.bias", (5,)), ("layers.1.attn.weight", (5, 6))]


def _dense_plain(seed):
    """Replicated plain params (same values and grads on every rank)."""
    named = [(name, nn.Parameter(randn(shape, seed + i))) for i, (name, shape) in enumerate(_DENSE)]

    def set_grads(t):
        for i, (_, p) in enumerate(named):
            p.grad = randn(p.shape, seed + 1000 + 100 * t + i)

    return named, set_grads


def ep_dtensor(rank, world_size):
    """Stacked experts [n_experts, d_in, d_out] as DTensors Shard(0) on moe_mesh ('ep',): 4 experts
    (even), 3 (uneven; empty on rank 3 of 4) and 1 (empty on all but rank 0); replicated plain dense."""
    moe_mesh = _mesh((world_size,), ("ep",))
    experts = [
        ("layers.0.moe.w_gate_up", (4, 6, 5)),
        ("layers.0.moe.w_down", (3, 5, 6)),
        ("layers.1.moe.w_gate_up", (1, 6, 5)),
    ]
    named_e = [(k, _dparam(randn(shape, 700 + i), moe_mesh, "S0")) for i, (k, shape) in enumerate(experts)]
    named_d, dense_grads = _dense_plain(750)

    def set_grads(t):
        dense_grads(t)
        for i, (k, p) in enumerate(named_e):
            p.grad = _dgrad(randn(p.shape, 1700 + 100 * t + i), moe_mesh, "S0")

    named = named_d + named_e
    return Setup(
        named=named,
        model_parts=[build_module(named)],
        set_grads=set_grads,
        opt_groups=[([k for k, _ in named], dict(momentum=0.9))],
        fused_kwargs=dict(moe_mesh=moe_mesh, ep_axis_name="ep"),
        groups={"ep": moe_mesh.get_group("ep")},
    )


def _plain_experts(moe_mesh, seed, *, extra_on_first=True, grads_on=lambda coord: True, dtensor_dp=False):
    """Plain per-rank expert tensors: the local slice (dim 0, torch.chunk) of stacked experts, for
    this rank's EP coordinate. Recognised by name (``mlp``/``moe`` pattern) and by ``mark_experts``."""
    from compiled_step.experts import mark_experts

    names = moe_mesh.mesh_dim_names
    coord = moe_mesh.get_coordinate()[names.index("ep")]
    ep = moe_mesh.size(names.index("ep"))
    stacked = [
        ("layers.0.mlp.experts.gate_up_linear.weight0", (2 * ep, 6, 5)),
        ("layers.1.moe.experts.down_linear.weight0", (2 * ep - 1, 5, 6)),  # uneven: last EP rank holds 1
        ("layers.2.router.custom.w", (2 * ep, 3)),  # recognised only through mark_experts
    ]
    if extra_on_first and coord == 0:
        stacked.append(("layers.0.mlp.experts.gate_up_linear.bias0", (1, 5)))  # only EP rank 0 has it
    local = []
    for i, (name, shape) in enumerate(stacked):
        full = randn(shape, seed + i)
        chunks = full.chunk(ep, dim=0) if shape[0] >= ep else [full] + [full[:0]] * (ep - 1)
        local.append((name, chunks[coord].clone(), shape, i))
    named = []
    for name, value, shape, i in local:
        if dtensor_dp and name.startswith("layers.1."):
            # Experts FSDP-sharded over the dp dim only (their mesh lacks the EP axis).
            p = _dparam(value, moe_mesh["dp"], "S1")
        else:
            p = nn.Parameter(value)
        named.append((f"{name}@ep{coord}", name, p, shape, i))

    def set_grads(t):
        for key, name, p, shape, i in named:
            if not grads_on(coord):
                p.grad = None
                continue
            full = randn(shape, seed + 1000 + 100 * t + i, 2.0)
            chunks = full.chunk(ep, dim=0) if shape[0] >= ep else [full] + [full[:0]] * (ep - 1)
            g = chunks[coord].clone()
            p.grad = _dgrad(g, moe_mesh["dp"], "S1") if hasattr(p, "device_mesh") else g

    module = build_module([(name, p) for _, name, p, _, _ in named])
    mark_experts(module.layers.get_submodule("2.router.custom"))
    return [(key, p) for key, _, p, _, _ in named], module, set_grads


def ep_plain(rank, world_size):
    """Plain per-rank experts (name pattern, both mlp and moe, and mark_experts), uneven counts per
    rank; replicated plain dense params. world 4: moe_mesh (dp, ep) and some experts are DTensors
    sharded over dp only, so they are reduced over dp and EP."""
    if world_size == 2:
        moe_mesh = _mesh((2,), ("ep",))
        groups = {"ep": moe_mesh.get_group("ep")}
    else:
        moe_mesh = _mesh((2, world_size // 2), ("dp", "ep"))
        groups = {"dp": moe_mesh.get_group("dp"), "ep": moe_mesh.get_group("ep")}
    named_d, dense_grads = _dense_plain(800)
    named_e, experts_module, expert_grads = _plain_experts(moe_mesh, 850, dtensor_dp=world_size == 4)

    def set_grads(t):
        dense_grads(t)
        expert_grads(t)

    return Setup(
        named=named_d + named_e,
        model_parts=[build_module(named_d), experts_module],
        set_grads=set_grads,
        opt_groups=[([k for k, _ in named_d + named_e], dict(momentum=0.9))],
        fused_kwargs=dict(moe_mesh=moe_mesh, ep_axis_name="ep"),
        groups=groups,
    )


def some_grads_missing(rank, world_size):
    """Grads present on some ranks only: odd ranks have no expert grads at all, a DTensor param has
    a grad on rank 0 only, and a whole param group (DTensor + plain) has no grads anywhere. Plain
    SGD (no momentum, no weight decay), so a missing grad and a zero grad give the same update."""
    moe_mesh = _mesh((world_size,), ("ep",))
    named_d, dense_grads = _dense_plain(900)
    named_e, experts_module, expert_grads = _plain_experts(
        moe_mesh, 950, extra_on_first=False, grads_on=lambda coord: coord % 2 == 0
    )
    shared = ("shared.weight", _dparam(randn((6, 4), 990), moe_mesh, "S0"))
    frozen = [("frozen.weight", _dparam(randn((4, 4), 991), moe_mesh, "S1")),
              ("frozen.bias", nn.Parameter(randn((4,), 992)))]
    other = [shared] + frozen

    def set_grads(t):
        dense_grads(t)
        expert_grads(t)
        shared[1].grad = _dgrad(randn((6, 4), 1990 + t), moe_mesh, "S0") if rank == 0 else None
        for _, p in frozen:
            p.grad = None

    # _dgrad on rank 0 only: distribute_tensor with src_data_rank=None issues no collective.
    return Setup(
        named=named_d + named_e + other,
        model_parts=[build_module(named_d + other), experts_module],
        set_grads=set_grads,
        opt_groups=[([k for k, _ in named_d + named_e] + ["shared.weight"], {}), (["frozen.weight", "frozen.bias"], {})],
        fused_kwargs=dict(moe_mesh=moe_mesh, ep_axis_name="ep"),
        groups={"world": _world_group()},
    )


def ep_fsdp_separate(rank, world_size):
    """Dense model fully_shard on a 1-D dp mesh; experts DTensors on a separate moe_mesh
    (world 2: ('ep',); world 4: ('ep_shard', 'ep') with experts Shard(1) on ep_shard, Shard(0) on ep).
    1-D whole-world meshes share the default process group, so world 2 needs ONE all_reduce."""
    dp_mesh = _mesh((world_size,), ("dp",))
    model = _fsdp_model(13, dp_mesh)
    if world_size == 2:
        moe_mesh = _mesh((2,), ("ep",))
        spec = "S0"
        groups = {"world": _world_group()}
    else:
        moe_mesh = _mesh((2, world_size // 2), ("ep_shard", "ep"))
        spec = "S1,S0"
        groups = {"world": _world_group(), "ep_shard": moe_mesh.get_group("ep_shard"), "ep": moe_mesh.get_group("ep")}
    experts = [("moe.experts.w1", (4, 6, 5)), ("moe.experts.w2", (3, 5, 6))]
    named_e = [(k, _dparam(randn(shape, 1300 + i), moe_mesh, spec)) for i, (k, shape) in enumerate(experts)]
    dense_grads = _backward_grads(model, rank, 13, gain=3.0)

    def set_grads(t):
        dense_grads(t)
        for i, (_, p) in enumerate(named_e):
            p.grad = _dgrad(randn(p.shape, 2300 + 100 * t + i), moe_mesh, spec)

    named = list(model.named_parameters()) + named_e
    return Setup(
        named=named,
        model_parts=[model, build_module(named_e)],
        set_grads=set_grads,
        opt_groups=[([k for k, _ in named], dict(momentum=0.9))],
        fused_kwargs=dict(moe_mesh=moe_mesh, ep_axis_name="ep"),
        groups=groups,
    )


def ep_fsdp_2d(rank, world_size):
    """EP and FSDP on ONE 2-D mesh ('ep_shard', 'ep'): experts (Shard(1), Shard(0)), dense params
    (Shard(0), Shard(0)) and (Shard(0), Replicate)."""
    mesh = _mesh((2, world_size // 2), ("ep_shard", "ep"))
    specs = {
        "dense.weight": ((8, 6), "S0,S0", F32),
        "dense.bias": ((6,), "S0,R", F32),
        "moe.experts.w1": ((4, 6, 5), "S1,S0", F32),
        "moe.experts.w2": ((4, 5, 6), "S1,S0", F32),
        "moe.experts.w3": ((2, 3, 1), "S1,S0", F32),  # d_in 3 over 2 ranks: 2 / 1 rows
    }
    return _dtensor_setup(
        specs, mesh, seed=1400, hyper=dict(momentum=0.9),
        groups={"ep_shard": mesh.get_group("ep_shard"), "ep": mesh.get_group("ep")},
        fused_kwargs=dict(moe_mesh=mesh, ep_axis_name="ep"),
    )


def grads_none_adamw(rank, world_size):
    """AdamW (weight decay, moments, step counts) where some params have no grad at some steps (on
    every rank): torch.optim leaves those params and their state untouched, so must FusedStep, in
    the packed and the bucketed path alike. Includes a 0-d plain param."""
    mesh = _mesh((world_size,), ("dp",))
    specs = {
        "w1": ((8, 6), "S0", F32),
        "w2": ((6, 6), "S1", F32),
        "b1": ((8,), "S0", F32),
        "b2": ((6,), "R", F32),
    }
    setup = _dtensor_setup(specs, mesh, seed=1500, opt="AdamW", hyper=dict(lr=1e-2, weight_decay=0.1),
                           groups={"dp": mesh.get_group()})
    gain = ("gain", nn.Parameter(randn((), 1550)))
    setup.named = setup.named + [gain]
    setup.opt_groups[0][0].append("gain")
    setup.model_parts = [build_module(setup.named)]
    dtensor_grads = setup.set_grads
    missing = {0: (), 1: ("w2", "b1", "gain"), 2: ("b2",)}

    def set_grads(t):
        dtensor_grads(t)
        gain[1].grad = randn((), 1560 + t, 3.0)
        for key, p in setup.named:
            if key in missing[t]:
                p.grad = None

    setup.set_grads = set_grads
    return setup


def nonfinite_on_last_rank(rank, world_size, value=math.nan):
    """A NaN (or inf) grad element in the shard held by the LAST rank at step 0, finite grads at
    step 1. The global norm is non-finite, so every rank must skip step 0 (params and momentum
    untouched) and apply step 1."""
    mesh = _mesh((world_size,), ("dp",))
    specs = {"w": ((8, 6), "S0", F32), "b": ((8,), "S0", F32), "r": ((5,), "R", F32)}
    setup = _dtensor_setup(specs, mesh, seed=1600, hyper=dict(momentum=0.9, weight_decay=0.01),
                           groups={"dp": mesh.get_group()})
    finite_grads = setup.set_grads
    (_, w), = [(k, p) for k, p in setup.named if k == "w"]

    def set_grads(t):
        finite_grads(t)
        if t == 0:
            full = w.grad.full_tensor()
            full[-1, 2] = value  # the last row lives on the last rank
            w.grad = _dgrad(full, mesh, "S0")

    setup.set_grads = set_grads
    return setup


# ----------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------

NORM_TYPES = (2.0, 1.0, INF, 3.0)
_ALL_FUNCTIONAL = ("scale_grads_and_clip_grad_norm", "clip_grad_norm", "_clip_grad_norm_impl")
_EP_FUNCTIONAL = ("scale_grads_and_clip_grad_norm", "clip_grad_norm")  # _clip_grad_norm_impl knows no EP


def _p(p):
    return "inf" if math.isinf(p) else f"{p:g}"


SCENARIOS: list[Scenario] = []
for _p_ in NORM_TYPES:
    # The 1-norm of these grads is ~100x their 2-norm: clip at 20 so updates stay well visible.
    _max = 20.0 if _p_ == 1.0 else 1.0
    SCENARIOS += [
        Scenario(f"fsdp_w2_p{_p(_p_)}", 2, fsdp, norm_type=_p_, max_grad_norm=_max,
                 functional=_ALL_FUNCTIONAL if _p_ == 2.0 else ()),
        Scenario(f"fsdp_w4_p{_p(_p_)}", 4, fsdp, norm_type=_p_, max_grad_norm=_max, functional=()),
        Scenario(f"mixed_w2_p{_p(_p_)}", 2, mixed_1d, norm_type=_p_, max_grad_norm=_max, functional=()),
        Scenario(f"tp2d_w4_p{_p(_p_)}", 4, tp_2d, norm_type=_p_, max_grad_norm=_max,
                 functional=_ALL_FUNCTIONAL if _p_ == 2.0 else ()),
        # 1e30 grads: clipped to max_grad_norm. 1e-30 grads and params: no clipping, updates of 1e-31.
        Scenario(f"tp2d_w4_huge_p{_p(_p_)}", 4, tp_2d, options=dict(gmag=1e30), norm_type=_p_, max_grad_norm=_max,
                 functional=()),
        Scenario(f"tp2d_w4_tiny_p{_p(_p_)}", 4, tp_2d, options=dict(gmag=1e-30, pmag=1e-30), norm_type=_p_,
                 max_grad_norm=_max, magnitude=1e-30, clipped=False, functional=()),
    ]
SCENARIOS += [
    Scenario("mixed_w2_huge_p2", 2, mixed_1d, options=dict(gmag=1e30), functional=()),
    Scenario("mixed_w2_tiny_p2", 2, mixed_1d, options=dict(gmag=1e-30, pmag=1e-30), magnitude=1e-30, clipped=False,
             functional=()),
    Scenario("fsdp_w2_adamw", 2, fsdp, options=dict(opt="AdamW"), functional=()),
    Scenario("fsdp_w2_bucketed", 2, fsdp, pack_threshold=0, functional=()),
    Scenario("fsdp_w4_packed", 4, fsdp, options=dict(opt="AdamW"), pack_threshold=None, functional=()),
    Scenario("tp2d_w4_bucketed", 4, tp_2d, pack_threshold=0, functional=()),
    Scenario("tp2d_w4_packed_p3", 4, tp_2d, norm_type=3.0, pack_threshold=None, functional=()),
    Scenario("mixed_w2_noclip", 2, mixed_1d, max_grad_norm=None, functional=()),
    Scenario("grads_none_adamw_w2", 2, grads_none_adamw, steps=3, functional=()),
    Scenario("grads_none_adamw_w4_packed", 4, grads_none_adamw, steps=3, pack_threshold=None, functional=()),
    Scenario("grads_none_adamw_w4_bucketed", 4, grads_none_adamw, steps=3, pack_threshold=0, functional=()),
    Scenario("tp2d_w4_adamw", 4, tp_2d, options=dict(opt="AdamW"), functional=()),
    Scenario("hsdp_w4", 4, hsdp, functional=_ALL_FUNCTIONAL),
    Scenario("partial_w2", 2, partial_grads, functional=()),
    Scenario("partial_w4", 4, partial_grads, functional=_ALL_FUNCTIONAL),
    Scenario("many_meshes_w4", 4, many_meshes, functional=_ALL_FUNCTIONAL),
    Scenario("pp_w2", 2, pp_plain, functional=_ALL_FUNCTIONAL),
    Scenario("pp_fsdp_w4", 4, pp_fsdp, functional=_ALL_FUNCTIONAL),
    Scenario("pp_fsdp_w4_p3", 4, pp_fsdp, norm_type=3.0, functional=()),
    *[Scenario(f"nonfinite_nan_w2_p{_p(p)}", 2, nonfinite_on_last_rank, norm_type=p, functional=())
      for p in NORM_TYPES],
    Scenario("nonfinite_inf_w2_pinf", 2, nonfinite_on_last_rank, options=dict(value=INF), norm_type=INF,
             functional=()),
    Scenario("nonfinite_nan_w4_pinf", 4, nonfinite_on_last_rank, norm_type=INF, functional=()),
    Scenario("nonfinite_nan_w4_p2", 4, nonfinite_on_last_rank, functional=()),
    Scenario("ep_dtensor_w2", 2, ep_dtensor, functional=_EP_FUNCTIONAL),
    Scenario("ep_dtensor_w4", 4, ep_dtensor, functional=_EP_FUNCTIONAL),
    Scenario("ep_dtensor_w4_pinf", 4, ep_dtensor, norm_type=INF, functional=()),
    Scenario("ep_plain_w2", 2, ep_plain, functional=_EP_FUNCTIONAL),
    Scenario("ep_plain_w4", 4, ep_plain, functional=_EP_FUNCTIONAL),
    Scenario("ep_plain_w4_p1", 4, ep_plain, norm_type=1.0, max_grad_norm=20.0, functional=()),
    Scenario("ep_plain_w4_packed", 4, ep_plain, pack_threshold=None, functional=()),
    Scenario("pp_fsdp_w4_bucketed", 4, pp_fsdp, pack_threshold=0, functional=()),
    Scenario("some_grads_missing_w2", 2, some_grads_missing, functional=_EP_FUNCTIONAL),
    Scenario("some_grads_missing_w4", 4, some_grads_missing, functional=_EP_FUNCTIONAL),
    Scenario("ep_fsdp_separate_w2", 2, ep_fsdp_separate, functional=_EP_FUNCTIONAL),
    Scenario("ep_fsdp_separate_w4", 4, ep_fsdp_separate, functional=_EP_FUNCTIONAL),
    Scenario("ep_fsdp_2d_w4", 4, ep_fsdp_2d, functional=_EP_FUNCTIONAL),
]
