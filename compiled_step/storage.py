"""The step's persistent tensors, built once per plan: flat buffers, the views users see, the vectors.

For every sharding group (see ``planning.py`` for the layout):

* ``params``: ``[flat_rows, ROW]`` in the param dtype. Aliased params' ``.data`` are views of it;
  staged params are copied in and out around the flat update.
* ``grads``: ``[rows, ROW]`` in the grad dtype, every grad of the group. ``p.grad`` is a view of it
  (a DTensor over the view for DTensor params) with the param's shape and memory layout, so autograd
  and FSDP2 accumulate into it in place and Phase A reads one buffer.
* ``state[key]``: ``[rows, ROW]`` per optimizer state key (``exp_avg``...), laid out from the rule's
  declaration (``lay_out_state``: each param's state tensors, their shapes and dtypes). A key whose
  every tensor is shaped like its param shares the param's rows, layout and DTensor-ness; any other
  key (Adafactor's factored ``row_var``/``col_var``) has rows of its own, each tensor contiguous.
  ``optimizer.state[p][key]`` are views of it, in torch's format, so ``optimizer.step()``,
  ``state_dict()`` and ``load_state_dict()`` see ordinary tensors. A state tensor that is not such a
  view (a loaded checkpoint, a user's assignment, new state torch.optim created) is *adopted*: copied
  into the buffer, and replaced by the view.

For the whole plan (``StepBuffers``): the per-slot vectors (counts, active flags, the group of each
slot, the table of per-tensor scalars), the group hyperparameters, the partial norms and the
outputs of the finish. Where torch keeps the count (the rule's ``STEP_KEY``: Adam's and Adafactor's
``state[p]["step"]``), it is a 0-d view of ``counts``.

Every element pairs with the same logical element of its param: grads and state are laid out with
the param's strides (channels_last and transposed params included), and copies between layouts
go through ``copy_``, which pairs elements by index, never by memory order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from compiled_step.norm import NormKind
from compiled_step.rules import state_parts, torch_keys
from compiled_step.rules.common import StateTensor, table_dtype
from compiled_step.matrices import Stack, numel
from compiled_step.planning import ALIASED, BUCKETED, ROW, STAGED, Plan, ShardingGroup, dense_strides, \
    is_dtensor, local_tensor, rows_for


# Every persistent buffer starts ``LEAD`` elements (row buffers: at least ``ROW``, placed in their page by
# ``_row_buffer``) into its storage, so no view
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


def offloads_state(device: torch.device) -> bool:
    """Whether ``offload_optimizer_state`` keeps the state of buffers on ``device`` in host memory between
    steps: for accelerators only, since on the CPU the host copy would be a second copy of the buffer
    itself. The mechanism (``lifecycle.offload.offload_in``/``offload_out``) is device-agnostic; tests
    replace this predicate to run it with CPU buffers standing in for device buffers."""
    return device.type != "cpu"


def _pins_home(device: torch.device) -> bool:
    """Pin the host copy when the state's buffers are on an accelerator, so that the copies in and out are
    asynchronous; a CPU buffer gains nothing from it (and a CPU-only torch has no pinned allocator)."""
    return device.type != "cpu"


# Where a row buffer starts within its 4 KiB page. The update reads params, grads and every state buffer
# element for element and writes params and state back; buffers that start at the same offset within a page put
# element i of every stream in the same L1 set (its index bits span 4 KiB), and the loop stalls on the conflicts.
# The CPU allocator gives every buffer of 32 MiB and up (mmap) the same offset in its page, so the streams of a
# large group all collide unless placed: measured on the 2-core CPU, torch's ``_fused_adamw_`` over four flat
# buffers of 37.7 M floats, 1 thread: 22.6-23.7 ms with their starts 0, 4 or 8 KiB apart, 19.5 ms with them 64 B
# to 1 KiB apart. Each stream of a group (``STREAMS``) starts ``STAGGER_BYTES`` after the previous one, modulo
# the page. GPUs index their caches otherwise; there the placement only costs a few KiB of padding per buffer.
PAGE_BYTES, STAGGER_BYTES = 4096, 256
STREAMS = ("params", "grads")  # then the state buffers, in the group's layout order (``make_state``)


def _row_buffer(rows: int, dtype: torch.dtype, device: torch.device, pin: bool = False, stream: int = 0
                ) -> torch.Tensor:
    """Zeros of ``[rows, ROW]``, at least ``ROW`` elements into a fresh storage, starting ``stream * STAGGER_BYTES``
    bytes into a 4 KiB page (modulo the page)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros((ROW * itemsize + PAGE_BYTES) // itemsize + rows * ROW, dtype=dtype, device=device,
                      pin_memory=pin)
    start = raw.data_ptr() + ROW * itemsize
    want = (stream * STAGGER_BYTES) % PAGE_BYTES
    # Allocators align to 64 B or more, and every dtype's size divides 256, so the shift is whole elements.
    shift = (want - start) % PAGE_BYTES
    lead = ROW + shift // itemsize
    return raw[lead:lead + rows * ROW].view(rows, ROW).detach()


def round_up(n: int, to: int) -> int:
    """``n`` rounded up to a multiple of ``to`` (``buckets.padded`` pads a list; this rounds a number)."""
    return -(-n // to) * to


def _view(buffer: torch.Tensor, row: int, local: torch.Tensor) -> torch.Tensor:
    """A view of ``buffer`` (``[rows, ROW]``) starting at ``row`` with ``local``'s shape and layout."""
    return buffer.as_strided(local.shape, dense_strides(local), buffer.storage_offset() + row * ROW)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Placed:
    """Where one tensor (or one stack of same-shape tensors) lives in a ``[rows, ROW]`` buffer."""

    row: int  # first row
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    rows_each: int = 0  # a stack: rows from one tensor to the next

    def view(self, buffer: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """The tensor, or with ``count``, the ``[count, *shape]`` stack, as a view of ``buffer``."""
        shape, strides = self.shape, self.strides
        if count is not None:
            shape, strides = (count, *shape), (self.rows_each * ROW, *strides)
        return buffer.as_strided(shape, strides, buffer.storage_offset() + self.row * ROW)


@dataclass(frozen=True)
class KeyLayout:
    """One state key's buffer in a sharding group, from the rule's ``state_layout`` declaration."""

    rows: int
    dtype: torch.dtype
    tensors: tuple[Placed | None, ...]  # per param of the group; None: the param keeps no such tensor
    stacks: tuple[Placed | None, ...]  # per matrix stack of the group (its ``[n, *shape]`` view); None: not kept
    like_params: bool  # every tensor shaped like its param, in the param's rows (the flat update's layout)


def lay_out_state(group: ShardingGroup, rule, variant, dtypes: dict[str, torch.dtype] | None = None
                  ) -> dict[str, KeyLayout]:
    """Each state key's layout in ``group``'s buffers, from ``rule.state_layout`` (per param: its tensors'
    shapes and dtypes), in ``rule.state_keys(variant)`` order. Pure: nothing is allocated. ``dtypes``: the keys
    the user keeps in another dtype than the declared one (``state_dtypes.state_dtypes``: bfloat16 moments).

    A key whose every param keeps a tensor shaped like the param (Adam's, SGD's, Muon's) uses the param's
    rows and memory layout, so a flat update reads it row for row with the params. Any other key (a
    factored pair, a tensor some params keep and others not) is packed in rows of its own, in the group's
    order (stack by stack, one padding element after each tensor of a stack, as ``planning`` pads the
    params), so it costs its own size. Raises ``ValueError`` for what the engine cannot place: a key of
    two dtypes, a packed key of a DTensor param or read by a flat update (which pairs rows with params).
    """
    locals_ = [local_tensor(p) for p in group.params]
    declared = [rule.state_layout(variant, tuple(t.shape), group.key.dtype) for t in locals_]
    per_shard = getattr(rule, "LOCAL_SHARDS", False)  # a DTensor param's state is its shard's (torchao's)
    layouts = {}
    for key in rule.state_keys(variant):
        tensors = [d.get(key) for d in declared]
        declared_dtypes = {t.dtype for t in tensors if t is not None}
        if len(declared_dtypes) > 1:
            raise ValueError(f"{group.label}: {rule.NAME} declares state {key!r} in several dtypes "
                             f"{sorted(map(str, declared_dtypes))}; one key's tensors share one buffer and one dtype")
        dtype = declared_dtypes.pop() if declared_dtypes else group.key.dtype
        dtype = (dtypes or {}).get(key, dtype)
        like = all(t is not None and tuple(t.shape) == tuple(x.shape) for t, x in zip(tensors, locals_))
        if like:
            placed = tuple(Placed(e.row, tuple(x.shape), dense_strides(x)) for e, x in zip(group.entries, locals_))
            stacks = tuple(Placed(st.first_row, st.shape, st.strides, st.rows_per_matrix) for st in group.stacks)
            layouts[key] = KeyLayout(group.rows, dtype, placed, stacks, True)
            continue
        for t, p, name in zip(tensors, group.params, group.names):
            if t is not None and is_dtensor(p) and not per_shard:
                raise ValueError(f"{name}: {rule.NAME} keeps state {key!r} of shape {tuple(t.shape)}, not shaped like "
                                 "this DTensor param; FusedStep cannot place it on the param's mesh")
        stacked = {i for st in group.stacks for i in st.members}
        if group.flat_slots and len(stacked) < len(group.flat):
            raise ValueError(f"{group.label}: {rule.NAME} keeps state {key!r} not shaped like its params, which the "
                             "flat update (row for row with the params) cannot read")
        placed: list[Placed | None] = [None] * len(tensors)
        stacks, row = [], 0
        for st in group.stacks:
            shapes = {None if tensors[i] is None else tuple(tensors[i].shape) for i in st.members}
            if len(shapes) > 1:
                raise ValueError(f"{group.label}: {rule.NAME} declares state {key!r} of shapes {shapes} for params "
                                 f"of one shape {st.shape}; a stack's state must be one shape")
            shape = shapes.pop()
            if shape is None:  # no param of this stack keeps the key (Adafactor's variance for matrices)
                stacks.append(None)
                continue
            each = rows_for(numel(shape) + 1)  # one padding element: no stack of them is contiguous
            stacks.append(Placed(row, shape, contiguous_strides(shape), each))
            for i in st.members:
                placed[i] = Placed(row, shape, contiguous_strides(shape))
                row += each
        for i in group.bucketed:
            if i is not None and tensors[i] is not None:
                shape = tuple(tensors[i].shape)
                placed[i] = Placed(row, shape, contiguous_strides(shape))
                row += rows_for(numel(shape))
        layouts[key] = KeyLayout(row, dtype, tuple(placed), tuple(stacks), False)
    return layouts


def flat_slice(buffer: torch.Tensor, row: int, numel: int) -> torch.Tensor:
    """A 1-D alias of ``numel`` elements of ``buffer`` from ``row``: not a view for Dynamo (no ``_base``
    to guard on), so every tensor of any shape hits the same bucket graph."""
    return buffer.view(-1)[row * ROW: row * ROW + numel].detach()


def flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of all elements of a dense tensor, in memory order (see ``_flat``)."""
    if t.is_contiguous():
        return t.view(-1).detach()
    return t.as_strided((t.numel(),), (1,), t.storage_offset()).detach()


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``t``'s device is the current device of its type, whatever the caller's is.

    Params may live on another device than the current one (``model.to("cuda:1")`` with no
    ``torch.cuda.set_device``), and some calls act on the current device only. The guard is the device
    module's own (``torch.cuda.device``, ``torch.xpu.device``...). CPU and meta have no current device;
    a backend whose module has no device guard (MPS) has one device, which is always the current one.
    """
    device = t.device
    if device.type in ("cpu", "meta"):
        return contextlib.nullcontext()
    guard = getattr(torch.get_device_module(device), "device", None)
    return guard(device) if guard is not None else contextlib.nullcontext()


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
    with on_device_of(view):  # torch >= 2.9's __dlpack__ refuses a CUDA tensor off the current device
        alias = torch.from_dlpack(view)
    storage = alias.untyped_storage()
    span = 1 + sum((n - 1) * s for n, s in zip(view.shape, view.stride())) if view.numel() else 0
    if alias.data_ptr() != view.data_ptr() or storage.data_ptr() != view.data_ptr() or \
            storage.nbytes() != span * view.element_size() or alias.stride() != view.stride():
        raise RuntimeError("torch.from_dlpack did not alias the flat buffer as expected (data_ptr, storage size or "
                           f"strides differ) on torch {torch.__version__}; pass flat_params=False")
    return alias


def _stack_view(buffer: torch.Tensor, stack: Stack) -> torch.Tensor:
    """``[n, rows, cols]`` view of a stack's matrices in ``buffer`` (``[R, ROW]``), each from its first row."""
    shape = (len(stack.members), *stack.shape)
    strides = (stack.rows_per_matrix * ROW, *stack.strides)
    return buffer.as_strided(shape, strides, buffer.storage_offset() + stack.first_row * ROW).detach()


def _box(buffer: torch.Tensor, stack: Stack, offset: int) -> torch.Tensor:
    """A stack's ``[W, n_own, chunk, cols]`` box in an all-to-all buffer ``[W, L]``, from ``offset``."""
    cols = stack.shape[1]
    shape = (stack.world, stack.per_owner, stack.chunk, cols)
    strides = (buffer.stride(0), stack.chunk * cols, cols, 1)
    return buffer.as_strided(shape, strides, buffer.storage_offset() + offset).detach()


def _wrap_like(p: torch.Tensor, local_view: torch.Tensor) -> torch.Tensor:
    """``local_view`` as what torch.optim would hold for ``p``: a DTensor for a DTensor param."""
    if not is_dtensor(p):
        return local_view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_view, p.device_mesh, p.placements, run_check=False, shape=p.size(),
                              stride=p.stride())


class GroupBuffers:
    """One sharding group's buffers and the views into them, in the group's param order.

    The big buffers are made one at a time, by ``make_grads``, ``make_params`` and ``make_state``
    (``binding.Binder`` calls them in that order), so that each old copy (the params' own tensors, the
    grads autograd made, loaded state, or the previous plan's buffers) can be released as soon as its
    values are in the new buffer, instead of all old and all new copies being alive at once.
    """

    def __init__(self, group: ShardingGroup, state_layout: dict[str, KeyLayout], offload: bool = False,
                 external_grads: dict[int, torch.Tensor] | None = None, rule=None):
        """``state_layout``: ``lay_out_state``'s, for the group's rule and variant. ``external_grads``: param
        id -> its grad, for the group's external params (``planning``). ``rule``: the group's rule, for its
        ``STATE_PARTS`` (None: every torch state key is one buffer key)."""
        self.group = group
        self.state_layout = state_layout
        self.state_keys = tuple(state_layout)
        self.rule = rule
        self.state_parts = state_parts(rule) if rule is not None else {}
        # The buffer keys each param keeps (Adafactor: row_var and col_var for a matrix, variance for a vector),
        # and the torch state keys they make (the same, but for a rule's STATE_PARTS: one key for its parts).
        self.param_state_keys = [tuple(k for k, lay in state_layout.items() if lay.tensors[i] is not None)
                                 for i in range(len(group.params))]
        self.param_torch_keys = [torch_keys(rule, keys) if rule is not None else keys
                                 for keys in self.param_state_keys]
        self._assembled: dict[tuple[str, int], torch.Tensor] = {}  # (torch key, param index) -> rule.assemble's
        # With offload_optimizer_state on an accelerator, the state users see (and that the binder
        # adopts into) lives in pinned host buffers; ``state`` is the device copy the program updates,
        # filled before each step and released after it.
        self.offloaded = offload and offloads_state(group.key.device)
        self.locals = [local_tensor(p) for p in group.params]  # the param shards as they are now
        self._external_grads = {i: (external_grads or {})[id(group.params[i])] for i in group.external}
        self.params: torch.Tensor | None = None  # set by make_params
        self.param_views: list[torch.Tensor | None] = []
        self.stack_params: list[torch.Tensor] = []
        self.grads: torch.Tensor | None = None  # set by make_grads
        self.grad_locals: list[torch.Tensor] = []
        self.grad_views: list[torch.Tensor] = []
        self.external_flat: dict[int, torch.Tensor] = {}
        self.stack_grads: list[torch.Tensor] = []
        self.state: dict[str, torch.Tensor] = {}  # filled key by key by make_state
        self.state_home: dict[str, torch.Tensor] = self.state if not self.offloaded else {}
        self.state_locals: dict[str, list[torch.Tensor]] = {}
        self.state_views: dict[str, list[torch.Tensor]] = {}
        self.stack_state: list[dict[str, torch.Tensor]] = [{} for _ in group.stacks]
        entries, device = group.entries, group.key.device
        self.staged = [i for i, e in enumerate(entries) if e.region == STAGED]
        self.aliased = [i for i, e in enumerate(entries) if e.region == ALIASED]
        rows = [e.slot - group.first_slot for e in entries if e.region != BUCKETED
                for _ in range(-(-e.numel // ROW))]
        self.row_slot = torch.tensor(rows, dtype=torch.int32).to(device)
        # A row-sharded matrix group's all-to-all buffers (bfloat16 [W, L]: one block per rank) and each
        # stack's box in them (see ``rules.muon``): ``outbox`` what this rank sends, ``inbox`` receives.
        self.outboxes, self.inboxes = [], []
        if group.exchange is not None:
            sizes = [round_up(st.per_owner * st.chunk * st.shape[1], 8) for st in group.stacks]  # 16-byte blocks
            self.outbox = _buffer((group.exchange.world, max(sum(sizes), 8)), torch.bfloat16, device)
            self.inbox = _buffer((group.exchange.world, max(sum(sizes), 8)), torch.bfloat16, device)
            offset = 0
            for st, size in zip(group.stacks, sizes):
                self.outboxes.append(_box(self.outbox, st, offset))
                self.inboxes.append(_box(self.inbox, st, offset))
                offset += size

    def make_grads(self) -> None:
        """The grad buffer and its views (``p.grad`` as users see it); external grads stay where they are."""
        group, key = self.group, self.group.key
        self.grads = _row_buffer(group.grad_rows, key.grad_dtype, key.device, stream=STREAMS.index("grads"))
        external = self._external_grads
        self.grad_locals = [local_tensor(external[i]) if e.external else _view(self.grads, e.row, t)
                            for i, (e, t) in enumerate(zip(group.entries, self.locals))]
        self.grad_views = [external[i] if e.external else _wrap_like(p, v)
                           for i, (p, e, v) in enumerate(zip(group.params, group.entries, self.grad_locals))]
        # What the compiled calls read of the external grads: 1-D aliases with storages of their own,
        # so that Dynamo sees the same input kind whatever their offsets in the other framework's
        # buffer (it specialises storage offsets 0 and 1, and guards on which inputs share a storage).
        self.external_flat = {i: own_storage_alias(flat_alias(self.grad_locals[i])) for i in group.external}
        # A matrix group's stacks as [n, rows, cols] views: params, grads and state, matrix by matrix.
        self.stack_grads = [_stack_view(self.grads, st) for st in group.stacks]

    def make_params(self) -> None:
        """The param buffer: aliased params' new ``.data`` (moved in by the binder), staged params' staging area."""
        group, key = self.group, self.group.key
        self.params = _row_buffer(group.flat_rows, key.dtype, key.device, stream=STREAMS.index("params"))
        # param_views: aliased -> the new p.data; staged -> the staging area; bucketed -> None
        self.param_views = [_view(self.params, e.row, t) if e.region != BUCKETED else None
                            for e, t in zip(group.entries, self.locals)]
        self.stack_params = [_stack_view(self.params, st) for st in group.stacks]

    def make_state(self, name: str) -> None:
        """State key ``name``'s buffer (and its pinned host home when offloading) and views, once."""
        if name in self.state:
            return
        group, key, layout = self.group, self.group.key, self.state_layout[name]
        stream = len(STREAMS) + self.state_keys.index(name)
        self.state[name] = _row_buffer(layout.rows, layout.dtype, key.device, stream=stream)
        if self.offloaded:
            self.state_home[name] = _row_buffer(layout.rows, layout.dtype, torch.device("cpu"),
                                                pin=_pins_home(key.device), stream=stream)
        home = self.state_home[name]
        self.state_locals[name] = [at.view(home) if at is not None else None for at in layout.tensors]
        # A part of a STATE_PARTS key is not shaped like the param: it stays local, and torch_view wraps the
        # state tensor ``assemble`` makes of the parts instead.
        self.state_views[name] = [v if v is None or self._is_part(name) else _wrap_like(p, v)
                                  for p, v in zip(group.params, self.state_locals[name])]
        for stack, at, views in zip(group.stacks, layout.stacks, self.stack_state):
            if at is not None:
                views[name] = at.view(self.state[name], len(stack.members)).detach()

    def _is_part(self, name: str) -> bool:
        """Buffer key ``name`` is one part of a torch state key (``STATE_PARTS``), not a torch key itself."""
        return any(name in parts for parts in self.state_parts.values())

    def _buffer_keys(self, key: str, i: int) -> tuple[str, ...]:
        """The buffer keys param i keeps torch state key ``key`` in: its ``STATE_PARTS`` parts, or ``key``."""
        parts = self.state_parts.get(key, ())
        return parts if parts and parts[0] in self.param_state_keys[i] else (key,)

    def torch_view(self, key: str, i: int) -> torch.Tensor:
        """What ``optimizer.state[p][key]`` holds for param i: the view of buffer key ``key``, or the rule's
        ``assemble`` over its parts' views (made once per plan, so that the binder recognises it every step)."""
        names = self._buffer_keys(key, i)
        for name in names:
            self.make_state(name)
        if names == (key,):
            return self.state_views[key][i]
        if (key, i) not in self._assembled:
            local = self.rule.assemble(key, {name: self.state_locals[name][i] for name in names},
                                       tuple(self.locals[i].shape), self.group.key.dtype)
            self._assembled[key, i] = _wrap_like(self.group.params[i], local)  # a DTensor like a DTensor param
        return self._assembled[key, i]

    def zero_state(self, key: str, i: int) -> None:
        """Param i's torch state ``key`` created as torch.optim creates it: zeros in every buffer key it is kept in."""
        for name in self._buffer_keys(key, i):
            self.state_locals[name][i].zero_()

    def adopt_state(self, key: str, i: int, value: torch.Tensor) -> None:
        """Copy ``value`` (a state tensor that is not ``torch_view(key, i)``) into param i's buffer keys."""
        names = self._buffer_keys(key, i)
        if names == (key,):
            self.state_locals[key][i].copy_(local_tensor(value))
            return
        declared = {name: StateTensor(self.state_layout[name].tensors[i].shape, self.state_layout[name].dtype)
                    for name in names}
        values = self.rule.disassemble(key, local_tensor(value), declared)
        for name in names:
            self.state_locals[name][i].copy_(values[name])

    def state_slice(self, name: str, i: int) -> torch.Tensor:
        """Param i's state tensor ``name`` in the (device) state buffer, as a 1-D alias (for the bucket calls)."""
        at = self.state_layout[name].tensors[i]
        return flat_slice(self.state[name], at.row, numel(at.shape))

    def make_all_state(self) -> None:
        """Every state key's buffer (those no param's state needed yet too), in the rule's key order."""
        for name in self.state_keys:
            self.make_state(name)
        # The binder makes them in the order it meets them: keep one order for the program's arguments.
        for d in (self.state, self.state_home, self.state_locals, self.state_views, *self.stack_state):
            ordered = {name: d[name] for name in self.state_keys if name in d}  # a stack keeps some keys only
            d.clear()
            d.update(ordered)


@dataclass
class Storage:
    """One plan's memory, the object the build hands to the binder, the program and the runner.

    ``groups[g]`` holds sharding group g's flat params, grads and state and the views users see;
    ``buffers`` the plan-wide vectors the compiled calls read and write (scales, hyperparameter rows,
    partial norms, outputs); ``group_rules[g]`` and ``group_variants[g]`` are group g's update rule and its
    variant (per sharding group, where the optimizers' lists are per param group)."""

    plan: Plan
    groups: list["GroupBuffers"]
    buffers: "StepBuffers"
    group_rules: list
    group_variants: list


class StepBuffers:
    """The plan-wide vectors and 0-d tensors the compiled calls read and write.

    ``rules[g]`` is group g's update rule: the per-slot table and the hyperparameter rows are as
    wide as the widest rule's columns (padded to 16 bytes), each rule reading its own columns.
    """

    def __init__(self, plan: Plan, rules: list, kind: NormKind, max_norm: float | None,
                 outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], offload: bool = False,
                 lr_ratios: list[list[float]] | None = None):
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
        # With several rules (several optimizers): which of the distinct rules each slot's group has.
        distinct = list(dict.fromkeys(rules))
        self.slot_rule = _buffer((n_slots,), torch.int32, device)
        self.slot_rule.copy_(torch.tensor([distinct.index(rules[g]) for g in slot_group], dtype=torch.int32))
        # Table columns and hyperparameter columns padded so that every row starts 16-byte aligned. The
        # table is float64 when a group's params are float64: their update is float64 throughout, as torch's.
        widest_table = max((len(r.TABLE_COLUMNS) for r in rules), default=2)
        widest_hp = max((len(r.HP_COLUMNS) for r in rules), default=2)
        self.table = _buffer((n_slots, round_up(widest_table, 4)), table_dtype(g.key.dtype for g in groups), device)
        self.hp = _buffer((len(groups), round_up(widest_hp, 2)), torch.float64, device)
        self.scales = [self.hp[g, 0].detach() for g in range(len(groups))]  # the SCALE column
        self.hp_rows = [self.hp[g].detach() for g in range(len(groups))]
        self.partials = _buffer((len(groups), PARTIAL_WIDTH), torch.float64, device)
        self.partial_rows = [self.partials[g].detach() for g in range(len(groups))]
        self.pp_partial = _buffer((1, PARTIAL_WIDTH), torch.float64, device)
        self.order = torch.tensor(kind.p if kind.kind == "scaled" else 2.0, dtype=torch.float64).to(device)
        threshold = float("inf") if max_norm is None else float(max_norm)
        self.max_norm = torch.tensor(threshold, dtype=torch.float64).to(device)
        self.total, self.finite, self.skipped = outputs  # FusedStep's: they outlive a plan
        self.amax = _buffer((n_slots,), torch.float32, device)
        # Matrix stacks' lr ratios (one [1] float64 each, in rows of 16 bytes), per group.
        ratios = [r for per_group in (lr_ratios or []) for r in per_group]
        table = _buffer((max(len(ratios), 1), 2), torch.float64, device)
        table[:len(ratios), 0].copy_(torch.tensor(ratios, dtype=torch.float64))
        self.lr_ratios, k = [], 0
        for per_group in lr_ratios or []:
            self.lr_ratios.append([table[k + j, :1].detach() for j in range(len(per_group))])
            k += len(per_group)
        # torch's step tensors (the rules' STEP_KEY) are 0-d views of the counts (of their host copy when offloading).
        self.offloaded = offload and offloads_state(device)
        self.counts_home = (_buffer((n_slots,), torch.float32, torch.device("cpu"), pin=_pins_home(device))
                            if self.offloaded else self.counts)
        any_steps = any(r.STEP_KEY is not None for r in rules)
        self.count_views = [self.counts_home[s] for s in range(n_slots)] if any_steps else None
