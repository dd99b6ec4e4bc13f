"""The layout of a matrix group (a rule of ``KIND = MATRIX``: Muon): stacks of whole matrices.

Pure Python over the params' metadata, like ``planning.py`` (which calls ``lay_out`` for such groups):

* every param of the group lives in the flat regions (aliased, or staged when FusedStep may not move
  it), ordered by shape, so that same-shape matrices follow each other in whole rows: each run of
  them is a ``Stack``, a strided ``[n, rows, cols]`` view of the buffers (``storage.py``) that one
  compiled call updates;
* each matrix is followed by at least one padding element, so no stack is contiguous (Dynamo would
  compile one graph for stacks whose matrices fill whole rows and another for the rest);
* each stack's slots start at a multiple of ``SLOT_ALIGN``;
* row-sharded matrices (FSDP2's ``Shard(0)``, torch.chunk's split) keep their rows on every rank;
  the group's ``Exchange`` names the process group over which an all-to-all brings each matrix to
  the rank that orthogonalizes it (matrix k: rank k % W) and its rows back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compiled_step.planning import ALIASED, STAGED, Entry, ShardingGroup, _owns_storage, align, dense_strides, \
    is_dtensor, local_tensor, rows_for


@dataclass(frozen=True)
class Stack:
    """Same-shape matrices of a matrix group, one after the other in whole rows of the flat buffers."""

    shape: tuple[int, int]
    strides: tuple[int, int]  # each matrix's strides (the params' own layout)
    first_row: int
    rows_per_matrix: int
    members: tuple[int, ...]  # indices into ShardingGroup.params, in buffer order
    first_slot: int  # the members' slots are first_slot, first_slot + 1, ...
    # Row-sharded matrices (FSDP2's Shard(0)): each rank holds ``shape`` = (its rows, cols) of matrices
    # of ``global_rows`` rows, in chunks of ``chunk`` rows over ``world`` ranks (torch.chunk's split).
    global_rows: int | None = None
    chunk: int = 0
    world: int = 1

    @property
    def per_owner(self) -> int:
        """Matrices each rank orthogonalizes for this stack (matrix k's owner is rank k % world)."""
        return -(-len(self.members) // self.world)


# How many matrices one compiled Newton-Schulz call takes. Batching same-shape matrices saves launches, but a
# call holds the temporaries of all its matrices at once (and under CUDA graphs the pool keeps that peak for
# good), while torch's Muon holds one matrix's, briefly. So a call holds at most CALL_FRACTION of the group's
# param bytes of temporaries, at most CALL_CAP (bounded whatever the number of matrices), at least CALL_FLOOR
# (small matrices stay batched), and always at least one matrix: its peak stays within 5% of the param bytes
# of torch's per-matrix one (tests/test_muon_memory.py checks 10%).
CALL_FRACTION = 0.05
CALL_FLOOR = 1 << 20
CALL_CAP = 64 << 20


def call_chunks(count: int, matrix_bytes: int, group_bytes: int) -> list[tuple[int, int]]:
    """``(first, how many)`` of each call over a stack of ``count`` matrices, each holding ``matrix_bytes`` of
    temporaries while it is updated, in a group of ``group_bytes`` param bytes. Every call but the last takes
    the same number of matrices; the last, fewer, runs the same graph (the leading dim is a symbol)."""
    budget = max(CALL_FLOOR, min(CALL_CAP, int(CALL_FRACTION * group_bytes)))
    per_call = max(1, budget // matrix_bytes)
    return [(first, min(per_call, count - first)) for first in range(0, count, per_call)]


def group_param_bytes(group: ShardingGroup) -> int:
    """The bytes of a matrix group's params on this rank (its stacks' matrices)."""
    itemsize = group.key.dtype.itemsize
    return sum(len(st.members) * st.shape[0] * st.shape[1] * itemsize for st in group.stacks)


@dataclass(frozen=True)
class Exchange:
    """The all-to-all of a row-sharded matrix group: whole matrices to their owners and back.

    Shaped like a ``Reduction`` where the program's collectives are inspected (``process_group``,
    ``device_type``, ``label``).
    """

    process_group: object
    device_type: str
    label: str
    world: int


def lay_out(group: ShardingGroup, first_slot: int, flat_params: bool) -> int:
    """A matrix group: every param in the flat regions, same shapes together (stacks); returns the next slot."""
    sharding = _sharding(group)
    order = sorted(range(len(group.params)), key=lambda i: (tuple(group.params[i].shape),
                                                             dense_strides(local_tensor(group.params[i])), i))
    entries: dict[int, Entry] = {}
    row, slot = 0, first_slot
    runs: dict[tuple, list[int]] = {}
    for i in order:
        local = local_tensor(group.params[i])
        runs.setdefault((tuple(group.params[i].shape), tuple(local.shape), dense_strides(local)), []).append(i)
    for (global_shape, shape, strides), members in runs.items():
        slot = align(slot)
        # At least one padding element after each matrix, so no stack is contiguous: Dynamo would
        # otherwise compile one graph for stacks whose matrices fill whole rows and one for the rest.
        per = rows_for(shape[0] * shape[1] + 1)
        shard = {} if sharding is None else dict(global_rows=global_shape[0], world=sharding.world,
                                                 chunk=-(-global_shape[0] // sharding.world))
        group.stacks.append(Stack(shape, strides, row, per, tuple(members), slot, **shard))
        for i in members:
            p = group.params[i]
            region = ALIASED if flat_params and type(p) in (torch.Tensor, torch.nn.Parameter) and \
                _owns_storage(p) else STAGED
            entries[i] = Entry(i, region, row, shape[0] * shape[1], slot)
            row += per
            slot += 1
    group.exchange = sharding
    group.flat = [i for s in group.stacks for i in s.members]
    group.flat_rows = group.rows = group.grad_rows = row
    group.first_slot, group.flat_slots = first_slot, slot - first_slot
    group.bucket_stride = align(1)
    group.slots = align(group.flat_slots)
    group.entries = [entries[i] for i in range(len(group.params))]
    return first_slot + group.slots


def _sharding(group: ShardingGroup) -> Exchange | None:
    """The all-to-all of a matrix group whose params are row-sharded (one Shard(0), the rest
    Replicate); None for whole matrices. Raises ``ValueError`` for what Muon cannot update."""
    exchange = None
    for p, name in zip(group.params, group.names):
        if p.ndim != 2:
            raise ValueError(f"{name}: a matrix rule (Muon) updates 2-D params only, got shape {tuple(p.shape)}")
        if group.key.fp8:
            raise ValueError(f"{name}: FP8 weights are not supported with Muon")
        if not is_dtensor(p) or not any(pl.is_shard() for pl in p.placements):
            continue
        shards = [d for d, pl in enumerate(p.placements) if pl.is_shard()]
        if len(shards) != 1 or p.placements[shards[0]].dim != 0 or any(pl.is_partial() for pl in p.placements):
            raise ValueError(f"{name}: Muon needs whole matrices; it gathers row-sharded ones (one Shard(0) mesh "
                             f"dim, as FSDP2 shards), but this param has placements {p.placements}")
        mesh, dim = p.device_mesh, shards[0]
        world, rank = mesh.size(dim), mesh.get_local_rank(dim)
        chunk = -(-p.shape[0] // world)
        rows = max(0, min(chunk, p.shape[0] - rank * chunk))
        if tuple(local_tensor(p).shape) != (rows, p.shape[1]):
            raise ValueError(f"{name}: Muon expects torch.chunk's row split ({rows} of {p.shape[0]} rows on this "
                             f"rank), got a local shard of shape {tuple(local_tensor(p).shape)}")
        names = mesh.mesh_dim_names
        exchange = Exchange(mesh.get_group(mesh_dim=dim), mesh.device_type,
                            names[dim] if names else f"mesh dim {dim}", world)
    return exchange
