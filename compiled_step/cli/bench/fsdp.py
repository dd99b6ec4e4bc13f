"""The FSDP2 row: a layout's params as FSDP2 shards, in this one process (gloo, world size 1).

Why one rank is enough: the row is there to show what the step issues for sharded params (their
compiled calls, ATen ops and, on CUDA, kernel launches), not to time a collective. With one rank
every shard is the whole tensor, but the params are ``fully_shard``'s DTensors: FusedStep cannot move
them into its flat buffer, so small ones are staged and large ones updated in buckets, as on N ranks.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Iterator

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench.errors import BenchError


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[object]:
    """The default process group (gloo, world size 1, a ``FileStore`` in a private directory) and a
    one-rank DeviceMesh on ``device``. An existing default group of one rank is used (and kept); one of
    several ranks is refused: the row's grads are whole tensors."""
    import torch.distributed as dist  # noqa: PLC0415 -- only this row needs it
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    owned = not dist.is_initialized()
    if not owned and dist.get_world_size() != 1:
        raise BenchError(f"the fsdp2 row runs on one rank; this process is one of {dist.get_world_size()} "
                         "(drop fsdp2 from --rows, or run the bench without a launcher)")
    with tempfile.TemporaryDirectory() as tmp:
        if owned:
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield init_device_mesh(device.type, (1,))
        finally:
            if owned:
                dist.destroy_process_group()


def shard(layout: L.Layout, params: list[torch.Tensor], mesh) -> list[torch.Tensor]:
    """``params`` (in ``layout`` order) as a module's params, ``fully_shard``'ed per block (``h0.``...)
    and at the root like a trainer does; returns the sharded params in ``layout`` order."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    root = torch.nn.Module()
    blocks: dict[str, torch.nn.Module] = {}
    where = []
    for spec, p in zip(layout.specs, params):
        head, _, rest = spec.name.partition(".")
        owner = root
        if rest:  # a block's param: the block is its own FSDP unit
            owner = blocks.get(head)
            if owner is None:
                owner = blocks[head] = torch.nn.Module()
                root.add_module(head, owner)
        name = (rest or head).replace(".", "_")
        owner.register_parameter(name, torch.nn.Parameter(p.detach()))
        where.append((owner, name))
    for block in blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)
    return [getattr(owner, name) for owner, name in where]


def sharded_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g`` (the whole grad) as ``p``'s grad: a DTensor over this rank's shard for a DTensor ``p``."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    if not isinstance(p, DTensor):
        return g
    return DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

