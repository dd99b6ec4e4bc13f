"""Update rules, one module per optimizer family, each matching ``torch.optim`` numerics.

A rule is the glue between an ordinary ``torch.optim`` optimizer and the compiled update:

* ``validate_group(group)`` raises for options the rule cannot honour (before any state changes);
* ``variant(group)`` names the structural flags that change the graph (few, fixed per run);
* ``state_tensors(p, state, variant)`` returns (and lazily creates, in torch's own format) the
  per-param state the update mutates;
* ``scalar_table(group, steps, ...)`` turns the group's current hyperparameters into a small
  ``[n, K]`` float32 table of per-tensor scalars. It runs eagerly once per group per step, so
  nothing that an LR scheduler changes is ever baked into a graph, and per-step scalars such as
  bias corrections are computed once instead of inside every vector loop (Inductor's CPU backend
  re-evaluates scalar subexpressions per vector otherwise);
* ``update(...)`` is the pure bucket function that ``torch.compile`` turns into the Phase B graph.
"""

from __future__ import annotations

import torch

from compiled_step.rules import adam, sgd

# Exact types only: a subclass may override ``step`` and we would silently do something else.
RULES = {
    torch.optim.Adam: adam,
    torch.optim.AdamW: adam,
    torch.optim.SGD: sgd,
}


def rule_for(optimizer: torch.optim.Optimizer):
    """Return the rule module for ``optimizer`` or raise ``TypeError`` for unsupported types."""
    rule = RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{t.__name__}" for t in RULES)
        raise TypeError(
            f"FusedStep supports {supported} (exact types); got {type(optimizer).__module__}."
            f"{type(optimizer).__qualname__}. A subclass may change step(), which FusedStep replaces."
        )
    return rule


__all__ = ["RULES", "rule_for", "adam", "sgd"]
