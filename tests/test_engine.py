"""compiled_step.engine: what a step builds, binds, runs and undoes, seen through ``fused.engine``.

Anchored to eager ``torch.nn.utils.clip_grad_norm_`` + ``torch.optim.AdamW`` on copies of the params with the same
grads: fp32 ``rtol=1e-5, atol=1e-6`` (test_parity.py's: FusedStep's norm is fp64, torch's fp32, so the clip
coefficient differs in the last bits). ``compile=False`` runs the same functions eagerly.
"""

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads, write_grads

TOL = dict(rtol=1e-5, atol=1e-6)


def _pair(**options):
    ours, ref = make_params(), make_params()
    fused = FusedStep(torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1), max_grad_norm=1.0, compile=False,
                      bucket_size=BUCKET, pack_threshold=PACK, **options)
    return ours, fused, ref, torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)


def _step_both(ours, fused, ref, ref_opt, step):
    grads = make_grads(ours, step)
    write_grads(ours, grads)
    set_grads(ref, grads)
    fused.step()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    ref_opt.step()


def _inside(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + buffer.nbytes


@pytest.mark.filterwarnings("ignore:FusedStep copied")  # the first step's grads are new tensors, as autograd's are
def test_the_storage_holds_every_grad_param_and_state_view_and_is_rebuilt_only_with_the_plan():
    ours, fused, ref, ref_opt = _pair(flat_params=True)
    assert fused.engine.storage is None and fused.engine.built is None  # built by the first step
    _step_both(ours, fused, ref, ref_opt, 0)
    store = fused.engine.storage
    assert store.plan is fused.plan and fused.engine.built.program is fused.program
    (gb,) = store.groups  # one sharding group: every param moved into one flat buffer
    state = fused.optimizer.state
    for p in ours:  # the params, their grads and their state lie in the group's buffers (p.data is an alias
        assert _inside(p, gb.params)  # of its own storage over the buffer's memory: compare addresses)
        assert _inside(p.grad, gb.grads)
        for key in ("exp_avg", "exp_avg_sq"):
            assert _inside(state[p][key], gb.state[key])
    assert store.group_rules == list(fused.rules) and len(store.group_variants) == 1
    for step in (1, 2):
        _step_both(ours, fused, ref, ref_opt, step)
        assert fused.engine.storage is store  # nothing changed: the same storage
    extra = torch.nn.Parameter(torch.ones(3))
    ref_extra = torch.nn.Parameter(torch.ones(3))
    fused.add_param_group({"params": [extra]})
    ref_opt.add_param_group({"params": [ref_extra]})
    ours, ref = ours + [extra], ref + [ref_extra]
    _step_both(ours, fused, ref, ref_opt, 3)
    assert fused.engine.storage is not store  # a new param group: a new plan and its storage
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)


def test_a_raising_step_is_undone_by_the_engine_counters_and_created_state_included():
    """``error_if_nonfinite``: the norm half ran (it counts a skip and the bind created the first step's state);
    the engine puts both back, so the step changed nothing, as eager ``clip_grad_norm_(error_if_nonfinite=True)``
    raising before ``optimizer.step()`` changes nothing."""
    ours, fused, ref, ref_opt = _pair(error_if_nonfinite=True)
    grads = make_grads(ours, 0)
    grads[3][0] = float("nan")
    set_grads(ours, grads)
    set_grads(ref, grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        fused.step()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    assert int(fused.skipped_steps) == 0  # raised, not skipped
    assert len(fused.optimizer.state) == len(ref_opt.state) == 0  # no state was created
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    # The next finite step is the first one, on both sides.
    fused.zero_grad(set_to_none=True)
    ref_opt.zero_grad(set_to_none=True)
    _step_both(ours, fused, ref, ref_opt, 1)
    assert int(fused.optimizer.state[ours[0]]["step"]) == int(ref_opt.state[ref[0]]["step"]) == 1
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)
