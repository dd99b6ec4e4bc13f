"""FusedStep's own lifecycle, single process (issue 4, "What it must show"): FP8 amax and scales
computed by the update itself, the first-microbatch flag driven by ``fused.accumulate`` and reset
by ``fused.step()``, and optimizer-state offload. The FSDP2 / PP / torchao parts run on 2 gloo
ranks in tests/distributed/test_fused_lifecycle.py; the lifecycle helpers alone are tested in
tests/test_fp8.py, tests/test_offload.py and tests/distributed/test_fsdp_accumulation.py.

References and tolerances:

* FP8 amax: eager ``w.abs().max()`` of each updated weight. Tolerance 0: a max of values is
  exact in their own dtype, and the update stores exactly the values it takes the max of.
* FP8 scales: ``448 / max(amax, eps)`` with Python floats (IEEE double), eps being 1e-12 rounded
  to the weight dtype, then one rounding to float32 (numpy). FusedStep does the same IEEE double
  operations and the same single rounding (torchao's recipe), so the tolerance is 0.
* Offload: the same steps with ``offload_optimizer_state`` False and True; tolerance 0 (a device
  move is a copy, not arithmetic; both runs execute the same compiled graphs).

Compiles are shared with the rest of the suite: ``BUCKET``/``PACK`` and the parameter layout come
from conftest, and the graph-inspection test compiles through Inductor's on-disk cache.
"""

from __future__ import annotations

import unittest.mock

import numpy as np
import pytest
import torch
from torch import nn

from compiled_step import FusedStep
from compiled_step.lifecycle.fp8 import (
    FirstMicrobatchFlag,
    default_first_microbatch_flag,
    feed_first_microbatch_flag,
)
from compiled_step.lifecycle.fsdp import prepare_for_grad_accumulation
from conftest import BUCKET, PACK, make_grads, make_params, set_grads

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, written out: the reference is independent
EPS = 1e-12  # torchao.float8.float8_utils.EPS

# Indices into conftest.SHAPES: [(8,6), (6,), (), (1,), (6,8)^T, (5,5), (5,5), (13,), (3,4,2)].
# FP8 weights: two matrices (one non-contiguous), a (5,5), a 13-element tensor that would be
# packed (<= PACK) if it were not an FP8 weight, and a (5,5) that gets no grad (its amax is read).
FP8_INDICES = [0, 4, 5, 7, 6]
NO_GRAD_INDEX = 6


@pytest.fixture(autouse=True)
def _reset_default_flag():
    default_first_microbatch_flag().reset()
    yield
    default_first_microbatch_flag().reset()


# ----------------------------------------------------------------------------------------------
# FP8: amax from the update pass, scales vs an independent computation
# ----------------------------------------------------------------------------------------------


def _expected_amax_and_scales(weights: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    amax = [float(w.detach().abs().max()) for w in weights]  # exact: a weight-dtype value
    eps = [float(torch.tensor(EPS, dtype=torch.float64).to(w.dtype)) for w in weights]  # eps in that dtype
    scales = np.array([E4M3_MAX / max(a, e) for a, e in zip(amax, eps)], dtype=np.float64).astype(np.float32)
    return torch.tensor(amax, dtype=torch.float32), scales


def _fp8_setup(dtype, fp8=True, backend="inductor"):
    params = make_params(dtype=dtype)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    fp8_weights = [params[i] for i in FP8_INDICES] if fp8 else None
    fused = FusedStep(opt, max_grad_norm=1.0, fp8_weights=fp8_weights, bucket_size=BUCKET, pack_threshold=PACK,
                      backend=backend)
    return params, fused


def _give_grads(params, step, nan=False):
    grads = make_grads(params, step)
    if nan:
        grads[1] = grads[1].clone()
        grads[1].view(-1)[0] = float("nan")  # a non-FP8 param: the whole step is skipped
    set_grads(params, grads)
    params[NO_GRAD_INDEX].grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_amax_and_scales_after_step_equal_independent_eager_computation(dtype):
    params, fused = _fp8_setup(dtype)
    twin, plain = _fp8_setup(dtype, fp8=False)  # same steps without FP8 weights
    weights = [params[i] for i in FP8_INDICES]
    for step in range(2):
        _give_grads(params, step)
        _give_grads(twin, step)
        fused.step()
        plain.step()
        amax, scales = _expected_amax_and_scales(weights)
        assert fused.fp8_amax.dtype == torch.float32 and fused.fp8_scales.dtype == torch.float32
        assert torch.equal(fused.fp8_amax, amax), (step, fused.fp8_amax, amax)  # tolerance 0 (docstring)
        np.testing.assert_array_equal(fused.fp8_scales.numpy(), scales)  # tolerance 0 (docstring)
        # Riding the amax along does not change the update: same params as without FP8 weights.
        for p, q in zip(params, twin):
            assert torch.equal(p, q)
    # A step skipped for a non-finite norm: weights unchanged, so amax/scales of the unchanged weights.
    before = [w.detach().clone() for w in weights]
    _give_grads(params, 2, nan=True)
    fused.step()
    assert not bool(fused.last_step_finite)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    amax, scales = _expected_amax_and_scales(weights)
    assert torch.equal(fused.fp8_amax, amax)
    np.testing.assert_array_equal(fused.fp8_scales.numpy(), scales)


def test_fp8_weights_are_never_packed_and_form_their_own_group():
    params, fused = _fp8_setup(torch.float32)
    _give_grads(params, 0)
    fused.step()
    fp8_ids = {id(params[i]) for i in FP8_INDICES}
    for group in fused.plan.groups:
        ids = {id(p) for p in group.params}
        if group.key.fp8:  # bucketed: the update computes each weight's amax
            assert ids == fp8_ids and group.flat == [] and len(group.bucketed) == len(fp8_ids)
        else:
            assert not ids & fp8_ids


def test_fp8_weight_not_held_by_the_optimizer_is_refused_before_anything_changes():
    params = make_params()
    stray = nn.Parameter(torch.randn(5, 5))
    opt = torch.optim.AdamW(params, lr=1e-2)
    set_grads(params, make_grads(params, 0))
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError):
        fused = FusedStep(opt, max_grad_norm=1.0, fp8_weights=[params[0], stray], compile=False,
                          bucket_size=BUCKET, pack_threshold=PACK)
        fused.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


class _GraphRecorder:
    """A torch.compile backend: records each graph Dynamo hands over and the Inductor code made
    for it (GraphLowering.save_output_code is called on fresh compiles and on FX-cache hits alike),
    then returns Inductor's compiled callable. One call = one graph = one frame (fullgraph=True)."""

    def __init__(self):
        self.graphs: list[tuple[torch.fx.GraphModule, list[str]]] = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.graph import GraphLowering

        codes: list[str] = []
        with unittest.mock.patch.object(GraphLowering, "save_output_code", codes.append):
            compiled = compile_fx(gm, example_inputs)
        self.graphs.append((gm, codes))
        return compiled


def _placeholders(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _amax_nodes(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target in ("amax", torch.amax, torch.ops.aten.amax.default)]


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def test_fp8_amax_is_computed_inside_the_update_graph():
    recorder = _GraphRecorder()
    params, fused = _fp8_setup(torch.float32, backend=recorder)
    _give_grads(params, 0)
    fused.step()
    graphs = list(recorder.graphs)
    kinds = {}
    for gm, codes in graphs:
        names = _placeholders(gm)
        if any("row_slot" in n for n in names):
            kind = "flat update"
        elif any("exp_avg" in n for n in names):
            kind = "bucket update with amax" if _amax_nodes(gm) else "bucket update"
        elif any("slot_group" in n for n in names):
            kind = "finish"
        else:
            kind = "norm"
        assert kind not in kinds, f"two {kind} graphs"
        kinds[kind] = (gm, codes)
    # Phase A, the finish, the flat update of the params FusedStep moved into its buffer, and the
    # bucket update of the FP8 weights with compute_amax (they stay where they are). No frame
    # compiled for amax alone.
    assert sorted(kinds) == ["bucket update with amax", "finish", "flat update", "norm"], sorted(kinds)
    assert all(not _amax_nodes(gm) for k, (gm, _) in kinds.items() if k != "bucket update with amax")

    gm, codes = kinds["bucket update with amax"]
    amaxes = _amax_nodes(gm)
    assert len(amaxes) == BUCKET  # one per bucket slot
    # The amax values are written into the plan's amax vector (an input, updated in place) ...
    copies = {n.args[1]: n.args[0] for n in gm.graph.nodes if n.target in ("copy_", torch.Tensor.copy_)}
    amax_out = [src for src, dst in copies.items() if dst.op == "placeholder" and "amax" in dst.name]
    assert len(amax_out) == 1 and all(a in _ancestors(amax_out[0]) for a in amaxes)
    # ... and each is taken of the very tensor the update stores into the param (no second read of p):
    # amax(abs(x)) where x is also the source of a copy_ into a param placeholder.
    for a in amaxes:
        (abs_node,) = a.all_input_nodes
        (stored,) = abs_node.all_input_nodes
        assert stored in copies and copies[stored].op == "placeholder" and "params" in copies[stored].name, (
            a, abs_node, stored)

    # Inductor: the FP8 update is one C++ kernel, one loop nest per tensor, the max accumulated in
    # the loop that stores the params (torch 2.13's C++ codegen text).
    (amax_code,) = codes
    assert amax_code.count('extern "C"') == 1
    assert amax_code.count("for(int64_t x0=") >= BUCKET
    assert amax_code.count("tmp_acc0_vec = at::vec::maximum(") == BUCKET

    # Second step: nothing recompiles, and the values are those of the eager reference.
    _give_grads(params, 1)
    fused.step()
    assert len(recorder.graphs) == len(graphs)
    amax, scales = _expected_amax_and_scales([params[i] for i in FP8_INDICES])
    assert torch.equal(fused.fp8_amax, amax)
    np.testing.assert_array_equal(fused.fp8_scales.numpy(), scales)


# ----------------------------------------------------------------------------------------------
# The first-microbatch flag
# ----------------------------------------------------------------------------------------------


class _TELike(nn.Module):
    """Stands in for a TransformerEngine module: its forward takes is_first_microbatch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.calls: list[object] = []

    def forward(self, x, is_first_microbatch=None):
        self.calls.append(is_first_microbatch)
        return self.lin(x)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.te = _TELike()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.te(x))


def _flag_run(fused, model, steps=2, k=3):
    """Values of fused.first_microbatch: inside each microbatch, after the block, after step()."""
    x = torch.randn(6, 4)
    seen = []
    for _ in range(steps):
        fused.zero_grad()
        with fused.accumulate(k) as acc:
            for xb in acc.split(x):
                seen.append(fused.first_microbatch.value)
                model(xb).square().sum().backward()
        seen.append(fused.first_microbatch.value)
        fused.step()
        seen.append(fused.first_microbatch.value)
        with torch.no_grad():
            model(x)  # evaluation between steps
    return seen


def test_first_microbatch_flag_true_false_false_then_none_after_step():
    model = _Model()
    flag = FirstMicrobatchFlag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused = FusedStep(opt, model_parts=[model], first_microbatch_flag=flag, compile=False,
                      bucket_size=BUCKET, pack_threshold=PACK)
    assert fused.first_microbatch is flag and flag.value is None
    with feed_first_microbatch_flag([model], fused.first_microbatch) as hooks:
        assert hooks.modules == [model.te]
        seen = _flag_run(fused, model)
    # Inside the block True, False, False; still False after it (the weights have not changed);
    # None after step(): the cached FP8 weights are stale.
    assert seen == [True, False, False, False, None] * 2
    # What the TE-like module was told: the three microbatches, then the evaluation forward.
    assert model.te.calls == [True, False, False, None] * 2
    assert default_first_microbatch_flag().value is None  # an explicit flag leaves the default alone


def test_first_microbatch_default_flag_is_the_seeds_and_step_resets_it():
    model = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused = FusedStep(opt, model_parts=[model], compile=False, bucket_size=BUCKET, pack_threshold=PACK)
    assert fused.first_microbatch is default_first_microbatch_flag()
    with feed_first_microbatch_flag([model]):  # the default flag, as TE users of NeMo Automodel have it
        seen = _flag_run(fused, model, steps=1)
    assert seen == [True, False, False, False, None]
    assert model.te.calls == [True, False, False, None]
    # Seed-style loop (prepare_for_grad_accumulation sets the default flag True): step() resets it.
    prepare_for_grad_accumulation([model])
    assert default_first_microbatch_flag().value is True
    model(torch.randn(2, 4)).sum().backward()
    fused.step()
    assert default_first_microbatch_flag().value is None


# ----------------------------------------------------------------------------------------------
# Optimizer-state offload
# ----------------------------------------------------------------------------------------------


def _offload_run(offload: bool, device: str, steps: int = 4):
    params = [nn.Parameter(p.detach().to(device)) for p in make_params()]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK,
                      offload_optimizer_state=offload)
    state_devices, norms = [], []
    for t in range(steps):
        grads = [g.to(device) for g in make_grads(params, t)]
        if t == 2:
            grads[3] = torch.full_like(grads[3], float("inf"))  # a skipped step in between
        set_grads(params, grads)
        norms.append(fused.step())
        state_devices.append({v.device.type for st in opt.state.values() for v in st.values()
                              if isinstance(v, torch.Tensor)})
    state = [{k: v.detach().cpu() for k, v in opt.state[p].items()} for p in params]
    return [p.detach().cpu() for p in params], state, torch.stack(norms).cpu(), state_devices, fused


def _assert_runs_identical(a, b):
    params_a, state_a, norms_a = a[:3]
    params_b, state_b, norms_b = b[:3]
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))
    assert torch.equal(norms_a, norms_b)
    for sa, sb in zip(state_a, state_b):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), sa.keys()


def test_offload_optimizer_state_on_cpu_is_bit_identical():
    off = _offload_run(False, "cpu")
    on = _offload_run(True, "cpu")
    _assert_runs_identical(off, on)  # tolerance 0 (docstring)
    assert on[3] == [{"cpu"}] * 4
    assert bool(torch.isinf(on[2][2])) and int(on[4].skipped_steps) == 1  # the skip really happened


def test_offload_on_cpu_keeps_the_packed_state_between_steps():
    """On a CPU-only machine nothing moves, so the CPU path must cost what it costs without offload:
    the packed params' state stays the same arena views from step to step instead of being
    re-adopted into fresh arenas every step (which made a step ~8x slower with 400 small params)."""
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK, offload_optimizer_state=True)
    small = [p for p in params if p.numel() <= PACK]
    seen = []
    for t in range(3):
        set_grads(params, make_grads(params, t))
        fused.step()
        seen.append([(opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for p in small])
    for before, after in zip(seen[1:], seen[2:]):
        assert all(a is b for pair_a, pair_b in zip(before, after) for a, b in zip(pair_a, pair_b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: optimizer state kept on the CPU between steps")
def test_offload_optimizer_state_cuda_lives_on_cpu_between_steps_and_matches():
    off = _offload_run(False, "cuda")
    on = _offload_run(True, "cuda")
    assert off[3] == [{"cuda"}] * 4  # without offload the state stays with the params
    assert on[3] == [{"cpu"}] * 4  # with offload every state tensor (step included) is on the CPU
    _assert_runs_identical(off, on)  # tolerance 0: same kernels on the same device; moves are copies
