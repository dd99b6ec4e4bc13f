"""The optimizers one FusedStep steps, seen as one list of param groups.

``FusedStep(optimizer)`` or ``FusedStep([muon, adamw])``: each optimizer keeps its own
``param_groups``, ``state``, hooks and schedulers; FusedStep reads them all every step, in order,
as one list of param groups (the first optimizer's groups, then the second's...). A param group is
named ``param_groups[i]`` with one optimizer and ``optimizers[k].param_groups[i]`` with several.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import optimizer as optim_module  # torch's global step hooks

from compiled_step import wrappers
from compiled_step.rules import rule_for


class Optimizers:
    """One or several ``torch.optim`` optimizers, each with its update rule."""

    def __init__(self, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]):
        wrappers.refuse_wrapped(optimizers, "FusedStep")  # a trainer's wrapper: say what to pass instead
        if isinstance(optimizers, torch.optim.Optimizer):
            items = (optimizers,)
        elif isinstance(optimizers, (list, tuple)) and optimizers:
            items = tuple(optimizers)
        else:
            raise TypeError("FusedStep takes a torch.optim optimizer or a non-empty list or tuple of them, got "
                            f"{type(optimizers).__name__}")
        for position, item in enumerate(items):
            wrappers.refuse_wrapped(item, "FusedStep")
            if any(item is other for other in items[:position]):
                raise ValueError(f"optimizers[{position}] is listed twice; list each optimizer once")
        self.items = items
        self.rules = tuple(rule_for(o) for o in items)  # raises TypeError for unsupported types

    def __len__(self) -> int:
        return len(self.items)

    def groups(self) -> list[dict]:
        """Every param group of every optimizer, in order (read anew: groups may be added)."""
        return [group for o in self.items for group in o.param_groups]

    def owners(self) -> list[int]:
        """For each param group of ``groups()``, the index of its optimizer."""
        return [k for k, o in enumerate(self.items) for _ in o.param_groups]

    def group_rules(self) -> list:
        return [self.rules[k] for k in self.owners()]

    def labels(self) -> list[str]:
        if len(self.items) == 1:
            return [f"param_groups[{i}]" for i in range(len(self.items[0].param_groups))]
        return [f"optimizers[{k}].param_groups[{i}]" for k, o in enumerate(self.items)
                for i in range(len(o.param_groups))]

    def variants(self) -> list:
        return [self.rules[k].variant(self.items[k], group) for group, k in zip(self.groups(), self.owners())]

    def hyperparameters(self) -> list[tuple[float, list]]:
        """Per param group: (sign, the rule's validated values). Raises before anything changes."""
        out = []
        owners = self.owners()
        for group, label, k in zip(self.groups(), self.labels(), owners):
            values = self.rules[k].group_values(self.items[k], group, label)
            out.append((-1.0 if group.get("maximize", False) else 1.0, values))
        return out

    def run_hooks(self, when: str) -> bool:
        """Run the step hooks each optimizer's ``step()`` would run (``register_step_pre_hook`` /
        ``register_step_post_hook``, global and per instance), with empty args since FusedStep's
        step takes none of the optimizer's. A pre-hook's replacement args are therefore ignored.
        Returns whether any hook ran."""
        ran = False
        for o in self.items:
            if when == "pre":
                hooks = [*optim_module._global_optimizer_pre_hooks.values(), *o._optimizer_step_pre_hooks.values()]
            else:
                hooks = [*o._optimizer_step_post_hooks.values(), *optim_module._global_optimizer_post_hooks.values()]
            for hook in hooks:
                hook(o, (), {})
                ran = True
        return ran

    def mark_stepped(self) -> None:
        """LR schedulers wrap ``optimizer.step`` to record that it ran and warn otherwise; FusedStep is
        that step, so record it the same way (``torch.optim.lr_scheduler``'s ``_opt_called``)."""
        for o in self.items:
            o._opt_called = True

    def zero_grad(self, set_to_none: bool) -> None:
        for o in self.items:
            o.zero_grad(set_to_none=set_to_none)

    def type_names(self) -> str:
        return ", ".join(type(o).__name__ for o in self.items)
