"""Adafactor (``rules/adafactor.py``): FusedStep(torch.optim.Adafactor) against eager
``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.Adafactor.step()``, and its state in torch's format.

Adafactor's state is not shaped like its params (a factored ``row_var``/``col_var`` pair for >= 2-D
params, a full ``variance`` for vectors and scalars); the rule declares it (``state_layout``) and
``storage.lay_out_state`` packs it in buffers of its own size.

Tolerance (float32): ``rtol=1e-5, atol=1e-6`` on params and state, as test_parity.py's. FusedStep computes
the same float32 ops and the same float64 scalars as torch, but Inductor's reductions (the param and update
norms, the row and column means) sum in another order than ATen's, 1e-7 relative per norm; the norms enter
the step through ``rsqrt`` and a division, so a difference stays at that scale, and six steps of updates of
size ``lr * rms(p)`` keep it under 1e-6 absolute. The returned total norm: ``rel=1e-6`` (float64 in
FusedStep, float32 in torch).
"""

import copy
import math

import pytest
import torch

from compiled_step import FusedStep
from compiled_step.planning import ROW
from compiled_step.rules import adafactor, conformance_errors
from compiled_step.storage import lay_out_state
from conftest import make_grads, write_grads

TOL = dict(rtol=1e-5, atol=1e-6)
STEPS = 6
# Matrices (two of one shape: one stack), 3-D tensors, vectors and a scalar: factored and full variances.
SHAPES = [(8, 12), (12,), (3, 5, 7), (8, 12), (16, 4), (5,), (), (2, 5, 7)]
NO_GRAD_AT = {2: 1, 4: 6}  # step -> the param that has no grad at that step (torch skips it, state and step)


def _params(seed=0, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def _grads(params, step):
    grads = make_grads(params, step)
    if step in NO_GRAD_AT:
        grads[NO_GRAD_AT[step]] = None
    return grads


def _write(params, grads):
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
    write_grads([p for p, g in zip(params, grads) if g is not None], [g for g in grads if g is not None])


def _eager_step(params, opt, clip):
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                          clip if clip is not None else math.inf)
    opt.step()
    return norm


def _assert_state_close(ours: dict, ref: dict, tol=TOL):
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **tol, msg=lambda m: f"state {key!r}: {m}")


GROUP_OPTIONS = [dict(), dict(weight_decay=0.1, maximize=True), dict(lr=3e-2, eps=(1e-3, 1e-3), d=2.0,
                                                                      beta2_decay=-0.5)]


@pytest.mark.parametrize("clip", [None, 1.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("options", GROUP_OPTIONS, ids=["defaults", "decay_maximize", "eps1_d_beta2"])
def test_adafactor_matches_torch(options, clip):
    ours, ref = _params(), _params()
    opt, ref_opt = torch.optim.Adafactor(ours, **options), torch.optim.Adafactor(ref, **options)
    fused = FusedStep(opt, max_grad_norm=clip, compile_notice=False)
    for step in range(STEPS):
        grads = _grads(ours, step)
        _write(ours, grads)
        _write(ref, grads)
        norm = fused.step()
        ref_norm = _eager_step(ref, ref_opt, clip)
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6), step
    for i, (p, q) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"param {i} {tuple(p.shape)}: {m}")
        _assert_state_close(opt.state[p], ref_opt.state[q])
        # torch's shapes: a factored pair from 2-D on, a full variance below
        expected = {"step", "row_var", "col_var"} if p.dim() >= 2 else {"step", "variance"}
        assert set(opt.state[p]) == expected
    # the params that missed a grad missed its step too, as torch's
    assert float(opt.state[ours[1]]["step"]) == STEPS - 1


def test_two_param_groups_with_their_own_hyperparameters_and_a_schedule():
    ours, ref = _params(), _params()

    def groups(params):
        return [dict(params=params[:4]), dict(params=params[4:], weight_decay=0.05, eps=(1e-20, 1e-2))]

    opt, ref_opt = torch.optim.Adafactor(groups(ours), lr=2e-2), torch.optim.Adafactor(groups(ref), lr=2e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False)
    for step in range(STEPS):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        fused.step()
        _eager_step(ref, ref_opt, 1.0)
        sched.step()
        ref_sched.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **TOL)
        _assert_state_close(opt.state[p], ref_opt.state[q])


def test_float64_params_match_torch_to_float64_rounding():
    """float64 params: FusedStep's update is float64 throughout, as torch's (tolerance 1e-12: reduction order)."""
    ours, ref = _params(dtype=torch.float64), _params(dtype=torch.float64)
    opt, ref_opt = torch.optim.Adafactor(ours, weight_decay=0.1), torch.optim.Adafactor(ref, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False)
    for step in range(STEPS):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(ref, grads)
        fused.step()
        _eager_step(ref, ref_opt, 1.0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        _assert_state_close(opt.state[p], ref_opt.state[q], dict(rtol=1e-12, atol=1e-12))


def test_state_is_laid_out_at_its_own_size():
    """The factored state takes rows of its own: a matrix's row_var and col_var cost rows + cols elements
    (plus padding to whole rows), not the param's size."""
    params = [torch.nn.Parameter(torch.randn(64, 96)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(96))]
    opt = torch.optim.Adafactor(params)
    fused = FusedStep(opt, compile_notice=False)
    write_grads(params, make_grads(params, 0))
    fused.step()
    (group,) = fused.plan.groups
    layout = lay_out_state(group, adafactor, adafactor.variant(opt, opt.param_groups[0]))
    assert layout["row_var"].rows == 3 and layout["col_var"].rows == 3  # one row each (64 and 96 elements)
    assert layout["variance"].rows == 1
    assert group.rows == 3 * -(-(64 * 96 + 1) // ROW) + 1  # the params' rows, against the state's 7
    for p in params[:3]:
        assert opt.state[p]["row_var"].shape == (64, 1) and opt.state[p]["col_var"].shape == (1, 96)
        assert "variance" not in opt.state[p]
    assert opt.state[params[3]]["variance"].shape == (96,)


def test_checkpoints_move_between_eager_torch_and_fused_step():
    """torch's state_dict format both ways: eager steps, a checkpoint loaded under FusedStep, fused steps,
    a checkpoint loaded into an eager optimizer, eager steps; against eager steps throughout."""
    ref = _params()
    ref_opt = torch.optim.Adafactor(ref, weight_decay=0.05)
    eager = _params()
    eager_opt = torch.optim.Adafactor(eager, weight_decay=0.05)
    for step in range(2):
        grads = make_grads(ref, step)
        for params, opt in ((ref, ref_opt), (eager, eager_opt)):
            write_grads(params, grads)
            _eager_step(params, opt, 1.0)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in eager]
    opt = torch.optim.Adafactor(ours, weight_decay=0.05)
    opt.load_state_dict(copy.deepcopy(eager_opt.state_dict()))
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False)
    for step in range(2, 4):
        grads = make_grads(ref, step)
        write_grads(ref, grads)
        _eager_step(ref, ref_opt, 1.0)
        write_grads(ours, grads)
        fused.step()
    back = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    back_opt = torch.optim.Adafactor(back, weight_decay=0.05)
    back_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(4, STEPS):
        grads = make_grads(ref, step)
        write_grads(ref, grads)
        _eager_step(ref, ref_opt, 1.0)
        write_grads(back, grads)
        _eager_step(back, back_opt, 1.0)
    for p, q in zip(back, ref):
        torch.testing.assert_close(p, q, **TOL)
        _assert_state_close(back_opt.state[p], ref_opt.state[q])


def test_switching_between_optimizer_step_and_fused_step():
    """optimizer.step() on FusedStep's state views (torch's step tensor is a view of the count) in the middle
    of a fused run continues the same trajectory."""
    ref, ours = _params(), _params()
    ref_opt, opt = torch.optim.Adafactor(ref, lr=2e-2), torch.optim.Adafactor(ours, lr=2e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, compile_notice=False)
    for step in range(STEPS + 2):
        grads = make_grads(ref, step)
        write_grads(ref, grads)
        _eager_step(ref, ref_opt, 1.0)
        write_grads(ours, grads)
        if 2 <= step < 5:
            _eager_step(ours, opt, 1.0)
        else:
            fused.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, **TOL)
        _assert_state_close(opt.state[p], ref_opt.state[q])


def test_invalid_hyperparameters_are_refused_before_anything_changes():
    params = _params()
    opt = torch.optim.Adafactor(params)
    fused = FusedStep(opt, compile_notice=False)
    write_grads(params, make_grads(params, 0))
    opt.param_groups[0]["d"] = 0.5  # torch refuses d < 1 at construction
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"invalid d 0\.5: torch\.optim requires 1\.0 <= d"):
        fused.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not opt.state


def test_adafactor_conforms():
    assert conformance_errors(adafactor) == []
