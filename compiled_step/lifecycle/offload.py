"""Moving a module between host memory and an accelerator (NeMo Automodel's offloading helpers).

Reading of NeMo Automodel's ``training.utils``: ``move_to_device`` moves a
model's buffers and parameters to ``device``, then runs the garbage collector and empties
the CUDA caching allocator so that the memory just vacated is given back.
``ScopedModuleOffloading(model, enabled)`` keeps a module parked on the CPU and brings it
onto the accelerator only for the body of a ``with`` block: on enter it moves the module
to the accelerator, on exit it moves it back to the CPU, also when the body raises, and it
never swallows the exception. With ``enabled=False`` it does nothing at all (the module
stays wherever it is). A typical use is a frozen reference or teacher model that only
needs accelerator memory for one forward pass per step.

Differences from NeMo Automodel, all additive:

* Device-generic. NeMo Automodel hard-codes ``"cuda"``; here the accelerator defaults to
  ``torch.accelerator.current_accelerator()`` and can be named with ``device=``. The cache
  emptied is that of every non-CPU device type the move touched (source or target), through
  ``torch.<type>.empty_cache`` (``torch.cuda``, ``torch.xpu``, ``torch.mps``...), and only
  when that backend reports itself available.
* Inputs are checked before anything moves: a non-module, a ``"meta"`` target (moving to
  meta throws the values away, it is never an offload) or ``enabled=True`` with no
  accelerator raise ``TypeError``/``ValueError``/``RuntimeError``.
* If moving onto the accelerator fails half-way (out of memory, say), ``__enter__`` moves
  the module back to the offload device before re-raising, since ``__exit__`` does not run
  for a failed ``__enter__``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from types import TracebackType

import torch
from torch import nn

__all__ = ["ScopedModuleOffloading", "move_to_device", "release_device_cache"]

# Device types with no caching allocator to empty.
_NO_CACHE_DEVICE_TYPES = frozenset({"cpu", "meta"})


def _as_device(device: object, what: str) -> torch.device:
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, (str, int)) and not isinstance(device, bool):
        resolved = torch.device(device)
    else:
        raise TypeError(f"{what} must be a torch.device, str or int, got {type(device).__name__}")
    if resolved.type == "meta":
        raise ValueError(f"{what}='meta' would discard the module's values; offloading needs a real device")
    return resolved


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def release_device_cache(device_types: Iterable[str]) -> None:
    """Collect garbage, then empty the caching allocator of each named device type.

    Call after moving tensors off a device, so the blocks they occupied go back to the
    driver instead of staying reserved by the caching allocator. CPU and meta have no
    such cache and are skipped, as is any backend that is not available in this process.
    """
    types = sorted(set(device_types))
    # Storages freed by the move can still be referenced from reference cycles; collect them
    # first or the allocator has nothing to release.
    gc.collect()
    for device_type in types:
        if device_type in _NO_CACHE_DEVICE_TYPES:
            continue
        backend = getattr(torch, device_type, None)
        empty_cache = getattr(backend, "empty_cache", None)
        is_available = getattr(backend, "is_available", None)
        if callable(empty_cache) and callable(is_available) and is_available():
            empty_cache()


def move_to_device(model: nn.Module, device: torch.device | str | int) -> None:
    """Move ``model``'s buffers and parameters to ``device`` and release stale device cache.

    Buffers are moved first by rebinding ``buffer.data``, as NeMo Automodel does (its reason:
    FSDP-wrapped modules may not move buffers for you); rebinding also keeps the buffer
    tensor objects, which other code may hold, valid. Then ``model.to(device)`` moves
    parameters (and their grads). Finally :func:`release_device_cache` empties the cache of every
    accelerator the module lived on or moved to.

    Raises ``TypeError`` for a non-module or a bad ``device``, ``ValueError`` for
    ``device="meta"``, before anything is moved.
    """
    model = _check_module(model)
    target = _as_device(device, "device")
    touched = {target.type}
    touched.update(t.device.type for t in model.parameters())
    touched.update(b.device.type for b in model.buffers())
    for buffer in model.buffers():
        buffer.data = buffer.data.to(target)
    model.to(target)
    release_device_cache(touched)


def _default_accelerator() -> torch.device | None:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:  # torch builds without the torch.accelerator API
        return None
    return accelerator.current_accelerator(check_available=True)


class ScopedModuleOffloading:
    """Context manager that keeps ``model`` on the accelerator only inside the ``with`` block.

    Usage::

        with ScopedModuleOffloading(ref_model, enabled=offload):
            ref_logits = ref_model(batch)      # on the accelerator here
        # ref_model is back on the CPU here, also if the forward raised

    Args:
        model: the module to move.
        enabled: when False (the default, as in NeMo Automodel) entering and leaving do nothing.
        device: where to run the body (keyword-only, not in NeMo Automodel). Defaults to the
            current accelerator (``torch.accelerator.current_accelerator()``); NeMo Automodel's
            behaviour is ``device="cuda"``.
        offload_device: where the module is parked outside the block (keyword-only).
            Defaults to ``"cpu"``, as in NeMo Automodel.

    Raises:
        TypeError / ValueError: bad ``model``, ``enabled``, ``device`` or ``offload_device``.
        RuntimeError: ``enabled=True``, no ``device`` given and no accelerator available.

    Exceptions raised in the body propagate unchanged (``__exit__`` returns False).
    """

    def __init__(
        self,
        model: nn.Module,
        enabled: bool = False,
        *,
        device: torch.device | str | int | None = None,
        offload_device: torch.device | str | int = "cpu",
    ) -> None:
        self.model = _check_module(model)
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self.offload_device = _as_device(offload_device, "offload_device")
        if device is not None:
            self.device: torch.device | None = _as_device(device, "device")
        elif enabled:
            self.device = _default_accelerator()
            if self.device is None:
                raise RuntimeError(
                    "ScopedModuleOffloading(enabled=True) needs an accelerator, and "
                    "torch.accelerator.current_accelerator() found none; pass device=... explicitly"
                )
        else:
            self.device = None

    def __enter__(self) -> ScopedModuleOffloading:
        if self.enabled:
            try:
                move_to_device(self.model, self.device)
            except BaseException:
                # __exit__ does not run when __enter__ raises: put the module back ourselves
                # so a failed (e.g. out-of-memory) move does not leave it split across devices.
                move_to_device(self.model, self.offload_device)
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        if self.enabled:
            move_to_device(self.model, self.offload_device)
        return False  # never swallow the body's exception


# ---------------------------------------------------------------------- FusedStep's optimizer-state offload


def storage_bytes_spanned(view: torch.Tensor) -> int:
    """The bytes a storage must hold for ``view``: from the storage's byte 0, where ``resize_`` sizes it
    from, to the view's last element. The state buffers start at least one row into their storage (``storage.LEAD``,
    so that no compiled call sees a storage offset of 0 or 1; ``storage._row_buffer`` places them in their page),
    and those leading elements count too. Any slack the first allocation left after the view is not made again."""
    if view.numel() == 0:
        return view.storage_offset() * view.element_size()
    last = view.storage_offset() + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))
    return (last + 1) * view.element_size()


def offload_in(groups: list, buffers) -> None:
    """Before a step with offloaded state: allocate the device state and fill it from the host copy.

    The storage is reallocated as large as it was built (what its view spans, offset included): sized
    to the view's own bytes it would end one row short, and the copy in and the update would write past it.
    """
    for gb in groups:
        if gb.offloaded:
            for key, work in gb.state.items():
                work.untyped_storage().resize_(storage_bytes_spanned(work))
                work.copy_(gb.state_home[key], non_blocking=True)
    if buffers.offloaded:
        buffers.counts.copy_(buffers.counts_home, non_blocking=True)


def offload_out(groups: list, buffers) -> None:
    """After the step: copy the state back to the host (blocking: it is read right after) and free it."""
    for gb in groups:
        if gb.offloaded:
            for key, work in gb.state.items():
                gb.state_home[key].copy_(work)
                work.untyped_storage().resize_(0)
    if buffers.offloaded:
        buffers.counts_home.copy_(buffers.counts)
