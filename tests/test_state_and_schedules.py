"""The optimizer stays the source of truth: state_dict, switching to optimizer.step(), late params,
LR/momentum schedulers, and zero recompiles while hyperparameters change.

Reference: eager ``clip_grad_norm_`` + the same torch.optim optimizer. Tolerances as in
test_parity.py (fp32, ``rtol=1e-5, atol=1e-6``: FMA/ordering and fp64-vs-fp32 norm differences).
"""

import copy
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads

TOL = dict(rtol=1e-5, atol=1e-6)


def eager_step(params, opt, max_norm=1.0):
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()


def assert_params_close(a, b, tol=TOL):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
                                        (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.2))])
def test_state_dict_round_trip_continues_the_same_trajectory(cls, kwargs):
    params = make_params()
    opt = cls(params, **kwargs)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(4):
        set_grads(params, make_grads(params, step))
        stepper.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())

    # Uninterrupted run.
    for step in range(4, 8):
        set_grads(params, make_grads(params, step))
        stepper.step()

    # Resumed run: fresh params, optimizer and FusedStep, loaded from the checkpoint.
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = cls(resumed, **kwargs)
    opt2.load_state_dict(saved_state)
    stepper2 = FusedStep(opt2, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(4, 8):
        set_grads(resumed, make_grads(resumed, step))
        stepper2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)  # same compiled code, same inputs: bit-identical
    sd1, sd2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in sd1:
        for name in sd1[k]:
            assert torch.equal(sd1[k][name], sd2[k][name]), (k, name)


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
                                        (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True))])
def test_switching_between_optimizer_step_and_fused_step(cls, kwargs):
    ref = make_params()
    opt_ref = cls(ref, **kwargs)
    ours = make_params()
    opt = cls(ours, **kwargs)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    # fused for 0-4, torch for 5-9 (including a fresh state_dict round trip), fused again for 10-14
    for step in range(15):
        grads = make_grads(ref, step)
        set_grads(ref, grads)
        eager_step(ref, opt_ref)
        set_grads(ours, grads)
        if 5 <= step < 10:
            eager_step(ours, opt)
        else:
            stepper.step()
    assert_params_close(ours, ref)
    for k, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(value, opt_ref.state_dict()["state"][k][name], **TOL)


def test_params_added_later_are_picked_up():
    ref, ours = make_params(), make_params()
    extra_ref = torch.nn.Parameter(torch.randn(7, 3))
    extra_ours = torch.nn.Parameter(extra_ref.detach().clone())
    opt_ref = torch.optim.AdamW(ref, lr=1e-2)
    opt = torch.optim.AdamW(ours, lr=1e-2)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(8):
        if step == 3:
            opt_ref.add_param_group({"params": [extra_ref], "lr": 3e-2, "weight_decay": 0.2})
            opt.add_param_group({"params": [extra_ours], "lr": 3e-2, "weight_decay": 0.2})
        if step == 5:  # appended to an existing group, as some frameworks do
            late_ref = torch.nn.Parameter(torch.ones(4))
            late_ours = torch.nn.Parameter(torch.ones(4))
            opt_ref.param_groups[0]["params"].append(late_ref)
            opt.param_groups[0]["params"].append(late_ours)
            ref.append(late_ref)
            ours.append(late_ours)
        all_ref = ref + ([extra_ref] if step >= 3 else [])
        all_ours = ours + ([extra_ours] if step >= 3 else [])
        grads = make_grads(all_ref, step)
        set_grads(all_ref, grads)
        set_grads(all_ours, grads)
        eager_step(all_ref, opt_ref)
        stepper.step()
    assert_params_close(ours + [extra_ours], ref + [extra_ref])


def test_params_without_grad_are_left_alone_like_torch():
    ref, ours = make_params(), make_params()
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(6):
        grads = make_grads(ref, step)
        for p_ref, p_ours, g in zip(ref, ours, grads):
            skip = (step % 2 == 0 and p_ref.dim() == 2)  # matrices get no grad on even steps
            p_ref.grad = None if skip else g.clone()
            p_ours.grad = None if skip else g.clone()
        eager_step(ref, opt_ref)
        stepper.step()
    assert_params_close(ours, ref)
    for k, st in opt_ref.state_dict()["state"].items():
        torch.testing.assert_close(opt.state_dict()["state"][k]["step"], st["step"])


def _warmup_cosine(total, warmup):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


SCHEDULES = {
    "warmup_cosine_adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1),
                            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(50, 5))),
    "onecycle_adam_betas": (torch.optim.Adam, dict(lr=1e-2),
                            lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=50,
                                                                            cycle_momentum=True)),
    "onecycle_sgd_momentum": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9),
                              lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=50,
                                                                              cycle_momentum=True)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_over_50_steps_causes_zero_recompiles_and_matches(name):
    cls, kwargs, make_scheduler = SCHEDULES[name]
    ref, ours = make_params(), make_params()
    opt_ref, opt = cls(ref, **kwargs), cls(ours, **kwargs)
    sched_ref, sched = make_scheduler(opt_ref), make_scheduler(opt)
    counter = CompileCounterWithBackend("inductor")
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, backend=counter)
    seen_hparams = set()
    for step in range(50):
        grads = make_grads(ref, step)
        set_grads(ref, grads)
        set_grads(ours, grads)
        eager_step(ref, opt_ref)
        stepper.step()
        sched_ref.step()
        sched.step()
        group = opt.param_groups[0]
        seen_hparams.add((group["lr"], group.get("betas"), group.get("momentum")))
        if step == 0:
            frames_after_first_step = counter.frame_count
    assert frames_after_first_step == 3  # Phase A norm graph + Phase B bucket and packed update graphs
    assert counter.frame_count == frames_after_first_step, "a hyperparameter change recompiled"
    assert len(seen_hparams) >= 45  # the schedule really changed the hyperparameters every step
    assert_params_close(ours, ref)


def test_compiled_frame_count_does_not_grow_with_the_number_of_tensors():
    counter = CompileCounterWithBackend("inductor")
    counts = {}
    for n_tensors in (16, 1024):
        gen = torch.Generator().manual_seed(n_tensors)
        # Varied sizes: small ones (including 1-element and equal sizes) take the packed path, every
        # fourth tensor is large and takes the bucket path (default pack_threshold = 16384).
        sizes = [int(s) for s in torch.randint(1, 300, (n_tensors,), generator=gen)]
        sizes[::7] = [1] * len(sizes[::7])
        sizes[::4] = [20000 + s for s in sizes[::4]]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in sizes]
        opt = torch.optim.AdamW(params, lr=1e-3)
        stepper = FusedStep(opt, max_grad_norm=1.0, backend=counter)  # default bucket size and packing
        for step in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            stepper.step()
        counts[n_tensors] = counter.frame_count
    assert counts[16] == 3  # Phase A norm, Phase B bucket update, Phase B packed update
    assert counts[1024] == counts[16], counts


def test_packed_state_is_views_into_arenas_and_survives_reassignment():
    """Small params' state lives in flat arenas as views; anything else put in the state is adopted."""
    ours, ref = make_params(), make_params()
    opt = torch.optim.AdamW(ours, lr=1e-2, amsgrad=True)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, amsgrad=True)
    stepper = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    small = [p for p in ours if p.numel() <= PACK]
    for step in range(6):
        grads = make_grads(ref, step)
        set_grads(ref, grads)
        set_grads(ours, grads)
        eager_step(ref, opt_ref)
        stepper.step()
        if step == 2:
            # A user replacing state tensors (as a checkpoint loader might): values must be kept.
            for p in small:
                opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone()
                opt.state[p]["step"] = opt.state[p]["step"].clone()
    bases = {opt.state[p]["exp_avg"]._base is not None for p in small}
    assert bases == {True}  # views into the arena again
    assert len({opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in small}) == 1  # one arena
    assert_params_close(ours, ref)
    for k, st in opt_ref.state_dict()["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(opt.state_dict()["state"][k][name], value, **TOL)
