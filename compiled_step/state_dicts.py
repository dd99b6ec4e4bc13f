"""FusedStep's ``state_dict()`` format, and the earlier formats its ``load_state_dict()`` also takes.

One format: the wrapped optimizer's own ``state_dict()`` plus ``"fused_step"``, FusedStep's own state (the skip
counter, the last step's finite flag, the training-health options' state); with several optimizers, their state
dicts in order under ``"optimizers"``. A plain ``torch.optim`` optimizer loads it (it ignores the extra key).

Loaded too (``split``): a plain ``torch.optim`` state dict (FusedStep's own state is then left as it is);
``FusedOptimizer.state_dict()`` before issue 23, which is this format; and ``FusedStep.state_dict()`` before
issue 23, which held FusedStep's own state only (the optimizer's was saved apart, and is then left as it is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FUSED_STATE_KEY = "fused_step"  # FusedStep's own state
OPTIMIZERS_KEY = "optimizers"  # with several optimizers, their state dicts, in order


def combined(optimizers: Sequence[torch.optim.Optimizer], own: dict) -> dict:
    """The optimizers' state dicts (torch's, with their own hooks run) and FusedStep's ``own`` state, as one dict."""
    if len(optimizers) == 1:
        state_dict = dict(optimizers[0].state_dict())
    else:
        state_dict = {OPTIMIZERS_KEY: [o.state_dict() for o in optimizers]}
    state_dict[FUSED_STATE_KEY] = own
    return state_dict


def split(state_dict: dict, n_optimizers: int) -> tuple[dict | None, list[dict] | None]:
    """(FusedStep's own state or None, the optimizers' state dicts in order or None), by format. Raises
    ``ValueError``/``TypeError`` for a dict of another number of optimizers, before anything changes."""
    state_dict = dict(state_dict)
    own = state_dict.pop(FUSED_STATE_KEY, None)
    if own is None and not {"state", "param_groups", OPTIMIZERS_KEY} & set(state_dict):
        return state_dict, None  # FusedStep.state_dict() before issue 23: FusedStep's own state only
    several = OPTIMIZERS_KEY in state_dict
    parts = [state_dict] if n_optimizers == 1 and not several else state_dict.get(OPTIMIZERS_KEY)
    if not isinstance(parts, list) or len(parts) != n_optimizers:
        held = len(parts) if isinstance(parts, list) else "one optimizer's"
        raise ValueError(f"this FusedStep steps {n_optimizers} optimizer(s); the state dict holds {held} state")
    if own is not None and not isinstance(own, dict):
        raise TypeError(f"state_dict[{FUSED_STATE_KEY!r}] must be a dict, got {type(own).__name__}")
    return own, parts


def counters(own: dict) -> dict[str, torch.Tensor]:
    """The skip counter and finite flag of FusedStep's ``own`` state, as ``[1]`` tensors; raises
    ``KeyError``/``TypeError`` before anything changes."""
    missing = {"skipped_steps", "last_step_finite"} - set(own)
    if missing:
        raise KeyError(f"FusedStep state_dict lacks {sorted(missing)}")
    values = {}
    for key, dtype in (("skipped_steps", torch.int64), ("last_step_finite", torch.bool)):
        value = own[key]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            values[key] = value.detach().reshape(1).to(dtype)
        elif isinstance(value, (bool, int)) and not (key == "skipped_steps" and isinstance(value, bool)):
            values[key] = torch.tensor([value], dtype=dtype)
        else:
            raise TypeError(f"FusedStep state_dict[{key!r}] must be a one-element tensor or a number, got "
                            f"{type(value).__name__}")
    return values


def load_optimizers(optimizers: Sequence[torch.optim.Optimizer], parts: list[dict]) -> None:
    """Each optimizer loads its part (torch's ``load_state_dict``, its hooks included); when one raises, those
    already loaded are put back as they were, so nothing changes."""
    before = [o.state_dict() for o in optimizers] if len(optimizers) > 1 else []
    try:
        for o, part in zip(optimizers, parts):
            o.load_state_dict(part)  # each raises before changing anything
    except BaseException:
        for o, part in zip(optimizers, before):
            o.load_state_dict(part)
        raise
