"""Update rules, one module per optimizer family, each matching ``torch.optim`` numerics.

A rule is the glue between an ordinary ``torch.optim`` optimizer and the compiled update; each
module satisfies ``UpdateRule``:

* ``group_values(optimizer, group, where)`` reads and validates a param group's hyperparameters
  (every step, before anything changes) into the rule's ``HP_COLUMNS`` (after SCALE and SIGN);
* ``variant(group)`` names the structural flags that change the graphs (few, fixed per run), and
  ``state_keys(variant)`` the per-param state tensors in torch's format;
* ``slot_table(hp, counts, apply, coef)`` computes every tensor's scalars (``TABLE_COLUMNS``) inside
  the finish graph, from the group hyperparameters, the per-tensor counts (Adam's step, SGD's
  first-step flag) and whether the tensor is updated this step;
* ``update_flat(...)`` updates a group's flat buffers row by row, ``update_bucket(...)`` a list of
  tensors; both advance the counts of the tensors they write, in the same graph.
"""

from __future__ import annotations

from typing import Protocol

import torch

from compiled_step.rules import adam, sgd


class UpdateRule(Protocol):
    NAME: str
    COUNTS_ARE_STEPS: bool
    HP_COLUMNS: tuple[str, ...]
    TABLE_COLUMNS: tuple[str, ...]

    def variant(self, group: dict): ...

    def state_keys(self, variant) -> tuple[str, ...]: ...

    def group_values(self, optimizer: torch.optim.Optimizer, group: dict, where: str) -> list: ...

    def slot_table(self, hp: torch.Tensor, counts: torch.Tensor, apply: torch.Tensor,
                   coef: torch.Tensor) -> torch.Tensor: ...

    def advance(self, counts: torch.Tensor, apply: torch.Tensor) -> torch.Tensor: ...

    def update_flat(self, *args) -> None: ...

    def update_bucket(self, *args) -> None: ...

    def state_for_update(self, variant, state: dict) -> tuple: ...


# Exact types only: a subclass may override ``step`` and we would silently do something else.
RULES: dict[type, UpdateRule] = {
    torch.optim.Adam: adam,
    torch.optim.AdamW: adam,
    torch.optim.SGD: sgd,
}


def rule_for(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """Return the rule module for ``optimizer`` or raise ``TypeError`` for unsupported types."""
    rule = RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{t.__name__}" for t in RULES)
        raise TypeError(
            f"FusedStep supports {supported} (exact types); got {type(optimizer).__module__}."
            f"{type(optimizer).__qualname__}. A subclass may change step(), which FusedStep replaces."
        )
    return rule


__all__ = ["RULES", "UpdateRule", "rule_for", "adam", "sgd"]
