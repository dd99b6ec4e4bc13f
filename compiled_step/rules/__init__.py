"""Update rules, one module per optimizer family, each matching ``torch.optim`` numerics.

A rule is the glue between an ordinary ``torch.optim`` optimizer and the compiled update. Everything
that differs between rules is data or a function on the rule module, never a branch in shared code:

* ``HP_COLUMNS``/``TABLE_COLUMNS``: the group hyperparameters it reads (after SCALE and SIGN) and the
  per-tensor scalars its update reads (after APPLY and GRAD_COEF);
* ``STATE_KEYS``: every state tensor it may keep, in torch's names (``state_keys(variant)``: those a
  variant's group keeps); the update functions take them as keyword arguments of those names, None
  where the variant keeps none;
* ``LOW_PRECISION_KEYS``: the state keys a user may keep in bfloat16 for float32 params (Adam's moments:
  ``state_dtypes.py``); the update reads them widened and rounds them on store;
* ``STOCHASTIC_ROUNDING``: its updates (``update_flat``/``update_bucket``, or ``update_matrices``) take
  ``rounding`` (``common.Rounding`` or None) and round their bfloat16 stores stochastically with it
  (``FusedStepConfig.stochastic_rounding``); optionally ``rounds_itself(variant)``: the optimizer itself asks
  for its bfloat16 params to round stochastically (torchao's ``bf16_stochastic_round``), and the engine passes
  ``rounding`` with params set for such a group whatever the config says;
* ``state_layout(variant, shape, dtype)``: the state tensors one param of that (local) shape and dtype
  keeps, each a ``StateTensor(shape, dtype)`` in torch's shape: param-shaped for Adam, SGD and Muon,
  a factored ``row_var``/``col_var`` pair for Adafactor's matrices. ``storage.lay_out_state`` lays the
  buffers out from it; nothing in the engine assumes a state tensor is shaped like its param;
* the per-tensor counts: ``STEP_KEY`` names torch's 0-d step tensor (``"step"``), which FusedStep
  makes a view of the count, or is None where torch keeps no step; then ``count_at_bind(created)``
  says the count of state FusedStep just created (True) or adopted (False): SGD's first-step flag,
  None for nothing (Muon);
* optionally ``STATE_PARTS``: torch state keys a rule keeps in several buffer keys (torchao's 8-bit
  moments: uint8 ``codes`` and float32 ``scale`` views wrapped in its ``OptimState8bit``), each torch key
  -> its buffer keys (among ``STATE_KEYS``); a param keeps all parts of such a key or none, and a key
  not named a part is its own torch key. Parts may be of any dtype (every other state tensor is
  floating). With it, ``assemble(key, parts, shape, dtype)`` makes torch's state tensor over the
  parts' buffer views and ``disassemble(key, value, declared)`` returns the parts' values of a state
  tensor torch holds (loaded, or made by the optimizer's own step), to be copied into the buffers;
* ``KIND``: ``ELEMENTWISE`` rules update flat buffers and buckets of tensors (``update_flat``,
  ``update_bucket``); ``MATRIX`` rules update stacks of whole same-shape params (``update_matrices``,
  ``call_bytes``, ``lr_ratio``, ``PARAM_NDIMS``; with ``ROW_SHARDED``, row-sharded stacks too:
  ``prepare_matrices``, ``orthogonalize``, ``apply_matrices`` and the graph constant ``Whole``; with
  ``LOCAL_SHARDS``, its math is per local tensor, as torchao's optimizers are on FSDP2: each rank updates
  a DTensor param's shard as a param of the shard's shape (``state_layout`` gets the shard's shape), no
  gather, and the engine wraps ``assemble``'s state tensor of the shard in a DTensor like the param);
* ``group_values(optimizer, group, where)`` reads and validates a param group's hyperparameters
  every step, before anything changes; ``variant(optimizer, group)`` names the structural options that
  change the graphs (a group's, or the optimizer's: torchao's ``block_size``);
  ``slot_table(hp, counts, apply, coef, table)`` computes every tensor's scalars inside the finish graph, in
  float64, rounded to the dtype of ``table`` (``common.table_dtype``: float64 when the plan holds float64
  params, whose update is float64 throughout; else float32).

``conformance_errors(rule)`` checks a rule module against this contract (names, kinds, the update
functions' signatures and the state declaration); tests run it over every registered rule.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Hashable
from typing import Protocol

import torch

from compiled_step.rules import adafactor, adam, muon, sgd
from compiled_step.rules.common import ELEMENTWISE, MATRIX, StateTensor


class UpdateRule(Protocol):
    NAME: str
    KIND: str  # ELEMENTWISE or MATRIX
    STEP_KEY: str | None  # torch's step tensor, a view of the count; None: torch keeps none
    HP_COLUMNS: tuple[str, ...]
    TABLE_COLUMNS: tuple[str, ...]
    STATE_KEYS: tuple[str, ...]
    LOW_PRECISION_KEYS: tuple[str, ...]  # keys that may be kept in bfloat16 for float32 params
    STOCHASTIC_ROUNDING: bool  # its elementwise updates take ``rounding`` (common.Rounding or None)

    def variant(self, optimizer: torch.optim.Optimizer, group: dict) -> Hashable: ...

    def state_keys(self, variant: Hashable) -> tuple[str, ...]: ...

    def state_layout(self, variant: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, StateTensor]:
        ...

    def count_at_bind(self, created: bool) -> float | None: ...

    def group_values(self, optimizer: torch.optim.Optimizer, group: dict, where: str) -> list: ...

    def slot_table(self, hp: torch.Tensor, counts: torch.Tensor, apply: torch.Tensor,
                   coef: torch.Tensor, table: torch.Tensor) -> torch.Tensor: ...


class ElementwiseRule(UpdateRule, Protocol):
    def update_flat(self, params: torch.Tensor, grads: torch.Tensor, row_slot: torch.Tensor, table: torch.Tensor,
                    counts: torch.Tensor, **state: torch.Tensor | None) -> None: ...

    def update_bucket(self, params: list[torch.Tensor], grads: list[torch.Tensor], table: torch.Tensor,
                      counts: torch.Tensor, amax: torch.Tensor | None, **state: list[torch.Tensor] | None) -> None: ...


class MatrixRule(UpdateRule, Protocol):
    """Whole same-shape params (Muon's matrices, Adafactor's tensors of any rank): ``update_matrices`` for
    stacks a rank holds whole, ``[n, *shape]``, in calls of at most ``call_bytes``-sized temporaries
    (``matrices.call_chunks``), with ``lr_ratio(shape, variant)`` (a float64 constant per stack) and
    ``PARAM_NDIMS`` (the ranks it updates; None: any). With ``ROW_SHARDED``, row-sharded stacks too:
    ``prepare_matrices`` (this rank's rows of the orthogonalization input, into an all-to-all box),
    ``orthogonalize`` (the matrices this rank owns, whole, their row count a ``Whole``) and
    ``apply_matrices`` (this rank's rows of the result), with the all-to-alls between them."""

    PARAM_NDIMS: tuple[int, ...] | None
    ROW_SHARDED: bool

    def update_matrices(self, params: torch.Tensor, grads: torch.Tensor, hp: torch.Tensor, table: torch.Tensor,
                        lr_ratio: torch.Tensor, counts: torch.Tensor, variant: Hashable,
                        **state: torch.Tensor) -> None: ...

    def call_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """The bytes one matrix's update holds while its call runs (sizes the calls: ``matrices.call_chunks``)."""

    def lr_ratio(self, shape: tuple[int, ...], variant: Hashable) -> float:
        """The stack constant the update gets as ``lr_ratio`` (Muon: torch's lr adjustment for the shape)."""

    def prepare_matrices(self, grads: torch.Tensor, table: torch.Tensor, box: torch.Tensor,
                         **state: torch.Tensor) -> None: ...

    def orthogonalize(self, box: torch.Tensor, hp: torch.Tensor, whole: Hashable, variant: Hashable) -> None: ...

    def apply_matrices(self, params: torch.Tensor, hp: torch.Tensor, table: torch.Tensor, lr_ratio: torch.Tensor,
                       box: torch.Tensor) -> None: ...


# Each kind's update functions, and whether each takes the state tensors (by their names); a matrix rule's
# row-sharded ones are required where it sets ROW_SHARDED.
_UPDATES = {ELEMENTWISE: {"update_flat": True, "update_bucket": True},
            MATRIX: {"update_matrices": True}}
_ROW_SHARDED_UPDATES = {"prepare_matrices": True, "orthogonalize": False, "apply_matrices": False}
_FUNCTIONS = ("variant", "state_keys", "state_layout", "count_at_bind", "group_values", "slot_table")
_MATRIX_FUNCTIONS = ("call_bytes", "lr_ratio")
# Sample params the declaration is checked on: a scalar, a vector, a matrix and a 3-D tensor, in two dtypes.
# (16, 256): large enough for torchao's quantized state (rules/quantized_adam.py).
_SAMPLE_SHAPES = ((), (5,), (4, 6), (2, 3, 4), (16, 256))
_SAMPLE_DTYPES = (torch.float32, torch.bfloat16)


def conformance_errors(rule, variants=None) -> list[str]:
    """What in ``rule`` breaks the contract above (empty when it conforms); ``variants``: those its state
    declaration is checked in (``declaration_errors``)."""
    errors = []
    for name in UpdateRule.__annotations__:
        if not hasattr(rule, name):
            errors.append(f"missing {name}")
    for name in _FUNCTIONS:
        if not callable(getattr(rule, name, None)):
            errors.append(f"missing function {name}")
    if errors:
        return errors
    if rule.KIND not in _UPDATES:
        errors.append(f"KIND {rule.KIND!r} is not one of {sorted(_UPDATES)}")
        return errors
    if rule.STEP_KEY is not None and (not isinstance(rule.STEP_KEY, str) or rule.STEP_KEY in rule.STATE_KEYS):
        errors.append(f"STEP_KEY {rule.STEP_KEY!r} must be None or a key name outside STATE_KEYS")
    if not set(rule.LOW_PRECISION_KEYS) <= set(rule.STATE_KEYS):
        errors.append(f"LOW_PRECISION_KEYS {rule.LOW_PRECISION_KEYS} must be among STATE_KEYS {rule.STATE_KEYS}")
    if rule.HP_COLUMNS[:2] != ("scale", "sign") or rule.TABLE_COLUMNS[:2] != ("apply", "grad_coef"):
        errors.append("HP_COLUMNS must start with scale, sign and TABLE_COLUMNS with apply, grad_coef")
    protocol = ElementwiseRule if rule.KIND == ELEMENTWISE else MatrixRule
    updates = dict(_UPDATES[rule.KIND])
    if rule.KIND == MATRIX:
        for name in _MATRIX_FUNCTIONS:
            if not callable(getattr(rule, name, None)):
                errors.append(f"missing function {name}")
        for name in MatrixRule.__annotations__:
            if not hasattr(rule, name):
                errors.append(f"missing {name}")
        if getattr(rule, "ROW_SHARDED", False):
            updates.update(_ROW_SHARDED_UPDATES)
            if not isinstance(getattr(rule, "Whole", None), type):
                errors.append("missing class Whole (ROW_SHARDED: the graph constant orthogonalize takes)")
    for name, takes_state in updates.items():
        fn = getattr(rule, name, None)
        if not callable(fn):
            errors.append(f"missing function {name}")
            continue
        expected = {p for p in inspect.signature(getattr(protocol, name)).parameters if p not in ("self", "state")}
        if rule.STOCHASTIC_ROUNDING and name in ("update_flat", "update_bucket", "update_matrices"):
            expected.add("rounding")
        params = inspect.signature(fn).parameters.values()
        got = {p.name for p in params}
        variadic = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if variadic or got != expected | (set(rule.STATE_KEYS) if takes_state else set()):
            state = f" and one per STATE_KEYS {rule.STATE_KEYS}" if takes_state else ""
            errors.append(f"{name}{tuple(p.name for p in params)}: expected the parameters {sorted(expected)}"
                          f"{state}, each named (no *args/**kwargs)")
    return errors + parts_errors(rule) + declaration_errors(rule, variants)


def state_parts(rule) -> dict[str, tuple[str, ...]]:
    """The rule's ``STATE_PARTS`` (torch key -> its buffer keys); empty for a rule whose every torch state
    tensor is one buffer key (Adam, SGD, Muon, Adafactor)."""
    return getattr(rule, "STATE_PARTS", {})


def torch_keys(rule, buffer_keys) -> tuple[str, ...]:
    """The torch state keys of a param that keeps ``buffer_keys`` (each part named by its torch key), in order."""
    owner = {part: key for key, parts in state_parts(rule).items() for part in parts}
    return tuple(dict.fromkeys(owner.get(k, k) for k in buffer_keys))


def parts_errors(rule) -> list[str]:
    """What in ``rule``'s ``STATE_PARTS`` breaks the contract: parts among ``STATE_KEYS``, each part of one torch
    key, and ``assemble``/``disassemble`` functions to go with them."""
    parts = state_parts(rule)
    if not parts:
        return []
    errors = []
    if not isinstance(parts, dict) or not all(isinstance(v, tuple) and v for v in parts.values()):
        return [f"STATE_PARTS must map each torch key to a tuple of buffer keys, got {parts!r}"]
    named = [part for ps in parts.values() for part in ps]
    if len(set(named)) != len(named) or not set(named) <= set(rule.STATE_KEYS) or set(named) & set(parts):
        errors.append(f"STATE_PARTS {parts}: each part must be one STATE_KEYS entry, of one torch key, not a "
                      "torch key itself")
    for name in ("assemble", "disassemble"):
        if not callable(getattr(rule, name, None)):
            errors.append(f"missing function {name} (the rule declares STATE_PARTS)")
    return errors


def declaration_errors(rule, variants=None) -> list[str]:
    """What in ``rule``'s state declaration breaks the contract, checked on sample params of every rank the
    rule takes (``PARAM_NDIMS``) and on ``variants`` (default: the variant of the default param group of each
    torch optimizer ``RULES`` maps to the rule): each param's keys are among ``state_keys``, each a
    ``StateTensor`` of a shape (a tuple of ints) and a floating dtype (any dtype for a ``STATE_PARTS`` part);
    a param keeps all parts of a torch key or none, and never the torch key beside its parts."""
    errors = []
    if variants is None:
        sample = torch.zeros(2, 2, requires_grad=True)
        optimizers = [t([sample]) for t, r in RULES.items() if r is rule]
        variants = [rule.variant(o, o.param_groups[0]) for o in optimizers]
    ndims = getattr(rule, "PARAM_NDIMS", None)
    parts = state_parts(rule)
    part_keys = {part for ps in parts.values() for part in ps}
    for var in variants:
        kept = rule.state_keys(var)
        if not set(kept) <= set(rule.STATE_KEYS):
            errors.append(f"state_keys({var}) = {kept}: not among STATE_KEYS {rule.STATE_KEYS}")
        for shape in _SAMPLE_SHAPES:
            if ndims is not None and len(shape) not in ndims:
                continue
            for dtype in _SAMPLE_DTYPES:
                declared = rule.state_layout(var, shape, dtype)
                for key, ps in parts.items():
                    kept_parts = [p for p in ps if p in declared]
                    if kept_parts and (len(kept_parts) != len(ps) or key in declared):
                        errors.append(f"state_layout({var}, {shape}, {dtype}) declares {sorted(declared)}: a param "
                                      f"keeps all parts {ps} of {key!r} or none, and not {key!r} beside them")
                for key, t in declared.items():
                    if key not in kept:
                        errors.append(f"state_layout({var}, {shape}, {dtype}) declares {key!r}, not in state_keys")
                    elif not isinstance(t, StateTensor) or not all(isinstance(n, int) and n >= 0 for n in t.shape) \
                            or not isinstance(t.dtype, torch.dtype) \
                            or not (t.dtype.is_floating_point or key in part_keys):
                        errors.append(f"state_layout({var}, {shape}, {dtype})[{key!r}] = {t!r}: expected a "
                                      "StateTensor(shape: tuple of ints >= 0, dtype: floating, or any dtype for a "
                                      "STATE_PARTS part)")
    return errors


# Exact types only: a subclass may override ``step`` and we would silently do something else.
RULES: dict[type, UpdateRule] = {
    torch.optim.Adam: adam,
    torch.optim.AdamW: adam,
    torch.optim.SGD: sgd,
    torch.optim.Muon: muon,
    torch.optim.Adafactor: adafactor,
}


_BUILT_IN = tuple(RULES)  # the torch.optim types (the message below stays the same once torchao's are registered)

# Rules for optimizers of optional packages: the module that defines the optimizer types -> the module whose
# ``RULES`` serve them, imported (each rule's ``OPTIMIZERS`` then registered) the first time such an optimizer is
# met, so that compiled_step imports and runs without those packages.
_OPTIONAL_RULES = {"torchao.optim.adam": "compiled_step.rules.torchao"}


def _register_optional(optimizer_type: type) -> None:
    name = _OPTIONAL_RULES.get(optimizer_type.__module__)
    if name is None:
        return
    for rule in importlib.import_module(name).RULES:
        for t in rule.OPTIMIZERS:
            RULES.setdefault(t, rule)


def rule_for(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """Return the rule module for ``optimizer`` or raise ``TypeError`` for unsupported types."""
    if type(optimizer) not in RULES:
        _register_optional(type(optimizer))
    rule = RULES.get(type(optimizer))
    if rule is None:
        supported = ", ".join(f"torch.optim.{t.__name__}" for t in _BUILT_IN)
        raise TypeError(
            f"FusedStep supports {supported} and torchao.optim's AdamW8bit, Adam8bit, AdamW4bit, Adam4bit, "
            f"AdamWFp8, AdamFp8 (exact types); got "
            f"{type(optimizer).__module__}."
            f"{type(optimizer).__qualname__}. A subclass may change step(), which FusedStep replaces."
        )
    return rule


def state_kwargs(rule, variant, by_key: dict) -> dict:
    """The update's state keyword arguments: ``by_key[k]`` for the keys the variant keeps and ``by_key`` holds
    (a stack of Adafactor's vectors holds no ``row_var``), else None."""
    kept = rule.state_keys(variant)
    return {k: (by_key.get(k) if k in kept else None) for k in rule.STATE_KEYS}


__all__ = ["RULES", "UpdateRule", "ElementwiseRule", "MatrixRule", "ELEMENTWISE", "MATRIX", "StateTensor",
           "conformance_errors", "declaration_errors", "parts_errors", "rule_for", "state_kwargs", "state_parts", "torch_keys", "adafactor", "adam", "muon", "sgd"]
