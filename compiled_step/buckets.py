"""Fixed-length buckets: the one home of list padding, for every compiled call over a list of tensors.

A compiled function over a list of B tensors with symbolic sizes is compiled once and called N/B
times, so compile time does not grow with the model. The last bucket of a list is padded to B with
one-element scratch tensors: their grads are zero and their slots inactive, so they add nothing to a
norm and are never updated. FusedStep's bucket updates (params FusedStep may not move) and the
functional API's partial norms (the caller's own grads) both pad here.
"""

from __future__ import annotations

import torch

from compiled_step.planning import ROW


def chunk(n: int, size: int) -> list[range]:
    """Index ranges of consecutive buckets of at most ``size`` items."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def row_slab(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, ROW]`` zero buffer starting one row into its storage (see ``storage.LEAD``)."""
    raw = torch.zeros((rows + 1) * ROW, dtype=dtype, device=device)
    return raw[ROW:].view(rows, ROW).detach()


class Fillers:
    """Scratch tensors that pad a bucket to ``size``, made once per (device, dtypes, kinds, size).

    Each slot gets its own tensors: Dynamo guards on which inputs alias, so reusing one tensor would
    compile another graph. ``"params"`` and ``"external_grads"`` fillers are allocations of their own
    (storage offset 0, like most param shards and the aliases of external grads); the others start a
    row of a slab, like the views of FusedStep's grad and
    state buffers they stand in for (storage offsets >= 2: Dynamo specialises offsets 0 and 1).
    """

    def __init__(self):
        self._made: dict[tuple, dict[str, list[torch.Tensor]]] = {}

    def get(self, device: torch.device, dtypes: dict[str, torch.dtype], size: int) -> dict[str, list[torch.Tensor]]:
        made_key = (device, tuple(dtypes.items()), size)
        made = self._made.get(made_key)
        if made is None:
            made = {}
            for kind, dtype in dtypes.items():
                if kind in ("params", "external_grads"):  # allocations of their own, as they are
                    made[kind] = [torch.zeros(1, dtype=dtype, device=device) for _ in range(size)]
                else:
                    slab = row_slab(size, dtype, device)
                    made[kind] = [slab.view(-1)[i * ROW: i * ROW + 1].detach() for i in range(size)]
            self._made[made_key] = made
        return made


def padded(items: list, fillers: list, size: int) -> list:
    """``items`` followed by as many ``fillers`` as make ``size``."""
    missing = size - len(items)
    return list(items) + list(fillers[:missing]) if missing > 0 else list(items)
