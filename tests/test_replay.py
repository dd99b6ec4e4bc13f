"""Build once, bind per step, replay: the prepared step and what it must never ignore.

After the first step every compiled call of the program is recorded and later steps replay it with
the same persistent tensors (the CPU analogue of a CUDA graph: tests/test_cuda.py replays the same
list as CUDA graphs). These tests run the replayed step against eager torch under everything that
changes between steps: persistent grads accumulated by autograd, grads replaced or set to None,
LR/betas/weight decay changed by schedulers, skipped steps, ``load_state_dict``, params added,
params moved (``p.data`` replaced), ``offload_optimizer_state``.

Reference: eager ``clip_grad_norm_`` + the same ``torch.optim`` optimizer on copies of the params.
Tolerance ``rtol=1e-5, atol=1e-6`` (fp32) as in test_parity.py: the fp64 norm and fused arithmetic
differ from torch's in the last bits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads

TOL = dict(rtol=1e-5, atol=1e-6)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _loss(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 8, generator=gen)
    return (model(x) ** 2).mean() * 50  # large enough that clipping at 1.0 is active


def _pair(cls=torch.optim.AdamW, **kwargs):
    """(model, fused) and (reference model, reference optimizer), identical at the start."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, **kwargs} if cls is not torch.optim.SGD else kwargs
    model, ref = _model(), _model()
    fused = FusedStep(cls(model.parameters(), **kwargs), max_grad_norm=1.0)
    return model, fused, ref, cls(ref.parameters(), **kwargs)


def _eager_step(ref, ref_opt):
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    return norm


def _step_both(model, fused, ref, ref_opt, step):
    """One training step of the same batch on both sides, grads zeroed the usual way on each."""
    _loss(model, step).backward()
    _loss(ref, step).backward()
    fused.step()
    _eager_step(ref, ref_opt)
    fused.zero_grad()
    ref_opt.zero_grad()


def _assert_models_close(a, b, tol=TOL):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x.detach(), y.detach(), **tol, msg=lambda m: f"{name}: {m}")


def test_every_compiled_call_is_recorded_after_the_first_step_and_replayed():
    model, fused, ref, ref_opt = _pair()
    calls = []
    for step in range(4):
        _loss(model, step).backward()
        _loss(ref, step).backward()
        norm = fused.step()
        torch.testing.assert_close(norm, _eager_step(ref, ref_opt).double(), rtol=1e-5, atol=0)
        if step == 0:
            calls = [c for c in fused.program.calls if c.runs_as == "compiled"]
            assert calls and all(c.recorded for c in calls)
            recorded = [c.compiled for c in calls]
        fused.zero_grad()
        ref_opt.zero_grad()
    # The same program, the same recorded callables: nothing was rebuilt or re-recorded.
    assert [c.compiled for c in fused.program.calls if c.runs_as == "compiled"] == recorded
    _assert_models_close(model, ref)


def test_persistent_grads_autograd_accumulates_into_the_same_buffer():
    """fused.zero_grad() zeroes in place (set_to_none=False semantics): p.grad stays the same tensor
    step after step, and two backwards per step accumulate into it as torch does."""
    model, fused, ref, ref_opt = _pair()
    views = None
    for step in range(4):
        for microbatch in range(2):
            _loss(model, 10 * step + microbatch).backward()
            _loss(ref, 10 * step + microbatch).backward()
        if views is not None:  # autograd accumulated into FusedStep's buffers, in place
            assert all(p.grad is v for p, v in zip(model.parameters(), views))
        fused.step()
        _eager_step(ref, ref_opt)
        views = views or [p.grad for p in model.parameters()]  # installed by the first step
        fused.zero_grad()
        ref_opt.zero_grad()
        assert all(p.grad is v and float(v.abs().max()) == 0.0 for p, v in zip(model.parameters(), views))
    _assert_models_close(model, ref)


def test_grads_that_are_not_the_buffers_are_copied_in_never_ignored():
    """optimizer.zero_grad() (set_to_none), a grad replaced by a new tensor (as FSDP2 does when
    it reallocates), and a grad set to None: every step still matches eager torch."""
    model, fused, ref, ref_opt = _pair()
    params, ref_params = list(model.parameters()), list(ref.parameters())
    for step in range(6):
        _loss(model, step).backward()
        _loss(ref, step).backward()
        if step == 2:  # a grad replaced by a new tensor with the same values
            params[0].grad = params[0].grad.clone()
        if step == 4:  # a grad removed: torch skips that param entirely
            params[1].grad = None
            ref_params[1].grad = None
        fused.step()
        _eager_step(ref, ref_opt)
        _assert_models_close(model, ref)
        if step % 2:
            fused.optimizer.zero_grad()  # set_to_none=True: the next backward allocates new grads
        else:
            fused.zero_grad()
        ref_opt.zero_grad()


def test_schedulers_changing_lr_betas_and_weight_decay_replay_correctly():
    """OneCycleLR changes lr and betas every step; weight decay is changed by hand mid-run."""
    model, fused, ref, ref_opt = _pair(betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(fused.optimizer, max_lr=5e-2, total_steps=12)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=5e-2, total_steps=12)
    for step in range(12):
        if step == 6:
            for opt in (fused.optimizer, ref_opt):
                opt.param_groups[0]["weight_decay"] = 0.3
        _loss(model, step).backward()
        _loss(ref, step).backward()
        fused.step()
        _eager_step(ref, ref_opt)
        sched.step()
        ref_sched.step()
        fused.zero_grad()
        ref_opt.zero_grad()
    assert fused.optimizer.param_groups[0]["betas"] == ref_opt.param_groups[0]["betas"]
    _assert_models_close(model, ref)


def test_skipped_steps_in_a_replayed_run_leave_everything_bit_identical():
    model, fused, ref, ref_opt = _pair()
    for step in range(5):
        _loss(model, step).backward()
        if step == 3:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            state = copy.deepcopy(fused.optimizer.state_dict()["state"])
            fused.step()
            assert not bool(fused.last_step_finite)
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            after = fused.optimizer.state_dict()["state"]
            assert all(torch.equal(after[k][n], state[k][n]) for k in state for n in state[k])
        else:
            _loss(ref, step).backward()
            fused.step()
            _eager_step(ref, ref_opt)
        fused.zero_grad()
        ref_opt.zero_grad()
    assert int(fused.skipped_steps) == 1
    _assert_models_close(model, ref)


def test_load_state_dict_mid_run_is_adopted():
    model, fused, ref, ref_opt = _pair(amsgrad=True)
    for step in range(3):
        _step_both(model, fused, ref, ref_opt, step)
    # Both load the reference's checkpoint (new tensors, CPU steps as torch keeps them).
    checkpoint = copy.deepcopy(ref_opt.state_dict())
    fused.optimizer.load_state_dict(checkpoint)
    ref_opt.load_state_dict(copy.deepcopy(checkpoint))
    for step in range(3, 6):
        _step_both(model, fused, ref, ref_opt, step)
    _assert_models_close(model, ref)
    ours, theirs = fused.optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    for k in theirs:
        for name in theirs[k]:
            torch.testing.assert_close(ours[k][name].to(theirs[k][name].dtype), theirs[k][name], **TOL)


def test_params_moved_by_the_user_are_moved_back_in():
    """p.data replaced (as model.to() or a user's assignment does): the plan is rebuilt around the
    new storage instead of updating the old buffer."""
    model, fused, ref, ref_opt = _pair()
    for step in range(4):
        if step == 2:
            for p, q in zip(model.parameters(), ref.parameters()):
                p.data = p.data.clone() * 0.5
                q.data = q.data.clone() * 0.5
        _step_both(model, fused, ref, ref_opt, step)
    _assert_models_close(model, ref)


def test_offload_optimizer_state_on_cpu_params_replays_correctly():
    model, fused, ref, ref_opt = _pair()
    fused.offload_optimizer_state = True
    for step in range(4):
        _step_both(model, fused, ref, ref_opt, step)
    _assert_models_close(model, ref)


def _steady_state_ops(n_tensors: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40 + i % 7, generator=gen)) for i in range(n_tensors)]
    fused = FusedStep(torch.optim.AdamW(params, lr=1e-3), max_grad_norm=1.0, compile_notice=False)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    for _ in range(2):
        fused.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused.step()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_steady_state_eager_op_count_does_not_depend_on_the_tensor_count():
    """With an unchanged plan and persistent grads, a step runs the same ATen ops for 64 and for
    1024 tensors: the bind is identity checks, the program a fixed list of recorded calls."""
    ops_64, ops_1024 = _steady_state_ops(64), _steady_state_ops(1024)
    assert len(ops_64) == len(ops_1024), (ops_64, ops_1024)
    assert sorted(ops_64) == sorted(ops_1024)
    assert len(ops_64) <= 8, ops_64  # the returned norm's clone, nothing per tensor


def test_params_added_later_join_a_rebuilt_program():
    params = make_params()
    extra = [torch.nn.Parameter(torch.randn(5, 3))]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_extra = [torch.nn.Parameter(p.detach().clone()) for p in extra]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(5):
        if step == 2:
            opt.add_param_group({"params": extra, "lr": 3e-2})
            ref_opt.add_param_group({"params": ref_extra, "lr": 3e-2})
        ours = params + (extra if step >= 2 else [])
        theirs = ref_params + (ref_extra if step >= 2 else [])
        grads = make_grads(ours, step)
        set_grads(ours, grads)
        set_grads(theirs, grads)
        fused.step()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref_opt.step()
    for a, b in zip(params + extra, ref_params + ref_extra):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
