"""Graph regression tests: the committed graphs/ goldens, inline pins, and the main error messages.

* ``test_reference_graphs_match_goldens`` regenerates every reference configuration and compares it
  with ``graphs/``; on a difference it shows a unified diff. ``EXPECTTEST_ACCEPT=1`` (expecttest's
  own switch) rewrites the files instead, exactly as it rewrites the inline expectations below.
* The goldens are tied to torch ``graphs.GOLDEN_TORCH_VERSION``: under another version the
  graph tests skip with that reason (Dynamo/Inductor lower differently), never fail falsely. The
  error-message pins are our own text and run on any version.
* The perturbation tests change the step on purpose (one more kernel; a graph break) and show that
  the comparison reports it, without writing anything.

Cost: every configuration is captured once per test session (``captured()``); configurations of
one family (``Reference.family``: the plain layouts; FSDP2, TP and EP; FP8) share their graphs, so a
graph compiles once per family. Cold, that is 16 graphs, a few seconds each.
"""

from __future__ import annotations

import functools
import inspect
import os
import unittest
from pathlib import Path

import expecttest
import pytest
import torch

from compiled_step import FusedStep, compiling
from compiled_step.cli import graphs
from compiled_step.cli.graphs import rendering as graph_render
from compiled_step.cli.graphs.goldens import HEADER_MARK
from compiled_step.planning import ROW
from compiled_step.rules import sgd

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "graphs"
APPLIES, SKIP_REASON = graphs.goldens_apply()
needs_goldens = pytest.mark.skipif(not APPLIES, reason=SKIP_REASON)


@functools.cache
def captured() -> dict[str, graphs.Capture]:
    """Every reference configuration, captured once per session."""
    return graphs.capture_references()


@functools.cache
def rendered() -> dict[str, str]:
    return {f"{name}.txt": graphs.render(cap) for name, cap in captured().items()}


def _golden_snapshot() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(GOLDEN_DIR.iterdir())} if GOLDEN_DIR.is_dir() else {}


# ---------------------------------------------------------------------------------------------
# The goldens
# ---------------------------------------------------------------------------------------------


@needs_goldens
def test_reference_graphs_match_goldens():
    files = rendered()
    if os.getenv("EXPECTTEST_ACCEPT"):  # read at call time, like expecttest's assertExpectedInline
        graphs.write(files, GOLDEN_DIR)
        return
    mismatches = graphs.compare(files, GOLDEN_DIR)
    assert not mismatches, (
        f"the compiled graphs differ from {GOLDEN_DIR} in {[m.file for m in mismatches]}. If the change is "
        "intended, review the diff and accept it with EXPECTTEST_ACCEPT=1 python -m pytest tests/test_graphs.py "
        "(or python -m compiled_step graphs):\n\n" + "\n".join(str(m) for m in mismatches)
    )


# Muon's matrix update transposes tall matrices, a branch on the shape: one graph for the tall
# stacks and one for the others, however many shapes there are.
PER_ORIENTATION = "rules.muon.update_matrices"


@needs_goldens
def test_every_reference_is_one_graph_per_function_without_breaks_or_recompiles():
    for name, cap in captured().items():
        assert cap.graph_breaks == [], name
        assert cap.recompiles_step2 == 0, name  # an LR change and a second step compile nothing
        functions = [g.function for g in cap.graphs]
        once = [f for f in functions if f != PER_ORIENTATION]
        assert len(once) == len(set(once)), (name, functions)  # no function compiled twice
        assert functions.count(PER_ORIENTATION) <= 2, (name, functions)
        assert all(g.kernels > 0 and g.bytes_accessed > 0 for g in cap.graphs), name


@needs_goldens
def test_every_reference_runs_one_phase_a_call_per_group_one_finish_and_one_update_per_flat_region_and_bucket():
    for name, cap in captured().items():
        phases = [graph_render.phase(cap.graphs[e.graph].function) for e in cap.events if e.kind == "compiled"]
        groups = cap.plan.groups
        assert phases.count("Phase A") == len(groups), name
        assert phases.count("finish") == 1, name
        # A matrix group (Muon) has one update per stack of same-shape matrices instead of a flat update.
        assert phases.count("Phase B") == sum(len(g.stacks) if g.stacks else bool(g.flat) for g in groups) + sum(
            g.bucket_count for g in groups), name
        assert phases.index("finish") == len(groups)  # Phase A of every group, then the finish, then Phase B
        # Phase A reads each group's whole flat grad buffer; its graph is compiled at the fixed row hint (its bytes
        # are counted there), whichever group's size came first.
        phase_a = next(g for g in cap.graphs if graph_render.phase(g.function) == "Phase A")
        assert phase_a.shapes[0] == (groups[0].rows, ROW), name
        assert phase_a.elements == compiling.ROWS_HINT * ROW, name


@needs_goldens
def test_plain_params_are_one_flat_update_and_dtensor_params_bucketed_and_staged():
    for name, cap in captured().items():
        regions = {e.region for g in cap.plan.groups for e in g.entries}
        functions = [g.function for g in cap.graphs]
        if cap.plan.groups[0].key.mesh_key:
            assert regions == {"staged", "bucketed"}, name
            assert any(f.endswith(".update_bucket") for f in functions), name
            assert cap.bytes_per_param.update_kind == "bucket update", name
        else:
            assert regions == {"aliased"}, name
            assert not any(f.endswith(".update_bucket") for f in functions), name
            # muon_adamw too: its Phase A graph, first compiled at the Muon group's sizes, is counted at the row hint
            # like every flat buffer's, so the AdamW group's bytes per param are its own.
            assert cap.bytes_per_param.update_kind == "flat update", name


@needs_goldens
def test_distributed_references_name_their_reductions():
    # The one-rank world still has the real plan: each group's reductions are named in its file.
    schedule = {name: "\n".join(graph_render.schedule_lines(cap)) for name, cap in captured().items()}
    assert "all_reduce(SUM) over 'dp_shard'" in schedule["fsdp2_shard0"]
    assert "all_reduce(SUM) over 'tp'" in schedule["tp_replicate_shard"]
    assert "'dp_replicate'" not in schedule["tp_replicate_shard"]  # Replicate dims are not reduced over
    ep = schedule["ep_experts"]
    assert ep.index("over 'ep'") < ep.index("over 'pp'") < ep.index("finish") < ep.index("Phase B")  # PP last
    assert captured()["ep_experts"].plan.groups[0].key.is_expert  # the EP/PP factor is the group's scale
    assert "all_reduce" not in schedule["adamw_fp32"]  # plain tensors on one device: no collective
    fp8 = schedule["fp8_amax"].splitlines()  # after Phase B: gather, one MAX all-reduce over the shards, scales
    assert fp8[-3].endswith("FP8: gather the amax of 4 FP8 weights")
    assert "all_reduce(MAX) over 'dp_shard': f32[4] (amax of the FP8 weights)" in fp8[-2]
    assert fp8[-1].endswith("FP8: scales from the amax (torchao's formula)")


@needs_goldens
def test_muon_adamw_reference_shows_the_stacks_one_norm_and_the_multi_rule_finish():
    cap = captured()["muon_adamw"]
    muon_group, adamw_group = cap.plan.groups
    assert [(s.shape, len(s.members)) for s in muon_group.stacks] == [((64, 64), 2), ((64, 128), 2), ((128, 64), 2)]
    assert not adamw_group.stacks and len(adamw_group.flat) == 5
    schedule = graph_render.schedule_lines(cap)
    expected = ["Phase A partial norm, group 0", "Phase A partial norm, group 1", "finish:",
                "matrix update, group 0, 2 matrices 64x64", "matrix update, group 0, 2 matrices 64x128",
                "matrix update, group 0, 2 matrices 128x64", "flat update, group 1"]
    assert len(schedule) == len(expected) + 1 and all(e in line for e, line in zip(expected, schedule)), schedule
    # One global norm: both groups' partials into one finish, which fills each slot by its optimizer's rule.
    finish = next(g for g in cap.graphs if graph_render.phase(g.function) == "finish")
    assert finish.constants == "kind='sum', p=2.0, rule=(rules.muon, rules.adam)"
    text = rendered()["muon_adamw.txt"]
    assert "optimizers: [torch.optim.Muon(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1), " \
           "torch.optim.AdamW(lr=0.001, weight_decay=0.1)]" in text
    assert "3 matrix stacks (one matrix update each): 2 x 64x64 from row 0" in text
    functions = [g.function for g in cap.graphs]
    assert functions == ["norm.partials.partial_of_buffer", "norm.finish.finish", PER_ORIENTATION, PER_ORIENTATION,
                         "rules.adam.update_flat"]


@needs_goldens
def test_dump_run_graphs_of_a_muon_adamw_run(tmp_path):
    # Each optimizer's groups are captured with that optimizer; Muon's on matrices of its stacks' shapes.
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(32, 16), (32, 16), (16, 16), (16, 16)]]
    rest = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(100, 16), (16,)]]
    fused = FusedStep([torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest)], max_grad_norm=1.0,
                      compile_notice=False)
    for p in matrices + rest:
        p.grad = torch.randn(p.shape, generator=gen)
    fused.step()
    texts = {p.name: p.read_text() for p in graphs.dump_run_graphs(tmp_path, fused) if p.suffix == ".txt"}
    assert set(texts) == {"run-muon-float32.txt", "run-adamw-float32.txt"}
    muon_text = texts["run-muon-float32.txt"]
    assert "plain matrices of the shapes of the stacks of the run's group 0 (2 x 16x16, 2 x 32x16)" in muon_text
    assert "== Graph 3: Phase B, rules.muon.update_matrices ==" in muon_text
    assert "the run's finish fills the scalars of every rule (muon, adam) in one graph" in muon_text
    assert "Phase B flat update, group 0" in texts["run-adamw-float32.txt"]


@needs_goldens
def test_a_graph_first_called_at_other_sizes_than_it_was_compiled_at_is_refused():
    # A family shares graphs; a configuration whose calls have other sizes would report the bytes of
    # another configuration's sizes. Same graphs (no compile), tensors of 300 and 40 elements: refused.
    captured()
    ref = graphs.REFERENCES[0]
    setup = graphs.plain_layout(ref.dtype, shapes=[(300,), (40,)])
    with pytest.raises(RuntimeError, match="Give adamw_fp32 a family of its own"):
        graphs.capture(ref, setup=setup)


@needs_goldens
def test_cli_writes_the_goldens(tmp_path, capsys):
    # `python -m compiled_step graphs --out DIR` gives the committed files (graphs are cached by now).
    captured()
    assert graphs.main(["--out", str(tmp_path)]) == 0
    capsys.readouterr()
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert written == rendered()
    if not os.getenv("EXPECTTEST_ACCEPT"):
        assert graphs.main(["--check", "--out", str(GOLDEN_DIR)]) == 0


def test_writing_and_checking_the_dumps_leave_the_folders_readme_alone(tmp_path):
    # graphs/README.md explains the dumps next to them. `python -m compiled_step graphs` writes with prune=True
    # (dump files of configurations that no longer exist are removed) and --check reports files that match no
    # configuration: both must see only dump files, which start with HEADER_MARK; the README does not.
    committed = (GOLDEN_DIR / "README.md").read_text()
    assert not committed.startswith(HEADER_MARK)
    (tmp_path / "README.md").write_text(committed)
    (tmp_path / "gone.txt").write_text(f"{HEADER_MARK}: gone\n")  # a configuration that no longer exists
    rendered = {"kept.txt": f"{HEADER_MARK}: kept\n"}
    graphs.write(rendered, tmp_path, prune=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "kept.txt"]
    assert (tmp_path / "README.md").read_text() == committed
    assert graphs.compare(rendered, tmp_path, complete=True) == []


# ---------------------------------------------------------------------------------------------
# Perturbations: the comparison must catch a changed step (and write nothing)
# ---------------------------------------------------------------------------------------------


def _perturbed(monkeypatch, make_wrapper) -> list[graphs.Mismatch]:
    # The plain SGD layout is one flat update: perturb it (a new function, so Dynamo compiles it anew).
    original = sgd.update_flat
    monkeypatch.setattr(sgd, "update_flat", functools.wraps(original)(make_wrapper(original)))
    before = _golden_snapshot()
    files = graphs.render_references(["sgd_nesterov"])
    mismatches = graphs.compare(files, GOLDEN_DIR, complete=False)
    assert _golden_snapshot() == before  # nothing was written, whatever EXPECTTEST_ACCEPT says
    return mismatches


@needs_goldens
def test_an_extra_kernel_is_reported(monkeypatch):
    def make(original):
        def update(*args, **kwargs):
            original(*args, **kwargs)
            # A reduction over the [S, K] scalar table: another iteration space, so one more kernel.
            # (A reduction over a grad would not do: Inductor fuses it into the update's loop.)
            return inspect.signature(original).bind(*args, **kwargs).arguments["table"].abs().sum()

        return update

    mismatches = _perturbed(monkeypatch, make)
    assert [(m.file, m.kind) for m in mismatches] == [("sgd_nesterov.txt", "changed")]
    diff = mismatches[0].diff
    changed = [line for line in diff.splitlines() if line.startswith(("-", "+"))]
    assert any(line.startswith("+kernels (Inductor's generated_kernel_count)") for line in changed), diff
    assert any(line.startswith("+outputs: f32[]") for line in changed), diff
    assert any("torch.ops.aten.sum" in line for line in changed if line.startswith("+")), diff


@needs_goldens
def test_a_graph_break_is_reported(monkeypatch):
    def make(original):
        def update(*args, **kwargs):
            torch._dynamo.graph_break()
            return original(*args, **kwargs)

        return update

    mismatches = _perturbed(monkeypatch, make)
    assert [(m.file, m.kind) for m in mismatches] == [("sgd_nesterov.txt", "changed")]
    added = [line for line in mismatches[0].diff.splitlines() if line.startswith("+")]
    assert "+graph breaks: 1" in added, mismatches[0].diff
    assert any("graph_break" in line for line in added), mismatches[0].diff


# ---------------------------------------------------------------------------------------------
# Inline pins (EXPECTTEST_ACCEPT=1 rewrites the strings in this file)
# ---------------------------------------------------------------------------------------------


@unittest.skipIf(not APPLIES, SKIP_REASON)
class TestGraphNumbers(expecttest.TestCase):
    def test_reference_adamw_fp32(self):
        # 3 graphs: Phase A over the group's flat grad buffer, the finish, and one flat update over
        # all 7 params (aliased). 32 B/param is the fp32 AdamW floor (read p, g, m, v; write p, m, v;
        # read g once more for the norm); the flat update also reads a row index and the table.
        self.assertExpectedInline(graphs.summary_numbers(captured()["adamw_fp32"]), """graphs=3 (Phase A: 1, finish: 1, Phase B: 1) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2] bytes_per_param=32.02""")

    def test_all_references(self):
        table = "\n".join(f"{name}: {graphs.summary_numbers(cap)}" for name, cap in captured().items())
        self.assertExpectedInline(table, """\
adamw_fp32: graphs=3 (Phase A: 1, finish: 1, Phase B: 1) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2] bytes_per_param=32.02
adamw_bf16: graphs=3 (Phase A: 1, finish: 1, Phase B: 1) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2] bytes_per_param=16.02
adam_amsgrad: graphs=3 (Phase A: 1, finish: 1, Phase B: 1) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2] bytes_per_param=40.02
sgd_nesterov: graphs=3 (Phase A: 1, finish: 1, Phase B: 1) recompiles_step2=0 graph_breaks=0 kernels=[4, 8, 2] bytes_per_param=24.02
adamw_fp32_unclipped: graphs=3 (Phase A: 1, finish: 1, Phase B: 1) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2] bytes_per_param=32.02
fsdp2_shard0: graphs=4 (Phase A: 1, finish: 1, Phase B: 2) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2, 5] bytes_per_param=32.01
tp_replicate_shard: graphs=4 (Phase A: 1, finish: 1, Phase B: 2) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2, 5] bytes_per_param=32.01
ep_experts: graphs=4 (Phase A: 1, finish: 1, Phase B: 2) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 2, 5] bytes_per_param=32.01
fp8_amax: graphs=4 (Phase A: 1, finish: 1, Phase B: 2) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 10, 2] bytes_per_param=32.01
muon_adamw: graphs=5 (Phase A: 1, finish: 1, Phase B: 3) recompiles_step2=0 graph_breaks=0 kernels=[4, 7, 4, 5, 2] bytes_per_param=32.02""")


def _params(n=2):
    return [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n)]


def _message(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    raise AssertionError("no error raised")


class TestErrorMessages(expecttest.TestCase):
    """The text users see for the main mistakes (our messages: no torch-version skip)."""

    def test_unsupported_optimizer(self):
        self.assertExpectedInline(_message(lambda: FusedStep(torch.optim.RMSprop(_params(), lr=1e-2))), """TypeError: FusedStep supports torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Muon, torch.optim.Adafactor and torchao.optim's AdamW8bit, Adam8bit, AdamW4bit, Adam4bit, AdamWFp8, AdamFp8 (exact types); got torch.optim.rmsprop.RMSprop. A subclass may change step(), which FusedStep replaces.""")

    def test_max_grad_norm_zero(self):
        opt = torch.optim.AdamW(_params())
        self.assertExpectedInline(_message(lambda: FusedStep(opt, max_grad_norm=0)), """ValueError: max_grad_norm must be a finite number > 0 or None, got 0""")

    def test_norm_type_zero(self):
        opt = torch.optim.AdamW(_params())
        self.assertExpectedInline(_message(lambda: FusedStep(opt, norm_type=0)), """ValueError: norm_type must be > 0 (1, 2, inf or any finite p > 0), got 0""")

    def test_differentiable(self):
        opt = torch.optim.AdamW(_params(), differentiable=True)
        self.assertExpectedInline(_message(lambda: FusedStep(opt)), """ValueError: AdamW(differentiable=True) is not supported: FusedStep updates params in place under no_grad and cannot build an autograd graph through the optimizer step.""")

    def test_expert_tp_replication_factor_bool(self):
        opt = torch.optim.AdamW(_params())
        self.assertExpectedInline(_message(lambda: FusedStep(opt, expert_tp_replication_factor=True)), """TypeError: expert_tp_replication_factor must be an integer, got bool""")

    def test_sparse_grad(self):
        params = _params()
        fused = FusedStep(torch.optim.AdamW(params), compile=False)
        params[0].grad = torch.randn(4, 4)
        params[1].grad = torch.randn(4, 4).to_sparse()
        self.assertExpectedInline(_message(fused.step), """TypeError: param_groups[0][1]: sparse grads are not supported; FusedStep needs dense grads""")

    def test_grad_shape_mismatch(self):
        params = _params()
        fused = FusedStep(torch.optim.AdamW(params), compile=False)
        for p in params:
            p.grad = torch.randn(4, 4)
        params[1].data = torch.zeros(16)  # the grad setter refuses a wrong shape: change the param instead
        self.assertExpectedInline(_message(fused.step), """ValueError: param_groups[0][1]: grad shape (4, 4) differs from param shape (16,)""")
