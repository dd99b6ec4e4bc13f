"""``python -m compiled_step demo``: the options, then the run, the summary and the outputs; the exit status
says whether FusedStep agreed with the reference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compiled_step.cli.demo.config import _DEFAULT_LR, _OPTIMIZERS, DemoConfig, DemoOptionError
from compiled_step.cli.demo.outputs import (
    check_out_dir,
    clear_previous_outputs,
    dump_graphs,
    plot_metrics,
    write_metrics,
)
from compiled_step.cli.demo.summary import format_summary
from compiled_step.cli.demo.training import run
from compiled_step.cli.extras import MissingExtraError, require_cli_extra
from compiled_step.cli.models import PRESETS
from compiled_step.cli.progress import is_terminal


def _cli_modules(cfg: DemoConfig) -> list[str]:
    """The cli extra's modules this run imports: matplotlib for the plot, tqdm for a bar on a terminal."""
    return ["matplotlib"] + (["tqdm"] if cfg.progress and is_terminal(sys.stderr) else [])


def _float_or_inf(text: str) -> float:
    try:
        return float(text)  # float() already accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compiled_step demo",
        description="Train the built-in transformer LM twice from the same init and the same batches: "
        "with clip_grad_norm_ + optimizer.step() and with FusedStep; compare and time them.",
    )
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--model", choices=sorted(PRESETS), default="small",
                   help="model preset: tiny (~0.1 M params) or small (~1.9 M, default)")
    p.add_argument("--optimizer", choices=_OPTIMIZERS, default="adamw", help="default adamw")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in _DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on matrices (default: adamw 0.1, adam/sgd 0)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    clip = p.add_mutually_exclusive_group()
    clip.add_argument("--max-grad-norm", type=_float_or_inf, default=1.0,
                      help="clip the total grad norm to this (default 1.0; 'inf' disables clipping)")
    clip.add_argument("--no-clip", action="store_true",
                      help="disable clipping (the grad norm is still computed and compared)")
    p.add_argument("--norm-type", type=_float_or_inf, default=2.0, help="p of the grad p-norm (default 2; 'inf')")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step per rank (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the data (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/demo-<model>-<optimizer>-<compiled|eager>-seed<seed>); "
                   "it must not hold a previous run unless --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo's files (metrics.csv, summary.json, curves.png, graphs/) in an output "
                   "folder that already holds a run; other files there are left alone")
    p.add_argument("--no-compile", action="store_true", help="run FusedStep eagerly (no torch.compile)")
    p.add_argument("--fsdp", type=int, default=0, metavar="N",
                   help="shard both copies with FSDP2 over N ranks; run under "
                   "`torchrun --nproc_per_node N -m compiled_step demo --fsdp N`")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output at all (without it: a bar on a terminal, a few plain lines otherwise)")
    return p


def parse_args(argv: list[str]) -> DemoConfig:
    """Parse the command line into a validated DemoConfig. Bad values raise ValueError."""
    a = build_parser().parse_args(argv)
    return DemoConfig(
        steps=a.steps, model=a.model, optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
        momentum=a.momentum, max_grad_norm=None if a.no_clip else a.max_grad_norm, norm_type=a.norm_type,
        batch_size=a.batch_size, seed=a.seed, out=a.out, compile=not a.no_compile, fsdp=a.fsdp,
        device=a.device, progress=not a.no_progress, overwrite=a.overwrite,
    )


def main(argv: list[str]) -> int:
    """Run the demo. Returns 0 if FusedStep agreed with the reference, 1 if not, 2 on bad options,
    an output folder that holds a previous run (without --overwrite) or a missing cli extra."""
    try:
        cfg = parse_args(argv)
        require_cli_extra("the demo", _cli_modules(cfg))
        check_out_dir(cfg)
        result = run(cfg)
    except (DemoOptionError, MissingExtraError) as e:
        # Only the demo's own option errors become a one-line message; any other exception
        # (including a ValueError from inside FusedStep) keeps its traceback.
        print(f"python -m compiled_step demo: error: {e}", file=sys.stderr)
        return 2
    if result is None:  # not rank 0: rank 0 reports
        return 0
    out_dir = cfg.out_dir
    if cfg.overwrite:
        clear_previous_outputs(out_dir)
    print(format_summary(result))
    csv_path, json_path = write_metrics(result, out_dir)
    png_path = plot_metrics(result, out_dir / "curves.png")
    print(f"output: {out_dir}/ ({csv_path.name}, {json_path.name}, {png_path.name})")
    print("graphs: writing the run's graphs (dump_run_graphs re-captures them on synthetic tensors)...",
          flush=True)
    written = dump_graphs(out_dir, result.fused_step)
    if written is not None:
        names = ", ".join(sorted(str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p)
                                 for p in written))
        print(f"graphs: {len(written)} file(s) in {out_dir}/: {names}")
    return 0 if result.agree else 1
