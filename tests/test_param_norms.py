"""``param_norms=True``: each param's pre-clip grad norm, from the Phase A calls that read the grads.

Reference: ``torch.linalg.vector_norm`` of each grad, in float64, times its scale (``grad_scale``);
rtol 1e-12 (the grads are fp32 or bf16, exact in float64; only the summation order differs). Training
with the option on is compared with eager ``clip_grad_norm_`` + ``torch.optim`` at the fp32 tolerance of
test_parity.py. Sharded params (FSDP2, TP, EP) are in tests/distributed/test_param_norms.py.
"""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads

NORM_RTOL = 1e-12
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 parity, as test_parity.py


def reference_norms(grads, scale, norm_type):
    return torch.stack([torch.linalg.vector_norm(g.double() * scale, norm_type) for g in grads])


def _mixed_params():
    """fp32 and bf16 params interleaved in one param group: two sharding groups whose order is not the
    optimizer's, so the per-param norms must be put back in the optimizer's order."""
    params = make_params()
    for i in (1, 4, 6):
        params[i] = torch.nn.Parameter(params[i].detach().to(torch.bfloat16))
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("flat_params", [True, False], ids=["flat", "staged_and_bucketed"])
def test_param_norms_equal_vector_norm_of_each_scaled_grad(norm_type, flat_params):
    params = _mixed_params()
    opt = torch.optim.AdamW([{"params": params[:5]}, {"params": params[5:], "weight_decay": 0.0}], lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, norm_type=norm_type, bucket_size=BUCKET, pack_threshold=PACK,
                      flat_params=flat_params, param_norms=True, compile_notice=False)
    assert fused.param_norms is None  # before the first step
    for step in range(3):
        grads = make_grads(params, step)
        if step == 2:
            grads[3] = None  # no grad: norm 0, as vector_norm of nothing
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        scale = 0.5 if step else 1.0
        total = fused.step(grad_scale=torch.tensor(scale, dtype=torch.float64))
        ref = reference_norms([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], scale,
                              norm_type)
        norms = fused.param_norms
        assert norms.dtype == torch.float64 and norms.shape == (len(params),)
        torch.testing.assert_close(norms, ref, rtol=NORM_RTOL, atol=0)
        torch.testing.assert_close(total, torch.linalg.vector_norm(ref, norm_type), rtol=NORM_RTOL, atol=0)
    assert norms[3] == 0 and (norms > 0).sum() == len(params) - 1


# Rows of 256 elements, cut into parts of 128, 8 and 1 rows (param_partials.PART_ROWS): 300 rows: 2 + 5 + 4
# parts; 128 rows, alone in its group as bfloat16: one part, and empty tables of 8- and 1-row parts; 17 rows:
# 2 + 1; 1 row and 2 rows: single rows.
PART_SHAPES = [(300, 256), (128, 256), (7,), (3, 100), (17, 256)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_param_norms_of_params_cut_into_parts_of_several_sizes(norm_type):
    """Phase A reduces each param's rows in parts of several sizes, then sums each param's parts
    (``norm/param_partials.py``): every size, and a group with empty tables, against vector_norm."""
    from compiled_step.health import ParamNormRows
    from compiled_step.norm.param_partials import PART_ROWS

    params = make_params(shapes=PART_SHAPES)
    params[1] = torch.nn.Parameter(params[1].detach().to(torch.bfloat16))
    counter = CompileCounterWithBackend("inductor")
    fused = FusedStep(torch.optim.SGD(params, lr=1e-2, momentum=0.9), max_grad_norm=1.0, norm_type=norm_type,
                      backend=counter, param_norms=True, compile_notice=False)
    for step in range(3):
        grads = make_grads(params, step)
        set_grads(params, grads)
        scale = 0.25 if step else 1.0
        total = fused.step(grad_scale=torch.tensor(scale, dtype=torch.float64))
        ref = reference_norms(grads, scale, norm_type)
        torch.testing.assert_close(fused.param_norms, ref, rtol=NORM_RTOL, atol=0)
        torch.testing.assert_close(total, torch.linalg.vector_norm(ref, norm_type), rtol=NORM_RTOL, atol=0)
        if step == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames, "a step recompiled"
    # The layout of this plan's per-param rows, as the step builds it from the plan (public seams: the plan
    # and health.ParamNormRows); the norms above show the step read the grads by it.
    layout = ParamNormRows(fused.plan, [group["params"] for group in fused.optimizer.param_groups])
    tables = sorted([t.shape[0] for t in part_rows] for part_rows in layout.part_rows)
    assert PART_ROWS == (128, 8, 1) and tables == [[1, 0, 0], [2, 5 + 2, 4 + 1 + 2 + 1]]  # the cuts meant here


def test_param_norms_of_a_general_p_norm():
    params = make_params()
    opt = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    fused = FusedStep(opt, norm_type=3.0, compile=False, bucket_size=BUCKET, pack_threshold=PACK,
                      flat_params=False, param_norms=True)
    grads = make_grads(params, 0)
    set_grads(params, grads)
    fused.step(grad_scale=2.0)
    torch.testing.assert_close(fused.param_norms, reference_norms(grads, 2.0, 3.0), rtol=NORM_RTOL, atol=0)


def test_param_norms_by_name_uses_model_names_and_training_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref_model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ref_model.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=0.5, model_parts=[model], param_norms=True, compile_notice=False)
    for step in range(4):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
        for m in (model, ref_model):
            (m(x) ** 2).sum().backward()
        ref = {name: torch.linalg.vector_norm(p.grad.double()).item() for name, p in model.named_parameters()}
        fused.step()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref_opt.step()
        fused.zero_grad()
        ref_opt.zero_grad()
        by_name = fused.param_norms_by_name()
        assert list(by_name) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        for name, value in by_name.items():
            assert value == pytest.approx(ref[name], rel=NORM_RTOL), name
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_param_norms_follow_a_plan_rebuild_and_are_off_by_default():
    params = make_params()
    opt = torch.optim.SGD(params[:5], lr=1e-2)
    fused = FusedStep(opt, compile=False, bucket_size=BUCKET, pack_threshold=PACK, param_norms=True)
    set_grads(params[:5], make_grads(params[:5], 0))
    fused.step()
    assert fused.param_norms.shape == (5,)
    opt.add_param_group({"params": params[5:], "lr": 1e-3})  # a new plan: its own param_norms
    grads = make_grads(params, 1)
    set_grads(params, grads)
    fused.step()
    torch.testing.assert_close(fused.param_norms, reference_norms(grads, 1.0, 2.0), rtol=NORM_RTOL, atol=0)
    plain = FusedStep(torch.optim.SGD(make_params(), lr=1e-2), compile=False)
    assert plain.param_norms is None and plain.clip_coef is None
    with pytest.raises(RuntimeError, match="param_norms=True"):
        plain.param_norms_by_name()


def test_param_norms_of_grads_read_in_ddp_buckets():
    """External grads (DDP ``gradient_as_bucket_view=True``, one gloo rank) go through their own Phase A
    calls; their per-param norms too."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from compiled_step.cli.graphs import single_rank_world

    with single_rank_world():
        torch.manual_seed(0)
        ddp = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)),
                  gradient_as_bucket_view=True, bucket_cap_mb=0.0005)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        fused = FusedStep(opt, max_grad_norm=1.0, model_parts=[ddp], bucket_size=BUCKET, param_norms=True,
                          compile_notice=False)
        for step in range(2):
            (ddp(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))) ** 2).sum().backward()
            ref = reference_norms([p.grad for p in ddp.parameters()], 1.0, 2.0)
            fused.step()
            assert "bucketed" in fused.plan.describe()[0]
            torch.testing.assert_close(fused.param_norms, ref, rtol=NORM_RTOL, atol=0)
            fused.zero_grad()


def _warmup_cosine(step, total=50, warmup=5):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_all_health_options_over_a_50_step_schedule_cause_zero_recompiles():
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine)
    counter = CompileCounterWithBackend("inductor")
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, backend=counter,
                      param_norms=True, skip_spike_sigma=3.0, spike_window=8, adaptive_clip="zclip",
                      zclip_warmup=5, compile_notice=False)
    lrs = set()
    for step in range(50):
        grads = make_grads(params, step, scale=30.0 if step in (20, 35) else 3.0)  # two spikes
        set_grads(params, grads)
        fused.step(loss=torch.tensor(2.0 - step / 50))
        scheduler.step()
        lrs.add(opt.param_groups[0]["lr"])
        if step == 0:
            frames_after_first_step = counter.frame_count
    assert frames_after_first_step == 3  # Phase A by param, the health finish, the flat update
    assert counter.frame_count == frames_after_first_step, "a step recompiled"
    assert len(lrs) >= 45
    assert fused.spike_skipped_steps.item() == 2  # the schedule ran through the skip path too


def test_the_health_options_are_inputs_of_the_one_finish_and_add_no_call():
    """Issue 23: training health is optional inputs to the one norm path, not a second pipeline. With every
    option off the finish gets no health input (its graph is the default step's, pinned by test_graphs.py);
    with them on, the same finish function gets them and the program has the same calls, in the same order."""
    described = {}
    for name, options in (("off", {}), ("on", dict(param_norms=True, skip_spike_sigma=3.0, adaptive_clip="zclip"))):
        params = make_params()
        fused = FusedStep(torch.optim.SGD(params, lr=1e-2), compile=False, bucket_size=BUCKET, pack_threshold=PACK,
                          **options)
        set_grads(params, make_grads(params, 0))
        fused.step()
        finish = fused.program.norm[-1]
        assert finish.function == "norm.finish.finish", name
        assert ("health" in finish.kwargs) == (name == "on")
        described[name] = [(c.runs_as, c.function) for c in fused.program.calls]
    assert len(described["on"]) == len(described["off"])
    assert [kind for kind, _ in described["on"]] == [kind for kind, _ in described["off"]]


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_param_norms_of_a_matrix_rule_whose_stacks_pad_after_each_matrix(norm_type):
    """Muon's (and Adafactor's, and torchao's AdamW8bit's) groups keep a padding row after a matrix that fills whole
    rows (``planning._lay_out_stacks``): 64 x 128 = 32 rows, laid out in 33. The per-param norms own those zero rows;
    before, building the partition raised ("parts of params cover 65 rows of a group's 67 grad rows")."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128, generator=gen)) for _ in range(2)]
    params.append(torch.nn.Parameter(torch.randn(48, 80, generator=gen)))  # 3840 elements: 15 rows in 16
    opt = torch.optim.Muon(params, lr=2e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, norm_type=norm_type, param_norms=True, compile_notice=False)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    set_grads(params, grads)
    fused.step()
    torch.testing.assert_close(fused.param_norms, reference_norms(grads, 1.0, norm_type), rtol=NORM_RTOL, atol=0)
