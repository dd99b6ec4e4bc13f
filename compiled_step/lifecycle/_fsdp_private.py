"""The one place that reads or writes FSDP2's private state; it knows each supported torch's spelling.

compiled_step supports torch 2.11, 2.13, 2.14 and 2.15. FSDP2 (``torch.distributed.fsdp.fully_shard``)
exposes public setters for its flags, but snapshotting them, restoring them exactly and recovering from
an exception need its private state. Where the versions differ (2.14 has 2.13's layout throughout):

* **Parameter groups of a state.** torch 2.11: ``FSDPState._fsdp_param_group``, one
  ``FSDPParamGroup`` or ``None``. torch 2.13: ``FSDPState._fsdp_param_groups``, a list (one
  ``fully_shard`` call may make several groups); the singular survives only as a property that
  raises when there are several. :func:`param_groups` returns a list on both.
* **Recovery after an exception.** torch 2.13 has ``FSDPModule.reset_iter_state()``; torch 2.11 has
  no such method. :func:`reset_iter_state` calls it where it exists and otherwise runs a port of
  2.13's ``FSDPState._reset_iter_state`` onto 2.11's attributes (one ``reduce_scatter_state``
  instead of a list, no ``_last_post_reduce_events``).
* **Gradients kept between no-sync backwards.** torch 2.11 to 2.14: the unsharded parameter's
  ``.grad`` and, under mixed precision with a ``reduce_dtype``, the instance attribute
  ``FSDPParam.unsharded_accumulated_grad`` (the grads upcast to ``reduce_dtype`` and summed there).
  torch 2.15: the unsharded parameter's ``.grad`` only (autograd accumulates in the reduce dtype
  through the tensor's ``grad_dtype``); ``unsharded_accumulated_grad`` survives as a read-only
  class property returning that ``.grad``, so writing ``None`` to it raises ``AttributeError``.
  :func:`drop_unsharded_grads` clears whichever the torch has.

The same in all (read directly here, never elsewhere): ``FSDPModule._get_fsdp_state()``,
``FSDPState._state_ctx.is_last_backward``, ``FSDPState._is_root``, the group flags
``reduce_grads`` / ``all_reduce_grads`` / ``reshard_after_backward``, ``FSDPParamGroup.fsdp_params``
and ``FSDPParam._unsharded_param``.

Spellings are told apart by which attribute the object has, not by ``torch.__version__``, so a
build between or after these (a nightly, a vendor build) takes whichever layout it really has.
If none is there, :class:`UnsupportedTorchError` names the torch version instead of failing
with a bare ``AttributeError`` deep inside a step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

__all__ = [
    "UnsupportedTorchError",
    "drop_unsharded_grads",
    "fsdp_state",
    "is_initialized_root",
    "param_groups",
    "reset_iter_state",
    "state_context",
]


class UnsupportedTorchError(RuntimeError):
    """FSDP2's private state has none of the layouts of torch 2.11, 2.13 (2.14) and 2.15."""


def _unsupported(what: str) -> UnsupportedTorchError:
    return UnsupportedTorchError(
        f"compiled_step: FSDP2's private state in torch {torch.__version__} has no {what}; "
        "compiled_step knows the layouts of torch 2.11 to 2.15 (compiled_step/lifecycle/_fsdp_private.py)"
    )


def fsdp_state(module: FSDPModule) -> Any:
    """The ``FSDPState`` of a ``fully_shard``'ed module."""
    return module._get_fsdp_state()


def param_groups(module_or_state: FSDPModule | Any) -> list[Any]:
    """Every ``FSDPParamGroup`` of a module (or of its ``FSDPState``), as a list; empty if it owns no params."""
    state = fsdp_state(module_or_state) if isinstance(module_or_state, FSDPModule) else module_or_state
    attrs = vars(state)
    # Look in the instance dict: in torch 2.13 the singular is also a class property that
    # raises for several groups, so getattr on it would not tell the layouts apart.
    if "_fsdp_param_groups" in attrs:  # torch 2.13
        return list(attrs["_fsdp_param_groups"])
    if "_fsdp_param_group" in attrs:  # torch 2.11
        group = attrs["_fsdp_param_group"]
        return [] if group is None else [group]
    raise _unsupported("_fsdp_param_groups (2.13) or _fsdp_param_group (2.11)")


def state_context(module: FSDPModule) -> Any:
    """The ``FSDPStateContext`` a state shares with its root; ``is_last_backward`` lives there."""
    return fsdp_state(module)._state_ctx


def is_initialized_root(module: FSDPModule) -> bool:
    """True for a root whose lazy init ran (its first forward): only those have iteration state."""
    # ``_is_root`` is None until the first forward's lazy init, then True or False.
    return fsdp_state(module)._is_root is True


def drop_unsharded_grads(fsdp_param: Any) -> None:
    """Forget the grads an ``FSDPParam`` keeps between no-sync backwards; they feed the next reduce-scatter.

    The ``.grad`` of the unsharded parameter object, which survives resharding, on every torch;
    on torch 2.11 to 2.14 also ``unsharded_accumulated_grad`` (the module docstring says why 2.15
    has no such attribute).
    """
    # The instance dict tells the layouts apart: in torch 2.15 the name is a read-only class
    # property (an alias of the unsharded parameter's .grad, cleared below), not an attribute.
    if "unsharded_accumulated_grad" in vars(fsdp_param):  # torch 2.11 - 2.14
        fsdp_param.unsharded_accumulated_grad = None
    elif not isinstance(getattr(type(fsdp_param), "unsharded_accumulated_grad", None), property):
        raise _unsupported("FSDPParam.unsharded_accumulated_grad (an attribute before 2.15, a property in 2.15)")
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    if unsharded is not None:
        unsharded.grad = None


def reset_iter_state(module: FSDPModule) -> None:
    """FSDP's recovery after an exception in forward or backward, on an initialised root module.

    Waits for in-flight collectives, reshards every parameter group and clears the per-iteration
    trackers, so the next forward starts clean. torch 2.13 and later: ``module.reset_iter_state()``
    (2.15's also drops the sharded and unsharded ``.grad`` of every parameter). torch 2.11 lacks it;
    there the same steps as 2.13's run on 2.11's attributes (see the module docstring).
    """
    method = getattr(module, "reset_iter_state", None)
    if method is not None:  # torch >= 2.13
        method()
        return
    _reset_iter_state_2_11(fsdp_state(module))


def _reset_iter_state_2_11(state: Any) -> None:
    # A port of torch 2.13's FSDPState._reset_iter_state and FSDPParamGroup._reset_iter_state
    # (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, _fsdp_param_group.py) to torch 2.11,
    # whose FSDPCommContext holds one ``reduce_scatter_state`` rather than a list and has no
    # ``_last_post_reduce_events``.
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    if state._is_root is False:
        raise RuntimeError("reset_iter_state must be called on the root FSDP module")
    comm_ctx = state._comm_ctx
    if "reduce_scatter_state" not in vars(comm_ctx):
        raise _unsupported("reset_iter_state() (2.13) nor FSDPCommContext.reduce_scatter_state (2.11)")
    current_stream = state._device_handle.current_stream()
    if (ag_state := comm_ctx.all_gather_state) is not None:
        if ag_state.event is not None:
            current_stream.wait_event(ag_state.event)
        comm_ctx.all_gather_state = None
    if (rs_state := comm_ctx.reduce_scatter_state) is not None:
        if rs_state.event is not None:
            current_stream.wait_event(rs_state.event)
        comm_ctx.reduce_scatter_state = None
    comm_ctx.post_forward_order.clear()
    for each in state._state_ctx.all_states:
        each._modules_to_run_forward.clear()
        each._training_state = TrainingState.IDLE
        for group in param_groups(each):
            _reset_group_2_11(group, TrainingState.IDLE)
    state._state_ctx.iter_forward_root = None
    state._state_ctx.post_backward_final_callback_queued = False


def _reset_group_2_11(group: Any, idle: Any) -> None:
    current_stream = group.device_handle.current_stream()
    if (result := group._all_gather_result) is not None:
        if (event := result.all_gather_event) is not None:
            current_stream.wait_event(event)
        if isinstance(result.all_gather_work, torch.distributed.distributed_c10d.Work):
            result.all_gather_work.wait()
        group._all_gather_result = None
    if group._post_reduce_event is not None:
        current_stream.wait_event(group._post_reduce_event)
        group._post_reduce_event = None
    if group._all_reduce_state is not None and group._all_reduce_state.event is not None:
        current_stream.wait_event(group._all_reduce_state.event)
    group._all_reduce_state = None
    if group._reshard_after_forward_event is not None:
        group._wait_all_gather_streams_on_event(group._reshard_after_forward_event)
        group._reshard_after_forward_event = None
    group._partial_reduce_output = None
    group._post_forward_indices.clear()
    group._training_state = idle
    group._to_sharded()
