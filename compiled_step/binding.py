"""Per step: make the persistent buffers hold this step's inputs, doing work only where something changed.

What a steady-state step costs here (the common case: ``fused.zero_grad()`` between steps, no
scheduler change to the structure) is a few identity checks per param in C-level loops:

* the optimizer still holds the same params in the same groups, with the same structural options;
* plain params still live where they were (their ``data_ptr``: in the flat buffers for aliased
  params), DTensor shards are the same objects;
* every ``p.grad`` is the view FusedStep installed (or still None);
* every state tensor in ``optimizer.state`` is FusedStep's view;

then one small host-to-device copy of the hyperparameters (skipped when they did not change).

Anything else is handled, never ignored: a grad that is not the installed view (after
``optimizer.zero_grad()``, FSDP2 assigning a fresh grad, a user's assignment) is validated, copied
into the buffer and replaced by the view; a grad set to None zeroes its region and marks the param
inactive (no update, as torch.optim skips params without grads); state that is not a view is
adopted; a changed structure or layout makes ``FusedStep`` rebuild the plan.
"""

from __future__ import annotations

import operator
import weakref
from itertools import repeat

import torch

from compiled_step import checks, collectives, grad_restore
from compiled_step.grad_restore import GradRestoreHooks
from compiled_step.lifecycle import ddp
from compiled_step.planning import Plan, is_dtensor, local_tensor
from compiled_step.storage import GroupBuffers, Storage, own_storage_alias

_GRAD = operator.attrgetter("grad")
_IS = operator.is_
_DATA_PTR = torch.Tensor.data_ptr


class Rebuild(Exception):
    """The plan no longer matches the params (raised by binding, handled by FusedStep)."""


def check_grad(p: torch.Tensor, g: torch.Tensor, label: str, grad_dtype: torch.dtype | None = None) -> None:
    """Raise for a grad FusedStep cannot use; raise ``Rebuild`` for one of another dtype."""
    if g.is_sparse:
        raise TypeError(f"{label}: sparse grads are not supported; FusedStep needs dense grads")
    if g.shape != p.shape:
        raise ValueError(f"{label}: grad shape {tuple(g.shape)} differs from param shape {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{label}: grad is on {g.device} but the param is on {p.device}")
    if g.is_complex() or not g.is_floating_point():
        raise TypeError(f"{label}: grads must be real floating point, got {g.dtype}")
    if grad_dtype is not None and g.dtype != grad_dtype:
        raise Rebuild(f"{label}: grad dtype changed to {g.dtype}")


def check_grads(plan: Plan, grads: list[torch.Tensor | None]) -> None:
    """``check_grad`` for every grad the plan's params have (None: no grad), before anything is built."""
    names = [name for group in plan.groups for name in group.names]
    for p, g, name in zip(plan.params, grads, names):
        if g is not None:
            check_grad(p, g, name)


def _why_foreign(p: torch.Tensor, g: torch.Tensor, binder, ddp_params: frozenset[int]) -> str:
    """Why ``binder`` found a grad that is not its view, for the copy warning (``checks.copy_warning``)."""
    owner = grad_restore.owner_of(p)
    if owner is not None and owner[0] is not binder and g is owner[0].grad_views[owner[1]]:
        return checks.ANOTHER_FUSED_STEP
    if ddp.is_bucket_view(g):
        return checks.DDP_BUCKET_VIEW if id(p) in ddp_params else checks.VIEW_OF_ANOTHER_BUFFER
    return checks.NEW_TENSOR


class Binder:
    """The per-step binding of one built plan."""

    def __init__(self, store: Storage, rules: list, owners: list[int], param_lists, variants: list, *,
                 bucket_view_params: frozenset[int] = frozenset(), ddp_params: frozenset[int] = frozenset()):
        """``store``: the plan's buffers. ``rules``, ``owners`` (the optimizer's index), ``param_lists`` and
        ``variants``: one per param group, the groups of all optimizers in order. ``bucket_view_params``:
        ``id()`` of the params whose DDP bucket views are read in place (``lifecycle/ddp.py``);
        ``ddp_params``: ``id()`` of all params of DDP modules with gradient_as_bucket_view=True (the copy
        warning blames DDP for those only)."""
        self.ref = weakref.ref(self)  # how the grad ownership registry names this binder (grad_restore)
        plan, groups = store.plan, store.groups
        self.plan, self.groups, self.buffers = plan, groups, store.buffers
        self.rules, self.owners = rules, owners
        self.param_lists = [list(params) for params in param_lists]
        self.variants = variants
        self.params = [p for gb in groups for p in gb.group.params]
        self.names = [n for gb in groups for n in gb.group.names]
        self.group_and_index = [(gb, i) for gb in groups for i in range(len(gb.group.params))]  # of each param
        self.grad_views: list[torch.Tensor] = []  # set by install, once the grad buffers exist
        # Plain params (aliased, staged or bucketed): a replaced ``.data`` shows as a new data_ptr.
        self.plain = [p for p in self.params if not is_dtensor(p)]
        self.plain_ptrs: list[int] = []  # set by install, once the aliased params live in the buffers
        self.sharded = [p for p in self.params if is_dtensor(p)]
        self.sharded_locals = [p._local_tensor for p in self.sharded]
        self.slots = [gb.group.entries[i].slot for gb in groups for i in range(len(gb.group.params))]
        self.expected_grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.active = [False] * plan.slots  # host copy of buffers.active
        self.state_objs: tuple = ()  # the optimizers' state dicts the views were installed into
        self.installed: list[tuple[str, list, list]] = []  # (key, state dicts, views) to check each step
        self.hp_values: list | None = None  # the hyperparameter rows last written
        self.created: list[torch.Tensor] = []  # params whose state bind_state created in this step
        # Params of DDP modules with gradient_as_bucket_view=True: a bucket view as their grad is read
        # where it is (lifecycle/ddp.py), so a new one rebuilds the plan instead of being copied.
        self.bucket_view_params = bucket_view_params
        self.ddp_params = ddp_params
        self.copied: list[tuple[str, str]] = []  # (name, why) of each grad the last bind_grads copied in
        self.restore_hooks: GradRestoreHooks | None = None  # set by install
        self.unseen_restores: list[int] = []  # params adopt_grad gave a view the binder expected None for
        self.owns = [False] * len(self.params)  # whether this binder owns each param's grad (grad_restore.claim)

    # ---------------------------------------------------------------- structure

    def unchanged(self, groups: list[dict], variants: list) -> bool:
        """Same params in the same groups (all optimizers' in order), same variants, no ``.data`` and no
        shard replaced."""
        if len(groups) != len(self.param_lists) or variants != self.variants:
            return False
        for group, expected in zip(groups, self.param_lists):
            params = group["params"]
            if len(params) != len(expected) or not all(map(_IS, params, expected)):
                return False
        if list(map(_DATA_PTR, self.plain)) != self.plain_ptrs:
            return False  # p.data was replaced (model.to(), a user's assignment): build the plan anew
        return all(map(_IS, (p._local_tensor for p in self.sharded), self.sharded_locals))

    # ---------------------------------------------------------------- grads

    def grads_unchanged(self) -> bool:
        return all(map(_IS, map(_GRAD, self.params), self.expected_grads))

    def bind_grads(self) -> bool:
        """Bring this step's grads into the grad buffers. Returns whether the active set changed.

        Validates every grad that is not the installed view before changing anything. Raises
        ``Rebuild`` when a grad's dtype differs from its buffer's.
        """
        grads = list(map(_GRAD, self.params))
        if self.unseen_restores:
            with torch.no_grad():
                for i in self.unseen_restores:
                    if grads[i] is None and self.expected_grads[i] is None:
                        gb, j = self.group_and_index[i]
                        gb.grad_locals[j].zero_()
            self.unseen_restores.clear()
        if all(map(_IS, grads, self.expected_grads)):
            self.copied = []
            return False
        foreign = []
        for i, (g, expected) in enumerate(zip(grads, self.expected_grads)):
            if g is expected or g is None or g is self.grad_views[i]:
                continue
            gb, j = self.group_and_index[i]
            p = self.params[i]
            check_grad(p, g, self.names[i], gb.group.key.grad_dtype)
            if id(p) in self.bucket_view_params and ddp.is_bucket_view(g):
                raise Rebuild(f"{self.names[i]}: DDP re-pointed the grad at another bucket view")
            if is_dtensor(g):
                g = collectives.match_grad_placement(p, g)
            foreign.append((i, g))
        self.copied = [(self.names[i], _why_foreign(self.params[i], grads[i], self, self.ddp_params))
                       for i, _ in foreign]
        changed = False
        with torch.no_grad():
            for i, g in enumerate(grads):
                if g is self.expected_grads[i]:
                    continue
                gb, j = self.group_and_index[i]
                if g is None:
                    gb.grad_locals[j].zero_()  # stale values must not reach the norm
                    self.expected_grads[i] = None
                    changed |= self._set_active(i, False)
                elif g is self.grad_views[i]:
                    self.expected_grads[i] = g
                    changed |= self._set_active(i, True)
            if foreign:
                torch._foreach_copy_([self.group_and_index[i][0].grad_locals[self.group_and_index[i][1]] for i, _ in foreign],
                                     [local_tensor(g) for _, g in foreign])
                for i, _ in foreign:
                    gb, j = self.group_and_index[i]
                    self.params[i].grad = gb.grad_views[j]
                    self.expected_grads[i] = gb.grad_views[j]
                    changed |= self._set_active(i, True)
                # Our buffer holds these grads now: our hooks act on them again, another FusedStep's stop.
                grad_restore.claim(self, [i for i, _ in foreign])
        if changed:
            self.buffers.active.copy_(torch.tensor(self.active, dtype=torch.bool), non_blocking=True)
        return changed

    def adopt_grad(self, i: int) -> None:
        """Copy the grad that backward just gave param i (its grad was None) into its buffer view and point
        the param at the view (called by its post-accumulate-grad hook); the new grad is then freed."""
        gb, j = self.group_and_index[i]
        p, g = self.params[i], self.params[i].grad
        if is_dtensor(g):
            g = collectives.match_grad_placement(p, g)
        with torch.no_grad():
            gb.grad_locals[j].copy_(local_tensor(g))
        p.grad = self.grad_views[i]
        if self.expected_grads[i] is None:
            # The binder counts this region as zero (no grad at the last bind). If p.grad is set to None again
            # before the next step (optimizer.step() and zero_grad(set_to_none=True) in between), the values
            # copied here would enter the norm: bind_grads zeroes the region then.
            self.unseen_restores.append(i)

    def release(self) -> None:
        """Remove the grad hooks and give up the grads' ownership (the plan is being replaced)."""
        if self.restore_hooks is not None:
            self.restore_hooks.remove()
        grad_restore.disown(self)

    def _set_active(self, i: int, value: bool) -> bool:
        slot = self.slots[i]
        if self.active[slot] == value:
            return False
        self.active[slot] = value
        return True

    def install(self, previous: list[torch.Tensor | None]) -> None:
        """At build: the grads the params had copied into new grad buffers and their params pointed at the
        views (external grads stay where they are), then aliased params moved into new param buffers
        (values copied, each with a storage of its own: ``storage.own_storage_alias``).

        One buffer at a time, each old copy dropped as soon as it is copied: the grads autograd made (or
        the previous plan's grad views) are freed before the param buffers exist, the params' own tensors
        (or the previous plan's param buffers) before the state buffers do (``bind_state``). ``previous``
        is emptied as its grads are copied. Holding old and new copies together would need 4x param
        bytes more than eager torch at a first step, a resume or a rebuild (issue 22).
        """
        had_grad = [g is not None for g in previous]
        with torch.no_grad():
            i = 0  # self.params runs group by group
            for gb in self.groups:
                gb.make_grads()
                for j, p in enumerate(gb.group.params):
                    g, previous[i] = previous[i], None
                    i += 1
                    if g is None or g is gb.grad_views[j]:
                        continue  # no grad, or an external grad read where it is
                    if is_dtensor(g):
                        g = collectives.match_grad_placement(p, g)
                    gb.grad_locals[j].copy_(local_tensor(g))
                    p.grad = gb.grad_views[j]
                g = None  # the last old grad: a view would keep the whole previous grad buffer alive
            self.grad_views = [v for gb in self.groups for v in gb.grad_views]
            for gb in self.groups:
                gb.make_params()
                for i in gb.aliased:
                    p, view = gb.group.params[i], gb.param_views[i]
                    view.copy_(p.data)
                    # The param is the only tensor FusedStep keeps over the alias's storage (gb.locals[i]
                    # is the param itself): at a rebuild, planning counts the storage's references to tell
                    # whether someone else aliased the param since (p.detach(), state_dict()), and a
                    # second tensor of ours would hide or fake one.
                    p.data = own_storage_alias(view)
        self.plain_ptrs = list(map(_DATA_PTR, self.plain))
        grad_restore.claim(self, range(len(self.params)))  # the newest plan takes the grads over
        self.restore_hooks = GradRestoreHooks(self)
        self.expected_grads = [self.grad_views[i] if had else None for i, had in enumerate(had_grad)]
        for i, had in enumerate(had_grad):
            self._set_active(i, had)
        self.buffers.active.copy_(torch.tensor(self.active, dtype=torch.bool), non_blocking=True)

    def zero_grads(self) -> None:
        """Zero every grad in place: the grad buffers, and the external grads where they are."""
        external = [gb.grad_locals[i] for gb in self.groups for i in gb.group.external]
        for gb in self.groups:
            gb.grads.zero_()
        if external:
            torch._foreach_zero_(external)

    # ---------------------------------------------------------------- state

    def state_unchanged(self, optimizers) -> bool:
        if len(optimizers) != len(self.state_objs) or not all(map(_IS, (o.state for o in optimizers), self.state_objs)):
            return False
        for key, dicts, views in self.installed:
            if not all(map(_IS, map(dict.get, dicts, repeat(key)), views)):
                return False
        return True

    def bind_state(self, optimizers) -> None:
        """Make every state tensor of an active param (or of one that has state) a view of the buffers.

        Missing state is created as torch.optim would (zeros, in the shapes the rule declares; and the count:
        torch's step tensor at 0 where the rule names one, ``STEP_KEY``, else ``rule.count_at_bind``: SGD's
        first-step flag), state that is not a view is copied in. Params without a grad
        and without state keep none. The params whose state was created are added to ``created``.

        Key by key: a key's buffers are made (at a build) just before its tensors are adopted, and each
        adopted tensor (loaded by ``load_state_dict``, or a view of the previous plan's buffer) is
        dropped from ``optimizer.state`` as soon as it is copied, so at most one key's old and new copies
        are alive together.
        """
        self._count_slots, self._count_values = [], []
        installed: dict[str, tuple[list, list]] = {}
        fresh: list[torch.Tensor] = []
        bound = []  # (param index, its state dict, its rule, its state keys)
        for i, p in enumerate(self.params):
            index = self.group_and_index[i][0].group.key.param_group
            rule, state = self.rules[index], optimizers[self.owners[index]].state
            gb, j = self.group_and_index[i]
            keys = gb.param_torch_keys[j]  # torch's keys of the rule's declaration for this param (state_layout)
            st = state.get(p)
            if not keys and rule.STEP_KEY is None:
                continue  # e.g. SGD without momentum: torch keeps no state, and neither do we
            if not st and not self.active[self.slots[i]]:
                continue  # no grad and no state: torch.optim creates none either
            if not st:
                fresh.append(p)
            bound.append((i, state[p], rule, keys))
        created, adopted = [False] * len(bound), [False] * len(bound)
        with torch.no_grad():
            for key in dict.fromkeys(k for *_, keys in bound for k in keys):
                for n, (i, st, _, keys) in enumerate(bound):
                    if key in keys:
                        c, a = self._bind_key(st, *self.group_and_index[i], key, installed)
                        created[n] |= c
                        adopted[n] |= a
            for n, (i, st, rule, _) in enumerate(bound):
                self._bind_count(rule, st, self.slots[i], created[n], adopted[n], installed)
            if self._count_slots:
                self._write_counts(self._count_slots, self._count_values)
            for gb in self.groups:
                gb.make_all_state()  # at a build: the keys no param's state needed yet
        self.state_objs = tuple(o.state for o in optimizers)
        self.installed = [(key, dicts, views) for key, (dicts, views) in installed.items()]
        self.created += fresh

    def _bind_key(self, st: dict, gb: GroupBuffers, j: int, key: str, installed: dict) -> tuple[bool, bool]:
        """The param's state tensor ``key`` as a view of the buffers: (whether it was created, adopted)."""
        view = gb.torch_view(key, j)  # makes the key's buffers at a build
        current = st.get(key)
        created = adopted = False
        if current is None:
            gb.zero_state(key, j)
            st[key] = view
            created = True
        elif current is not view:
            gb.adopt_state(key, j, current)
            st[key] = view  # the optimizer's reference to the old tensor goes: it is freed unless held elsewhere
            adopted = True
        dicts, views = installed.setdefault(key, ([], []))
        dicts.append(st)
        views.append(view)
        return created, adopted

    def _bind_count(self, rule, st: dict, slot: int, created: bool, adopted: bool, installed: dict) -> None:
        """The param's count: torch's step tensor (``rule.STEP_KEY``) as a view of the counts where torch keeps
        one, else what ``rule.count_at_bind`` says for state just created or adopted (None: nothing)."""
        key = rule.STEP_KEY
        if key is not None:  # Adam, Adafactor: state["step"] is a view of the counts
            view = self.buffers.count_views[slot]
            current = st.get(key)
            if current is not view:
                self._count_slots.append(slot)
                self._count_values.append(current)  # None: a new state starts at step 0
                st[key] = view
            dicts, views = installed.setdefault(key, ([], []))
            dicts.append(st)
            views.append(view)
        elif created or adopted:
            value = rule.count_at_bind(created)  # SGD: 1.0 for a buffer it creates (torch clones the grad), else 0.0
            if value is not None:
                self._count_slots.append(slot)
                self._count_values.append(value)

    def forget(self, optimizers, params: list[torch.Tensor]) -> None:
        """Remove the state ``bind_state`` created for ``params`` (a step that raised changes nothing)."""
        for p in params:
            for optimizer in optimizers:
                optimizer.state.pop(p, None)
        self.state_objs = ()  # re-install at the next step

    def _write_counts(self, slots: list[int], values: list) -> None:
        """Write per-slot counts (None: 0; numbers; step tensors wherever they live) without a host sync."""
        counts = self.buffers.counts_home  # the counts themselves, or their host copy when offloading
        device = counts.device
        values = [torch.zeros((), dtype=torch.float32) if v is None else
                  (local_tensor(v.detach()).reshape(()).to(torch.float32) if isinstance(v, torch.Tensor)
                   else torch.tensor(float(v), dtype=torch.float32)) for v in values]
        index = torch.tensor(slots).to(device, non_blocking=True)
        counts.index_copy_(0, index, torch.stack([v.to(device, non_blocking=True) for v in values]))

    # ---------------------------------------------------------------- hyperparameters

    def write_hyperparameters(self, rows: list[list]) -> None:
        """Write each group's hyperparameter row (floats, or device tensors copied on the device).

        One host-to-device copy when a float changed (pinned, non-blocking on CUDA); nothing when no
        value changed since the last step.
        """
        hp = self.buffers.hp
        width = hp.shape[1]  # the rule's columns, then zero padding
        tensors = [(g, c, v) for g, row in enumerate(rows) for c, v in enumerate(row) if isinstance(v, torch.Tensor)]
        floats = [v if not isinstance(v, torch.Tensor) else 0.0 for row in rows
                  for v in row + [0.0] * (width - len(row))]
        if floats != self.hp_values or tensors:
            host = torch.tensor(floats, dtype=torch.float64)
            if hp.device.type == "cuda":
                host = host.pin_memory()
            hp.view(-1).copy_(host, non_blocking=True)
            self.hp_values = None if tensors else floats
        for g, c, v in tensors:
            hp[g, c].copy_(v)
