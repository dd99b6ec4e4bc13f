"""FusedOptimizer: a torch.optim.Optimizer whose step is FusedStep's; and the wrappers FusedStep refuses.

References: eager torch.optim.AdamW/SGD after torch.nn.utils.clip_grad_norm_ (and torch.amp.GradScaler's
own unscale_ + step), the uninterrupted run for checkpoint round trips, torch's own LR schedulers.
Tolerance: 1e-6 relative per step against eager (FusedStep's fp64 norm and fused update differ from
eager by an ulp or two, README "Known differences"); resumes are bit-identical.
"""

from __future__ import annotations

import collections
import copy
import io
import math
import pickle
from pathlib import Path

import pytest
import torch

from compiled_step import FusedOptimizer, FusedStep

RTOL = 1e-6


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)


def _loss(model, step):
    x, y = _batch(step)
    return torch.nn.functional.mse_loss(model(x), y) * 50  # large grads: a max_grad_norm of 1 clips


def _close(a, b, rtol=RTOL):
    return all(float((p - q).norm()) <= rtol * float(q.norm()) for p, q in zip(a.parameters(), b.parameters()))


def test_is_an_optimizer_sharing_the_wrapped_optimizers_objects():
    inner = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    opt = FusedOptimizer(inner, max_grad_norm=1.0)
    assert isinstance(opt, torch.optim.Optimizer) and opt.optimizer is inner
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    inner.load_state_dict(inner.state_dict())  # torch replaces inner.state and inner.param_groups
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert math.isnan(float(opt.grad_norm)) and opt.grad_norm.dtype == torch.float64 and opt.steps == 0


def test_closure_step_with_schedulers_matches_eager_clip_and_adamw():
    """Schedulers on the wrapper and on the optimizer inside both drive the lr FusedStep reads."""
    model, reference = _model(), _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), max_grad_norm=1.0)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
                  torch.optim.lr_scheduler.StepLR(opt.optimizer, 2, 0.5)]
    eager_schedulers = [torch.optim.lr_scheduler.LambdaLR(eager, lambda s: 1 / (1 + s)),
                        torch.optim.lr_scheduler.StepLR(eager, 2, 0.5)]
    live_norm = opt.grad_norm
    for step in range(6):
        def closure():
            opt.zero_grad()
            loss = _loss(model, step)
            loss.backward()
            return loss

        loss = opt.step(closure)
        eager.zero_grad()
        eager_loss = _loss(reference, step)
        eager_loss.backward()
        eager_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        eager.step()
        for s in schedulers + eager_schedulers:
            s.step()
        assert torch.equal(loss, eager_loss) and loss.requires_grad  # evaluated under enable_grad
        assert eager_norm > 1.0 and abs(float(live_norm) - float(eager_norm)) <= RTOL * float(eager_norm)
        assert live_norm is opt.grad_norm  # one tensor, written in place by every step
        assert _close(model, reference), step
    assert opt.steps == 6 and opt.param_groups[0]["lr"] == eager.param_groups[0]["lr"]


def test_zero_grad_zeroes_in_place_or_frees_and_no_step_copies_a_grad():
    """zero_grad() zeroes FusedStep's grad buffers in place; zero_grad(set_to_none=True), as Accelerate calls it,
    frees the grads as torch does, and the next backward puts them back into the buffers: either way no step
    copies a grad (before issue 23, FusedOptimizer zeroed in place whatever set_to_none said)."""
    model = _model()
    opt = FusedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), max_grad_norm=1.0)
    _loss(model, 0).backward()
    opt.step()
    grads = [p.grad for p in model.parameters()]
    storages = [g.untyped_storage().data_ptr() for g in grads]
    for set_to_none in (False, True):
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert all(p.grad is None for p in model.parameters())
        else:
            assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
        _loss(model, 1).backward()
        assert [p.grad.untyped_storage().data_ptr() for p in model.parameters()] == storages  # the buffers
        opt.step()
        assert len(opt.last_step_copied_grads) == 0  # autograd's grads are in FusedStep's buffers
    model[0].weight.grad = torch.ones_like(model[0].weight)  # a grad that is not FusedStep's: copied in
    opt.step()
    assert len(opt.last_step_copied_grads) == 1


def test_step_hooks_on_the_wrapper_run_once_around_the_step():
    model = _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt, float(o.grad_norm))))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt, float(o.grad_norm))))
    inner_calls = []
    opt.optimizer.register_step_post_hook(lambda o, args, kwargs: inner_calls.append(o))
    _loss(model, 0).backward()
    opt.step()
    assert [c[:2] for c in calls] == [("pre", True), ("post", True)] and inner_calls == [opt.optimizer]
    assert math.isnan(calls[0][2]) and calls[1][2] > 0


def _train(opt, model, steps, nan_at=None):
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        if step == nan_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")  # a skipped step, counted
        opt.step()


def test_state_dict_round_trip_through_torch_save_into_a_fresh_wrapper():
    model = _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0)
    _train(opt, model, range(4), nan_at=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    _train(opt, model, range(4, 7))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what HF Trainer and Lightning load with
    assert int(saved["optim"]["fused_step"]["skipped_steps"]) == 1 and len(saved["optim"]["state"]) == 4
    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = FusedOptimizer(torch.optim.AdamW(resumed_model.parameters(), lr=1e-2), max_grad_norm=1.0)
    resumed.load_state_dict(saved["optim"])  # before any step
    assert int(resumed.skipped_steps) == 1
    _train(resumed, resumed_model, range(4, 7))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert all(torch.equal(opt.state[p][k], resumed.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_state_dicts_load_across_eager_and_fused():
    """A plain AdamW loads a FusedOptimizer's dict (it ignores "fused_step") and the other way round."""
    model = _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0)
    _train(opt, model, range(2))
    plain = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    assert all(torch.equal(plain.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in model.parameters())
    other = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), compile_notice=False)
    other.load_state_dict(plain.state_dict())
    assert int(other.state_dict()["fused_step"]["skipped_steps"]) == 0


def test_failed_load_changes_nothing():
    model = _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0)
    _train(opt, model, range(2), nan_at=1)
    state = opt.state_dict()
    bad = {**copy.deepcopy(state), "fused_step": {"skipped_steps": 7, "last_step_finite": True}}
    bad["param_groups"] = bad["param_groups"] * 2  # two groups for an optimizer with one
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(bad)
    assert int(opt.skipped_steps) == 1 and len(opt.param_groups) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (never run on the CPU-only development machines)"))])
def test_grad_scaler_unscales_and_skips_inside_the_step(device):
    """Reference: GradScaler's own path, unscale_ + clip_grad_norm_ + scaler.step on AdamW."""
    model, reference = _model().to(device), _model().to(device)
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    scaler, eager_scaler = (torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2) for _ in range(2))
    for step in range(5):
        for m, o, s in ((model, opt, scaler), (reference, eager, eager_scaler)):
            o.zero_grad()
            x, y = _batch(step)
            s.scale(torch.nn.functional.mse_loss(m(x.to(device)), y.to(device)) * 50).backward()
            if step == 2:
                next(m.parameters()).grad.view(-1)[0] = float("inf")  # an overflow: both skip the step
            if o is eager:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            s.step(o)
            s.update()
        assert scaler.get_scale() == eager_scaler.get_scale()
        assert _close(model, reference), step
    assert int(opt.skipped_steps) == 1 and opt.steps == 5



class _GradOps:
    """Counts every aten op, and the ops that take a grad (any tensor over a grad's storage) as an argument."""

    def __init__(self, grads):
        from torch.utils._python_dispatch import TorchDispatchMode

        storages = {g.untyped_storage().data_ptr() for g in grads}
        ops, grad_ops = collections.Counter(), collections.Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops[str(func)] += 1
                leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
                if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in storages for t in leaves):
                    grad_ops[str(func)] += 1
                return func(*args, **(kwargs or {}))

        self.mode, self.ops, self.grad_ops = Mode(), ops, grad_ops


# torch warns on every scaler.step that it will stop passing itself to step() (it still does in 2.13).
@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("user_unscales", [False, True], ids=["scaler_step", "unscale_then_step"])
def test_grad_scaler_reads_no_grad_and_update_sees_the_steps_found_inf(user_unscales):
    """Under a CPU GradScaler, scaler.step makes no pass over the grads of its own (no
    _amp_foreach_non_finite_check_and_unscale_, no op on a grad outside the compiled step): the step unscales
    and records found-inf for scaler.update(). Reference: eager AdamW under its own GradScaler with
    unscale_ + clip_grad_norm_ + scaler.step; overflows (inf and NaN grads) on steps 2, 3 and 6, growth every
    2 clean steps, so the scale backs off and grows. The scales must be equal (both are powers of 2 moved by
    the same found-inf); params to RTOL. With the user's own unscale_ first, the grads are unscaled once."""
    model, reference = _model(), _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    scaler, eager_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2))
    scales, eager_scales, counted = [], [], []
    overflow = {2: float("inf"), 3: float("nan"), 6: float("-inf")}
    for step in range(8):
        for m, o, s in ((model, opt, scaler), (reference, eager, eager_scaler)):
            o.zero_grad()
            x, y = _batch(step)
            s.scale(torch.nn.functional.mse_loss(m(x), y) * 50).backward()
            if step in overflow:
                next(m.parameters()).grad.view(-1)[0] = overflow[step]  # both skip the step
            if o is eager:
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
                s.step(o)
            else:
                if user_unscales:
                    s.unscale_(o)
                if step == 0:  # compiles (Dynamo compiles nothing under a dispatch mode); then counted
                    s.step(o)
                else:
                    counter = _GradOps([p.grad for p in m.parameters()])
                    with counter.mode:
                        s.step(o)
                    counted.append(counter)
                found_inf = s._per_optimizer_states[id(o)]["found_inf_per_device"]
                assert [t.dtype for t in found_inf.values()] == [torch.float32], found_inf
            s.update()
        scales.append(scaler.get_scale())
        eager_scales.append(eager_scaler.get_scale())
        assert _close(model, reference), step
    assert scales == eager_scales
    assert len(set(scales)) > 2, scales  # the scale both backed off and grew
    assert int(opt.skipped_steps) == len(overflow) and opt.steps == 8
    for counter in counted:
        assert "aten._amp_foreach_non_finite_check_and_unscale_.default" not in counter.ops, counter.ops
        assert not counter.grad_ops, counter.grad_ops  # no op of GradScaler's (or ours) on a grad
        # The one host read allowed: FusedStep reading the CPU scale as a number (a CUDA scale stays on its
        # device). Reading found-inf on the host (as GradScaler's _maybe_opt_step does) would be a second.
        assert counter.ops["aten._local_scalar_dense.default"] <= 1, counter.ops


def _muon_and_adamw(model):
    matrices = [p for p in model.parameters() if p.ndim == 2]
    others = [p for p in model.parameters() if p.ndim != 2]
    return torch.optim.Muon(matrices, lr=2e-2), torch.optim.AdamW(others, lr=1e-2, weight_decay=0.1)


def test_a_list_of_optimizers_is_one_optimizer_to_schedulers_and_checkpoints():
    """FusedOptimizer([muon, adamw]): one LR scheduler drives both (the same group dicts), state_dict holds
    both and round-trips into a fresh wrapper bit-identically; the steps match eager clip over both +
    muon.step() + adamw.step() without clipping (the Muon tolerance of tests/test_muon.py: fp32 ulps)."""
    model, reference, resumed_model = _model(), _model(), _model()
    muon, adamw = _muon_and_adamw(model)
    opt = FusedOptimizer([muon, adamw])
    assert opt.optimizers == (muon, adamw) and opt.param_groups == muon.param_groups + adamw.param_groups
    with pytest.raises(AttributeError, match="use .optimizers"):
        opt.optimizer
    with pytest.raises(TypeError, match="wraps 2 optimizers"):
        opt.add_param_group({"params": []})
    eager = _muon_and_adamw(reference)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    eager_schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in eager]
    for step in range(4):
        if step == 2:
            saved = copy.deepcopy(opt.state_dict())
            resumed = FusedOptimizer(list(_muon_and_adamw(resumed_model)))  # a resume builds everything first,
            resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed, lambda s: 1 / (1 + s))  # then loads
            resumed_model.load_state_dict(model.state_dict())
            resumed.load_state_dict(saved)
            resumed_scheduler.load_state_dict(scheduler.state_dict())
        for net, o in ((model, opt), (reference, None)) + (((resumed_model, resumed),) if step >= 2 else ()):
            _loss(net, step).backward()
            if o is None:
                for e in eager:
                    e.step()
                    e.zero_grad()
            else:
                o.step()
                o.zero_grad()
        scheduler.step()
        if step >= 2:
            resumed_scheduler.step()
        for s in eager_schedulers:
            s.step()
    assert set(opt.state) == {p for o in (muon, adamw) for p in o.state}
    assert _close(model, reference, rtol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for o in eager for g in o.param_groups]


def test_pickle_and_nonfinite_errors_are_refused():
    params = list(_model().parameters())
    opt = FusedOptimizer(torch.optim.AdamW(params), error_if_nonfinite=True)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(opt)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)  # as GradScaler.step sets them
    with pytest.raises(ValueError, match="GradScaler"):
        opt.step()



def test_a_grad_scaler_argument_is_checked_before_the_step():
    params = list(_model().parameters())
    opt = FusedOptimizer(torch.optim.AdamW(params), error_if_nonfinite=True)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        opt.step(grad_scaler=object())
    with pytest.raises(ValueError, match="GradScaler"):
        opt.step(grad_scaler=torch.amp.GradScaler("cpu"))  # as GradScaler.step passes itself
    assert opt.steps == 0 and opt.plan is None  # nothing ran


def test_fused_optimizer_and_fused_step_refuse_a_fused_optimizer():
    opt = FusedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    for cls in (FusedStep, FusedOptimizer):
        with pytest.raises(TypeError, match=r"got a FusedStep \(FusedOptimizer is the same class\).*"
                                            r"fused\.optimizer \(the SGD inside\)"):
            cls(opt)
        with pytest.raises(TypeError, match=r"got a FusedStep"):
            cls([torch.optim.SGD(_model().parameters(), lr=0.1), opt])


def test_accelerated_optimizer_is_refused_with_what_to_pass():
    accelerate = pytest.importorskip("accelerate")
    inner = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    prepared = accelerate.Accelerator(cpu=True).prepare(inner)
    for cls in (FusedStep, FusedOptimizer):
        with pytest.raises(TypeError, match=rf"{cls.__name__} got an AcceleratedOptimizer \(wrapping AdamW\).*"
                                            r"Wrap before prepare: optimizer = FusedOptimizer\(AdamW\(\.\.\.\).*"
                                            r"pass optimizer\.optimizer"):
            cls(prepared)
    FusedStep(prepared.optimizer)  # what the message says to pass


def test_lightning_optimizer_is_refused_with_what_to_pass():
    pl = pytest.importorskip("pytorch_lightning")
    inner = torch.optim.SGD(_model().parameters(), lr=0.1)
    wrapped = pl.core.optimizer.LightningOptimizer(inner)
    for cls in (FusedStep, FusedOptimizer):
        with pytest.raises(TypeError, match=r"got a LightningOptimizer \(wrapping SGD\).*global_step.*"
                                            r"configure_optimizers.*FusedStepCallback"):
            cls(wrapped)


def test_other_subclasses_keep_the_exact_type_message():
    class MyAdamW(torch.optim.AdamW):
        pass

    with pytest.raises(TypeError, match="exact types"):
        FusedOptimizer(MyAdamW(_model().parameters()))


# ---------------------------------------------------------------------------------------- FusedStep is the optimizer


def test_fused_step_is_the_torch_optimizer_and_a_dcp_stateful():
    """One class: FusedOptimizer is FusedStep, a torch.optim.Optimizer and a torch.distributed.checkpoint Stateful,
    whose step() still returns the norm (norm = fused.step()) and whose grad_norm is one tensor."""
    from torch.distributed.checkpoint.stateful import Stateful

    model, reference = _model(), _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fused = FusedStep(inner, max_grad_norm=1.0, compile=False)
    assert FusedOptimizer is FusedStep and isinstance(fused, torch.optim.Optimizer) and isinstance(fused, Stateful)
    assert fused.param_groups is inner.param_groups and fused.state is inner.state and fused.defaults is inner.defaults
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    live = fused.grad_norm
    for step in range(2):
        _loss(model, step).backward()
        norm = fused.step()
        _loss(reference, step).backward()
        eager_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        eager.step()
        fused.zero_grad()
        eager.zero_grad()
        assert norm is not live and float(norm) == float(live)  # a copy of this step's norm; live one in place
        assert abs(float(norm) - float(eager_norm)) <= RTOL * float(eager_norm)
    assert _close(model, reference) and fused.steps == 2


def test_torch_hooks_run_through_torch_machinery_on_the_fused_step():
    """Step hooks on the FusedStep run through torch.optim.Optimizer's own wrapper: a pre-hook's replaced kwargs
    reach the step (here grad_scale=2: the returned norm is 2x eager clip_grad_norm_'s, to RTOL), global hooks
    see the FusedStep and, inside its step, the wrapped optimizer (as torch's own wrapping optimizers, e.g.
    ZeroRedundancyOptimizer, run them). State-dict hooks registered on it run around its state_dict and
    load_state_dict."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model, reference = _model(), _model()
    fused = FusedStep(torch.optim.SGD(model.parameters(), lr=0.1), compile=False)
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(type(o).__name__)),
               fused.register_step_pre_hook(lambda o, args, kwargs: (args, {**kwargs, "grad_scale": 2.0})),
               fused.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": o is fused}),
               fused.register_load_state_dict_pre_hook(
                   lambda o, sd: {"state": sd["state"], "param_groups": sd["param_groups"],
                                  "fused_step": {**sd["fused_step"], "skipped_steps": 2 + sd["extra"]}})]
    try:
        _loss(model, 0).backward()
        norm = fused.step()
        _loss(reference, 0).backward()
        eager_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        assert abs(float(norm) - 2 * float(eager_norm)) <= RTOL * 2 * float(eager_norm)
        assert seen == ["FusedStep", "SGD"]
        state = fused.state_dict()
        assert state["extra"] is True and int(state["fused_step"]["skipped_steps"]) == 0
        fused.load_state_dict(state)  # what the pre-hook returns is loaded: 2 + True
        assert int(fused.skipped_steps) == 3
    finally:
        for handle in handles:
            handle.remove()


def _old_dicts():
    path = Path(__file__).resolve().parents[1] / "fixtures" / "main_db0f6e2_state_dicts.pt"
    return torch.load(path, weights_only=True)  # written by main's code at db0f6e2: see make_main_state_dicts.py


def _continue_from(saved_model, eager_state, stepper_for, steps=range(4, 7)):
    """Resume the old run in ``stepper_for(model)`` and, as the reference, in eager AdamW (+ Muon) loaded by torch
    from the same dicts, with clip_grad_norm_ over all params; return both models after ``steps``."""
    model, reference = _model(seed=1), _model(seed=1)
    model.load_state_dict(saved_model)
    reference.load_state_dict(saved_model)
    stepper = stepper_for(model)
    eager = eager_state(reference)
    for step in steps:
        for net, o in ((model, stepper), (reference, None)):
            _loss(net, step).backward()
            if o is None:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
                for e in eager:
                    e.step()
                    e.zero_grad()
            else:
                o.step()
                o.zero_grad()
    return model, reference, stepper


def test_loads_main_fused_step_state_dict_holding_its_counters_only():
    """main's FusedStep.state_dict() held {"skipped_steps", "last_step_finite"} only; the optimizer's state was
    saved beside it. Loaded as before (optimizer.load_state_dict, then fused.load_state_dict), it restores the
    counters and leaves the optimizer's state alone; the run continues as eager AdamW + clip_grad_norm_ (RTOL)."""
    old = _old_dicts()["FusedStep"]
    assert set(old["fused_step"]) == {"skipped_steps", "last_step_finite"}
    assert int(old["fused_step"]["skipped_steps"]) == 1

    def fused_for(model):
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        adamw.load_state_dict(old["optimizer"])
        fused = FusedStep(adamw, max_grad_norm=1.0, compile=False)
        moments = {p: st["exp_avg"].clone() for p, st in adamw.state.items()}
        fused.load_state_dict(old["fused_step"])
        assert int(fused.skipped_steps) == 1 and bool(fused.last_step_finite)
        assert all(torch.equal(adamw.state[p]["exp_avg"], m) for p, m in moments.items())  # left alone
        return fused

    def eager_for(reference):
        adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        adamw.load_state_dict(old["optimizer"])
        return [adamw]

    model, reference, fused = _continue_from(old["model"], eager_for, fused_for)
    assert _close(model, reference) and int(fused.skipped_steps) == 1


@pytest.mark.parametrize("which", ["FusedOptimizer", "FusedOptimizer[muon, adamw]"])
def test_loads_main_fused_optimizer_state_dict(which):
    """main's FusedOptimizer.state_dict(): the optimizer's dict(s) plus "fused_step" (the counters). Loaded into
    FusedStep, the counters and every optimizer's state come back; the run continues as eager torch.optim loaded
    by torch from the same dict (which ignores "fused_step") + clip_grad_norm_ (RTOL; Muon's fp32 ulps included,
    as in test_a_list_of_optimizers_is_one_optimizer_to_schedulers_and_checkpoints)."""
    old = _old_dicts()[which]
    several = "optimizers" in old["optim"]

    def optimizers(model):
        if not several:
            return [torch.optim.AdamW(model.parameters(), lr=1e-2)]
        matrices = [p for p in model.parameters() if p.ndim == 2]
        others = [p for p in model.parameters() if p.ndim != 2]
        return [torch.optim.Muon(matrices, lr=2e-2), torch.optim.AdamW(others, lr=1e-2)]

    def fused_for(model):
        fused = FusedStep(optimizers(model) if several else optimizers(model)[0], max_grad_norm=1.0, compile=False)
        fused.load_state_dict(old["optim"])
        assert int(fused.skipped_steps) == 1 and fused.state_dict().keys() == old["optim"].keys()
        return fused

    def eager_for(reference):
        eager = optimizers(reference)
        for o, part in zip(eager, old["optim"]["optimizers"] if several else [old["optim"]]):
            o.load_state_dict(part)
        return eager

    model, reference, fused = _continue_from(old["model"], eager_for, fused_for)
    assert _close(model, reference) and int(fused.skipped_steps) == 1


def test_a_loss_spike_is_skipped_through_the_optimizer_call():
    """step(loss=...) on the optimizer, called as trainers call one (zero_grad, backward, step), feeds the spike
    check: a loss 1e4 above a window of two alternating losses (grads unchanged: a constant added to the loss)
    is skipped, leaving the params bit-identical, and counted; every other step matches eager AdamW +
    clip_grad_norm_ (RTOL). Before issue 23, FusedOptimizer.step took no loss."""
    model, reference = _model(), _model()
    opt = FusedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0, skip_spike_sigma=3.0,
                         spike_window=4, compile=False)
    eager = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    spike = 6
    for step in range(8):
        opt.zero_grad()
        loss = _loss(model, step % 2) + (1e4 if step == spike else 0.0)  # two batches: flat norms and losses
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(loss=loss.detach())
        if step == spike:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            continue
        eager.zero_grad()
        _loss(reference, step % 2).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        eager.step()
        assert _close(model, reference), step
    assert int(opt.spike_skipped_steps) == 1 and int(opt.skipped_steps) == 0 and opt.steps == 8


def test_a_lightning_optimizer_runs_the_fused_steps_methods_as_self():
    """LightningOptimizer subclasses the class it wraps and forwards missing attributes: FusedStep's zero_grad,
    state_dict, load_state_dict and properties run with it as self, on the FusedStep's objects, and assign
    nothing to it (an attribute it assigned would shadow the FusedStep's from then on)."""
    pl = pytest.importorskip("pytorch_lightning")
    model = _model()
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0, compile=False)
    wrapped = pl.core.optimizer.LightningOptimizer(fused)
    own = set(vars(wrapped))
    _train(fused, model, range(3), nan_at=1)
    assert isinstance(wrapped, FusedStep) and wrapped.param_groups is fused.param_groups
    assert wrapped.grad_norm is fused.grad_norm and wrapped.skipped_steps is fused.skipped_steps
    grads = [p.grad for p in model.parameters()]
    wrapped.zero_grad()
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    state = copy.deepcopy(wrapped.state_dict())
    assert int(state["fused_step"]["skipped_steps"]) == 1
    state["fused_step"]["skipped_steps"] = torch.tensor(5)
    wrapped.load_state_dict(state)
    assert int(fused.skipped_steps) == 5 and set(vars(wrapped)) == own
