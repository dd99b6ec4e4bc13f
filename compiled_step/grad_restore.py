"""Grads set to None go back to FusedStep's buffers before autograd writes them: no per-step copies.

Trainers free grads between steps: HF Trainer calls ``model.zero_grad()`` and Accelerate's optimizer
``zero_grad(set_to_none=True)``. Autograd would then give each param a new grad tensor, and the next
``step()`` would copy every one into the grad buffers (a read and a write of each grad, and a second
grad-sized allocation at the peak). Instead, a hook on each param runs when the backward pass is
about to accumulate into ``p.grad``. If ``p.grad`` is None, it zeroes the param's view of the grad
buffer and installs it, so autograd accumulates into the buffer in place, as after
``fused.zero_grad()``.

The hook acts only when the engine will write ``p.grad``:
* a ``backward()`` that reaches the param (not ``backward(inputs=...)`` without it);
* never under ``torch.autograd.grad``, which returns grads without touching ``.grad``.

A param that gets no grad keeps ``p.grad`` None and stays inactive for the step, as in ``torch.optim``.
The hooks hold the binder weakly: once a plan is replaced, or the FusedStep is gone, they are removed.
"""

from __future__ import annotations

import weakref

import torch


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
    """The hook of one param: see the module docstring."""

    __slots__ = ("binder", "index", "node")
    __torch_unserializable__ = True  # pickling a param drops its hooks; torch.utils.hooks warns unless marked

    def __init__(self, binder, index: int, node):
        self.binder = weakref.ref(binder)
        self.index = index
        self.node = node  # a strong reference keeps torch from making a new AccumulateGrad per forward

    def __call__(self, grad: torch.Tensor) -> None:
        binder = self.binder()
        if binder is not None and binder.params[self.index].grad is None and _will_accumulate(self.node):
            binder.restore_grad(self.index)


class GradRestoreHooks:
    """The hooks of one binder's params (only those that require grad and are autograd leaves)."""

    def __init__(self, binder):
        self.handles = []
        for i, p in enumerate(binder.params):
            if not p.requires_grad or p.grad_fn is not None:
                continue
            node = torch.autograd.graph.get_gradient_edge(p).node
            self.handles.append(p.register_hook(_Restore(binder, i, node)))
        self._finalizer = weakref.finalize(binder, _remove, self.handles)

    def remove(self) -> None:
        self._finalizer()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
