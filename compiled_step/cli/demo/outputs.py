"""What a run writes into its output folder: metrics.csv, summary.json, curves.png and the run's graphs;
and the folder's check (no previous run without ``--overwrite``) and clean-up."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compiled_step.cli.demo.config import (
    GRAD_NORM_RTOL,
    LOSS_RTOL,
    DemoConfig,
    DemoOptionError,
    DemoResult,
    StepMetrics,
)
from compiled_step.cli.demo.summary import rel_diff, timing_note
from compiled_step.cli.models import PRESETS


def write_metrics(result: DemoResult, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "metrics.csv"
    names = list(StepMetrics.__dataclass_fields__)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for m in result.metrics:
            writer.writerow(asdict(m))
    json_path = out_dir / "summary.json"
    cfg = asdict(result.config)
    cfg["out"] = str(result.config.out_dir)
    cfg["lr"] = result.config.resolved_lr
    cfg["weight_decay"] = result.config.resolved_weight_decay
    payload = {
        "config": cfg,
        "model": asdict(PRESETS[result.config.model]) | {"n_params": result.n_params},
        "device": result.device,
        "device_name": result.device_name,
        "timed": timing_note(torch.device(result.device)),
        "world_size": result.world_size,
        "torch": torch.__version__,
        "summary": result.summary,
    }
    # allow_nan: inf shows up legitimately (norm_type=inf); json writes it as Infinity.
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    return csv_path, json_path


def plot_metrics(result: DemoResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = curves_figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves_figure(result: DemoResult) -> Any:
    """The three panels of curves.png (loss, grad norm, relative differences) as a matplotlib Figure."""
    # Lazy and headless: importing the demo must not import matplotlib, and Agg needs no display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result.metrics
    steps = [m.step for m in ms]
    fig, (ax_loss, ax_gn, ax_rel) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(steps, [m.loss_eager for m in ms], label="eager clip_grad_norm_ + step", lw=2.5, alpha=0.6)
    ax_loss.plot(steps, [m.loss_fused for m in ms], label="FusedStep", lw=1.2, ls="--")
    ax_loss.axhline(result.loss_floor, color="grey", lw=0.8, ls=":", label="loss floor (entropy rate)")
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax_loss.legend()

    ax_gn.plot(steps, [m.grad_norm_eager for m in ms], label="eager", lw=2.5, alpha=0.6)
    ax_gn.plot(steps, [m.grad_norm_fused for m in ms], label="FusedStep", lw=1.2, ls="--")
    if result.config.clipping:
        ax_gn.axhline(result.config.max_grad_norm, color="grey", lw=0.8, ls=":", label="max_grad_norm")
    ax_gn.set(title=f"grad norm before clipping (p={result.config.norm_type:g})", xlabel="step",
              ylabel=f"total {result.config.norm_type:g}-norm of all grads")
    ax_gn.legend()

    # Relative differences on a log axis; exact zeros (step 0's loss) are drawn at a floor so
    # the log scale can show them.
    tiny = 1e-12
    ax_rel.semilogy(steps, [max(rel_diff(m.loss_fused, m.loss_eager), tiny) for m in ms], label="loss")
    ax_rel.semilogy(steps, [max(rel_diff(m.grad_norm_fused, m.grad_norm_eager), tiny) for m in ms], label="grad norm")
    ax_rel.axhline(LOSS_RTOL, color="C0", lw=0.8, ls=":", label="loss tolerance")
    ax_rel.axhline(GRAD_NORM_RTOL, color="C1", lw=0.8, ls=":", label="grad-norm tolerance")
    ax_rel.set(title="|fused - eager| / |eager|  (exact 0 drawn at 1e-12)", xlabel="step",
               ylabel="relative difference")
    ax_rel.legend()
    fig.suptitle(f"compiled_step demo: {result.config.run_name} on {result.device}")
    fig.tight_layout()
    return fig


def dump_graphs(out_dir: Path, fused: Any, log: Callable[[str], None] = print) -> list | None:
    """Write the run's compiled graphs with compiled_step.cli.graphs.dump_run_graphs, if it exists.

    Returns what dump_run_graphs returns (the paths it wrote), or None when it is not available.
    A missing graphs module or function is reported in a printed line (never skipped silently);
    an error inside dump_run_graphs propagates.
    """
    import importlib

    try:
        # import_module, not `from compiled_step.cli import graphs`: only the former raises a
        # ModuleNotFoundError that names the missing module, which separates "the graphs module is
        # not there" from "it is there but broken".
        graphs = importlib.import_module("compiled_step.cli.graphs")
    except ModuleNotFoundError as e:
        if e.name != "compiled_step.cli.graphs":
            raise  # the graphs module exists but one of its own imports is missing: that is a real error
        log("graphs: NOT written: compiled_step.cli.graphs is not in this checkout")
        return None
    dump = getattr(graphs, "dump_run_graphs", None)
    if dump is None:
        log("graphs: NOT written: compiled_step.cli.graphs has no dump_run_graphs(out_dir, fused) yet")
        return None
    written = dump(out_dir, fused)
    return list(written) if written is not None else []


# What a run writes into its folder: these files, and dump_run_graphs' files under graphs/.
OUTPUT_FILES = ("metrics.csv", "summary.json", "curves.png")
GRAPHS_DIR = "graphs"


def check_out_dir(cfg: DemoConfig) -> None:
    """Refuse (DemoOptionError) an output folder that is not empty, unless cfg.overwrite.

    Checked before training, on every rank, so a second run of the same command stops at once
    instead of replacing the first run's results after minutes of work.
    """
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise DemoOptionError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise DemoOptionError(
            f"{out}/ is not empty (a previous run?); pass --overwrite to replace the demo's files there, "
            "or --out to write somewhere else"
        )


def clear_previous_outputs(out_dir: Path) -> None:
    """Remove a previous run's files (OUTPUT_FILES and graphs/), so none of them survives stale."""
    import shutil

    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / GRAPHS_DIR).is_dir():
        shutil.rmtree(out_dir / GRAPHS_DIR)
