"""FSDP2 gradient-accumulation lifecycle: sync flags, the final backward, token counting.

With FSDP2 (``torch.distributed.fsdp.fully_shard``) each backward normally reduce-scatters
the gradients and reshards the parameters. During gradient accumulation both are wasted on
every microbatch but the last: the gradients can accumulate unsharded and unreduced, and
the parameters can stay unsharded for the next forward. FSDP2 exposes three switches, all
read when a backward finishes:

* ``set_requires_gradient_sync(b)``: per parameter group, ``reduce_grads`` and
  ``all_reduce_grads`` (HSDP) -- whether ``post_backward`` reduce-scatters;
* ``set_reshard_after_backward(b)``: per parameter group, ``reshard_after_backward``;
* ``set_is_last_backward(b)``: one ``is_last_backward`` shared by all states under a root
  (``FSDPStateContext``) -- whether the root's final callback finalizes the backward.

Two ways to drive them:

* NeMo Automodel's functions, same names and signatures: :func:`prepare_for_grad_accumulation`
  (call once before the first microbatch) and :func:`prepare_for_final_backward` (call
  before the last microbatch's forward-backward). Unlike NeMo Automodel, which only acts on model
  parts carrying its FSDP mixin, these act on every ``FSDPModule`` found by walking
  ``model_parts`` with ``.modules()``.
* :class:`GradAccumulation` (or :func:`accumulate`), an exception-safe driver::

      with accumulate(model_parts, num_microbatches=4) as acc:
          for mb in acc.split(batch):                   # or: for _ in acc.microbatches()
              loss = loss_fn(model(mb["x"]), mb["y"])    # sum over tokens
              loss.backward()
              acc.add_tokens((mb["y"] != -100).sum())    # int or 0-d tensor, no host sync
      num_label_tokens = acc.num_label_tokens

  It snapshots the FSDP flags on enter, disables sync and resharding, switches them on
  right before the last microbatch is handed out, and on exit puts every flag back exactly
  as it found it -- also when an exception escapes. See the class docstring for the rest.

With ``pp_enabled=True`` none of this touches FSDP: a pipeline schedule runs the backward
and drives the same switches itself, as in NeMo Automodel.

Not reproduced from NeMo Automodel: its global ``IS_OPTIM_STEP`` flag (set False/True by the two
functions), which only its own pipeline-parallel backward patch reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from compiled_step.lifecycle import _fsdp_private
from compiled_step.lifecycle.fp8 import FirstMicrobatchFlag, default_first_microbatch_flag

__all__ = [
    "GradAccumulation",
    "Microbatch",
    "accumulate",
    "fsdp_modules",
    "prepare_for_final_backward",
    "prepare_for_grad_accumulation",
    "reset_fsdp_iteration_state",
]


def _as_parts(model_parts: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    """Validate ``model_parts``: one module or an iterable of modules (a list, as in NeMo Automodel)."""
    if isinstance(model_parts, nn.Module):
        return [model_parts]
    if isinstance(model_parts, (str, bytes)) or not isinstance(model_parts, Iterable):
        raise TypeError(f"model_parts must be a list of torch.nn.Module, got {type(model_parts).__name__}")
    parts = list(model_parts)
    for part in parts:
        if not isinstance(part, nn.Module):
            raise TypeError(f"model_parts must hold torch.nn.Module objects, got {type(part).__name__}")
    return parts


def fsdp_modules(model_parts: nn.Module | Iterable[nn.Module]) -> list[FSDPModule]:
    """Every ``FSDPModule`` under ``model_parts`` (``.modules()`` walk), each once, in walk order."""
    seen: set[int] = set()
    found = []
    for part in _as_parts(model_parts):
        for module in part.modules():
            if isinstance(module, FSDPModule) and id(module) not in seen:
                seen.add(id(module))
                found.append(module)
    return found


def _check_pp_enabled(pp_enabled: object) -> bool:
    if not isinstance(pp_enabled, bool):
        raise TypeError(f"pp_enabled must be a bool, got {type(pp_enabled).__name__}")
    return pp_enabled


def _set_sync_flags(modules: Sequence[FSDPModule], enabled: bool) -> None:
    # recurse=False: the walk already visits every FSDP submodule; recursing from each one
    # would revisit subtrees (quadratic in depth) for the same result.
    for module in modules:
        module.set_requires_gradient_sync(enabled, recurse=False)
        module.set_reshard_after_backward(enabled, recurse=False)
        module.set_is_last_backward(enabled)


def prepare_for_grad_accumulation(model_parts: list[nn.Module], pp_enabled: bool = False) -> None:
    """Prepare model parts before starting gradient accumulation (NeMo Automodel's function).

    Call once, before the first microbatch's forward. Sets the default first-microbatch
    flag (:func:`compiled_step.lifecycle.fp8.default_first_microbatch_flag`) to True, as the
    seed does. Unless ``pp_enabled``, then switches every FSDP2 module under
    ``model_parts`` to accumulate: no gradient reduce-scatter, no reshard after backward,
    and the coming backwards are not the last one.

    Args:
        model_parts: list of model parts (modules) to prepare.
        pp_enabled: whether pipeline parallelism is enabled; the pipeline schedule then
            drives FSDP's flags and they are left alone.
    """
    parts = _as_parts(model_parts)
    pp_enabled = _check_pp_enabled(pp_enabled)
    default_first_microbatch_flag().begin_step()
    if pp_enabled:
        return
    _set_sync_flags(fsdp_modules(parts), enabled=False)


def prepare_for_final_backward(model_parts: list[nn.Module], pp_enabled: bool = False) -> None:
    """Prepare model parts before the final backward pass (NeMo Automodel's function).

    Call before the last microbatch's forward-backward. Unless ``pp_enabled``, switches
    every FSDP2 module under ``model_parts`` back on: this backward reduce-scatters the
    accumulated gradients, reshards the parameters and finalizes (it is the last one).

    Args:
        model_parts: list of model parts (modules) to prepare.
        pp_enabled: whether pipeline parallelism is enabled; if so, nothing is changed.
    """
    parts = _as_parts(model_parts)
    pp_enabled = _check_pp_enabled(pp_enabled)
    if pp_enabled:
        return
    _set_sync_flags(fsdp_modules(parts), enabled=True)


def reset_fsdp_iteration_state(model_parts: nn.Module | Iterable[nn.Module]) -> None:
    """Recover FSDP2 roots after an exception in forward or backward.

    Call after catching the exception, before the next forward, on every rank. Runs FSDP's own
    recovery on each root FSDP module that has run a forward (``reset_iter_state()`` in torch
    2.13 and later, the same steps on torch 2.11, which lacks it: waits for in-flight collectives,
    reshards, clears per-iteration trackers) and
    drops the unsharded gradients FSDP keeps between microbatches while gradient sync is
    off, which ``reset_iter_state`` before torch 2.15 leaves in place and the next backward would
    otherwise add to its own. The sharded ``.grad`` of the parameters: torch 2.15's
    ``reset_iter_state`` sets it to None, earlier versions leave it; either way zero it
    (``optimizer.zero_grad()``) before accumulating again, as the failed step is lost.
    """
    states_done: set[int] = set()
    for module in fsdp_modules(model_parts):
        state = _fsdp_private.fsdp_state(module)
        if id(state) in states_done:
            continue
        states_done.add(id(state))
        # Only an initialised root has iteration state to reset (and the reset refuses non-roots).
        if _fsdp_private.is_initialized_root(module):
            _fsdp_private.reset_iter_state(module)
    for module in fsdp_modules(model_parts):
        for group in _fsdp_private.param_groups(module):
            for fsdp_param in group.fsdp_params:
                _fsdp_private.drop_unsharded_grads(fsdp_param)


# --------------------------------------------------------------------------------------
# Snapshot / restore of the FSDP flags
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GroupFlags:
    reduce_grads: bool
    all_reduce_grads: bool
    reshard_after_backward: bool


class _FlagSnapshot:
    """The FSDP2 flags as found: per parameter group, and ``is_last_backward`` per context.

    Restoring writes the private attributes back directly rather than calling the setters:
    ``set_requires_gradient_sync`` sets ``reduce_grads`` and ``all_reduce_grads`` together,
    so it cannot restore an HSDP state where the user turned only the all-reduce off
    (``set_requires_all_reduce(False)``).
    """

    def __init__(self, modules: Sequence[FSDPModule]) -> None:
        self._groups: list[tuple[Any, _GroupFlags]] = []
        self._contexts: list[tuple[Any, bool]] = []
        seen_groups: set[int] = set()
        seen_contexts: set[int] = set()
        for module in modules:
            context = _fsdp_private.state_context(module)
            if id(context) not in seen_contexts:
                seen_contexts.add(id(context))
                self._contexts.append((context, context.is_last_backward))
            for group in _fsdp_private.param_groups(module):
                if id(group) not in seen_groups:
                    seen_groups.add(id(group))
                    flags = _GroupFlags(group.reduce_grads, group.all_reduce_grads, group.reshard_after_backward)
                    self._groups.append((group, flags))

    def restore(self) -> None:
        for group, flags in self._groups:
            group.reduce_grads = flags.reduce_grads
            group.all_reduce_grads = flags.all_reduce_grads
            group.reshard_after_backward = flags.reshard_after_backward
        # Before the first forward every state has its own context and lazy init later
        # makes them share the root's; restoring each captured context covers both cases.
        for context, is_last_backward in self._contexts:
            context.is_last_backward = is_last_backward


# --------------------------------------------------------------------------------------
# The accumulation driver
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Microbatch:
    """Position of one microbatch in an accumulation: ``index`` of ``count``."""

    index: int
    count: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


class GradAccumulation:
    """Exception-safe driver for one optimizer step's gradient accumulation.

    Usage::

        with GradAccumulation(model_parts, num_microbatches=k) as acc:
            for mb in acc.microbatches():            # yields Microbatch(index, count), k times
                loss_fn(model(inputs[mb.index])).backward()
                acc.add_tokens(n_label_tokens)
        optimizer step, using acc.num_label_tokens

    ``acc.split(batch)`` is the same loop yielding the ``k`` slices of ``batch`` along
    dim 0 instead of :class:`Microbatch` objects.

    What happens when:

    * ``__enter__``: snapshots every FSDP2 flag under ``model_parts`` (per parameter group
      ``reduce_grads``, ``all_reduce_grads``, ``reshard_after_backward``; the shared
      ``is_last_backward``), then turns sync, resharding and last-backward off, like
      :func:`prepare_for_grad_accumulation`. Calls ``fp8_flag.begin_step()``.
    * before the last microbatch is handed out: turns all three on, like
      :func:`prepare_for_final_backward`, so its backward reduce-scatters.
    * after the first microbatch's loop body completes: ``fp8_flag.after_first_microbatch()``.
    * ``__exit__``: restores every snapshotted flag. If an exception escapes, also calls
      ``fp8_flag.reset()`` and, when ``reset_on_error`` (default), recovers FSDP with
      :func:`reset_fsdp_iteration_state`; the exception propagates unchanged and the step
      is lost (zero the grads before the next one). If the block ends normally but fewer
      than ``num_microbatches`` microbatches were completed, raises ``RuntimeError``: the
      final backward with gradient sync never ran, so the grads are unreduced.

    With ``pp_enabled=True`` no FSDP flag is read or written (the pipeline schedule owns
    them); the first-microbatch flag and token counting work the same.

    Args:
        model_parts: the model parts (modules) whose FSDP2 modules to drive.
        num_microbatches: ``k >= 1``; ``k == 1`` makes the only microbatch the last.
        pp_enabled: pipeline parallelism is enabled (keyword-only).
        fp8_flag: a :class:`~compiled_step.lifecycle.fp8.FirstMicrobatchFlag` to drive, or
            None for no FP8 flag handling (keyword-only).
        reset_on_error: run FSDP recovery when an exception escapes (keyword-only).

    Raises ``TypeError``/``ValueError`` for bad arguments at construction, before any state
    changes, and ``RuntimeError`` for misuse (entering twice, iterating twice, adding
    tokens outside the block).
    """

    def __init__(
        self,
        model_parts: nn.Module | Iterable[nn.Module],
        num_microbatches: int,
        *,
        pp_enabled: bool = False,
        fp8_flag: FirstMicrobatchFlag | None = None,
        reset_on_error: bool = True,
    ) -> None:
        self._parts = _as_parts(model_parts)
        if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int):
            raise TypeError(f"num_microbatches must be an int, got {type(num_microbatches).__name__}")
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        self._pp_enabled = _check_pp_enabled(pp_enabled)
        if fp8_flag is not None and not isinstance(fp8_flag, FirstMicrobatchFlag):
            raise TypeError(f"fp8_flag must be a FirstMicrobatchFlag or None, got {type(fp8_flag).__name__}")
        if not isinstance(reset_on_error, bool):
            raise TypeError(f"reset_on_error must be a bool, got {type(reset_on_error).__name__}")
        self._num_microbatches = num_microbatches
        self._fp8_flag = fp8_flag
        self._reset_on_error = reset_on_error
        self._modules: list[FSDPModule] = []
        self._snapshot: _FlagSnapshot | None = None
        self._entered = False
        self._active = False
        self._iterated = False
        self._handed_out = 0
        self._completed = 0
        self._tokens: int | torch.Tensor = 0

    # -- properties ------------------------------------------------------------------------

    @property
    def num_microbatches(self) -> int:
        return self._num_microbatches

    @property
    def completed_microbatches(self) -> int:
        """Microbatches whose loop body finished."""
        return self._completed

    @property
    def num_label_tokens(self) -> int | torch.Tensor:
        """Sum of :meth:`add_tokens` arguments: an int, or a 0-d tensor once a tensor was added."""
        return self._tokens

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> GradAccumulation:
        if self._entered:
            raise RuntimeError("a GradAccumulation is single-use; create a new one for each step")
        self._entered = True
        if not self._pp_enabled:
            self._modules = fsdp_modules(self._parts)
            self._snapshot = _FlagSnapshot(self._modules)
            _set_sync_flags(self._modules, enabled=False)
        if self._fp8_flag is not None:
            self._fp8_flag.begin_step()
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        self._active = False
        if self._snapshot is not None:
            self._snapshot.restore()
        if exc_val is not None:
            if self._fp8_flag is not None:
                # The step is lost; whatever TE cached is not to be reused.
                self._fp8_flag.reset()
            if self._reset_on_error and not self._pp_enabled:
                try:
                    reset_fsdp_iteration_state(self._parts)
                except Exception as reset_error:  # keep the user's exception the one raised
                    if hasattr(exc_val, "add_note"):
                        exc_val.add_note(f"compiled_step: FSDP recovery after this error also failed: {reset_error!r}")
            return False
        if self._completed != self._num_microbatches:
            raise RuntimeError(
                f"gradient accumulation ended early: {self._handed_out} of {self._num_microbatches} "
                f"microbatches handed out, {self._completed} completed. The final backward with "
                "gradient sync did not run to completion, so the gradients are not reduced. Run every "
                "microbatch, or use a smaller num_microbatches."
            )
        return False

    # -- iteration -------------------------------------------------------------------------

    def microbatches(self) -> Iterator[Microbatch]:
        """Yield ``num_microbatches`` :class:`Microbatch` objects; run one forward-backward per item.

        The final-backward flags are switched on just before the last item is yielded. A
        microbatch counts as completed when the loop asks for the next item, i.e. after its
        body ran without raising.
        """
        self._check_active("microbatches()")
        if self._iterated:
            raise RuntimeError("microbatches()/split() can be iterated once per accumulation")
        self._iterated = True
        return self._iterate()

    def _iterate(self) -> Iterator[Microbatch]:
        k = self._num_microbatches
        for index in range(k):
            self._check_active("the microbatch loop")
            if index == k - 1 and not self._pp_enabled:
                _set_sync_flags(self._modules, enabled=True)
            self._handed_out += 1
            yield Microbatch(index, k)
            # Reached only when the loop body finished and the loop asked for more.
            self._completed += 1
            if index == 0 and self._fp8_flag is not None:
                self._fp8_flag.after_first_microbatch()

    def split(self, batch: Any) -> Iterator[Any]:
        """Like :meth:`microbatches`, yielding the ``num_microbatches`` slices of ``batch``.

        ``batch`` is a tensor or a (nested) dict / list / tuple of tensors that all have the
        same size along dim 0; each is cut with ``torch.tensor_split`` into
        ``num_microbatches`` slices (sizes differ by at most one). Raises ``TypeError`` for
        other leaf types and ``ValueError`` for mismatched or too-small dim 0, before any
        microbatch is handed out.
        """
        self._check_active("split()")
        sizes: set[int] = set()
        _collect_dim0(batch, sizes)
        if len(sizes) != 1:
            raise ValueError(f"all tensors in the batch must share their dim-0 size, got sizes {sorted(sizes)}")
        (size,) = sizes
        if size < self._num_microbatches:
            raise ValueError(f"batch dim 0 is {size}, fewer than num_microbatches={self._num_microbatches}")
        slices = _split_tree(batch, self._num_microbatches)
        return (slices[mb.index] for mb in self.microbatches())

    # -- tokens ----------------------------------------------------------------------------

    def add_tokens(self, n: int | torch.Tensor) -> None:
        """Add ``n`` label tokens to :attr:`num_label_tokens`; call inside the ``with`` block.

        ``n`` is a non-negative int or a 0-d integer tensor (e.g. ``(labels != -100).sum()``
        or :func:`compiled_step.padding.count_tail_padding_tensor`). A tensor is added as a
        tensor, so nothing is read back to the host.
        """
        self._check_active("add_tokens()")
        if isinstance(n, torch.Tensor):
            if n.dim() != 0:
                raise ValueError(f"a token count tensor must be 0-d, got shape {tuple(n.shape)}")
            if n.dtype.is_floating_point or n.dtype.is_complex or n.dtype == torch.bool:
                raise TypeError(f"a token count tensor must have an integer dtype, got {n.dtype}")
            n = n.detach()
        elif isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"token count must be an int or a 0-d integer tensor, got {type(n).__name__}")
        elif n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        self._tokens = self._tokens + n

    def _check_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"{what} is only valid inside `with GradAccumulation(...)`")


def accumulate(
    model_parts: nn.Module | Iterable[nn.Module],
    num_microbatches: int,
    *,
    pp_enabled: bool = False,
    fp8_flag: FirstMicrobatchFlag | None = None,
    reset_on_error: bool = True,
) -> GradAccumulation:
    """``with accumulate(model_parts, k) as acc: ...`` -- shorthand for :class:`GradAccumulation`."""
    return GradAccumulation(
        model_parts, num_microbatches, pp_enabled=pp_enabled, fp8_flag=fp8_flag, reset_on_error=reset_on_error
    )


def _collect_dim0(tree: Any, sizes: set[int]) -> None:
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0:
            raise ValueError("cannot split a 0-d tensor along dim 0")
        sizes.add(tree.shape[0])
    elif isinstance(tree, Mapping):
        for value in tree.values():
            _collect_dim0(value, sizes)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _collect_dim0(value, sizes)
    else:
        raise TypeError(f"split() handles tensors and dict/list/tuple of tensors, got {type(tree).__name__}")


def _split_tree(tree: Any, k: int) -> list[Any]:
    if isinstance(tree, torch.Tensor):
        return list(torch.tensor_split(tree, k, dim=0))
    if isinstance(tree, Mapping):
        per_key = {key: _split_tree(value, k) for key, value in tree.items()}
        return [type(tree)((key, chunks[i]) for key, chunks in per_key.items()) for i in range(k)]
    per_item = [_split_tree(value, k) for value in tree]
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return [type(tree)(*(chunks[i] for chunks in per_item)) for i in range(k)]
    return [type(tree)(chunks[i] for chunks in per_item) for i in range(k)]
