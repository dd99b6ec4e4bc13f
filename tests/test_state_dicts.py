"""``state_dicts.py``: FusedStep's one state_dict format, and its refusals before anything changes.

References: torch.optim's own state dicts (a plain AdamW loads FusedStep's dict and FusedStep loads a plain
AdamW's); the formats of main before issue 23 are loaded in tests/integrations/test_fused_optimizer.py
(``test_loads_main_*``), from a fixture written by main's code.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compiled_step import FusedStep


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _two(model):
    return (torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=1e-2),
            torch.optim.AdamW([p for p in model.parameters() if p.ndim != 2], lr=1e-2))


def _step(fused, model, nan=False):
    model(torch.ones(3, 4)).square().sum().backward()
    if nan:
        next(model.parameters()).grad.view(-1)[0] = float("nan")
    fused.step()
    fused.zero_grad()


def test_state_dict_is_the_optimizers_plus_fused_steps_own():
    model = _model()
    muon, adamw = _two(model)
    fused = FusedStep([muon, adamw], max_grad_norm=1.0, compile=False)
    _step(fused, model)
    _step(fused, model, nan=True)
    state = fused.state_dict()
    assert state.keys() == {"optimizers", "fused_step"} and int(state["fused_step"]["skipped_steps"]) == 1
    assert [s.keys() for s in state["optimizers"]] == [muon.state_dict().keys(), adamw.state_dict().keys()]
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(state["optimizers"][0]["state"].values(), muon.state_dict()["state"].values()))


def test_a_dict_for_another_number_of_optimizers_or_a_bad_own_part_changes_nothing():
    model = _model()
    fused = FusedStep(list(_two(model)), max_grad_norm=1.0, compile=False)
    _step(fused, model, nan=True)
    before = copy.deepcopy(fused.state_dict())
    single = FusedStep(torch.optim.AdamW(_model().parameters(), lr=1e-2), compile=False).state_dict()
    with pytest.raises(ValueError, match="steps 2 optimizer"):
        fused.load_state_dict(single)
    with pytest.raises(ValueError, match="steps 2 optimizer"):
        fused.load_state_dict({**before, "optimizers": before["optimizers"][:1]})
    with pytest.raises(TypeError, match="must be a dict"):
        fused.load_state_dict({**before, "fused_step": 3})
    bad_second = copy.deepcopy(before)
    bad_second["optimizers"][1]["param_groups"] *= 2  # the first loads, the second raises: the first is put back
    bad_second["optimizers"][0]["param_groups"][0]["lr"] = 5.0
    with pytest.raises(ValueError, match="different number of parameter groups"):
        fused.load_state_dict(bad_second)
    after = fused.state_dict()
    assert after["optimizers"][0]["param_groups"][0]["lr"] == before["optimizers"][0]["param_groups"][0]["lr"]
    assert int(after["fused_step"]["skipped_steps"]) == 1
