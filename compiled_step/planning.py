"""The plan: sharding groups, where each param lives in its group's flat buffers, and the reductions.

Pure Python over the optimizer's params and their metadata: nothing is allocated, compiled or
communicated here. The plan is built from *all* params of the optimizer (not only those with a grad
this step), so that every rank derives the same groups and issues the same collectives, and it is
rebuilt only when the params, their grouping or their layout change.

A group's tensors live in flat buffers of ``ROW``-element rows (``storage.py`` allocates them):

* every param's grad and optimizer state occupy whole rows of the group's grad and state buffers,
  so Phase A reads one buffer per group and the state is addressable as one tensor per key;
* each param is in one of three *regions*:

  - ``aliased``: a plain tensor whose storage FusedStep may own. Its ``.data`` becomes a view of the
    group's param buffer, so the whole region is updated by one flat compiled call;
  - ``staged``: a small param FusedStep may not move (a DTensor shard, a tensor whose storage is
    shared with other tensors). It is copied into the param buffer before the flat update and back
    after it (cheap for small params, and one call for a thousand of them);
  - ``bucketed``: a large param that stays where it is (FSDP2's sharded params, FP8 weights). It is
    updated in fixed-length buckets of ``bucket_size`` tensors, one compiled call per bucket;
  - a bucketed param may have an *external* grad: one that lives in another framework's persistent
    buffer, read there by Phase A and the update instead of being copied into the grad buffer
    (DistributedDataParallel's bucket views, ``gradient_as_bucket_view=True``). External params
    come last, in buckets of their own, and take no rows of the grad buffer;

* a group whose rule updates whole params (Muon's matrices, Adafactor's tensors: ``rules.MATRIX``) is laid
  out by ``_lay_out_stacks``: every param in the flat regions, same-shape params in *stacks*
  (``matrices.Stack``) that one compiled call updates;
* each param has a *slot*: an index into the per-tensor vectors (step counts, "has a grad", the
  per-tensor scalar table). The flat region's rows carry the slot of the param they belong to;
  each bucket owns ``bucket_size`` consecutive slots (the last one padded with scratch slots).
  Every group's slots and every bucket's start at a multiple of ``SLOT_ALIGN``, so the slices of the
  per-slot vectors the compiled calls take are 16-byte aligned (Inductor copies misaligned inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compiled_step.matrices import Exchange, Stack, numel

# Elements per row of the flat buffers. Every param starts on a row boundary, so the flat update
# reads a param's per-tensor scalars once per row (a 4-byte row index per ROW elements: 0.016 B/param
# at 256) instead of once per element. The price is padding: at most ROW - 1 elements per param.
ROW = 256

ALIASED, STAGED, BUCKETED = "aliased", "staged", "bucketed"

SLOT_ALIGN = 4  # 4 float32 = 16 bytes
EP_DIM = 1 << 20  # the "mesh dim" of an EP reduction: after every real dim of the same group


def align(n: int, to: int = SLOT_ALIGN) -> int:
    return -(-n // to) * to


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor as a plain tensor, or the tensor itself.

    torchao's float8 FSDP weights are DTensors over a ``WeightWithDynamicFloat8CastTensor``
    wrapper (and so are their optimizer states, made with ``zeros_like``); the compiled math wants
    the plain tensor inside, which shares its storage.
    """
    local = t._local_tensor if is_dtensor(t) else t
    if type(local).__name__ == "WeightWithDynamicFloat8CastTensor":
        local = local._tensor
    return local


_DTENSOR_TYPE = None


def is_dtensor(t) -> bool:
    """``isinstance(t, DTensor)``, without importing torch.distributed per call."""
    global _DTENSOR_TYPE
    if _DTENSOR_TYPE is None:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = type("NoDTensor", (), {})
        _DTENSOR_TYPE = DTensor
    return isinstance(t, _DTENSOR_TYPE)


def rows_for(numel: int) -> int:
    return -(-numel // ROW)


def is_dense(t: torch.Tensor) -> bool:
    """All elements stored without gaps or overlaps (contiguous up to a permutation of dims)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides if it is dense (channels_last, transposed...), else contiguous strides.

    Grads and optimizer state are laid out with their param's strides, so that element i of the
    param's memory and element i of its grad's and state's memory are the same logical element.
    """
    if is_dense(t):
        return tuple(t.stride())
    strides, running = [], 1
    for size in reversed(t.shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def _owns_storage(p: torch.Tensor) -> bool:
    """True when no other tensor shares ``p``'s storage, so moving ``p.data`` changes nothing else.

    A param whose storage is shared (a view of another param, tied through a view, FSDP1's flat
    parameter, an alias a user took: ``p.detach()``, ``model.state_dict()``'s values) must stay where
    it is, or the tensors sharing it would stop seeing its updates. ``torch._C._storage_Use_Count``
    counts the references to the storage: the param's own and the temporary ``untyped_storage()``
    wrapper make 2. The same count holds at a rebuild for a param already in a flat buffer: FusedStep
    keeps no second tensor over its storage (``Binder.install``), so any reference beyond the two is
    someone else's, and the param stays where it is, as at the first build.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # cannot tell: do not move it
        return False
    return use_count(p.untyped_storage()._cdata) <= 2


def grad_dtype_of(p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s grads: the current grad's, else ``p.grad_dtype`` when set, else ``p.dtype``."""
    g = p.grad
    if g is not None:
        return g.dtype
    declared = getattr(p, "grad_dtype", None)
    return declared if isinstance(declared, torch.dtype) else p.dtype


@dataclass(frozen=True)
class GroupKey:
    """What must be equal for params to share buffers, compiled calls and a norm reduction."""

    param_group: int  # index into optimizer.param_groups
    device: torch.device
    dtype: torch.dtype
    grad_dtype: torch.dtype
    mesh_key: tuple = ()  # see mesh_key_of for DTensors; () for plain tensors
    is_expert: bool = False
    fp8: bool = False  # FP8 weights: their update also computes the new weights' amax


@dataclass(frozen=True)
class Entry:
    """Where one param of a group lives."""

    index: int  # position in ShardingGroup.params
    region: str  # ALIASED, STAGED or BUCKETED
    row: int  # first row in the group's grad and state buffers (and param buffer, for the flat regions)
    numel: int  # elements of the local shard
    slot: int  # global slot: index into the per-tensor vectors
    external: bool = False  # the grad lives outside the grad buffer (see the module docstring)


@dataclass
class ShardingGroup:
    key: GroupKey
    params: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # one per param, same order as ``params``
    flat: list[int] = field(default_factory=list)  # indices of the aliased and staged params, buffer order
    bucketed: list[int | None] = field(default_factory=list)  # indices of the bucketed params, buffer order
    # (None: padding that makes the external params start a bucket)
    external: list[int] = field(default_factory=list)  # those of them with external grads (the last buckets)
    stacks: list = field(default_factory=list)  # a matrix group's matrices.Stack runs (else empty)
    exchange: object = None  # a row-sharded matrix group's matrices.Exchange (its all-to-all)
    flat_rows: int = 0  # rows of the param buffer (the flat regions come first in every buffer)
    rows: int = 0  # rows of the state buffers
    grad_rows: int = 0  # rows of the grad buffer: every param's but the external ones, which come last
    first_slot: int = 0  # the group's slots are [first_slot, first_slot + slots)
    flat_slots: int = 0  # slots of the flat regions (one per param), then the buckets' slots
    bucket_count: int = 0
    bucket_stride: int = 0  # slots per bucket: bucket_size rounded up to SLOT_ALIGN
    slots: int = 0  # align(flat_slots) + bucket_count * bucket_stride
    label: str = ""  # the param group, e.g. "param_groups[0]" or "optimizers[1].param_groups[0]"

    def bucket_first_slot(self, b: int) -> int:
        return self.first_slot + align(self.flat_slots) + b * self.bucket_stride

    def describe(self) -> str:
        k = self.key
        where = f"{k.device}, {str(k.dtype).replace('torch.', '')}"
        if k.grad_dtype != k.dtype:
            where += f" (grads {str(k.grad_dtype).replace('torch.', '')})"
        if k.mesh_key:
            where += f", DeviceMesh {k.mesh_key[1]} of shape {k.mesh_key[2]}, placements {k.mesh_key[3]}"
        counts = {r: sum(e.region == r for e in self.entries) for r in (ALIASED, STAGED, BUCKETED)}
        parts = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
        text = (f"{self.label}, {where}, expert={k.is_expert}"
                f"{', fp8' if k.fp8 else ''}: {len(self.params)} params ({parts}), "
                f"{sum(e.numel for e in self.entries):,} local elements in {self.rows} rows")
        if self.stacks:
            text += f", {len(self.stacks)} matrix stacks"
        if self.exchange is not None:
            text += (f"; whole matrices through 2 all_to_all over {self.exchange.label!r} per step (to their owners "
                     "and back)")
        return text


@dataclass
class Reduction:
    """One process group over which some sharding groups' partial norms are reduced.

    ``members`` are indices into ``Plan.groups``; their partials are stacked and reduced in one
    collective. ``device_type`` is the mesh's: partials travel there for the collective (NCCL cannot
    reduce CPU tensors, e.g. under FSDP2's CPUOffloadPolicy) and come back.
    """

    process_group: object
    device_type: str
    label: str
    members: list[int] = field(default_factory=list)
    over_shards: bool = True  # a mesh dim the params are sharded over (False for EP: different experts)
    dims: list[int] = field(default_factory=list)  # per member: the mesh dim reduced (EP_DIM for EP)


@dataclass
class Plan:
    signature: tuple  # identity of the params and their grouping (see ``params_signature``)
    groups: list[ShardingGroup]
    device: torch.device  # every param's (local) device
    bucket_size: int
    slots: int  # length of the per-tensor vectors
    reductions: list[Reduction] = field(default_factory=list)  # mesh dims and EP, one per process group
    pp: Reduction | None = None  # applied last, to the combined partial of all groups

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g.params]

    def describe(self) -> list[str]:
        lines = [f"group {i}: {g.describe()}" for i, g in enumerate(self.groups)]
        reductions = "; ".join(f"{r.label!r} over groups {r.members}" for r in self.reductions) or "none"
        lines.append(f"reductions (one collective each, in this order): {reductions}")
        lines.append(f"pp: {repr(self.pp.label) + ' (the combined partial, reduced last)' if self.pp is not None else 'none'}")
        return lines


def params_signature(param_lists) -> tuple:
    """Identity of the params and their grouping."""
    return tuple(tuple(map(id, params)) for params in param_lists)


def mesh_key_of(p: torch.Tensor) -> tuple:
    """(mesh identity, dim names, shape, placements) of a DTensor."""
    if not is_dtensor(p):
        return ()
    return (id(p.device_mesh), tuple(p.device_mesh.mesh_dim_names or ()), tuple(p.device_mesh.shape), p.placements)


def _on_ep_mesh(p: torch.Tensor, ep_axis_name: str | None) -> bool:
    """A DTensor whose device mesh has the EP axis: an expert param (recognition by mesh axis)."""
    return bool(ep_axis_name) and is_dtensor(p) and ep_axis_name in (p.device_mesh.mesh_dim_names or ())


def check_params(param_lists, names: dict[int, str], labels: list[str] | None = None) -> None:
    """Raise ``ValueError`` for a param listed twice (in one optimizer or in two) or params on more
    than one device, ``TypeError`` for complex, sparse or integer params. ``labels[i]`` names param
    group i (default ``param_groups[i]``)."""
    labels = labels or [f"param_groups[{i}]" for i in range(len(param_lists))]
    seen: dict[int, tuple[int, int]] = {}
    devices = {}
    for index, params in enumerate(param_lists):
        for position, p in enumerate(params):
            where = seen.get(id(p))
            if where is not None:
                first, second = f"{labels[where[0]]}[{where[1]}]", f"{labels[index]}[{position}]"
                holder = "optimizers" if labels[0].startswith("optimizers") else "optimizer"
                raise ValueError(
                    f"{names.get(id(p), first)} is listed twice in the {holder} ({first} and {second}); its grad "
                    "would count twice in the norm and it would be updated twice. List every param once, in "
                    "one optimizer."
                )
            seen[id(p)] = (index, position)
            if p.is_complex():
                raise TypeError(f"FusedStep does not support complex params (got one of dtype {p.dtype})")
            if p.is_sparse:
                raise TypeError("FusedStep does not support sparse params")
            if not p.is_floating_point():
                raise TypeError(f"FusedStep needs floating-point params, got {p.dtype}")
            devices.setdefault(local_tensor(p).device, names.get(id(p), f"{labels[index]}[{position}]"))
    if len(devices) > 1:
        found = ", ".join(f"{d} ({name})" for d, name in devices.items())
        raise ValueError(f"FusedStep needs every param on one device; found {found}")


def _region(p: torch.Tensor, local: torch.Tensor, fp8: bool, flat_params: bool, pack_threshold: int,
            external: bool) -> str:
    if external:
        return BUCKETED  # its grad is read where it is, so its update is a bucket call
    if fp8 and local.numel() > 0:
        return BUCKETED  # the update computes each FP8 weight's amax, a per-tensor reduction
    if flat_params and not fp8 and type(p) in (torch.Tensor, torch.nn.Parameter) and _owns_storage(p):
        return ALIASED
    if local.numel() <= pack_threshold or local.numel() == 0:
        return STAGED
    return BUCKETED


def build_plan(
    param_lists: list[list[torch.Tensor]],
    *,
    names: dict[int, str] | None = None,
    expert_ids: frozenset[int] = frozenset(),
    ep: tuple | None = None,
    ep_axis_name: str | None = None,
    pp: tuple | None = None,
    bucket_size: int = 16,
    pack_threshold: int = 0,
    flat_params: bool = False,
    fp8_ids: frozenset[int] = frozenset(),
    external_grads: frozenset[int] = frozenset(),
    matrix_groups: dict | None = None,
    group_labels: list[str] | None = None,
) -> Plan:
    """Group *all* params (not only those with grads) so every rank issues the same collectives.

    Args:
        param_lists: one list of params per optimizer param group.
        names: fully qualified names by ``id(param)``, for error messages.
        expert_ids: ``id()`` of expert params (see ``experts.expert_param_ids``). DTensors whose
            mesh has ``ep_axis_name`` are experts too.
        ep: ``(process_group, device_type)`` of the EP axis; expert params whose mesh lacks the EP
            axis are reduced over it, since different EP ranks hold different experts.
        ep_axis_name: the EP axis name, to tell which DTensor experts already reduce over EP.
        pp: ``(process_group, device_type)`` of the pipeline axis, reduced over last.
        bucket_size: tensors per bucketed compiled call.
        pack_threshold: params that cannot be aliased but have at most this many local elements
            are staged through the flat buffer instead of bucketed.
        flat_params: alias plain params into the flat param buffers.
        fp8_ids: ``id()`` of FP8 weights, whose amax the update computes.
        external_grads: ``id()`` of params whose grads are read where they are (``lifecycle/ddp.py``).
        matrix_groups: param group index -> its rule, for the groups whose rule updates whole params
            (``rules.MATRIX``: Muon, Adafactor); its ``PARAM_NDIMS`` and ``ROW_SHARDED`` say which it takes.
        group_labels: how messages name each param group (default ``param_groups[i]``).

    Raises ``ValueError`` for a param listed twice, params on several devices and DTensor shards
    that are not stored densely.
    """
    names = names or {}
    matrix_groups = matrix_groups or {}
    check_params(param_lists, names, group_labels)
    groups: dict[GroupKey, ShardingGroup] = {}
    for index, params in enumerate(param_lists):
        for position, p in enumerate(params):
            local = local_tensor(p)
            is_expert = id(p) in expert_ids or _on_ep_mesh(p, ep_axis_name)
            key = GroupKey(index, local.device, p.dtype, grad_dtype_of(p), mesh_key_of(p), is_expert,
                           fp8=id(p) in fp8_ids)
            label = group_labels[index] if group_labels else f"param_groups[{index}]"
            group = groups.setdefault(key, ShardingGroup(key, label=label))
            group.params.append(p)
            group.names.append(names.get(id(p), f"{group.label}[{position}]"))
    ordered = list(groups.values())
    slot = 0
    for group in ordered:
        if group.key.param_group in matrix_groups:
            slot = _lay_out_stacks(group, slot, flat_params, matrix_groups[group.key.param_group])
        else:
            slot = _lay_out(group, slot, bucket_size, pack_threshold, flat_params, external_grads)
    device = ordered[0].key.device if ordered else torch.device("cpu")
    reductions, pp_reduction = _reductions(ordered, ep, ep_axis_name, pp)
    return Plan(params_signature(param_lists), ordered, device, bucket_size, slot, reductions, pp_reduction)


def _lay_out(group: ShardingGroup, first_slot: int, bucket_size: int, pack_threshold: int, flat_params: bool,
             external_grads: frozenset[int]) -> int:
    """Assign regions, rows and slots; returns the next free slot."""
    regions, external = [], set()
    for i, (p, name) in enumerate(zip(group.params, group.names)):
        local = local_tensor(p)
        if id(p) in external_grads:
            external.add(i)
        region = _region(p, local, group.key.fp8, flat_params, pack_threshold, i in external)
        if region == BUCKETED and not is_dense(local):
            raise ValueError(
                f"{name}: FusedStep needs params stored densely (no gaps or overlaps) when it cannot move them; "
                f"got a local tensor of shape {tuple(local.shape)} and stride {local.stride()}"
            )
        regions.append(region)
    group.flat = [i for i, r in enumerate(regions) if r != BUCKETED]
    internal = [i for i, r in enumerate(regions) if r == BUCKETED and i not in external]
    group.external = sorted(external)
    # External params start a bucket of their own: a bucket's grads are all in the grad buffer or all
    # outside it, so each kind of bucket is one graph.
    pad = (-len(internal) % bucket_size) if group.external else 0
    group.bucketed = internal + [None] * pad + group.external
    entries: dict[int, Entry] = {}
    row, slot = 0, first_slot
    for i in group.flat:
        numel = local_tensor(group.params[i]).numel()
        entries[i] = Entry(i, regions[i], row, numel, slot)
        row += rows_for(numel)
        slot += 1
    group.flat_rows = row
    group.first_slot, group.flat_slots = first_slot, slot - first_slot
    group.bucket_stride = align(bucket_size)
    grad_rows = None
    for position, i in enumerate(group.bucketed):
        if i is None:
            continue  # padding before the external buckets
        if i in external and grad_rows is None:
            grad_rows = row  # the external params come last and take no grad rows
        numel = local_tensor(group.params[i]).numel()
        b, j = divmod(position, bucket_size)
        entries[i] = Entry(i, BUCKETED, row, numel, group.bucket_first_slot(b) + j, external=i in external)
        row += rows_for(numel)
    group.rows = row
    group.grad_rows = row if grad_rows is None else grad_rows
    group.bucket_count = -(-len(group.bucketed) // bucket_size)
    group.slots = align(group.flat_slots) + group.bucket_count * group.bucket_stride
    group.entries = [entries[i] for i in range(len(group.params))]
    return first_slot + group.slots


def _reductions(groups: list[ShardingGroup], ep, ep_axis_name, pp):
    # Distinct process groups in order of first appearance. Ranks that share a process group hold
    # the same params (same pipeline stage), hence the same plan and the same collective order.
    reductions: dict[int, Reduction] = {}

    def add(process_group, device_type, label, member, dim, over_shards=True):
        reduction = reductions.setdefault(
            id(process_group), Reduction(process_group, device_type, label, over_shards=over_shards)
        )
        reduction.members.append(member)
        reduction.dims.append(dim)

    for member, group in enumerate(groups):
        p = group.params[0]
        mesh_names = ()
        if is_dtensor(p):
            mesh = p.device_mesh
            mesh_names = tuple(mesh.mesh_dim_names or ())
            for dim, placement in enumerate(p.placements):
                # Shard dims hold parts of the grad: their partials add up. A Replicate dim holds
                # copies; a Partial param's grad is normed once summed (copies again, see nemo_compat).
                if placement.is_shard():
                    label = mesh_names[dim] if mesh_names else f"mesh dim {dim}"
                    add(mesh.get_group(mesh_dim=dim), mesh.device_type, label, member, dim)
        if group.key.is_expert and ep is not None and (ep_axis_name is None or ep_axis_name not in mesh_names):
            add(ep[0], ep[1], "ep", member, EP_DIM, over_shards=False)
    pp_reduction = Reduction(pp[0], pp[1], "pp") if pp is not None else None
    return list(reductions.values()), pp_reduction


def _lay_out_stacks(group: ShardingGroup, first_slot: int, flat_params: bool, rule) -> int:
    """A matrix group: every param in the flat regions, same shapes together (stacks); returns the next slot."""
    sharding = _row_sharding(group, rule)
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
        per = rows_for(numel(shape) + 1)
        shard = {} if sharding is None else dict(global_rows=global_shape[0], world=sharding.world,
                                                 chunk=-(-global_shape[0] // sharding.world))
        group.stacks.append(Stack(shape, strides, row, per, tuple(members), slot, **shard))
        for i in members:
            p = group.params[i]
            region = ALIASED if flat_params and type(p) in (torch.Tensor, torch.nn.Parameter) and \
                _owns_storage(p) else STAGED
            entries[i] = Entry(i, region, row, numel(shape), slot)
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


def _row_sharding(group: ShardingGroup, rule) -> Exchange | None:
    """The all-to-all of a matrix group whose params are row-sharded (one Shard(0), the rest
    Replicate); None for whole params, and for a rule whose math is per local shard (``LOCAL_SHARDS``).
    Raises ``ValueError`` for what the rule cannot update."""
    exchange = None
    for p, name in zip(group.params, group.names):
        if rule.PARAM_NDIMS is not None and p.ndim not in rule.PARAM_NDIMS:
            dims = " or ".join(f"{n}-D" for n in rule.PARAM_NDIMS)
            raise ValueError(f"{name}: {rule.NAME} updates {dims} params only, got shape {tuple(p.shape)}")
        if group.key.fp8:
            raise ValueError(f"{name}: FP8 weights are not supported with {rule.NAME}")
        if not is_dtensor(p) or not any(pl.is_shard() for pl in p.placements):
            continue
        if getattr(rule, "LOCAL_SHARDS", False):
            continue  # the rule updates each local shard as a param of its own shape (torchao's optimizers)
        if not rule.ROW_SHARDED:
            raise ValueError(f"{name}: {rule.NAME} needs whole params and cannot gather sharded ones, but this "
                             f"param has placements {p.placements}")
        shards = [d for d, pl in enumerate(p.placements) if pl.is_shard()]
        if len(shards) != 1 or p.placements[shards[0]].dim != 0 or any(pl.is_partial() for pl in p.placements):
            raise ValueError(f"{name}: {rule.NAME} needs whole matrices; it gathers row-sharded ones (one Shard(0) "
                             f"mesh dim, as FSDP2 shards), but this param has placements {p.placements}")
        mesh, dim = p.device_mesh, shards[0]
        world, rank = mesh.size(dim), mesh.get_local_rank(dim)
        chunk = -(-p.shape[0] // world)
        rows = max(0, min(chunk, p.shape[0] - rank * chunk))
        if tuple(local_tensor(p).shape) != (rows, p.shape[1]):
            raise ValueError(f"{name}: {rule.NAME} expects torch.chunk's row split ({rows} of {p.shape[0]} rows on "
                             f"this rank), got a local shard of shape {tuple(local_tensor(p).shape)}")
        names = mesh.mesh_dim_names
        exchange = Exchange(mesh.get_group(mesh_dim=dim), mesh.device_type,
                            names[dim] if names else f"mesh dim {dim}", world)
    return exchange
