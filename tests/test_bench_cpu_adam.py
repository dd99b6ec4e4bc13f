"""``bench --cpu-adam``: its subprocess per thread count, its table and goals, and its own BENCHMARKS.md section.

No timing is judged here (the bench judges its goals; these machines' timings are not a test's business): the
small run checks the plumbing and that every method steps the same params the same way. Tolerance for FusedStep
against anchor B (``clip_grad_norm_`` + torch's fused AdamW): same fp32 update math, clip coefficients that differ in
the last bits (FusedStep's norm is accumulated in float64, torch's in float32), over 3 steps of lr 1e-3: 1e-6 on
params of size ~0.02.
"""

import math

import pytest
import torch

from compiled_step.cli.bench import cpu_adam
from compiled_step.cli.bench.report import kept_section, with_section


@pytest.fixture(scope="module")
def small_run():
    results, notes = cpu_adam.measure([1], rounds=2, log=lambda msg: None, warmup=1, blocks=(64, 1),
                                      dtypes=("float32", "bfloat16"), fsdp_offload=True)
    return results, notes


def test_a_small_run_steps_every_method_alike_and_reports_them(small_run):
    results, notes = small_run
    result, bf16, sharded = results
    methods = {"fused", "B", "torch", cpu_adam.FLAT}
    if cpu_adam.deepspeed_available():
        methods |= {"DS", "DS+clip"}
        assert not notes
    else:
        assert notes and "deepspeed is not installed" in notes[0]
    assert set(result["median_s"]) == methods
    assert result["threads"] == 1 and result["omp_num_threads"] == "1" and result["n_tensors"] == 12
    diffs = result["max_abs_diff"]
    assert result["max_abs_diff_vs"] == "B" and diffs["B"] == 0.0 and diffs["fused"] <= 1e-6, diffs
    if "DS+clip" in diffs:  # DeepSpeed's AdamW, after the same clip: its own fp32 arithmetic order
        assert diffs["DS+clip"] <= 1e-6, diffs
    assert math.isnan(diffs[cpu_adam.FLAT])  # the probe's params are its own
    # bfloat16 params: FusedStep with fp32_moments; the fp32 probe does not run
    assert bf16["dtype"] == "bfloat16" and set(bf16["median_s"]) == methods - {cpu_adam.FLAT}
    # FSDP2 shards under CPUOffloadPolicy: every method steps DTensor params (DeepSpeed their local tensors) the
    # same way as on plain tensors
    assert sharded["fsdp_offload"] and set(sharded["median_s"]) == methods - {cpu_adam.FLAT}
    assert sharded["max_abs_diff_vs"] == "B" and sharded["max_abs_diff"]["fused"] <= 1e-6, sharded["max_abs_diff"]
    if "DS+clip" in sharded["max_abs_diff"]:
        assert sharded["max_abs_diff"]["DS+clip"] <= 1e-6, sharded["max_abs_diff"]
    if cpu_adam.deepspeed_available():
        # against DeepSpeed's clipped step, float32 moments both: params within a bfloat16 rounding flip (~2**-8
        # relative of params of size ~0.1 at most)
        assert bf16["max_abs_diff_vs"] == "DS+clip" and bf16["max_abs_diff"]["fused"] <= 1e-3, bf16["max_abs_diff"]


def test_the_table_reports_every_method_the_roofline_and_the_goals(small_run):
    results, notes = small_run
    text = cpu_adam.table(results, notes)
    roof, source = cpu_adam.roofline(results[0])
    assert roof >= max(results[0]["stream_gbps"], results[0]["in_place_gbps"]) and roof > 0
    assert f"| float32 | 1 | {roof:.1f} | {source} |" in text
    assert "| bfloat16 | 1 | FusedStep GB/s / DS GB/s (24 vs 22 B/param) |" in text
    assert "| float32, FSDP2 shards (CPUOffloadPolicy) | 1 | FusedStep (clip + AdamW) |" in text
    for method in results[0]["median_s"]:
        assert f"| {cpu_adam.DESCRIPTIONS[method]} |" in text
    expected = "not run" if not cpu_adam.deepspeed_available() else None
    for goal in ("FusedStep GB/s / DS GB/s", "speedup over DS+clip", "speedup over B"):
        line = next(line for line in text.splitlines() if goal in line)
        if expected and "DS" in goal:
            assert line.endswith("| - | not run |"), line
        else:
            assert line.endswith("| met |") or line.endswith("| gap |"), line


def test_bytes_per_param_are_the_streams_each_method_must_move():
    assert cpu_adam.bytes_per_param("DS", torch.float32) == 28  # p, g, m, v read; p, m, v written
    assert cpu_adam.bytes_per_param("fused", torch.float32) == 32  # and g once more, for the norm
    assert cpu_adam.bytes_per_param("fused", torch.bfloat16) == 24  # bf16 p and g, fp32 moments
    assert cpu_adam.bytes_per_param("DS", torch.bfloat16) == 22
    assert cpu_adam.layout().n_params == 37_828_608 and cpu_adam.layout().n_tensors == 144


def test_each_modes_section_is_kept_and_replaced_on_its_own():
    text = with_section("# Benchmarks\n\nmain tables\n", "## Low-precision\n\nlp one", "low-precision")
    text = with_section(text, "## CPU AdamW\n\ncpu one", "cpu-adam")
    text = with_section(text, "## CPU AdamW\n\ncpu two", "cpu-adam")
    assert "cpu one" not in text and "cpu two" in text and "lp one" in text
    kept = kept_section(text)
    assert "lp one" in kept and "cpu two" in kept and "main tables" not in kept
    assert kept.index("lp one") < kept.index("cpu two")
