"""The layout of a matrix group (a rule of ``KIND = MATRIX``: Muon, Adafactor): stacks of whole same-shape params.

The data types and the sizing of the calls; ``planning.py`` lays such groups out (``planning._lay_out_stacks``),
and this module imports nothing of the package, so the two do not import each other:

* every param of the group lives in the flat regions (aliased, or staged when FusedStep may not move
  it), ordered by shape, so that same-shape params follow each other in whole rows: each run of
  them is a ``Stack``, a strided ``[n, *shape]`` view of the buffers (``storage.py``) that one
  compiled call updates (``[n, rows, cols]`` for Muon's matrices);
* each matrix is followed by at least one padding element, so no stack is contiguous (Dynamo would
  compile one graph for stacks whose matrices fill whole rows and another for the rest);
* each stack's slots start at a multiple of ``SLOT_ALIGN``;
* row-sharded matrices (FSDP2's ``Shard(0)``, torch.chunk's split) keep their rows on every rank;
  the group's ``Exchange`` names the process group over which an all-to-all brings each matrix to
  the rank that orthogonalizes it (matrix k: rank k % W) and its rows back.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    """Same-shape params of a matrix group (matrices for Muon), one after the other in whole rows of the flat
    buffers."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]  # each matrix's strides (the params' own layout)
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
    def whole_shape(self) -> tuple[int, ...]:
        """The shape of the whole params (the rows of every rank for row-sharded matrices)."""
        return self.shape if self.global_rows is None else (self.global_rows, *self.shape[1:])

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


def group_param_bytes(group) -> int:
    """The bytes of a matrix group's params on this rank (its stacks' matrices; ``group``: a
    ``planning.ShardingGroup``)."""
    itemsize = group.key.dtype.itemsize
    return sum(len(st.members) * numel(st.shape) * itemsize for st in group.stacks)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


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
