"""The reference configurations, one file ``graphs/<name>.txt`` each: their tensors (plain, FSDP2, TP,
EP, FP8, Muon + AdamW layouts), optimizers and FusedStep options, and the one-process world the
distributed ones run in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

REFERENCE_BUCKET_SIZE = 4
LARGE_SHAPE = (128, 256)  # 32768 elements: above FusedStep's default pack_threshold (16384)
N_LARGE = REFERENCE_BUCKET_SIZE  # exactly one full bucket per sharding group (where they are bucketed)
SMALL_SHAPES = ((256,), (256,), (128,))  # biases and norm weights: staged when not aliased
GRAD_SCALE = 3.0  # grads ~ N(0, 9): the total norm is ~1e3, so clipping at 1.0 is active


@dataclass
class Setup:
    """The tensors and FusedStep arguments of one configuration (built inside the capture world)."""

    params: list[torch.nn.Parameter]
    grads: Callable[[int], list[torch.Tensor]]  # step -> grads, in the params' placements
    fused_kwargs: dict[str, Any] = field(default_factory=dict)
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # With several optimizers (``Reference.more_optimizers``): the params of each, in the optimizers'
    # order. None: every param goes to the one optimizer.
    optimizer_params: list[list[torch.nn.Parameter]] | None = None


def _values(shapes, dtype, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen) * scale).to(dtype) for shape in shapes]


def _shapes(n_large: int = N_LARGE, small: Sequence[tuple[int, ...]] = SMALL_SHAPES):
    return [LARGE_SHAPE] * n_large + list(small)


def plain_layout(dtype: torch.dtype, device: str = "cpu", shapes: Sequence[tuple[int, ...]] | None = None,
                 grad_dtype: torch.dtype | None = None) -> Setup:
    """Plain tensors on one device: all aliased into the flat buffers; no reductions."""
    shapes = list(shapes) if shapes is not None else _shapes()
    params = [torch.nn.Parameter(t.to(device)) for t in _values(shapes, dtype, seed=0)]
    grad_dtype = grad_dtype or dtype
    if grad_dtype != dtype:
        for p in params:
            p.grad_dtype = grad_dtype
    return Setup(params, lambda step: [g.to(device) for g in _values(shapes, grad_dtype, 1000 + step, GRAD_SCALE)],
                 notes=["params: plain tensors: FusedStep aliases all of them into its flat buffers (p.data becomes "
                        "a view), so one flat update covers them"])


def _dtensor_setup(dtype: torch.dtype, mesh, placements, notes: list[str]) -> Setup:
    from torch.distributed.tensor import distribute_tensor

    shapes = _shapes()
    params = [torch.nn.Parameter(distribute_tensor(t, mesh, placements)) for t in _values(shapes, dtype, seed=0)]

    def grads(step):
        return [distribute_tensor(g, mesh, placements) for g in _values(shapes, dtype, 1000 + step, GRAD_SCALE)]

    notes = notes + ["DTensor params stay where they are: the 4 large shards are bucketed (one full bucket of 4), "
                     "the 3 small ones are staged (copied into the flat buffer around the flat update)"]
    return Setup(params, grads, notes=notes)


def fsdp2_shard0_layout(dtype: torch.dtype) -> Setup:
    """FSDP2-style params: DTensors ``Shard(0)`` on a 1-D mesh named ``dp_shard``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
    return _dtensor_setup(dtype, mesh, [Shard(0)], notes=[
        "params: DTensors with placements (Shard(dim=0),) on a 1-D DeviceMesh ('dp_shard',) of size 1",
    ])


def tp_replicate_shard_layout(dtype: torch.dtype) -> Setup:
    """TP params of an HSDP-style 2-D mesh: ``Replicate()`` over ``dp_replicate``, ``Shard(0)`` over ``tp``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp_replicate", "tp"))
    return _dtensor_setup(dtype, mesh, [Replicate(), Shard(0)], notes=[
        "params: DTensors with placements (Replicate(), Shard(dim=0)) on a 2-D DeviceMesh ('dp_replicate', 'tp') "
        "of shape (1, 1); the norm is reduced over 'tp' only (a Replicate dim holds copies, not parts)",
    ])


def fp8_amax_layout(dtype: torch.dtype) -> Setup:
    """FSDP2 ``Shard(0)`` params whose 4 large weights are FP8 weights (``fp8_weights=``): their update
    also returns max|w| of the stored values, MAX-reduced over the shards for the FP8 scales."""
    setup = fsdp2_shard0_layout(dtype)
    setup.fused_kwargs = dict(fp8_weights=setup.params[:N_LARGE])
    setup.notes.append("fp8_weights: the 4 large params (FP8 weights are always bucketed and form their own sharding "
                       "group: group 0; the 3 small params form group 1, staged), fp8_dtype=torch.float8_e4m3fn")
    return setup


class _Experts(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.experts = torch.nn.ParameterList(params)


def ep_experts_layout(dtype: torch.dtype) -> Setup:
    """Expert params: DTensors ``Shard(0)`` on the MoE mesh's ``ep`` axis, with NeMo Automodel's EP and PP
    scaling (``num_label_tokens``/``dp_group_size``) and a pipeline axis reduced over last."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    moe_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    pp_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("pp",))
    setup = _dtensor_setup(dtype, moe_mesh, [Shard(0)], notes=[
        "params: expert DTensors with placements (Shard(dim=0),) on the MoE DeviceMesh ('ep',) of size 1 "
        "(recognised as experts by the ep axis)",
        "device_mesh ('pp',) of size 1 with pp_axis_name='pp': PP scaling and a last reduction over 'pp'",
        "step(num_label_tokens=4096, dp_group_size=1): grads x 1/(4096/1) (PP), experts also x 1/ep_ratio "
        "(ep_ratio = dp_group_size / ep_shard_size x expert_tp_replication_factor = 1); the factor is the group's "
        "scale, folded into Phase A and the finish (no extra pass)",
    ])
    setup.fused_kwargs = dict(model_parts=[_Experts(setup.params)], device_mesh=pp_mesh, pp_axis_name="pp",
                              moe_mesh=moe_mesh, ep_axis_name="ep")
    setup.step_kwargs = dict(num_label_tokens=4096, dp_group_size=1)
    return setup


# Muon + AdamW: Muon on the hidden matrices (three stacks: square, wide and tall, two matrices each, so
# every stack is batched and the tall one is transposed), AdamW on the rest (an embedding-like matrix,
# biases, norm weights), as a transformer trainer splits them.
MUON_SHAPES = ((64, 64), (64, 64), (64, 128), (64, 128), (128, 64), (128, 64))
ADAMW_SHAPES = ((256, 64), (128,), (64,), (64,), (64,))


def muon_adamw_layout(dtype: torch.dtype) -> Setup:
    """Plain tensors: the hidden matrices for Muon (``optimizer_params[0]``), the rest for AdamW."""
    setup = plain_layout(dtype, shapes=MUON_SHAPES + ADAMW_SHAPES)
    n = len(MUON_SHAPES)
    setup.optimizer_params = [setup.params[:n], setup.params[n:]]
    shapes = ", ".join("x".join(map(str, s)) for s in dict.fromkeys(MUON_SHAPES))
    setup.notes = [
        f"params: plain tensors. Muon: the {n} hidden matrices, 2 of each shape ({shapes}): one matrix stack per "
        "shape, each orthogonalized whole by one batched update_matrices call (group 0). AdamW: the "
        f"{len(ADAMW_SHAPES)} others, an embedding-like 256x64 matrix, a bias and three norm weights, aliased into "
        "one flat buffer (one flat update, group 1)",
        "one global norm over both optimizers' grads clips both; the finish fills each slot's scalars by its "
        "optimizer's rule",
    ]
    return setup


@dataclass(frozen=True)
class Reference:
    """One reference configuration: a file ``graphs/<name>.txt``.

    To add one, append a ``Reference`` to ``REFERENCES``, run ``python -m compiled_step graphs`` and
    commit the new file. ``family``: configurations of one family share compiled graphs, so they must
    have the same buffer sizes (the capture checks it and raises otherwise); give a configuration
    with other sizes a family of its own. ``more_optimizers``: the optimizers after the first, each
    ``(class, kwargs)``, for one ``FusedStep([first, ...])``; the layout's ``Setup.optimizer_params``
    says which params each takes.
    """

    name: str
    title: str
    optimizer: type
    optimizer_kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: torch.dtype = torch.float32
    max_grad_norm: float | None = 1.0
    norm_type: float = 2.0
    layout: Callable[[torch.dtype], Setup] = plain_layout
    distributed: bool = False  # needs the one-process gloo world
    family: str = "plain"
    more_optimizers: tuple[tuple[type, tuple[tuple[str, Any], ...]], ...] = ()

    @property
    def optimizer_specs(self) -> tuple[tuple[type, tuple[tuple[str, Any], ...]], ...]:
        return ((self.optimizer, self.optimizer_kwargs), *self.more_optimizers)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return self.optimizer(params, **dict(self.optimizer_kwargs))

    def make_optimizers(self, setup: Setup) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        """What ``FusedStep`` takes: the optimizer, or with ``more_optimizers`` the list of them."""
        if not self.more_optimizers:
            return self.make_optimizer(setup.params)
        if setup.optimizer_params is None or len(setup.optimizer_params) != len(self.optimizer_specs):
            raise ValueError(f"{self.name}: {len(self.optimizer_specs)} optimizers need the layout's "
                             "Setup.optimizer_params, one list of params per optimizer")
        return [cls(params, **dict(kwargs)) for (cls, kwargs), params in zip(self.optimizer_specs,
                                                                             setup.optimizer_params)]

    def describe_optimizer(self) -> str:
        described = [f"torch.optim.{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs)})"
                     for cls, kwargs in self.optimizer_specs]
        return described[0] if len(described) == 1 else f"[{', '.join(described)}]"


_ADAMW = (("lr", 1e-3), ("weight_decay", 0.1))
_MUON = (("lr", 2e-2), ("momentum", 0.95), ("nesterov", True), ("weight_decay", 0.1))

REFERENCES: tuple[Reference, ...] = (
    Reference("adamw_fp32", "AdamW, fp32, clipped (the reference configuration)", torch.optim.AdamW, _ADAMW),
    Reference("adamw_bf16", "AdamW with bf16 params, grads and state", torch.optim.AdamW, _ADAMW,
              dtype=torch.bfloat16),
    Reference("adam_amsgrad", "Adam with amsgrad", torch.optim.Adam,
              (("lr", 1e-3), ("weight_decay", 0.01), ("amsgrad", True))),
    Reference("sgd_nesterov", "SGD with nesterov momentum", torch.optim.SGD,
              (("lr", 1e-2), ("momentum", 0.9), ("nesterov", True), ("weight_decay", 1e-4))),
    Reference("adamw_fp32_unclipped", "AdamW, fp32, not clipped (max_grad_norm=None)", torch.optim.AdamW, _ADAMW,
              max_grad_norm=None),
    Reference("fsdp2_shard0", "AdamW, fp32, an FSDP2 Shard(0) sharding group", torch.optim.AdamW, _ADAMW,
              layout=fsdp2_shard0_layout, distributed=True, family="dtensor"),
    Reference("tp_replicate_shard", "AdamW, fp32, a TP Replicate + Shard sharding group", torch.optim.AdamW, _ADAMW,
              layout=tp_replicate_shard_layout, distributed=True, family="dtensor"),
    Reference("ep_experts", "AdamW, fp32, an expert sharding group with EP scaling (and PP)", torch.optim.AdamW,
              _ADAMW, layout=ep_experts_layout, distributed=True, family="dtensor"),
    Reference("fp8_amax", "AdamW, fp32, FSDP2 Shard(0), FP8 weights: amax of the new weights inside the update",
              torch.optim.AdamW, _ADAMW, layout=fp8_amax_layout, distributed=True, family="fp8"),
    Reference("muon_adamw", "Muon on the hidden matrices + AdamW on the rest, fp32, clipped by one global norm",
              torch.optim.Muon, _MUON, more_optimizers=((torch.optim.AdamW, _ADAMW),), layout=muon_adamw_layout,
              family="muon_adamw"),
)


@contextlib.contextmanager
def single_rank_world():
    """A one-process gloo world (rank 0 of 1, in-memory store), unless one is already up."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("reference configurations are captured in a one-rank world; this process group "
                               f"has {dist.get_world_size()} ranks")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
