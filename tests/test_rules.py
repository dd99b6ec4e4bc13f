"""The rule contract (``compiled_step/rules/__init__.py``) and the state layout the engine derives from a
rule's declaration (``storage.lay_out_state``). Pure Python: nothing is compiled."""

import types

import pytest
import torch

from compiled_step import planning
from compiled_step.rules import (RULES, StateTensor, adafactor, adam, conformance_errors, declaration_errors, muon,
                                  parts_errors, sgd, torch_keys)
from compiled_step.storage import lay_out_state


DELETE = object()


def _copy(rule, **changes):
    """A module-like copy of ``rule`` with ``changes`` (``DELETE``: without the attribute)."""
    attrs = {k: v for k, v in vars(rule).items() if not k.startswith("__")}
    attrs.update(changes)
    return types.SimpleNamespace(**{k: v for k, v in attrs.items() if v is not DELETE})


def test_every_registered_rule_conforms_in_every_variant():
    for optimizer_type, rule in RULES.items():
        assert conformance_errors(rule) == [], optimizer_type
    assert declaration_errors(adam, [adam.Variant(amsgrad=True), adam.Variant(amsgrad=False)]) == []
    assert declaration_errors(sgd, [sgd.Variant(momentum=True), sgd.Variant(momentum=False)]) == []


@pytest.mark.parametrize("rule,change,error", [
    (muon, dict(lr_ratio=DELETE), "missing function lr_ratio"),
    (muon, dict(Whole=DELETE), "missing class Whole"),
    (muon, dict(ROW_SHARDED=DELETE), "missing ROW_SHARDED"),
    (adafactor, dict(ROW_SHARDED=DELETE), "missing ROW_SHARDED"),
    (adafactor, dict(call_bytes=DELETE), "missing function call_bytes"),
    (adam, dict(STEP_KEY=DELETE), "missing STEP_KEY"),
    (sgd, dict(count_at_bind=DELETE), "missing function count_at_bind"),
    (adam, dict(state_layout=DELETE), "missing function state_layout"),
    (adam, dict(STEP_KEY="exp_avg"), "STEP_KEY 'exp_avg' must be None or a key name outside STATE_KEYS"),
    (adafactor, dict(update_matrices=lambda params, grads, hp, table, lr_ratio, variant, row_var, col_var,
                     variance: None), "update_matrices"),
])
def test_a_rule_that_breaks_the_contract_is_reported(rule, change, error):
    errors = conformance_errors(_copy(rule, **change))
    assert any(error in e for e in errors), errors


def test_a_declaration_outside_the_state_keys_is_reported():
    def layout(var, shape, dtype):
        return {"exp_avg": StateTensor(shape, dtype), "scale": StateTensor((1,), dtype)}

    variants = [adam.Variant(amsgrad=False)]
    errors = conformance_errors(_copy(adam, state_layout=layout), variants)
    assert any("declares 'scale', not in state_keys" in e for e in errors), errors
    errors = conformance_errors(_copy(adam, state_layout=lambda var, shape, dtype: {"exp_avg": (shape, dtype)}),
                                variants)
    assert any("expected a StateTensor" in e for e in errors), errors


def _plan(params, rule, flat=False):
    """A one-group plan; ``flat``: every param in the flat region (staged), else bucketed (matrix rules: stacks)."""
    matrix = {0: rule} if rule.KIND == "matrix" else {}
    return planning.build_plan([params], bucket_size=4, pack_threshold=1 << 20 if flat else 0,
                               matrix_groups=matrix)


def test_param_shaped_state_shares_the_params_rows():
    params = [torch.zeros(3, 300), torch.zeros(7), torch.zeros(2, 2)]
    (group,) = _plan(params, adam).groups
    layout = lay_out_state(group, adam, adam.Variant(amsgrad=True))
    assert list(layout) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    for key in layout.values():
        assert key.like_params and key.rows == group.rows
        assert [t.row for t in key.tensors] == [e.row for e in group.entries]


def test_factored_state_is_packed_stack_by_stack():
    params = [torch.zeros(4, 300), torch.zeros(10), torch.zeros(4, 300), torch.zeros(2, 3, 5)]
    (group,) = _plan(params, adafactor).groups
    layout = lay_out_state(group, adafactor, adafactor.Variant())
    row_var, col_var, variance = layout["row_var"], layout["col_var"], layout["variance"]
    assert not row_var.like_params and [t is None for t in row_var.tensors] == [False, True, False, False]
    assert [t is None for t in variance.tensors] == [True, False, True, True]
    assert row_var.tensors[0].shape == (4, 1) and col_var.tensors[0].shape == (1, 300)
    assert row_var.tensors[3].shape == (2, 3, 1) and col_var.tensors[3].shape == (2, 1, 5)
    # the two 4x300 matrices form one stack: their row_var one row apart (4 elements and a padding one)
    assert row_var.tensors[2].row - row_var.tensors[0].row == 1
    assert col_var.tensors[2].row - col_var.tensors[0].row == 2  # 300 elements and a padding one: 2 rows
    assert row_var.rows == 3 and col_var.rows == 5 and variance.rows == 1


def test_state_an_elementwise_flat_update_cannot_read_is_refused():
    def factored(var, shape, dtype):
        return {"exp_avg": StateTensor((shape[0], 1) if len(shape) == 2 else shape, dtype),
                "exp_avg_sq": StateTensor(shape, dtype)}

    rule = _copy(adam, state_layout=factored)
    (group,) = _plan([torch.zeros(4, 8), torch.zeros(3)], adam, flat=True).groups
    with pytest.raises(ValueError, match="keeps state 'exp_avg' not shaped like its params, which the flat update"):
        lay_out_state(group, rule, adam.Variant(amsgrad=False))


def test_a_matrix_rule_refuses_params_of_other_ranks_and_sharded_params_it_cannot_gather():
    with pytest.raises(ValueError, match=r"muon updates 2-D params only, got shape \(3,\)"):
        _plan([torch.zeros(3)], muon)
    _plan([torch.zeros(3), torch.zeros(()), torch.zeros(2, 3, 4)], adafactor)  # any rank


# A rule that keeps torch's exp_avg in two buffer keys (STATE_PARTS), as torchao's quantized state
# (rules/quantized_adam.py):
# uint8 codes shaped like the param and a float32 scale. Built on Adam, so that torchao is not needed here.
_PARTS = {"exp_avg": ("exp_avg_codes", "exp_avg_scale")}
_PART_KEYS = ("exp_avg_sq", "exp_avg_codes", "exp_avg_scale")


def _parts_layout(var, shape, dtype):
    return {"exp_avg_sq": StateTensor(shape, dtype), "exp_avg_codes": StateTensor(shape, torch.uint8),
            "exp_avg_scale": StateTensor((1,), torch.float32)}


def _rule_with_parts(**changes):
    attrs = dict(STATE_PARTS=_PARTS, STATE_KEYS=_PART_KEYS, state_keys=lambda var: _PART_KEYS,
                 state_layout=_parts_layout, assemble=lambda key, parts, shape, dtype: None,
                 disassemble=lambda key, value, declared: {})
    attrs.update(changes)
    return _copy(adam, **attrs)


def test_state_parts_may_be_of_any_dtype_and_other_keys_must_be_floating():
    variants = [adam.Variant(amsgrad=False)]
    assert declaration_errors(_rule_with_parts(), variants) == []
    assert parts_errors(_rule_with_parts()) == []
    errors = declaration_errors(_rule_with_parts(STATE_PARTS=DELETE), variants)  # codes not a part: not floating
    assert any("'exp_avg_codes'" in e and "dtype: floating" in e for e in errors), errors


@pytest.mark.parametrize("change,error", [
    (dict(assemble=DELETE), "missing function assemble"),
    (dict(disassemble=DELETE), "missing function disassemble"),
    (dict(STATE_PARTS={"exp_avg": ("exp_avg_codes", "codes_elsewhere")}), "each part must be one STATE_KEYS entry"),
    (dict(STATE_PARTS={"exp_avg": ["exp_avg_codes"]}), "a tuple of buffer keys"),
])
def test_a_rule_whose_state_parts_break_the_contract_is_reported(change, error):
    errors = parts_errors(_rule_with_parts(**change))
    assert any(error in e for e in errors), errors


def test_a_param_keeps_all_parts_of_a_key_or_none():
    def layout(var, shape, dtype):  # codes without their scale
        return {"exp_avg_sq": StateTensor(shape, dtype), "exp_avg_codes": StateTensor(shape, torch.uint8)}

    errors = declaration_errors(_rule_with_parts(state_layout=layout), [adam.Variant(amsgrad=False)])
    assert any("keeps all parts" in e for e in errors), errors


def test_torch_keys_name_each_part_by_its_torch_key():
    rule = _rule_with_parts()
    assert torch_keys(rule, ("exp_avg_codes", "exp_avg_scale", "exp_avg_sq")) == ("exp_avg", "exp_avg_sq")
    assert torch_keys(adam, ("exp_avg", "exp_avg_sq")) == ("exp_avg", "exp_avg_sq")
