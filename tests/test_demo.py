"""Tests of the demo (python -m compiled_step demo), its built-in model and data, and the progress bar.

The end-to-end tests run the demo in-process on the `tiny` preset with a few steps. The reference
everywhere is torch's own `clip_grad_norm_` + `optimizer.step()`; the agreement tolerances are
the demo's LOSS_RTOL / GRAD_NORM_RTOL, whose reasons are stated in compiled_step/cli/demo/config.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
import types

import pytest
import torch

from compiled_step.cli import demo
from compiled_step.cli.demo import config as demo_config
from compiled_step.cli.demo import outputs as demo_outputs
from compiled_step.cli.demo import training as demo_training
from compiled_step.cli.models import PRESETS, MarkovData, build_model, param_groups
from compiled_step.cli.progress import StepProgress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- model ----------------------------------------------------------------------------------------

def test_model_shapes_and_initial_loss():
    model = build_model("tiny", seed=0)
    cfg = model.cfg
    idx = torch.randint(cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    assert logits.dtype == torch.float32
    # Targets independent of the inputs: with a tied head, targets == inputs would be easier
    # than chance even at init (the head scores each input token against its own embedding).
    targets = torch.randint(cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    loss = model(idx, targets)
    assert loss.shape == ()
    # With std-0.02 weights the logits are nearly uniform, so the first loss is close to ln(V):
    # their std is ~0.02 * sqrt(d_model) = 0.16, which adds ~std^2 / 2 = 0.013 nats. 0.1 leaves
    # room for that and flags a broken init (e.g. std 1 gives several nats more).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    # Shorter sequences are fine, longer ones are a clear error.
    assert model(idx[:, :5]).shape == (3, 5, cfg.vocab_size)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.int64))


def test_model_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_model("tiny", seed=7), build_model("tiny", seed=7), build_model("tiny", seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tok_emb.weight"], sc["tok_emb.weight"])


def test_model_is_causal():
    model = build_model("tiny", seed=0)
    cfg = model.cfg
    idx = torch.randint(cfg.vocab_size, (2, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        ref, out = model(idx), model(changed)
    # A later token must not affect earlier positions. Exact equality is not required: the
    # attention kernel may block its reductions differently for the two inputs, so allow
    # fp32 rounding (1e-6 absolute on logits of size ~0.5).
    torch.testing.assert_close(out[:, :-1], ref[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, -1], ref[:, -1])
    # ...while an early token does reach the last position (attention mixes at all).
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % cfg.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(changed)[:, -1], ref[:, -1])


def test_tied_and_untied_heads():
    tiny, small = build_model("tiny"), build_model("small")
    assert PRESETS["tiny"].tie_embeddings and tiny.head.weight is tiny.tok_emb.weight
    assert not PRESETS["small"].tie_embeddings and small.head.weight is not small.tok_emb.weight
    # A tied weight is one parameter: it appears once in the optimizer's groups.
    groups = param_groups(tiny, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(tiny.parameters()))
    # Decay only on matrices that are not embeddings.
    decay_ids = {id(p) for p in groups[0]["params"]}
    for name, p in small.named_parameters():
        in_decay = id(p) in {id(q) for q in param_groups(small, 0.1)[0]["params"]}
        assert in_decay == (p.ndim == 2 and "emb" not in name), name
    assert decay_ids  # tiny has decayed matrices too


def test_small_preset_size():
    # The demo's default must stay small enough for a 2-core CPU (DESIGN: 1-3 M params).
    n = sum(p.numel() for p in build_model("small").parameters())
    assert 1_000_000 <= n <= 3_000_000


def test_model_loss_falls_with_adamw():
    model = build_model("tiny", seed=0)
    data = MarkovData(model.cfg.vocab_size, model.cfg.seq_len, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        x, y = data.batch(16, gen)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # Measured: 4.17 -> ~2.4 after 15 steps with this seed. Requiring a 0.5-nat drop (averaged
    # over the last 3 steps to ignore batch noise) fails for a model that does not learn, e.g.
    # a broken causal mask or detached head, while leaving wide room for platform differences.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_markov_data():
    data = MarkovData(32, 16, seed=3)
    torch.testing.assert_close(data.transition.sum(1), torch.ones(32, dtype=torch.float64))
    x1, y1 = data.batch(8, torch.Generator().manual_seed(5))
    x2, y2 = data.batch(8, torch.Generator().manual_seed(5))
    assert x1.shape == y1.shape == (8, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # same generator seed, same batch
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    assert int(x1.min()) >= 0 and int(y1.max()) < 32
    # Every observed transition is one the chain allows.
    assert bool((data.transition[x1, y1] > 0).all())
    # The chain is a function of its seed.
    assert torch.equal(MarkovData(32, 16, seed=3).transition, data.transition)
    assert not torch.equal(MarkovData(32, 16, seed=4).transition, data.transition)
    # Four successors per token: the entropy rate is at most ln 4, far below ln 32.
    h = data.entropy_rate()
    assert 0 < h <= math.log(4) + 1e-9
    with pytest.raises(ValueError, match="branching"):
        MarkovData(8, 4, branching=9)


# --- progress -------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    """A StringIO that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_progress_shows_compiling_spinner_then_steps():
    buf = _Terminal()
    with StepProgress(3, desc="training", file=buf) as bar:
        assert bar.live  # a terminal: the bar and the spinner
        with bar.first_step("compiling"):
            time.sleep(0.7)  # long enough for the 0.25 s spinner to redraw at least twice
        bar.update(loss=1.5)
        bar.update(loss=1.25)
        bar.update(loss=1.0)
    text = buf.getvalue()
    assert "compiling |" in text and "compiling /" in text  # the spinner advanced
    assert "compiling: done in" in text
    assert "3/3" in text and "loss=1" in text


def test_progress_not_a_terminal_prints_plain_lines():
    """stderr redirected to a file: no bar, no spinner frames, a few whole lines."""
    buf = io.StringIO()  # isatty() is False, like a file or a pipe
    with StepProgress(8, desc="training", file=buf) as bar:
        assert not bar.live
        with bar.first_step("compiling"):
            time.sleep(0.7)  # the live spinner would have redrawn twice by now
        for i in range(8):
            bar.update(loss=2.0 - i / 10)
    text = buf.getvalue()
    assert "\r" not in text
    assert not any(f"compiling {frame}" in text for frame in "|/-\\")
    lines = text.splitlines()
    assert lines[0] == "compiling..."
    assert lines[1].startswith("compiling: done in ")
    # One line per quarter of the run, not one per step.
    assert lines[2:] == ["training: step 2/8 (loss=1.9)", "training: step 4/8 (loss=1.7)",
                         "training: step 6/8 (loss=1.5)", "training: step 8/8 (loss=1.3)"]


def test_progress_live_can_be_forced_either_way():
    assert not StepProgress(1, file=_Terminal(), live=False).live
    buf = io.StringIO()
    with StepProgress(2, desc="training", file=buf, live=True) as bar:
        assert bar.live
        bar.update(loss=1.0)
    assert "\r" in buf.getvalue()  # tqdm redraws in place


def test_progress_disabled_is_silent():
    buf = io.StringIO()
    with StepProgress(2, file=buf, enabled=False) as bar:
        with bar.first_step():
            pass
        bar.update(loss=1.0)
        bar.write("hello")
    assert buf.getvalue() == ""


# --- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--max-grad-norm", "0"], "--no-clip"),
        (["--norm-type", "0"], "--norm-type"),
        (["--batch-size", "0"], "--batch-size"),
        (["--momentum", "1"], "--momentum"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--fsdp", "-2"], "--fsdp"),
        (["--device", "tpu"], "--device"),
        (["--device", "not a device"], "--device"),
    ],
)
def test_bad_options_raise_value_error(argv, message):
    with pytest.raises(ValueError, match=message):
        demo.parse_args(argv)


def test_bad_option_cli_exit_code(capsys):
    assert demo.main(["--steps", "-3"]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_device_cuda_without_cuda_is_a_clear_error(capsys, tmp_path):
    assert demo.main(["--device", "cuda", "--model", "tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert "--device cuda was requested but CUDA is not available" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists()


def test_device_cuda_resolves_to_an_indexed_device(monkeypatch):
    """`--device cuda` (and the default on a GPU machine) must give torch.cuda.set_device an index.

    torch.cuda.set_device(torch.device("cuda")) raises ValueError; the CUDA calls are faked here (no
    GPU on the test machines), only the device arithmetic is under test.
    """
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert demo_training._resolve_device(demo.DemoConfig(device="cuda")) == torch.device("cuda", 1)
    assert demo_training._resolve_device(demo.DemoConfig()) == torch.device("cuda", 1)  # default: cuda if available
    assert demo_training._resolve_device(demo.DemoConfig(device="cuda:0")) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert demo_training._resolve_device(demo.DemoConfig(device="cuda", fsdp=2)) == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", i) for i in (1, 1, 0, 1)]
    with pytest.raises(ValueError, match="2 CUDA device"):
        demo.DemoConfig(device="cuda:2")


def test_fsdp_without_torchrun_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert demo.main(["--fsdp", "2", "--model", "tiny", "--no-compile", "--no-progress"]) == 2
    assert "torchrun --nproc_per_node 2" in capsys.readouterr().err


def test_option_defaults_and_clip_switches():
    cfg = demo.parse_args([])
    assert (cfg.steps, cfg.model, cfg.optimizer, cfg.max_grad_norm, cfg.compile) == (40, "small", "adamw", 1.0, True)
    assert cfg.out_dir.as_posix() == "runs/demo-small-adamw-compiled-seed0"
    assert demo.parse_args([]).overwrite is False and demo.parse_args(["--overwrite"]).overwrite is True
    assert not demo.parse_args(["--no-clip"]).clipping
    assert not demo.parse_args(["--max-grad-norm", "inf"]).clipping
    assert demo.parse_args(["--norm-type", "inf"]).norm_type == math.inf
    assert demo.parse_args(["--optimizer", "sgd"]).resolved_lr == demo_config._DEFAULT_LR["sgd"]
    with pytest.raises(SystemExit):  # argparse: --no-clip and --max-grad-norm are exclusive
        demo.parse_args(["--no-clip", "--max-grad-norm", "2"])


# --- plot -----------------------------------------------------------------------------------------------

def test_every_panel_of_curves_has_axis_labels():
    metrics = [demo_config.StepMetrics(step=i, loss_eager=3.0 - i / 10, loss_fused=3.0 - i / 10 + 1e-7 * i,
                                grad_norm_eager=2.0, grad_norm_fused=2.0 + 1e-6 * i, opt_s_eager=1e-3,
                                opt_s_fused=1e-3, iter_s_eager=1e-2, iter_s_fused=1e-2) for i in range(4)]
    result = demo.DemoResult(config=demo.DemoConfig(model="tiny"), metrics=metrics, n_params=1, loss_floor=1.0,
                             device="cpu", world_size=1)
    fig = demo_outputs.curves_figure(result)
    try:
        panels = fig.axes
        assert len(panels) == 3
        for ax in panels:
            assert ax.get_xlabel() == "step"
            assert ax.get_ylabel(), ax.get_title()
        assert "2-norm" in panels[1].get_ylabel()  # the middle panel: the grad norm, with its p
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


# --- graphs hook ------------------------------------------------------------------------------------

def test_dump_graphs_reports_missing_module(monkeypatch):
    # None in sys.modules makes the import fail with ModuleNotFoundError, as if the graphs module were absent.
    monkeypatch.setitem(sys.modules, "compiled_step.cli.graphs", None)
    lines = []
    assert demo_outputs.dump_graphs("unused", object(), log=lines.append) is None
    assert len(lines) == 1 and "NOT written" in lines[0] and "compiled_step.cli.graphs" in lines[0]


def test_dump_graphs_reports_missing_function_and_calls_it(monkeypatch, tmp_path):
    fake = types.ModuleType("compiled_step.cli.graphs")
    monkeypatch.setitem(sys.modules, "compiled_step.cli.graphs", fake)
    lines = []
    assert demo_outputs.dump_graphs(tmp_path, object(), log=lines.append) is None
    assert "no dump_run_graphs" in lines[0]
    calls = []
    def fake_dump(out_dir, fused):
        calls.append((out_dir, fused))
        return [out_dir / "graphs" / "a.txt"]

    fake.dump_run_graphs = fake_dump
    sentinel = object()
    assert demo_outputs.dump_graphs(tmp_path, sentinel, log=lines.append) == [tmp_path / "graphs" / "a.txt"]
    assert calls == [(tmp_path, sentinel)]


# --- end to end -------------------------------------------------------------------------------------

def _check_outputs(out_dir, steps):
    png = out_dir / "curves.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000  # three panels with curves, not an empty canvas
    with (out_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(steps))
    summary = json.loads((out_dir / "summary.json").read_text())
    s = summary["summary"]
    # Same init, same batch, no update yet: the first losses are bit-identical.
    assert float(rows[0]["loss_eager"]) == float(rows[0]["loss_fused"])
    # Recompute the agreement from the CSV rather than trusting the summary's own verdict.
    for r in rows:
        le, lf = float(r["loss_eager"]), float(r["loss_fused"])
        ge, gf = float(r["grad_norm_eager"]), float(r["grad_norm_fused"])
        assert abs(lf - le) <= demo.LOSS_RTOL * abs(le), r
        assert abs(gf - ge) <= demo.GRAD_NORM_RTOL * abs(ge), r
    assert s["agree"] is True
    assert s["final_loss_fused"] < s["first_loss"]  # it trained
    return rows, summary


def _check_graphs(out_dir, printed):
    """Graphs are written when compiled_step.cli.graphs.dump_run_graphs exists, else a line says so."""
    import importlib

    try:
        available = hasattr(importlib.import_module("compiled_step.cli.graphs"), "dump_run_graphs")
    except ModuleNotFoundError:
        available = False
    if available:
        files = [p for p in (out_dir / "graphs").rglob("*") if p.is_file()]
        assert files and all(p.stat().st_size > 0 for p in files)
        assert f"graphs: {len(files)} file(s)" in printed
    else:
        assert "graphs: NOT written" in printed


def test_demo_end_to_end_no_compile(tmp_path, capsys):
    out = tmp_path / "run"
    rc = demo.main(["--model", "tiny", "--steps", "6", "--no-compile", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows, summary = _check_outputs(out, 6)
    assert "AGREE" in printed and f"output: {out}/" in printed
    _check_graphs(out, printed)
    assert summary["config"]["compile"] is False
    # It says where it ran and what it timed.
    assert "device=cpu (" in printed and "timed           on cpu: wall clock of clip_grad_norm_" in printed
    assert summary["device"] == "cpu" and summary["device_name"] and "wall clock" in summary["timed"]


def test_demo_refuses_to_overwrite_a_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--steps", "2", "--no-compile", "--no-progress", "--out", str(out)]
    assert demo.main(argv) == 0
    capsys.readouterr()
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert set(first) >= {"metrics.csv", "summary.json", "curves.png"}

    # The same command again: refused before any training, nothing touched.
    assert demo.main(argv) == 2
    captured = capsys.readouterr()
    assert "demo: " not in captured.out  # it did not start
    assert len(captured.err.strip().splitlines()) == 1
    assert f"{out}/ is not empty" in captured.err and "--overwrite" in captured.err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first

    # --overwrite replaces the demo's files (a stale graph file goes) and leaves other files alone.
    (out / "notes.txt").write_text("mine")
    (out / "graphs").mkdir(exist_ok=True)
    (out / "graphs" / "stale.txt").write_text("from an older run")
    assert demo.main([*argv, "--overwrite", "--seed", "1"]) == 0
    capsys.readouterr()
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "graphs" / "stale.txt").exists()
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1
    _check_outputs(out, 2)


def test_demo_progress_with_stderr_redirected_has_no_spinner(tmp_path, capsys):
    """Under capsys, stderr is not a terminal, as when it is redirected to a file: no bar, no frames."""
    out = tmp_path / "run"
    assert demo.main(["--model", "tiny", "--steps", "4", "--no-compile", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "step/s" not in err
    assert not any(f"first step {frame}" in err for frame in "|/-\\")
    # The progress lines (other lines, e.g. warnings, may come in between).
    lines = [line for line in err.splitlines() if line.startswith(("first step", "training"))]
    assert lines[0] == "first step..." and lines[1].startswith("first step: done in ")
    assert [line.split(" (")[0] for line in lines[2:]] == [f"training: step {i}/4" for i in range(1, 5)]


@pytest.mark.parametrize("extra", [["--optimizer", "sgd", "--no-clip"], ["--optimizer", "adam", "--norm-type", "inf"]])
def test_demo_other_optimizers_no_compile(tmp_path, capsys, extra):
    out = tmp_path / "run"
    rc = demo.main(["--model", "tiny", "--steps", "4", "--no-compile", "--no-progress", "--out", str(out), *extra])
    assert rc == 0, capsys.readouterr().out
    _check_outputs(out, 4)


def test_demo_end_to_end_compiled(tmp_path, capsys):
    # The one compiled run: tiny model, 3 steps. FusedStep compiles two graphs (norm, update),
    # independent of the model size, which is what this run pays for.
    out = tmp_path / "run"
    rc = demo.main(["--model", "tiny", "--steps", "3", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    _, summary = _check_outputs(out, 3)
    _check_graphs(out, printed)
    assert summary["config"]["compile"] is True
    assert summary["summary"]["median_opt_ratio_eager_over_fused"] > 0


def test_demo_detects_a_wrong_update(tmp_path, monkeypatch, capsys):
    """Negative control: the tolerance is tight enough to catch a small real bug.

    The fused copy's learning rate is raised by 2%, a plausible bug (e.g. a stale or mis-scaled
    hyperparameter). Measured: its loss is 3e-3 away from the reference's after 10 steps, 3x the
    tolerance (1% would give 1.6e-3, too close to the bound for a robust test). The demo must
    say DISAGREE and exit with 1.
    """
    real = demo_training._make_fused_step

    def wrong_lr(optimizer, cfg, **kw):
        for g in optimizer.param_groups:
            g["lr"] *= 1.02
        return real(optimizer, cfg, **kw)

    monkeypatch.setattr(demo_training, "_make_fused_step", wrong_lr)
    out = tmp_path / "run"
    rc = demo.main(["--model", "tiny", "--steps", "10", "--no-compile", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    assert "DISAGREE" in printed
    assert json.loads((out / "summary.json").read_text())["summary"]["agree"] is False


def test_demo_fsdp_single_process(tmp_path, capsys):
    """--fsdp 1 runs without torchrun: a one-rank gloo group, FSDP2-sharded (DTensor) params."""
    import torch.distributed as dist

    out = tmp_path / "run"
    rc = demo.main(["--model", "tiny", "--steps", "4", "--no-compile", "--no-progress", "--fsdp", "1",
                    "--out", str(out)])
    printed = capsys.readouterr().out
    assert not dist.is_initialized()  # the demo tears down the group it created
    assert rc == 0, printed
    _check_outputs(out, 4)


def test_demo_fsdp_two_ranks_under_torchrun(tmp_path):
    """The documented multi-process command: torchrun --nproc_per_node 2 -m compiled_step demo --fsdp 2.

    Real processes on gloo; each rank draws its own batches, rank 0 reports and writes.
    """
    import os
    import subprocess
    from pathlib import Path

    import compiled_step

    repo_root = Path(compiled_step.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "compiled_step", "demo", "--fsdp", "2", "--model", "tiny", "--steps", "3", "--no-compile",
           "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("summary:") == 1  # rank 0 only
    assert "FSDP x2" in proc.stdout and "AGREE" in proc.stdout
    _, summary = _check_outputs(out, 3)
    assert summary["world_size"] == 2
