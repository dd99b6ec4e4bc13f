"""The step's persistent tensors, built once per plan: flat buffers, the views users see, the vectors.

For every sharding group (see ``planning.py`` for the layout):

* ``params``: ``[flat_rows, ROW]`` in the param dtype. Aliased params' ``.data`` are views of it;
  staged params are copied in and out around the flat update.
* ``grads``: ``[rows, ROW]`` in the grad dtype, every grad of the group. ``p.grad`` is a view of it
  (a DTensor over the view for DTensor params) with the param's shape and memory layout, so autograd
  and FSDP2 accumulate into it in place and Phase A reads one buffer.
* ``state[key]``: ``[rows, ROW]`` per optimizer state key (``exp_avg``...), in the param dtype.
  ``optimizer.state[p][key]`` are views of it, in torch's format (the param's shape, layout and
  DTensor-ness), so ``optimizer.step()``, ``state_dict()`` and ``load_state_dict()`` see ordinary
  tensors. A state tensor that is not such a view (a loaded checkpoint, a user's assignment, new
  state torch.optim created) is *adopted*: copied into the buffer, and replaced by the view.

For the whole plan (``StepBuffers``): the per-slot vectors (counts, active flags, the group of each
slot, the table of per-tensor scalars), the group hyperparameters, the partial norms and the
outputs of the finish. Adam's ``state[p]["step"]`` is a 0-d view of ``counts``.

Every element pairs with the same logical element of its param: grads and state are laid out with
the param's strides (channels_last and transposed params included), and copies between layouts
go through ``copy_``, which pairs elements by index, never by memory order.
"""

from __future__ import annotations

import torch

from compiled_step import buckets, collectives
from compiled_step.norm import NormKind
from compiled_step.planning import ALIASED, BUCKETED, ROW, STAGED, Plan, ShardingGroup, dense_strides, \
    is_dtensor, local_tensor


# Every persistent buffer starts ``LEAD`` elements (``ROW`` for row buffers) into its storage, so no view
# handed to a compiled call has a storage offset of 0 or 1: Dynamo specialises offsets 0 and 1 and
# would compile another graph for the one view that happens to start a buffer. 32 elements keep the
# bodies 16-byte aligned for every dtype.
LEAD = 32
PARTIAL_WIDTH = 2  # partial norms are [value, 0] or [max, scaled sum]: 16 bytes, so rows stay aligned


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, lead: int = LEAD,
            pin: bool = False) -> torch.Tensor:
    """Zeros of ``shape`` starting ``lead`` elements into a fresh storage (a non-view alias)."""
    numel = 1
    for n in shape:
        numel *= n
    raw = torch.zeros(lead + numel, dtype=dtype, device=device, pin_memory=pin)
    return raw[lead:].view(shape).detach()


def _row_buffer(rows: int, dtype: torch.dtype, device: torch.device, pin: bool = False) -> torch.Tensor:
    return _buffer((rows, ROW), dtype, device, lead=ROW, pin=pin)


def padded(n: int, to: int) -> int:
    return -(-n // to) * to


def _view(buffer: torch.Tensor, row: int, local: torch.Tensor) -> torch.Tensor:
    """A view of ``buffer`` (``[rows, ROW]``) starting at ``row`` with ``local``'s shape and layout."""
    return buffer.as_strided(local.shape, dense_strides(local), buffer.storage_offset() + row * ROW)


def _flat(buffer: torch.Tensor, row: int, numel: int) -> torch.Tensor:
    """A 1-D alias of ``numel`` elements of ``buffer`` from ``row``: not a view for Dynamo (no ``_base``
    to guard on), so every tensor of any shape hits the same bucket graph."""
    return buffer.view(-1)[row * ROW: row * ROW + numel].detach()


def flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of all elements of a dense tensor, in memory order (see ``_flat``)."""
    if t.is_contiguous():
        return t.view(-1).detach()
    return t.as_strided((t.numel(),), (1,), t.storage_offset()).detach()


def own_storage_alias(view: torch.Tensor) -> torch.Tensor:
    """``view``'s elements as a tensor with a storage object of its own, over the same memory.

    Why: checkpoint tools see tensors through their storages. ``torch.save`` writes a view's whole
    storage (the whole flat buffer for one param); safetensors' ``save_model``/``load_model`` refuse
    a storage that no tensor covers entirely; Accelerate's ``clean_state_dict_for_safetensors``
    keeps one name per storage and drops the rest, so views of one flat buffer would save one
    weight of the model. A DLPack round trip gives a new storage object that starts at the view's
    first element and spans exactly its bytes: writes land in the buffer (the flat update keeps
    its one pass), and the DLPack capsule keeps the buffer alive as long as the alias lives.
    """
    alias = torch.from_dlpack(view)
    storage = alias.untyped_storage()
    span = 1 + sum((n - 1) * s for n, s in zip(view.shape, view.stride())) if view.numel() else 0
    if alias.data_ptr() != view.data_ptr() or storage.data_ptr() != view.data_ptr() or \
            storage.nbytes() != span * view.element_size() or alias.stride() != view.stride():
        raise RuntimeError("torch.from_dlpack did not alias the flat buffer as expected (data_ptr, storage size or "
                           f"strides differ) on torch {torch.__version__}; pass flat_params=False")
    return alias


def _wrap_like(p: torch.Tensor, local_view: torch.Tensor) -> torch.Tensor:
    """``local_view`` as what torch.optim would hold for ``p``: a DTensor for a DTensor param."""
    if not is_dtensor(p):
        return local_view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_view, p.device_mesh, p.placements, run_check=False, shape=p.size(),
                              stride=p.stride())


class GroupBuffers:
    """One sharding group's buffers and the views into them, in the group's param order."""

    def __init__(self, group: ShardingGroup, state_keys: tuple[str, ...], offload: bool = False,
                 external_grads: dict[int, torch.Tensor] | None = None):
        """``external_grads``: param id -> its grad, for the group's external params (``planning``)."""
        self.group = group
        key = group.key
        device = key.device
        self.params = _row_buffer(group.flat_rows, key.dtype, device)
        self.grads = _row_buffer(group.grad_rows, key.grad_dtype, device)
        self.state = {k: _row_buffer(group.rows, key.dtype, device) for k in state_keys}
        # With offload_optimizer_state on an accelerator, the state users see (and that the binder
        # adopts into) lives in pinned host buffers; ``state`` is the device copy the program updates,
        # filled before each step and released after it.
        self.offloaded = offload and device.type != "cpu"
        self.state_home = ({k: _row_buffer(group.rows, key.dtype, torch.device("cpu"), pin=True) for k in state_keys}
                           if self.offloaded else self.state)
        self.locals = [local_tensor(p) for p in group.params]  # the param shards as they are now
        entries = group.entries
        # param_views: aliased -> the new p.data; staged -> the staging area; bucketed -> None
        self.param_views = [_view(self.params, e.row, t) if e.region != BUCKETED else None
                            for e, t in zip(entries, self.locals)]
        external = {i: (external_grads or {})[id(group.params[i])] for i in group.external}
        self.grad_locals = [local_tensor(external[i]) if e.external else _view(self.grads, e.row, t)
                            for i, (e, t) in enumerate(zip(entries, self.locals))]
        self.grad_views = [external[i] if e.external else _wrap_like(p, v)
                           for i, (p, e, v) in enumerate(zip(group.params, entries, self.grad_locals))]
        # What the compiled calls read of the external grads: 1-D aliases with storages of their own,
        # so that Dynamo sees the same input kind whatever their offsets in the other framework's
        # buffer (it specialises storage offsets 0 and 1, and guards on which inputs share a storage).
        self.external_flat = {i: own_storage_alias(flat_alias(self.grad_locals[i])) for i in group.external}
        self.state_locals = {k: [_view(buf, e.row, t) for e, t in zip(entries, self.locals)]
                             for k, buf in self.state_home.items()}
        self.state_views = {k: [_wrap_like(p, v) for p, v in zip(group.params, views)]
                            for k, views in self.state_locals.items()}
        self.staged = [i for i, e in enumerate(entries) if e.region == STAGED]
        self.aliased = [i for i, e in enumerate(entries) if e.region == ALIASED]
        rows = [e.slot - group.first_slot for e in entries if e.region != BUCKETED
                for _ in range(-(-e.numel // ROW))]
        self.row_slot = torch.tensor(rows, dtype=torch.int32).to(device)

    # ---------------------------------------------------------------- install (at build)

    def install(self, previous_grads: list[torch.Tensor | None]) -> None:
        """Move aliased params into the param buffer and grads into the grad buffer (values copied).

        ``previous_grads[i]`` is param i's grad before the build (None: no grad; it stays None).
        """
        with torch.no_grad():
            for i in self.aliased:
                p, view = self.group.params[i], self.param_views[i]
                view.copy_(p.data)
                alias = own_storage_alias(view)
                p.data = alias
                self.locals[i] = alias
            for i, (p, g) in enumerate(zip(self.group.params, previous_grads)):
                if g is None or g is self.grad_views[i]:
                    continue  # no grad, or an external grad read where it is
                self.grad_locals[i].copy_(local_tensor(g))
                p.grad = self.grad_views[i]

    def zero_external_grads(self) -> None:
        """Zero the external grads where they are (``fused.zero_grad()``)."""
        if self.group.external:
            torch._foreach_zero_([self.grad_locals[i] for i in self.group.external])

    # ---------------------------------------------------------------- bucket arguments

    def bucket_args(self, rule, variant, buffers: "StepBuffers", fillers: buckets.Fillers) -> list[tuple]:
        """Prebuilt arguments of every bucket call of the group: lists padded to ``bucket_size``."""
        group, size = self.group, buffers.plan.bucket_size
        keys = rule.state_keys(variant)
        key = group.key
        dtypes = {"params": key.dtype, "grads": key.grad_dtype, "external_grads": key.grad_dtype,
                  **{k: key.dtype for k in keys}}
        calls = []
        for b in range(group.bucket_count):
            members = [i for i in group.bucketed[b * size:(b + 1) * size] if i is not None]
            entries = [group.entries[i] for i in members]
            external = bool(entries) and entries[0].external  # a bucket is all external or none
            params = [flat_alias(self.locals[i]) for i in members]
            grads = [self.external_flat[i] if external else _flat(self.grads, e.row, e.numel)
                     for i, e in zip(members, entries)]
            state = {k: [_flat(self.state[k], e.row, e.numel) for e in entries] for k in keys}
            if len(members) < size:
                filler = fillers.get(key.device, dtypes, size)
                params = buckets.padded(params, filler["params"], size)
                grads = buckets.padded(grads, filler["external_grads" if external else "grads"], size)
                state = {k: buckets.padded(v, filler[k], size) for k, v in state.items()}
            first = group.bucket_first_slot(b)
            slots = slice(first, first + size)
            amax = buffers.amax[slots].detach() if group.key.fp8 else None
            state_args = rule.state_for_update(variant, state)
            calls.append((params, grads, *state_args, buffers.table[slots].detach(),
                          buffers.counts[slots].detach(), amax))
        return calls

    def external_grad_buckets(self, size: int, fillers: buckets.Fillers) -> list[list[torch.Tensor]]:
        """The external grads in lists of ``size`` (the last one padded), for Phase A."""
        grads = [self.external_flat[i] for i in self.group.external]
        filler = fillers.get(self.group.key.device, {"external_grads": self.group.key.grad_dtype}, size)
        return [buckets.padded(grads[r.start:r.stop], filler["external_grads"], size)
                for r in buckets.chunk(len(grads), size)]

    def flat_args(self, rule, variant, buffers: "StepBuffers") -> tuple:
        group = self.group
        rows = group.flat_rows
        state = {k: buf[:rows].detach() for k, buf in self.state.items()}
        slots = slice(group.first_slot, group.first_slot + group.flat_slots)
        return (self.params, self.grads[:rows].detach(), *rule.state_for_update(variant, state), self.row_slot,
                buffers.table[slots].detach(), buffers.counts[slots].detach())


class StepBuffers:
    """The plan-wide vectors and 0-d tensors the compiled calls read and write."""

    def __init__(self, plan: Plan, rule, kind: NormKind, max_norm: float | None,
                 outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], offload: bool = False):
        device = plan.device
        self.plan = plan
        groups = plan.groups
        n_slots = plan.slots
        self.counts = _buffer((n_slots,), torch.float32, device)
        self.active = _buffer((n_slots,), torch.bool, device)
        slot_group = [0] * n_slots
        for g, group in enumerate(groups):
            for s in range(group.first_slot, group.first_slot + group.slots):
                slot_group[s] = g
        self.slot_group = _buffer((n_slots,), torch.int32, device)
        self.slot_group.copy_(torch.tensor(slot_group, dtype=torch.int32))
        # Table columns and hyperparameter columns padded so that every row starts 16-byte aligned.
        self.table = _buffer((n_slots, padded(len(rule.TABLE_COLUMNS), 4)), torch.float32, device)
        self.hp = _buffer((len(groups), padded(len(rule.HP_COLUMNS), 2)), torch.float64, device)
        self.scales = [self.hp[g, 0].detach() for g in range(len(groups))]  # the SCALE column
        self.partials = _buffer((len(groups), PARTIAL_WIDTH), torch.float64, device)
        self.partial_rows = [self.partials[g].detach() for g in range(len(groups))]
        self.pp_partial = _buffer((1, PARTIAL_WIDTH), torch.float64, device)
        self.order = torch.tensor(kind.p if kind.kind == "scaled" else 2.0, dtype=torch.float64).to(device)
        threshold = float("inf") if max_norm is None else float(max_norm)
        self.max_norm = torch.tensor(threshold, dtype=torch.float64).to(device)
        self.total, self.finite, self.skipped = outputs  # FusedStep's: they outlive a plan
        self.amax = _buffer((n_slots,), torch.float32, device)
        # Adam's state["step"] are 0-d views of the counts (of their host copy when offloading).
        self.offloaded = offload and device.type != "cpu"
        self.counts_home = (_buffer((n_slots,), torch.float32, torch.device("cpu"), pin=True) if self.offloaded
                            else self.counts)
        self.count_views = [self.counts_home[s] for s in range(n_slots)] if rule.COUNTS_ARE_STEPS else None


def copy_staged_in(gb: GroupBuffers) -> None:
    torch._foreach_copy_([gb.param_views[i] for i in gb.staged], [gb.locals[i] for i in gb.staged])


def copy_staged_out(gb: GroupBuffers) -> None:
    torch._foreach_copy_([gb.locals[i] for i in gb.staged], [gb.param_views[i] for i in gb.staged])


def reduce_partials_over(reduction, kind: NormKind, partials: torch.Tensor, members: torch.Tensor | None,
                         order: torch.Tensor) -> None:
    """Reduce the member groups' rows of ``partials`` in place over one process group."""
    if members is None:
        partials.copy_(collectives.reduce_stacked(kind, partials, reduction, order))
    else:
        stacked = partials.index_select(0, members)
        partials.index_copy_(0, members, collectives.reduce_stacked(kind, stacked, reduction, order))


def offload_in(groups: list[GroupBuffers], buffers: StepBuffers) -> None:
    """Before a step with offloaded state: allocate the device state and fill it from the host copy."""
    for gb in groups:
        if gb.offloaded:
            for key, work in gb.state.items():
                work.untyped_storage().resize_(work.numel() * work.element_size())
                work.copy_(gb.state_home[key], non_blocking=True)
    if buffers.offloaded:
        buffers.counts.copy_(buffers.counts_home, non_blocking=True)


def offload_out(groups: list[GroupBuffers], buffers: StepBuffers) -> None:
    """After the step: copy the state back to the host (blocking: it is read right after) and free it."""
    for gb in groups:
        if gb.offloaded:
            for key, work in gb.state.items():
                gb.state_home[key].copy_(work)
                work.untyped_storage().resize_(0)
    if buffers.offloaded:
        buffers.counts_home.copy_(buffers.counts)
