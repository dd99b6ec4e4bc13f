"""The bench's Muon + AdamW row (issue 17): its param split, floor and Newton-Schulz work, its goal, and
the row run at --quick sizes with FusedStep compiled. The --no-compile quick run of every row, this one
included, is in test_bench.py (which takes ``muon_row_tolerance`` from here).

No timing assertions: the machine is shared and noisy.
"""

from __future__ import annotations

import json

import pytest
import torch

from compiled_step.cli import bench
from compiled_step.cli import layouts as L
from compiled_step.cli.bench import goals as bench_goals
from compiled_step.cli.bench import methods as bench_methods
from compiled_step.cli.bench import muon as bench_muon
from compiled_step.cli.bench import options as bench_options
from compiled_step.cli.bench import rows as bench_rows
from compiled_step.rules import muon as muon_rule


def _quick_layout() -> L.Layout:
    sizes = bench_options._SIZES["quick"]
    return L.gpt_layout(sizes["d_model"], sizes["n_layers"], sizes["vocab"], sizes["seq_len"])


def muon_row_tolerance(n_params: int) -> float:
    """The Muon + AdamW row's distance to B after the quick run's steps (warmup, rounds, the memory
    step and the op-count step), as tests/test_muon.py bounds it: each step's Newton-Schulz output
    may differ by about one bfloat16 ulp of its entries (|O| < 2: 2**-7) where the clip coefficients
    (or D's pre-scaled grads) differ in their last fp32 bits, so a Muon param moves by at most
    lr * ratio * 2**-7 more per step. The quick run's FusedStep runs eagerly (compile=False), where
    the bfloat16 Gram polynomial is one baddbmm rounded once instead of torch's three roundings: the
    same per-step bound holds it (measured: 2e-4 against 2.2e-3). AdamW's params stay far inside it."""
    layout = _quick_layout()
    assert layout.n_params == n_params  # the row ran on this layout
    sizes = bench_options._SIZES["quick"]
    steps = sizes["warmup"] + sizes["rounds"] + 2
    ratio = max(muon_rule.adjust_lr_ratio(s.shape, None) for s in layout.specs if s.hidden_matrix)
    return steps * bench_methods.MUON_HP["lr"] * ratio * 2 ** -7


# ------------------------------------------------------------------------------------ Muon + AdamW row


def test_muon_adamw_groups_split_the_headline_layout():
    layout = L.gpt_layout()
    params = L.make_params(layout)
    muon_groups, adamw_groups = L.muon_adamw_groups(layout, params)
    hidden = {id(p) for g in muon_groups for p in g["params"]}
    # Muon: the 4 projection weights of each of the 4 blocks, every one 2-D; embeddings go to AdamW.
    assert len(hidden) == 16 and all(p.ndim == 2 for g in muon_groups for p in g["params"])
    by_name = {s.name: p for s, p in zip(layout.specs, params)}
    assert id(by_name["wte"]) not in hidden and id(by_name["wpe"]) not in hidden
    assert id(by_name["h3.mlp.c_proj.weight"]) in hidden
    rest = [p for g in adamw_groups for p in g["params"]]
    assert len(rest) + len(hidden) == layout.n_tensors and not hidden & {id(p) for p in rest}
    assert [g["weight_decay"] for g in adamw_groups] == [0.1, 0.0]
    opts = bench_methods.make_optimizers(bench_methods.MUON_ADAMW, layout, params)
    assert [type(o) for o in opts] == [torch.optim.Muon, torch.optim.AdamW]


def test_muon_adamw_floor_and_newton_schulz_work():
    layout = L.gpt_layout()
    d, muon = 512, 4 * 12 * 512 * 512  # per block: 3d*d + d*d + 4d*d + d*4d hidden-matrix elements
    # Muon keeps one state tensor (24 B/param in fp32), AdamW two (32 B/param).
    expected = (24 * muon + 32 * (layout.n_params - muon)) / layout.n_params
    assert bench_methods.floor_bytes_per_param("muon_adamw", torch.float32, layout) == pytest.approx(expected)
    # Per Newton-Schulz step on X of s x l: X X^T, G G and G' X: 4 s^2 l + 2 s^3 flops; 5 steps.
    per_block = sum(5 * (4 * d * d * l + 2 * d ** 3) for l in (3 * d, d, 4 * d, 4 * d))
    assert bench_muon.newton_schulz_gflop(layout) == pytest.approx(4 * per_block / 1e9)


def test_muon_goal_is_the_ratio_to_b():
    def goal(times, device="cpu"):
        row = bench_rows.RowResult(key="muon_adamw", optimizer="muon_adamw", dtype="float32", layout="x",
                                   n_params=20_000_000, n_tensors=52, param_bytes=80_000_000, bytes_per_param=26.0,
                                   bandwidth_gbps=10.0, floor_s=0.05, grad_norm=10.0)
        for name, t in times.items():
            row.methods.append(bench_rows.MethodResult(row=row.key, method=name, times_s=[t], floor_s=0.05,
                                                       graphs_compiled=0, speedup_vs_b=times["B"] / t))
        goals = bench_goals.evaluate_goals([row], [], torch.device(device), "fused", 10_000_000)
        return next(g for g in goals if g.name.startswith("Muon + AdamW"))

    assert (goal({"B": 1.3, "fused": 1.0}).status, goal({"B": 1.2, "fused": 1.0}).status) == ("met", "gap")
    assert goal({"B": 1.2, "fused": 1.0}).measured.startswith("1.20x (FusedStep 1000.0 ms, B 1200.0 ms")
    assert goal({"B": 1.9, "fused": 1.0}, "cuda").status == "gap"  # >= 2x on a GPU
    assert goal({"B": 1.0}).status == "not measured"


def test_muon_adamw_row_runs_both_methods_compiled(tmp_path):
    """The row at --quick sizes, compiled: FusedStep([muon, adamw]) and anchor B, with their op counts,
    FusedStep's compiled calls (its program's), Newton-Schulz timed beside them, and the goal's figure."""
    argv = ["--quick", "--rows", "muon_adamw", "--methods", "B,fused", "--no-memory", "--skip-compile-time",
            "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (row,) = data["rows"]
    assert row["key"] == "muon_adamw" and row["optimizer"] == "muon_adamw"
    methods = {m["method"]: m for m in row["methods"]}
    assert set(methods) == {"B", "fused"}
    for m in methods.values():
        assert all(t > 0 for t in m["times_s"]) and m["aten_ops"] > 0 and m["graphs_during_timing"] == 0
    assert methods["B"]["compiled_calls"] is None and methods["B"]["graphs_compiled"] == 0
    # Phase A per sharding group (Muon's, AdamW's decayed and undecayed), the finish, one matrix update
    # per shape of hidden matrix (192x64, 64x64, 256x64, 64x256) and one flat update per AdamW group.
    assert methods["fused"]["compiled_calls"] == 3 + 1 + 4 + 2
    assert methods["fused"]["graphs_compiled"] > 0
    assert methods["fused"]["max_abs_diff_vs_b"] <= muon_row_tolerance(row["n_params"])
    (ns_times,) = row["probe_times_s"].values()
    assert len(ns_times) == len(methods["B"]["times_s"]) and all(t > 0 for t in ns_times)
    assert any(n.startswith("Newton-Schulz alone") and "of B's median step" in n and "FusedStep runs the same" in n
               for n in row["notes"])
    goal = next(g for g in data["goals"] if g["name"].startswith("Muon + AdamW"))
    assert goal["status"] == bench_goals.NO_VERDICT
    assert goal["measured"].startswith(f"{methods['fused']['speedup_vs_b']:.2f}x")
