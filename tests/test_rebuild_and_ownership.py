"""Plan rebuilds and FusedSteps that share params: never silently wrong, never a copy per step.

* A rebuild (``add_param_group``: progressive unfreezing, Lightning's ``BackboneFinetuning``) follows the
  first build's rule: a param that another tensor aliases (``p.detach()``, ``model.state_dict()``'s
  values, taken at any time) stays where it is, so the alias keeps following the weights as in eager
  torch. A param that stays after living in an old flat buffer keeps its values and its updates.
* Two FusedSteps over the same params (a trainer kept alive while a second one trains the model): the
  one that steps owns the grads, so grads set to None between steps (``model.zero_grad()``, as HF
  Trainer does) come back in its own buffer, and no step copies them; the older one stepped again
  takes them back and stays correct. The copy warning names the real cause of a copy.

Reference: eager ``clip_grad_norm_`` + the same ``torch.optim`` optimizers on copies of the params,
stepped in the same order. Tolerance ``rtol=1e-5, atol=1e-6`` (fp32) for params and optimizer state,
as in test_parity.py: the fp64 norm and fused arithmetic differ from torch's in the last bits. Aliases
are compared with ``torch.equal``: in eager torch an alias is the weight's memory, so any difference at
all means it stopped following.

``compile=False`` runs the same step functions eagerly: what is tested is where params live and whose
buffer a grad is, which compiling does not change (test_parity.py tests the compiled math).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from compiled_step import FusedStep
from test_parity import assert_states_close
from test_replay import _eager_step, _loss, _model  # the same model, batches and eager reference

TOL = dict(rtol=1e-5, atol=1e-6)
OPT = dict(lr=1e-2, weight_decay=0.1)


def _assert_close(model, ref):
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"{name}: {m}")


def _extra(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _loss_with(model, extras, step):
    """The model's loss plus one term per extra layer fed the model's output, as unfrozen heads would be."""
    loss = _loss(model, step)
    gen = torch.Generator().manual_seed(200 + step)
    x = torch.randn(32, 4, generator=gen)
    return loss + sum((e(x) ** 2).mean() for e in extras)


# ------------------------------------------------------------------ item 2: rebuilds and aliases


@pytest.mark.parametrize("pack_threshold", [16384, 0], ids=["stays_staged", "stays_bucketed"])
@pytest.mark.parametrize("alias", ["detach", "state_dict"])
def test_aliases_taken_after_a_step_follow_the_weights_through_plan_rebuilds(alias, pack_threshold):
    """Aliases taken after the first step (when the params live in the flat buffer) stay bit-identical to
    the weights through two rebuilds (two ``add_param_group``), and every param, the aliased ones
    included, matches eager AdamW + clip_grad_norm_ with its state. The second rebuild moves a param
    that already stayed once (staged or bucketed over the old flat buffer's memory)."""
    model, ref = _model(), _model()
    extras, ref_extras = [_extra(1), _extra(2)], [_extra(1), _extra(2)]
    opt, ref_opt = torch.optim.AdamW(model.parameters(), **OPT), torch.optim.AdamW(ref.parameters(), **OPT)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=False, pack_threshold=pack_threshold)
    aliases = {}
    for step in range(6):
        if step in (2, 4):  # unfreeze one more layer: a new param group, so a new plan
            k = step // 2 - 1
            opt.add_param_group({"params": list(extras[k].parameters())})
            ref_opt.add_param_group({"params": list(ref_extras[k].parameters())})
        _loss_with(model, extras[:step // 2], step).backward()
        _loss_with(ref, ref_extras[:step // 2], step).backward()
        plan = fused.plan
        fused.step()
        _eager_step(torch.nn.ModuleList([ref, *ref_extras]), ref_opt)
        assert (fused.plan is not plan) == (step in (0, 2, 4))  # the rebuilds did happen
        opt.zero_grad()  # set to None, the extras' grads too
        ref_opt.zero_grad()
        if step == 0:
            aliases = ({n: p.detach() for n, p in model.named_parameters()} if alias == "detach"
                       else model.state_dict())
        for name, p in model.named_parameters():
            assert torch.equal(aliases[name], p), f"step {step}: the alias of {name} no longer follows it"
        _assert_close(model, ref)
        _assert_close(torch.nn.ModuleList(extras), torch.nn.ModuleList(ref_extras))
        assert_states_close(opt, ref_opt, TOL)


# ------------------------------------------------------------------ item 3: two FusedSteps, one owner


def _fused(model, flat_params):
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    return opt, FusedStep(opt, max_grad_norm=1.0, compile=False, flat_params=flat_params, model_parts=[model])


def _train(model, fused, ref, ref_opt, steps, copies, caught=None):
    """Steps of one FusedStep and of its eager twin, grads set to None between steps as HF Trainer does."""
    for step in steps:
        _loss(model, step).backward()
        _loss(ref, step).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fused.step()
        if caught is not None:
            caught += [str(x.message) for x in w if "FusedStep copied" in str(x.message)]
        _eager_step(ref, ref_opt)
        copies.append(len(fused.last_step_copied_grads))
        model.zero_grad()
        ref_opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        _assert_close(model, ref)
        assert_states_close(fused.optimizer, ref_opt, TOL)


@pytest.mark.parametrize("flat_params", [True, False], ids=["moved_in", "left_in_place"])
def test_a_second_fused_step_takes_the_grads_over_while_the_first_is_alive(flat_params):
    """HF Trainer's ``model.zero_grad()`` frees the grads; the first FusedStep's hooks are older, and
    must not point the grads at its buffer while the second one trains: no copy at any step."""
    model, ref = _model(), _model()
    opt1, first = _fused(model, flat_params)
    ref_opt1 = torch.optim.AdamW(ref.parameters(), **OPT)
    copies1, copies2 = [], []
    _train(model, first, ref, ref_opt1, range(2), copies1)
    opt2, second = _fused(model, flat_params)
    ref_opt2 = torch.optim.AdamW(ref.parameters(), **OPT)
    _train(model, second, ref, ref_opt2, range(2, 6), copies2)
    assert first.plan is not None  # the first one is alive throughout
    assert copies1 == [0, 0] and copies2 == [0, 0, 0, 0]


@pytest.mark.parametrize("flat_params", [True, False], ids=["moved_in", "left_in_place"])
def test_the_older_fused_step_stepped_again_takes_its_grads_back_and_stays_correct(flat_params):
    """Each FusedStep steps its own optimizer in turns; each must match its eager twin at every step. The
    one that steps takes the grads over: params it moves into its flat buffer make it rebuild (the grads
    come along), params left in place make it copy each grad once, after which neither copies again.
    The copy warning says why: another FusedStep's buffer, not DDP (there is none)."""
    model, ref = _model(), _model()
    n = len(list(model.parameters()))
    opt1, first = _fused(model, flat_params)
    opt2, second = _fused(model, flat_params)
    ref_opt1, ref_opt2 = torch.optim.AdamW(ref.parameters(), **OPT), torch.optim.AdamW(ref.parameters(), **OPT)
    copies, caught = [], []
    _train(model, first, ref, ref_opt1, range(0, 2), copies, caught)
    _train(model, second, ref, ref_opt2, range(2, 5), copies, caught)
    _train(model, first, ref, ref_opt1, range(5, 7), copies, caught)
    _train(model, second, ref, ref_opt2, range(7, 9), copies, caught)
    switch = 0 if flat_params else n  # moved in: a rebuild at each switch, which brings the grads along
    assert copies == [0, 0] + [0, 0, 0] + [switch, 0] + [switch, 0]
    if flat_params:
        assert caught == []
    else:
        assert len(caught) == 2  # once per FusedStep
        for message in caught:
            assert "a view of another FusedStep's grad buffer" in message
            assert "DistributedDataParallel" not in message


# ------------------------------------------------------------------ the copy warning's causes


def test_a_grad_viewing_a_buffer_that_is_not_ddps_is_not_blamed_on_ddp():
    """A grad assigned as a view of a larger buffer, with no DDP anywhere: the warning must say so."""
    model, ref = _model(), _model()
    opt, fused = _fused(model, True)
    ref_opt = torch.optim.AdamW(ref.parameters(), **OPT)
    _train(model, fused, ref, ref_opt, range(1), [])  # built: the grads the first step finds are taken in
    _loss(model, 1).backward()
    _loss(ref, 1).backward()
    weight = model[0].weight
    big = torch.zeros(weight.numel() + 100)
    view = big[50:50 + weight.numel()].view_as(weight)
    view.copy_(weight.grad)
    weight.grad = view
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fused.step()
    _eager_step(ref, ref_opt)
    _assert_close(model, ref)
    (message,) = [str(x.message) for x in w if "FusedStep copied" in str(x.message)]
    assert "a view of a larger buffer that is not FusedStep's" in message
    assert "DistributedDataParallel" not in message
    assert fused.last_step_copied_grads == ("0.weight",)
