"""Update rules, one module per optimizer family, each matching ``torch.optim`` numerics.

A rule is the glue between an ordinary ``torch.optim`` optimizer and the compiled update. Everything
that differs between rules is data or a function on the rule module, never a branch in shared code:

* ``HP_COLUMNS``/``TABLE_COLUMNS``: the group hyperparameters it reads (after SCALE and SIGN) and the
  per-tensor scalars its update reads (after APPLY and GRAD_COEF);
* ``STATE_KEYS``: every state tensor it may keep, in torch's names (``state_keys(variant)``: those a
  variant keeps); the update functions take them as keyword arguments of those names, None where
  the variant keeps none;
* ``COUNTS``: what the per-tensor counts are to it (``STEPS``: torch's ``state["step"]``, a 0-d view
  of the count; ``FIRST_STEP_FLAGS``: 1.0 for state FusedStep creates, 0.0 for state it adopts;
  ``NO_COUNTS``);
* ``KIND``: ``ELEMENTWISE`` rules update flat buffers and buckets of tensors (``update_flat``,
  ``update_bucket``); ``MATRIX`` rules update stacks of whole same-shape matrices
  (``update_matrices``);
* ``group_values(optimizer, group, where)`` reads and validates a param group's hyperparameters
  every step, before anything changes; ``variant(group)`` names the structural options that change
  the graphs; ``slot_table(hp, counts, apply, coef, table)`` computes every tensor's scalars inside
  the finish graph, in float64, rounded to the dtype of ``table`` (``common.table_dtype``: float64
  when the plan holds float64 params, whose update is float64 throughout; else float32).

``conformance_errors(rule)`` checks a rule module against this contract (names, kinds and the update
functions' signatures); tests run it over every registered rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable
from typing import Protocol

import torch

from compiled_step.rules import adam, muon, sgd
from compiled_step.rules.common import ELEMENTWISE, FIRST_STEP_FLAGS, MATRIX, NO_COUNTS, STEPS


class UpdateRule(Protocol):
    NAME: str
    KIND: str  # ELEMENTWISE or MATRIX
    COUNTS: str  # STEPS, FIRST_STEP_FLAGS or NO_COUNTS
    HP_COLUMNS: tuple[str, ...]
    TABLE_COLUMNS: tuple[str, ...]
    STATE_KEYS: tuple[str, ...]

    def variant(self, group: dict) -> Hashable: ...

    def state_keys(self, variant: Hashable) -> tuple[str, ...]: ...

    def group_values(self, optimizer: torch.optim.Optimizer, group: dict, where: str) -> list: ...

    def slot_table(self, hp: torch.Tensor, counts: torch.Tensor, apply: torch.Tensor,
                   coef: torch.Tensor, table: torch.Tensor) -> torch.Tensor: ...


class ElementwiseRule(UpdateRule, Protocol):
    def update_flat(self, params: torch.Tensor, grads: torch.Tensor, row_slot: torch.Tensor, table: torch.Tensor,
                    counts: torch.Tensor, **state: torch.Tensor | None) -> None: ...

    def update_bucket(self, params: list[torch.Tensor], grads: list[torch.Tensor], table: torch.Tensor,
                      counts: torch.Tensor, amax: torch.Tensor | None, **state: list[torch.Tensor] | None) -> None: ...


class MatrixRule(UpdateRule, Protocol):
    """Whole matrices: ``update_matrices`` for stacks a rank holds whole; for row-sharded stacks,
    ``prepare_matrices`` (this rank's rows of the orthogonalization input, into an all-to-all box),
    ``orthogonalize`` (the matrices this rank owns, whole) and ``apply_matrices`` (this rank's rows of
    the result), with the all-to-alls between them."""

    def update_matrices(self, params: torch.Tensor, grads: torch.Tensor, hp: torch.Tensor, table: torch.Tensor,
                        lr_ratio: torch.Tensor, variant: Hashable, **state: torch.Tensor) -> None: ...

    def prepare_matrices(self, grads: torch.Tensor, table: torch.Tensor, box: torch.Tensor,
                         **state: torch.Tensor) -> None: ...

    def orthogonalize(self, box: torch.Tensor, hp: torch.Tensor, whole: Hashable, variant: Hashable) -> None: ...

    def call_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """The bytes one matrix's update holds while its call runs (sizes the calls: ``matrices.call_chunks``)."""

    def apply_matrices(self, params: torch.Tensor, hp: torch.Tensor, table: torch.Tensor, lr_ratio: torch.Tensor,
                       box: torch.Tensor) -> None: ...


# Each kind's update functions, and whether each takes the state tensors (by their names).
_UPDATES = {ELEMENTWISE: {"update_flat": True, "update_bucket": True},
            MATRIX: {"update_matrices": True, "prepare_matrices": True, "orthogonalize": False,
                     "apply_matrices": False}}


def conformance_errors(rule) -> list[str]:
    """What in ``rule`` breaks the contract above (empty when it conforms)."""
    errors = []
    for name, kind in UpdateRule.__annotations__.items():
        if not hasattr(rule, name):
            errors.append(f"missing {name}")
    for name in ("variant", "state_keys", "group_values", "slot_table"):
        if not callable(getattr(rule, name, None)):
            errors.append(f"missing function {name}")
    if errors:
        return errors
    if rule.KIND not in _UPDATES:
        errors.append(f"KIND {rule.KIND!r} is not one of {sorted(_UPDATES)}")
        return errors
    if rule.COUNTS not in (STEPS, FIRST_STEP_FLAGS, NO_COUNTS):
        errors.append(f"COUNTS {rule.COUNTS!r} is not one of steps, first_step_flags, none")
    if rule.HP_COLUMNS[:2] != ("scale", "sign") or rule.TABLE_COLUMNS[:2] != ("apply", "grad_coef"):
        errors.append("HP_COLUMNS must start with scale, sign and TABLE_COLUMNS with apply, grad_coef")
    protocol = ElementwiseRule if rule.KIND == ELEMENTWISE else MatrixRule
    if rule.KIND == MATRIX and not callable(getattr(rule, "call_bytes", None)):
        errors.append("missing function call_bytes")
    for name, takes_state in _UPDATES[rule.KIND].items():
        fn = getattr(rule, name, None)
        if not callable(fn):
            errors.append(f"missing function {name}")
            continue
        expected = {p for p in inspect.signature(getattr(protocol, name)).parameters if p not in ("self", "state")}
        params = inspect.signature(fn).parameters.values()
        got = {p.name for p in params}
        variadic = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if variadic or got != expected | (set(rule.STATE_KEYS) if takes_state else set()):
            state = f" and one per STATE_KEYS {rule.STATE_KEYS}" if takes_state else ""
            errors.append(f"{name}{tuple(p.name for p in params)}: expected the parameters {sorted(expected)}"
                          f"{state}, each named (no *args/**kwargs)")
    return errors


# Exact types only: a subclass may override ``step`` and we would silently do something else.
RULES: dict[type, UpdateRule] = {
    torch.optim.Adam: adam,
    torch.optim.AdamW: adam,
    torch.optim.SGD: sgd,
    torch.optim.Muon: muon,
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


def state_kwargs(rule, variant, by_key: dict) -> dict:
    """The update's state keyword arguments: ``by_key[k]`` for the keys the variant keeps, else None."""
    kept = rule.state_keys(variant)
    return {k: (by_key[k] if k in kept else None) for k in rule.STATE_KEYS}


__all__ = ["RULES", "UpdateRule", "ElementwiseRule", "MatrixRule", "ELEMENTWISE", "MATRIX", "STEPS",
           "FIRST_STEP_FLAGS", "NO_COUNTS", "conformance_errors", "rule_for", "state_kwargs", "adam", "muon", "sgd"]
