"""Tests for the benchmark: layouts, the quick run's outputs and their internal consistency, goal logic.

No timing assertions: the machine is shared and noisy. What is checked is that every number the bench
reports is positive, finite where it must be, and derived from the others as documented (fraction of
roofline = floor / median, speedup = t_B / t, floor = params x B/param / bandwidth), and that goals are
computed from the numbers rather than written down.
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch

import os
import subprocess
import sys
from pathlib import Path

import compiled_step
from test_bench_muon import muon_row_tolerance
from compiled_step.cli import bench
from compiled_step.cli import layouts as L
from compiled_step.cli.bench import compile_time as bench_compile_time
from compiled_step.cli.bench import goals as bench_goals
from compiled_step.cli.bench import measure as bench_measure
from compiled_step.cli.bench import methods as bench_methods
from compiled_step.cli.bench import options as bench_options
from compiled_step.cli.bench import report as bench_report
from compiled_step.cli.bench import rows as bench_rows

REPO_ROOT = Path(compiled_step.__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- layouts


def test_gpt_layout_default_is_headline_size():
    layout = L.gpt_layout()
    # The performance goals are stated for a >= 10 M-parameter GPT-like layout.
    assert layout.n_params >= 10_000_000
    assert layout.n_tensors == 2 + 12 * 4 + 2
    expected = 8192 * 512 + 1024 * 512 + 4 * (12 * 512 * 512 + 13 * 512) + 2 * 512
    assert layout.n_params == expected


def test_many_small_and_n_tensor_layouts():
    small = L.many_small_layout(1024, 256)
    assert small.n_tensors == 1024
    assert 100 <= small.n_params / small.n_tensors <= 1000  # "a few hundred elements"
    for n in (16, 64, 256, 1024):
        layout = L.n_tensor_layout(n)
        assert layout.n_tensors == n
        assert len({s.numel for s in layout.specs}) > 1  # varied sizes: dynamic shapes are exercised


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_layout_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive int"):
        L.gpt_layout(d_model=bad)
    with pytest.raises(ValueError, match="positive int"):
        L.many_small_layout(n_tensors=bad)


def test_params_grads_and_groups():
    layout = L.gpt_layout(d_model=16, n_layers=1, vocab=32, seq_len=8)
    params = L.make_params(layout, dtype=torch.bfloat16)
    grads = L.make_grads(layout, dtype=torch.bfloat16)
    assert all(p.is_leaf and p.requires_grad and p.dtype == torch.bfloat16 for p in params)
    assert [p.shape for p in params] == [g.shape for g in grads]
    assert all(torch.isfinite(g.float()).all() for g in grads)
    groups = L.param_groups(layout, params)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == layout.n_tensors
    # Same seed, same values: every method of a row starts from identical params.
    assert all(torch.equal(a, b) for a, b in zip(params, L.make_params(layout, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="specs"):
        L.param_groups(layout, params[:-1])


def test_floor_bytes_per_param():
    # DESIGN.md: fp32 AdamW reads p, g, m, v and writes p, m, v (28 B) plus one read of g for the norm.
    assert bench_methods.floor_bytes_per_param("adamw", torch.float32) == 32
    assert bench_methods.floor_bytes_per_param("sgd", torch.float32) == 24
    assert bench_methods.floor_bytes_per_param("adamw", torch.bfloat16) == 16


def test_peak_extra_bytes_sees_temporaries():
    x = torch.zeros(1 << 20)

    def in_place():
        x.add_(1.0)

    def with_temp():
        y = x * 2.0  # a 4 MiB temporary
        x.copy_(y)

    assert bench_measure.peak_extra_bytes(with_temp, torch.device("cpu")) >= x.numel() * 4
    assert bench_measure.peak_extra_bytes(in_place, torch.device("cpu")) < x.numel() * 4 // 100


# --------------------------------------------------------------------------------------- the quick run


def _fused_available() -> bool:
    try:
        from compiled_step import FusedStep  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md = out / "BENCHMARKS.md"
    methods = "A,B,D,fused" if _fused_available() else "A,B,D"
    # compile=False keeps this fast: the plumbing, outputs and arithmetic are what is under test.
    argv = ["--quick", "--no-compile", "--methods", methods, "--out", str(out), "--write-benchmarks-md", str(md)]
    # Run in a subprocess with stdout and stderr captured at the file-descriptor level: the profiler's
    # noise is written by native code, which no in-process capture of sys.stderr would see.
    code = "import sys; from compiled_step.cli.bench import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=600)
    return proc, out, md, methods.split(",")


def test_quick_run_writes_all_outputs(quick_run):
    proc, out, md, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("bench.md", "results.csv", "compile_times.csv", "results.json", "bench.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "python -m compiled_step bench --quick" in text
    assert torch.__version__ in text and "## Machine" in text
    assert "| goal | target | measured | status |" in text
    # It says where the outputs go, before and after.
    assert proc.stdout.splitlines()[0] == (f"bench: outputs go to {out.resolve()}/ (bench.md, results.csv, "
                                           f"compile_times.csv, results.json, bench.png; also {md})")
    assert f"bench: wrote {out.resolve()}/ (bench.md" in proc.stdout and str(md.resolve()) in proc.stdout


def test_quick_run_prints_no_profiler_noise(quick_run):
    proc, _, _, _ = quick_run
    assert proc.returncode == 0
    # kineto's "USDT: ... profiler_start" / "profiler_stop" lines, once per profiling session.
    assert "USDT" not in proc.stderr and "profiler_start" not in proc.stderr and "profiler_stop" not in proc.stderr
    assert "USDT" not in proc.stdout


def test_quiet_profiler_keeps_other_stderr_lines(capfd):
    # Native writes to fd 2 inside the block: the noise goes, everything else comes out afterwards.
    with bench_measure.quiet_profiler():
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"[W CPUAllocator.cpp:245] a real warning\n")
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:59] profiler_stop\n")
        os.write(2, b"RuntimeError: something real about profiler_start\n")
    err = capfd.readouterr().err
    assert err == "[W CPUAllocator.cpp:245] a real warning\nRuntimeError: something real about profiler_start\n"


def test_quiet_profiler_restores_stderr_after_an_exception(capfd):
    with pytest.raises(ValueError), bench_measure.quiet_profiler():
        os.write(2, b"kept\n")
        raise ValueError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "kept\nafter\n"


def test_quick_run_defines_every_method(quick_run):
    proc, out, md, methods = quick_run
    text = (out / "bench.md").read_text()
    for name in methods:
        line = f"- **{name}**: {bench_methods.describe_method(name, compiled=False)}"
        assert line in text and line in md.read_text(), name
    assert "- **B**: clip_grad_norm_(foreach=True) + optimizer(fused=True)" in text  # spelled out
    if "fused" in methods:
        assert "- **fused**: FusedStep.step() with compile=False (eager)" in text


def test_png_legend_spells_out_the_methods(tmp_path):
    rows = [_row("adamw", {"A": 0.2, "B": 0.1, "C": 0.15, "D": 0.3, "fused": 0.05}),
            _row("small", {"A": 0.02, "B": 0.01, "D": 0.03, "fused[b=8]": 0.005})]
    legend = bench_report.write_png(tmp_path / "b.png", rows, [], "cpu")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert legend == [f"{n}: {bench_methods.METHOD_DESCRIPTIONS[n]}" for n in "ABCD"] + [
        f"fused: {bench_methods.METHOD_DESCRIPTIONS['fused']}",
        f"fused[b=8]: {bench_methods.METHOD_DESCRIPTIONS['fused']}, bucket_size=8"]


def test_quick_run_numbers_are_consistent(quick_run):
    _, out, _, methods = quick_run
    rows = list(csv.DictReader((out / "results.csv").open()))
    # The small-first row times FusedStep (B beside it): without it, the row is skipped.
    row_keys = [k for k in bench_rows.ROW_KINDS if "fused" in methods or k != bench_rows.SMALL_FIRST]
    assert {r["row"] for r in rows} == set(row_keys)
    for row_key in row_keys:
        recs = {r["method"]: r for r in rows if r["row"] == row_key}
        assert set(recs) == ({"B", "fused"} if row_key == bench_rows.SMALL_FIRST else set(methods))
        b = float(recs["B"]["median_ms"])
        for m, r in recs.items():
            median, floor = float(r["median_ms"]), float(r["floor_ms"])
            assert median > 0 and floor > 0 and float(r["bandwidth_gbps"]) > 0
            assert float(r["roofline_fraction"]) == pytest.approx(floor / median, rel=1e-9)
            assert float(r["speedup_vs_b"]) == pytest.approx(b / median, rel=1e-9)
            # The roofline bandwidth is the higher of the two triads (see Triad).
            assert float(r["bandwidth_gbps"]) == max(float(r["stream_triad_gbps"]), float(r["in_place_triad_gbps"]))
            bpp = float(r["bytes_per_param"])  # a mean over the params on the Muon + AdamW row
            assert floor == pytest.approx(int(r["n_params"]) * bpp / (float(r["bandwidth_gbps"]) * 1e9) * 1e3)
            assert int(r["peak_extra_bytes"]) >= 0
            assert int(r["graphs_during_timing"]) == 0
            # Every step runs ATen ops; launches are counted on CUDA only.
            assert int(r["aten_ops"]) > 0
            assert r["kernel_launches"] == r["graph_launches"] == ""
            assert int(r["threads"]) == (1 if row_key in bench_rows.TINY_ROWS else torch.get_num_threads())
            # Best-round view: fastest triad >= median triad; fraction and speedup from the minima.
            best_bw, best_min = float(r["best_bandwidth_gbps"]), float(r["min_ms"])
            assert best_bw >= float(r["bandwidth_gbps"]) and 0 < best_min <= median
            best_floor_ms = int(r["n_params"]) * bpp / (best_bw * 1e9) * 1e3
            assert float(r["best_round_roofline_fraction"]) == pytest.approx(best_floor_ms / best_min, rel=1e-9)
            assert float(r["best_round_speedup_vs_b"]) == pytest.approx(
                float(recs["B"]["min_ms"]) / best_min, rel=1e-9)
            # Same init, grads and step count: every method stays on B's trajectory.
            tol = 5e-2 if r["dtype"] == "bfloat16" else 1e-4
            if row_key == bench_methods.MUON_ADAMW:
                tol = muon_row_tolerance(int(r["n_params"]))
            assert float(r["max_abs_diff_vs_b"]) <= tol, (row_key, m)
        assert float(recs["B"]["speedup_vs_b"]) == 1.0


def test_quick_run_reports_figures_without_verdicts(quick_run):
    proc, out, md, methods = quick_run
    data = json.loads((out / "results.json").read_text())
    goals = {g["name"]: g for g in data["goals"]}
    # Quick layouts are too small and noisy to judge: figures, but never met or gap.
    assert not any(g["status"] in ("met", "gap") for g in goals.values())
    for text in (proc.stdout, (out / "bench.md").read_text(), md.read_text()):
        assert "**met**" not in text and "**gap**" not in text
    size_goal = next(g for n, g in goals.items() if n.startswith("headline layout"))
    assert size_goal["status"] == bench_goals.NO_VERDICT and " M in " in size_goal["measured"]
    if "fused" in methods:
        head = next(r for r in data["rows"] if r["key"] == "adamw")
        fused = next(m for m in head["methods"] if m["method"] == "fused")
        roof = goals["FusedStep fraction of the bandwidth roofline (headline)"]
        assert roof["status"] == bench_goals.NO_VERDICT
        assert roof["measured"].startswith(f"{fused['roofline_fraction']:.2f}")
        for key, n in bench_rows.TINY_ROWS.items():
            tiny = next(g for name, g in goals.items() if name.startswith("tiny tensors") and f" {n} tensors" in name)
            row = next(r for r in data["rows"] if r["key"] == key)
            ratio = next(m for m in row["methods"] if m["method"] == "fused")["speedup_vs_b"]
            assert tiny["measured"].startswith(f"{ratio:.2f}x") and tiny["status"] == bench_goals.NO_VERDICT
    # Compile times are not measured by --quick.
    assert all(g["status"] == "not measured" for n, g in goals.items() if "compile time" in n)
    for g in goals.values():
        assert f"**{g['status']}**" in md.read_text()
    assert "not judged: a --quick run gives figures only" in md.read_text()


def test_quick_run_tiny_rows_run_on_one_thread(quick_run):
    _, out, _, methods = quick_run
    data = json.loads((out / "results.json").read_text())
    for key, n in bench_rows.TINY_ROWS.items():
        row = next(r for r in data["rows"] if r["key"] == key)
        assert row["n_tensors"] == n and row["threads"] == 1
        assert {m["method"] for m in row["methods"]} == set(methods)
    assert torch.get_num_threads() >= 1  # the bench ran in a subprocess; nothing to restore here


def test_quick_run_has_a_small_first_row_of_b_and_fused_after_a_small_fused_step(quick_run):
    """The headline again, after a small FusedStep built and stepped first (issue 22 item 5): B and FusedStep
    only, a note saying what ran first, and the goal's figure (no verdict under --quick)."""
    proc, out, md, methods = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "results.json").read_text())
    goal = next(g for g in data["goals"] if g["name"].startswith("headline after a small FusedStep"))
    if "fused" not in methods:
        assert all(r["key"] != "small_first" for r in data["rows"])
        assert goal["status"] == "not measured"
        return
    row = next(r for r in data["rows"] if r["key"] == "small_first")
    head = next(r for r in data["rows"] if r["key"] == "adamw")
    assert [m["method"] for m in row["methods"]] == ["B", "fused"]
    assert (row["n_params"], row["n_tensors"]) == (head["n_params"], head["n_tensors"])
    assert any(n.startswith("A small FusedStep (gpt(d_model=64,n_layers=2,vocab=512)") and "stepped 2 times first"
               in n for n in row["notes"]), row["notes"]
    def relative(r):  # t_fused / t_B, medians
        times = {m["method"]: statistics.median(m["times_s"]) for m in r["methods"]}
        return times["fused"] / times["B"]

    ratio = relative(row) / relative(head)
    assert goal["measured"].startswith(f"{ratio:.3f} (") and goal["status"] == bench_goals.NO_VERDICT


def test_quick_run_counts_fused_compiled_calls_and_has_an_fsdp2_row(quick_run):
    _, out, _, methods = quick_run
    rows = list(csv.DictReader((out / "results.csv").open()))
    data = json.loads((out / "results.json").read_text())
    for r in rows:
        # Only FusedStep has a program of compiled calls; the anchors' column is empty.
        assert (r["compiled_calls"] != "") == r["method"].startswith("fused"), r
    if "fused" in methods:
        plain = next(r for r in rows if r["row"] == "adamw" and r["method"] == "fused")
        sharded = next(r for r in rows if r["row"] == "fsdp2" and r["method"] == "fused")
        assert int(plain["compiled_calls"]) > 0 and int(sharded["compiled_calls"]) > 0
        # Same layout; as FSDP2 shards the norm needs its all-reduce over the mesh (a collective call).
        assert plain["n_params"] == sharded["n_params"]
        fsdp2 = next(r for r in data["rows"] if r["key"] == "fsdp2")
        assert any("fused:" in n and "collective" in n for n in fsdp2["notes"]), fsdp2["notes"]


def test_fsdp2_shards_are_staged_or_bucketed_and_counted_as_compiled_calls():
    """The FSDP2 row's params (one rank, gloo): DTensors FusedStep cannot move, so its program has a
    Phase A call per group, the finish, a flat update per group with staged params, and a call per bucket."""
    from compiled_step import FusedStep
    from compiled_step.cli.bench import fsdp
    from compiled_step.planning import BUCKETED, STAGED

    layout = L.gpt_layout(d_model=16, n_layers=2, vocab=64, seq_len=8)
    with fsdp.single_process_group(torch.device("cpu")) as mesh:
        params = fsdp.shard(layout, L.make_params(layout), mesh)
        assert all(type(p).__name__ == "DTensor" and p.placements[0].is_shard() for p in params)
        grads = L.make_grads(layout)
        for p, g in zip(params, grads):
            p.grad = fsdp.sharded_grad(p, g)
        fused = FusedStep(bench_methods.make_optimizer("adamw", L.param_groups(layout, params)), max_grad_norm=1.0,
                          compile=False, pack_threshold=64, bucket_size=4)
        fused.step()
        regions = {e.region for g in fused.plan.groups for e in g.entries}
        assert regions == {STAGED, BUCKETED}
        expected = sum(1 + bool(g.flat_slots) + g.bucket_count for g in fused.plan.groups) + 1
        assert sum(c.runs_as == "compiled" for c in fused.program.calls) == expected
    import torch.distributed as dist

    assert not dist.is_initialized()  # the row's process group is gone with the row


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), bench_measure.num_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_count_step_ops_counts_aten_ops():
    x, y = torch.zeros(8), torch.ones(8)

    def three_ops():
        x.add_(y)
        x.mul_(y)
        x.sub_(y)

    ops = bench_measure.count_step_ops(three_ops, torch.device("cpu"))
    assert ops.aten_ops == 3 and ops.kernel_launches is None and ops.graph_launches is None
    # Nested ops count: on the CPU a foreach op over 5 tensors runs one add_ per tensor under it.
    ts = [torch.zeros(4) for _ in range(5)]
    assert bench_measure.count_step_ops(lambda: torch._foreach_add_(ts, ts), torch.device("cpu")).aten_ops == 1 + 5


# ------------------------------------------------------------------------------------------ goal logic


def _row(key, times_by_method, n_params=20_000_000, floor_s=0.05, n_tensors=52, peak=None):
    row = bench_rows.RowResult(key=key, optimizer="adamw", dtype="float32", layout="x", n_params=n_params,
                          n_tensors=n_tensors, param_bytes=4 * n_params, bytes_per_param=32,
                          bandwidth_gbps=10.0, floor_s=floor_s, grad_norm=10.0)
    for name, t in times_by_method.items():
        row.methods.append(bench_rows.MethodResult(row=key, method=name, times_s=[t], floor_s=floor_s,
                                              graphs_compiled=0, peak_extra_bytes=peak))
    b = row.method("B").median_s
    for m in row.methods:
        m.speedup_vs_b = b / m.median_s
    return row


def test_goals_are_computed_from_numbers():
    cpu = torch.device("cpu")
    compiles = [bench_compile_time.CompileResult(n, cold_s=10.0, warm_s=2.0) for n in (16, 64, 256, 1024)]
    good = [_row("adamw", {"B": 0.1, "fused": 0.052}, peak=1000),
            _row("small", {"B": 0.01, "fused": 0.0015}, n_params=262_144, floor_s=0.0008, n_tensors=1024),
            _row("tiny100", {"B": 0.0009, "fused": 0.0004}, n_params=1600, floor_s=1e-6, n_tensors=100),
            _row("tiny1000", {"B": 0.007, "fused": 0.003}, n_params=16000, floor_s=1e-5, n_tensors=1000)]
    status = {g.name.split(" (")[0].split(",")[0]: g.status
              for g in bench_goals.evaluate_goals(good, compiles, cpu, "fused", 10_000_000)}
    assert list(status.values()).count("gap") == 0, status

    slow = [_row("adamw", {"B": 0.1, "fused": 0.09}, peak=50_000_000)]
    bad_compiles = [bench_compile_time.CompileResult(16, cold_s=8.0, warm_s=2.0),
                    bench_compile_time.CompileResult(1024, cold_s=None, warm_s=None, error="timed out after 600s")]
    goals = {g.name: g for g in bench_goals.evaluate_goals(slow, bad_compiles, cpu, "fused", 10_000_000)}
    assert goals["FusedStep fraction of the bandwidth roofline (headline)"].status == "gap"
    assert goals["FusedStep speedup over anchor B (headline, t_B / t)"].status == "gap"
    assert goals["cold compile time, every tensor count"].status == "gap"
    assert "timed out" in goals["cold compile time, every tensor count"].measured
    peak = next(g for n, g in goals.items() if n.startswith("no param-sized"))
    assert peak.status == "gap"
    overhead = next(g for n, g in goals.items() if n.startswith("per-step overhead"))
    assert overhead.status == "not measured"
    assert all(g.status == "not measured" for n, g in goals.items() if n.startswith("tiny tensors"))

    # Tiny rows: t_B / t >= 2 is the CPU goal; on CUDA the ratio is a figure without a goal.
    tiny = [_row("tiny100", {"B": 0.0009, "fused": 0.0006}, n_tensors=100),
            _row("tiny1000", {"B": 0.008, "fused": 0.004}, n_tensors=1000)]
    goals = [g for g in bench_goals.evaluate_goals(tiny, [], cpu, "fused", 10_000_000) if g.name.startswith("tiny")]
    assert [(g.status, g.measured.split(" ")[0]) for g in goals] == [("gap", "1.50x"), ("met", "2.00x")]
    goals = [g for g in bench_goals.evaluate_goals(tiny, [], torch.device("cuda"), "fused", 100_000_000)
             if g.name.startswith("tiny")]
    assert [g.status for g in goals] == ["figure only, no goal on this device"] * 2

    # --quick: the same figures, no verdicts.
    judged = bench_goals.evaluate_goals(good, compiles, cpu, "fused", 10_000_000)
    unjudged = bench_goals.evaluate_goals(good, compiles, cpu, "fused", 10_000_000, verdicts=False)
    assert [g.measured for g in judged] == [g.measured for g in unjudged]
    assert {g.status for g in unjudged} == {bench_goals.NO_VERDICT, "not measured"}


# ------------------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "A,C"], "must include B"),
        (["--methods", "A,B,E"], "unknown"),
        (["--rows", "adamw,lion"], "unknown"),
        (["--bucket-size", "0"], "> 0"),
        (["--bucket-size", "x"], "integer"),
        (["--rounds", "0"], "> 0"),
        (["--d-model", "-4"], "> 0"),
        (["--compile-sizes", "16,16"], "duplicates"),
        (["--no-compile", "--methods", "A,B,C"], "excludes anchor C"),
        (["--device", "nonsense"], "not a torch device"),
        (["--wait-idle", "-1"], ">= 0"),
    ],
)
def test_bad_options_fail_clearly(argv, message, capsys, tmp_path):
    assert bench.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_cuda_is_an_error(capsys, tmp_path):
    assert bench.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "cuda" in capsys.readouterr().err


def test_cuda_device_index_is_checked_and_filled_in(monkeypatch, capsys, tmp_path):
    # CUDA faked (no GPU here): only the option handling is under test.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert bench.main(["--device", "cuda:3", "--out", str(tmp_path)]) == 2
    assert "--device cuda:3: this machine has 1 CUDA device(s)" in capsys.readouterr().err
    args = bench_options.build_parser().parse_args(["--device", "cuda", "--methods", "A,B", "--out", str(tmp_path)])
    bench_options.resolve(args)
    assert args.device_obj == torch.device("cuda", 0)


# ------------------------------------------------------------------------------- compile-time plumbing


@pytest.mark.skipif(not _fused_available(), reason="needs compiled_step.FusedStep")
def test_compile_time_subprocess_plumbing(tmp_path):
    # compile=False in the child: this checks the fresh-subprocess/cache-dir plumbing, not compile speed.
    argv = ["--quick", "--no-compile", "--rows", "small", "--methods", "B,fused", "--compile-sizes", "4",
            "--no-memory", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (rec,) = list(csv.DictReader((tmp_path / "compile_times.csv").open()))
    assert rec["n_tensors"] == "4" and rec["compiled"] == "False" and rec["error"] == ""
    assert float(rec["cold_s"]) > 0 and float(rec["warm_s"]) > 0
    assert not math.isnan(float(rec["steady_ms"]))


def test_small_first_goal_is_fuseds_time_relative_to_b_against_the_headline_rows():
    cpu = torch.device("cpu")

    def goal(rows):
        goals = bench_goals.evaluate_goals(rows, [], cpu, "fused", 10_000_000)
        return next(g for g in goals if g.name.startswith("headline after a small FusedStep"))

    head = _row("adamw", {"B": 0.1, "fused": 0.050})
    within = goal([head, _row("small_first", {"B": 0.1, "fused": 0.054})])
    beyond = goal([head, _row("small_first", {"B": 0.1, "fused": 0.056})])
    # The machine twice as slow for the second row: B and FusedStep alike, so no gap.
    drift = goal([head, _row("small_first", {"B": 0.2, "fused": 0.1})])
    # Slower by 12% while B is not: a gap, although the raw medians are close.
    hidden = goal([head, _row("small_first", {"B": 0.09, "fused": 0.0504})])
    assert (within.status, within.measured) == ("met", "1.080 (FusedStep 54.000 ms vs 50.000 ms: 1.080; "
                                                       "B 100.0 ms vs 100.0 ms)")
    assert (beyond.status, beyond.measured.split(" ")[0]) == ("gap", "1.120")
    assert (drift.status, drift.measured.split(" ")[0]) == ("met", "1.000")
    assert (hidden.status, hidden.measured.split(" ")[0]) == ("gap", "1.120")
    assert goal([head]).status == "not measured"
    assert goal([_row("small_first", {"B": 0.1, "fused": 0.05})]).status == "not measured"


def test_small_first_row_needs_fused_unless_the_rows_are_defaulted(capsys, tmp_path):
    assert bench.main(["--quick", "--rows", "small_first", "--methods", "B", "--out", str(tmp_path)]) == 2
    assert "--rows small_first needs the fused method in --methods" in capsys.readouterr().err
    args = bench_options.build_parser().parse_args(["--quick", "--methods", "A,B"])
    bench_options.resolve(args)
    assert "small_first" not in args.row_keys and any("small_first was skipped" in n for n in args.notes)
    args = bench_options.build_parser().parse_args(["--quick", "--rows", "adamw,small_first", "--methods",
                                                    "A,B,fused,fused+norms"])
    bench_options.resolve(args)
    spec = next(s for s in bench_options.row_specs(args) if s.key == "small_first")
    assert spec.small_first and spec.methods == ("B", "fused")


def test_param_norms_cost_goal_is_the_ratio_of_medians():
    cpu = torch.device("cpu")
    name = bench_methods.PARAM_NORMS

    def goal(times):
        goals = bench_goals.evaluate_goals([_row("adamw", times)], [], cpu, "fused", 10_000_000)
        return next(g for g in goals if g.name.startswith("param_norms=True costs"))

    cheap, costly = goal({"B": 0.1, "fused": 0.050, name: 0.051}), goal({"B": 0.1, "fused": 0.050, name: 0.0525})
    assert (cheap.status, cheap.measured.split(" ")[0]) == ("met", "1.020")
    assert (costly.status, costly.measured.split(" ")[0]) == ("gap", "1.050")
    assert goal({"B": 0.1, "fused": 0.05}).status == "not measured"
    assert name in bench_options.build_parser().format_help()
    assert bench_methods.describe_method(name).endswith("from the same Phase A read)")



def test_the_low_precision_section_survives_a_regeneration_and_is_replaced_by_the_next_run(tmp_path):
    from compiled_step.cli.bench.report import kept_section, with_section

    text = with_section("# Benchmarks\n\nmain tables\n", "## Low-precision\n\nfirst run")
    assert "main tables" in text and "first run" in text
    again = with_section(text, "## Low-precision\n\nsecond run")
    assert "second run" in again and "first run" not in again and again.count("main tables") == 1
    assert "second run" in kept_section(again) and "main tables" not in kept_section(again)
    assert kept_section("# Benchmarks\n\nno section\n") == ""
