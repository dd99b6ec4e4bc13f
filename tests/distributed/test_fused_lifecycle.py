"""FusedStep's own lifecycle on real FSDP2 modules, 2 gloo ranks (issue 4, "What it must show").

The lifecycle helpers alone are tested in test_fsdp_accumulation.py and tests/test_fp8.py; here
everything goes through ``fused.accumulate(k)`` and ``fused.step()``. One spawn runs every
scenario of ``_workers_lifecycle`` (see its docstring); the tests below assert on the records.

References and tolerances (fp32 model, AdamW lr=1e-2, clipping active at max_norm=0.5):

* Reference: a twin of the same FSDP model (same init, same sharding) stepped eagerly on the whole
  local batch: one backward, ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.AdamW``. The loss
  is the token sum over the global token count on both sides.
* Grads before the step: ``|g - g_ref| <= 1e-6 * max|g_ref|``. The only difference is fp32
  summation order (K microbatch partial sums vs one batch; each element sums 24 sample terms), a
  few ulps; observed ~3e-8 of max|g| ~0.18. A dropped, repeated or unnormalised microbatch, or a
  missing reduce-scatter, changes grads by O(max|g|).
* Norm: ``rel 1e-6``. FusedStep accumulates in fp64, clip_grad_norm_ in fp32 (~1e-7 relative).
* Params after each step: ``|p - p_ref| <= 1e-6`` (1e-4 of the learning rate). Adam's update is
  invariant to the grad's scale, so the grad differences above move params by ~lr x their
  relative size, plus fp32 rounding of p (|p| < 0.5: ulp 3e-8); observed 1.5e-8. Two steps move
  params by ~2e-2 (checked, as the control).
* Token hand-off under PP, FP8 scales vs torchao: bit equality (same code path / same formula).
"""

from __future__ import annotations

import pytest

from . import _workers_lifecycle as w
from .harness import run_distributed

WORLD = 2
GRAD_RTOL = 1e-6  # of max |g_ref|; see module docstring
NORM_RTOL = 1e-6
PARAM_ATOL = 1e-6


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(w.worker, world_size=WORLD, timeout=240)


def _scenario(results, name) -> list[dict]:
    per_rank = [r[name] for r in results]
    for rank, res in enumerate(per_rank):
        if "error" in res:
            pytest.fail(f"scenario {name} raised on rank {rank}:\n{res['error']}")
    return per_rank


def _on(keys):
    return {k: (True, True, True) for k in keys}


def _off(keys):
    return {k: (False, False, False) for k in keys}


# ----------------------------------------------------------------------------------------------
# 1a. k-microbatch accumulation == one step on the concatenated batch
# ----------------------------------------------------------------------------------------------


def test_accumulate_then_step_matches_eager_step_on_whole_batch(results):
    for rank, res in enumerate(_scenario(results, "accumulation_parity")):
        for step, (diff, scale) in enumerate(res["grad_diff"]):
            assert diff <= GRAD_RTOL * scale, (rank, step, diff, scale)
        for step, (ours, ref) in enumerate(res["norms"]):
            assert ours > w.MAX_NORM, "clipping must be active for the comparison to cover it"
            assert abs(ours - ref) <= NORM_RTOL * ref, (rank, step, ours, ref)
        for step, (diff, _) in enumerate(res["param_diff"]):
            assert diff <= PARAM_ATOL, (rank, step, diff)
        # Control: the params really moved, by far more than the tolerance.
        assert res["moved"][0] > 1e3 * PARAM_ATOL, res["moved"]
        assert res["norm_dtype"] == "torch.float64"


def test_accumulate_counts_tokens_without_sync_and_step_consumes_them(results):
    for rank, res in enumerate(_scenario(results, "accumulation_parity")):
        assert res["tokens_is_tensor"] == [True] * w.STEPS  # tensor counts stay tensors: no host sync
        for counted, expected in res["tokens"]:
            assert counted == expected, (rank, res["tokens"])
        assert res["accumulation_consumed"], "step() must take the accumulation's tokens once"


# ----------------------------------------------------------------------------------------------
# 1b. No reduce-scatter before the last microbatch
# ----------------------------------------------------------------------------------------------


def test_no_reduce_scatter_before_the_last_microbatch(results):
    for rank, res in enumerate(_scenario(results, "accumulation_parity")):
        rs = [c["reduce_scatter"] for c in res["per_microbatch"]]
        # One reduce-scatter per fully_shard'ed layer, in the last microbatch's backward only.
        assert rs == ([0] * (w.K - 1) + [w.N_GROUPS]) * w.STEPS, (rank, rs)
        assert [c["all_reduce"] for c in res["per_microbatch"]] == [0] * (w.K * w.STEPS)
        # The step itself: one SUM all-reduce of the stacked partial norms (one process group),
        # and no gradient collective.
        for calls in res["in_step"]:
            assert calls == [("all_reduce", "RedOpType.SUM")], (rank, calls)


def test_fsdp_flags_off_then_on_for_the_last_microbatch_then_restored(results):
    for rank, res in enumerate(_scenario(results, "accumulation_parity")):
        before = res["flags_before"]
        groups = [k for k in before if k != "is_last_backward"]
        assert len(groups) == w.N_GROUPS
        off = {**_off(groups), "is_last_backward": False}
        on = {**_on(groups), "is_last_backward": True}
        assert res["flags_inside"] == ([off] * (w.K - 1) + [on]) * w.STEPS, rank
        assert res["flags_after"] == [before] * w.STEPS


def test_first_microbatch_flag_during_fsdp_accumulation(results):
    for res in _scenario(results, "accumulation_parity"):
        assert res["fp8_flag"] == ([True] + [False] * (w.K - 1)) * w.STEPS
        assert res["fp8_flag_after_step"] is None


# ----------------------------------------------------------------------------------------------
# 1c. Flags restored after an exception; the next step still works
# ----------------------------------------------------------------------------------------------


def test_flags_restored_after_exception_and_next_step_matches_reference(results):
    for rank, res in enumerate(_scenario(results, "exception")):
        prior = res["prior"]
        assert prior["2[0]"] == (True, True, False) and prior["4[0]"] == (True, False, True), prior
        assert res["propagated"] == ["'simulated failure in microbatch 1'", "'simulated failure in microbatch 2'"]
        assert res["notes"] == [], "FSDP's recovery (reset_iter_state, or its port on torch 2.11) failed"
        # The second failure happened after the final-backward flags were switched on.
        groups = [k for k in prior if k != "is_last_backward"]
        assert res["inside_last"] == {**_on(groups), "is_last_backward": True}
        assert res["after_error"] == [prior, prior], rank
        assert res["fp8_after_error"] == [None, None]
        assert res["final"] == prior
        ours, ref = res["norm"]
        assert abs(ours - ref) <= NORM_RTOL * ref, (rank, ours, ref)
        assert res["param_diff"][0] <= PARAM_ATOL, (rank, res["param_diff"])


# ----------------------------------------------------------------------------------------------
# 1d. Tokens added in accumulate() are handed to step() (PP on: they scale the grads)
# ----------------------------------------------------------------------------------------------


def test_pp_tokens_from_accumulate_equal_an_explicit_num_label_tokens(results):
    for rank, res in enumerate(_scenario(results, "pp_token_handoff")):
        norms = res["norms"]
        assert res["acc_tokens"] == res["tokens"] > w.DP
        # Same code path, same grads: bit-identical to passing the count explicitly.
        assert norms["a"] == norms["b"], (rank, norms)
        assert res["a_equals_b"]
        # And it did scale: without a count the norm is tokens / DP times larger (fp64, 1e-12).
        ratio = norms["c"] / norms["a"]
        assert abs(ratio - res["tokens"] / w.DP) <= 1e-12 * ratio, (rank, norms)
        assert res["consumed"]


def test_pp_tokens_of_a_failed_accumulation_are_not_applied_to_the_next_step(results):
    for rank, res in enumerate(_scenario(results, "pp_token_handoff")):
        norms = res["norms"]
        assert norms["d"] == norms["c"], (rank, norms)


# ----------------------------------------------------------------------------------------------
# 2c. torchao Float8Linear on FSDP2: stored scales == torchao's own precompute
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_torchao_float8_scales_after_step_equal_torchao_precompute(results, dtype):
    per_rank = _scenario(results, "torchao_fp8")
    if "skipped" in per_rank[0]:
        pytest.skip(per_rank[0]["skipped"])
    for rank, res in enumerate(per_rank):
        r = res[dtype]
        assert r["n_float8"] == r["n_targets"] == 3, r
        for step, s in enumerate(r["steps"]):
            # Reference: torchao's precompute_float8_dynamic_scale_for_fsdp on the same updated
            # weights; tolerance 0 (the same formula on the same amax values, module docstring).
            assert s["stored"] == s["theirs"], (rank, step, s)
            assert s["ours"] == s["stored"]
            assert s["scale_dtype"] == "torch.float32"
            # amax from the update pass == eager abs-max of the full updated weights (exact).
            assert s["amax"] == s["eager_amax"], (rank, step, s)
            # One batched MAX all-reduce per process group (3 weights), next to the norm's SUMs.
            assert s["max_all_reduces"] == r["n_process_groups"], (rank, step, s)
            assert s["all_reduces"] == 2 * r["n_process_groups"], (rank, step, s)
        # The second step's forward all-gathered FP8 weights cast with the scales we stored.
        assert all(s["how"] == "backward" for s in r["steps"]), r["steps"]

