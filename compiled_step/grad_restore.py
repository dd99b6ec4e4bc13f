"""Grads set to None go back to FusedStep's buffers before autograd writes them: no per-step copies.

Trainers free grads between steps: HF Trainer calls ``model.zero_grad()`` and Accelerate's optimizer
``zero_grad(set_to_none=True)``. Autograd then gives each param the grad it computed, and the next
``step()`` would copy every one into the grad buffers. Instead each param has two hooks. One runs when
the backward pass is about to accumulate into ``p.grad`` and notes whether ``p.grad`` is None; the other
runs right after autograd set ``p.grad`` (a post-accumulate-grad hook): for a param so noted, it copies
the new grad into the param's view of the grad buffer and installs the view, and the new grad is freed.
Later backwards before the step accumulate into the view in place, as after ``fused.zero_grad()``.

Why copy after rather than install a zeroed view before (and let autograd accumulate into it): with N
the grad's bytes, zeroing writes N and accumulating reads the view and the new grad and writes the view
(4N, two ops per param); the copy reads the new grad and writes the view (2N, one op). Autograd hands the
new grad to ``p.grad`` without copying it (it steals the backward's buffer when nothing else holds it).
Memory: the new grad lives from the op that computed it to the copy, one param's at a time, as the
temporary that autograd accumulated from did before; no grad-sized buffer is added at the peak.

The hooks act only when the engine writes ``p.grad``:
* a ``backward()`` that reaches the param (not ``backward(inputs=...)`` without it);
* never under ``torch.autograd.grad``, which returns grads without touching ``.grad``;
* not when the new grad has a graph (``backward(create_graph=True)``): the view would drop it; the step
  copies such a grad in, as any grad that is not the view.

A param that gets no grad keeps ``p.grad`` None and stays inactive for the step, as in ``torch.optim``.
The hooks hold the binder weakly: once a plan is replaced, or the FusedStep is gone, they are removed.

Several FusedSteps may hold the same params (a trainer kept alive while a second one trains them): each
has its hooks on them, and the first registered would win the backward, so the one that steps would copy
every grad out of the other's buffer at every step. So each param has one *owner*, the binder whose
buffer its grad belongs in, and only the owner's hook acts. A binder claims its params when it is built
(the newest FusedStep takes them over) and claims a param back when its step had to copy the param's
grad in (an older FusedStep stepped again: one copy, then none). A hook whose owner is gone acts and
claims the param.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# param -> (weakref to the owning binder, the param's index in it). Keyed by identity (tensors' ``==`` is
# elementwise), weak on both sides: neither a param nor a FusedStep is kept alive by ownership. Each binder
# mirrors it in ``binder.owns`` (a bool per param), which is all a hook reads in the common case.
_OWNERS = WeakIdKeyDictionary()


def claim(binder, indices: Iterable[int]) -> None:
    """Make ``binder`` the owner of the grads of its params ``indices`` (their previous owner's hooks stop)."""
    for i in indices:
        p = binder.params[i]
        previous = owner_of(p)
        if previous is not None and previous[0] is not binder:
            previous[0].owns[previous[1]] = False
        _OWNERS[p] = (binder.ref, i)
        binder.owns[i] = True


def disown(binder) -> None:
    """Give up the params ``binder`` owns (its plan is replaced): another FusedStep's hooks may act on them."""
    for i, p in enumerate(binder.params):
        if binder.owns[i]:
            binder.owns[i] = False
            entry = _OWNERS.get(p)
            if entry is not None and entry[0] is binder.ref:
                del _OWNERS[p]


def owner_of(p: torch.Tensor) -> tuple[object, int] | None:
    """(the binder, the param's index in it) owning ``p``'s grad; None when none is alive."""
    entry = _OWNERS.get(p)
    binder = entry[0]() if entry is not None else None
    return None if binder is None else (binder, entry[1])


def _will_accumulate(node) -> bool:
    """Whether the running backward pass executes ``node`` (a param's AccumulateGrad), so writes ``.grad``.

    torch raises for a leaf's node under ``torch.autograd.grad`` ("currently running
    autograd.grad()"): that pass never writes ``.grad``.
    """
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return False


class _Restore:
    """The hooks of one param (see the module docstring): ``__call__`` before autograd accumulates into
    ``p.grad``, ``adopt`` right after."""

    __slots__ = ("binder", "index", "node", "pending")
    __torch_unserializable__ = True  # pickling a param drops its hooks; torch.utils.hooks warns unless marked

    def __init__(self, binder, index: int, node):
        self.binder = weakref.ref(binder)
        self.index = index
        self.node = node  # a strong reference keeps torch from making a new AccumulateGrad per forward
        self.pending = False  # this backward will set p.grad from None, and the grad belongs in our buffer

    def __call__(self, grad: torch.Tensor) -> None:
        # Set on every call, so a backward that failed between the two hooks leaves nothing stale.
        self.pending = self._will_set_grad()

    def _will_set_grad(self) -> bool:
        binder = self.binder()
        if binder is None:
            return False
        p = binder.params[self.index]
        if p.grad is not None or not _will_accumulate(self.node):
            return False
        if not binder.owns[self.index]:
            if owner_of(p) is not None:
                return False  # another FusedStep owns the grad: its hooks bring it into its own buffer
            claim(binder, (self.index,))  # the owner is gone
        return True

    def adopt(self, p: torch.Tensor) -> None:
        if not self.pending:
            return
        self.pending = False
        binder = self.binder()
        if binder is not None and p.grad is not None and not p.grad.requires_grad:
            binder.adopt_grad(self.index)


class GradRestoreHooks:
    """The hooks of one binder's params (only those that require grad and are autograd leaves)."""

    def __init__(self, binder):
        self.handles = []
        for i, p in enumerate(binder.params):
            if not p.requires_grad or p.grad_fn is not None:
                continue
            restore = _Restore(binder, i, torch.autograd.graph.get_gradient_edge(p).node)
            self.handles.append(p.register_hook(restore))
            self.handles.append(p.register_post_accumulate_grad_hook(restore.adopt))
        self._finalizer = weakref.finalize(binder, _remove, self.handles)

    def remove(self) -> None:
        self._finalizer()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
