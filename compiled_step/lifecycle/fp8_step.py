"""FP8 weight scales computed by FusedStep: the amax comes out of the update, the scales follow it.

The bucketed update of an FP8 weight also writes the max |w| of the values it stores (same loop, no
extra read) into the plan's per-slot ``amax`` vector. After Phase B, one eager call gathers the FP8
weights' amax, MAX-reduces it over the mesh dims the weights are sharded on (one collective per
process group, NaN-preserving), and computes torchao's scales into persistent tensors
(``FusedStep.fp8_amax`` / ``fp8_scales``), which ``store`` then hands to torchao's FSDP2 float8
all-gather.
"""

from __future__ import annotations

import torch

from compiled_step import collectives
from compiled_step.lifecycle.fp8 import (
    _check_float8_dtype,
    find_float8_fsdp_weights,
    fp8_scales_from_amax,
    store_fp8_scales_for_fsdp,
)


class Fp8Weights:
    """The FP8 weights of a FusedStep and the scales it computes for them."""

    def __init__(self, model_parts, fp8_weights, fp8_dtype: torch.dtype, optimizer: torch.optim.Optimizer):
        # torchao float8 FSDP weights found in model_parts (their scales are stored where torchao's
        # all-gather reads them), or an explicit list of params (scales only exposed).
        self.targets = find_float8_fsdp_weights(model_parts)
        weights = [t.weight for t in self.targets] if fp8_weights is None else list(fp8_weights)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        stray = [i for i, w in enumerate(weights) if id(w) not in held]
        if stray:
            raise ValueError(f"fp8_weights[{stray[0]}] is not a param of the optimizer; FP8 scales are computed "
                             "from the weights the step updates")
        self.dtype = _check_float8_dtype(fp8_dtype)
        self.weights = weights
        self.amax: torch.Tensor | None = None  # float32 [n]: max |w| of each FP8 weight after the last step
        self.scales: torch.Tensor | None = None  # float32 [n]: their scales
        # Built with the plan (``calls``): the torchao targets ``store`` writes, and the int64 index of
        # their scales in ``scales``, on its device. Indexing with a Python list instead costs a
        # blocking host-to-device copy of the index every step.
        self.store_targets: list = []
        self.store_index: torch.Tensor | None = None

    @property
    def ids(self) -> frozenset[int]:
        return frozenset(map(id, self.weights))

    def __bool__(self) -> bool:
        return bool(self.weights)

    def calls(self, plan, buffers) -> list[tuple[str, str, object, tuple]]:
        """The program's FP8 calls for ``plan``, as ``(kind, label, fn, args)``: gather the weights'
        amax from ``buffers.amax``, one MAX all-reduce per process group the weights are sharded over,
        then the scales. They write ``self.amax`` and ``self.scales`` in place."""
        device = plan.device
        where = {}
        for g, group in enumerate(plan.groups):
            for p, entry in zip(group.params, group.entries):
                where[id(p)] = (g, entry.slot, p.dtype)
        slots = torch.tensor([where[id(w)][1] for w in self.weights], device=device)
        by_group: dict[int, list[int]] = {}
        for position, w in enumerate(self.weights):
            by_group.setdefault(where[id(w)][0], []).append(position)
        dtypes = {where[id(w)][2] for w in self.weights}
        weight_dtype = dtypes.pop() if len(dtypes) == 1 else None
        if self.amax is None or self.amax.device != device:
            self.amax = torch.zeros(len(self.weights), dtype=torch.float32, device=device)
            self.scales = torch.zeros(len(self.weights), dtype=torch.float32, device=device)
        amax, scales = self.amax, self.scales
        position = {id(w): i for i, w in enumerate(self.weights)}
        self.store_targets = [t for t in self.targets if id(t.weight) in position]
        self.store_index = torch.tensor([position[id(t.weight)] for t in self.store_targets], dtype=torch.int64,
                                        device=device)
        calls = [("eager", f"FP8: gather the amax of {len(self.weights)} FP8 weights", _gather, (buffers.amax, slots, amax))]
        for reduction in plan.reductions:
            if not reduction.over_shards:
                continue  # EP ranks hold different experts: their amax must not be mixed
            positions = [i for m in reduction.members for i in by_group.get(m, [])]
            if positions:
                calls.append(("collective", f"all_reduce(MAX) over {reduction.label!r}: f32[{len(positions)}] (amax of "
                              "the FP8 weights)", _reduce,
                              (reduction, amax, torch.tensor(positions, device=device))))
        calls.append(("eager", "FP8: scales from the amax (torchao's formula)", _scales,
                      (amax, scales, self.dtype, weight_dtype)))
        return calls

    def store(self) -> None:
        """Hand the scales to torchao's FSDP2 float8 all-gather (0-d views of one gather of
        ``self.scales`` in the targets' order, by the index built with the plan: no host transfer)."""
        if not self.store_targets or self.scales is None:
            return
        store_fp8_scales_for_fsdp(self.store_targets, self.scales.index_select(0, self.store_index))


def _gather(per_slot: torch.Tensor, slots: torch.Tensor, amax: torch.Tensor) -> None:
    amax.copy_(per_slot.index_select(0, slots))


def _reduce(reduction, amax: torch.Tensor, positions: torch.Tensor) -> None:
    amax.index_copy_(0, positions, collectives.reduce_amax(amax.index_select(0, positions), reduction))


def _scales(amax: torch.Tensor, scales: torch.Tensor, float8_dtype: torch.dtype, weight_dtype) -> None:
    scales.copy_(fp8_scales_from_amax(amax, float8_dtype=float8_dtype, weight_dtype=weight_dtype))
