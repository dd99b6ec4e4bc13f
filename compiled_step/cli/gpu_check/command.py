"""``gpu-check``: run the stages (``stages.py``) inside a time budget and write the figures (``report.py``)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from compiled_step.cli.gpu_check import report
from compiled_step.cli.gpu_check.stages import Stage, child_env, plan, source_root

DEFAULT_BUDGET_S = 340  # under 6 minutes with start-up and the report
MIN_STAGE_S = 15  # a stage with less time left than this is not started


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compiled_step gpu-check",
                                     description="The GPU acceptance run: CUDA tests (combo kernels on and off), "
                                                 "sync-debug steps of every rule, offload under a memory check, "
                                                 "the bench's CUDA rows. Figures go to OUT/gpu_acceptance.json and "
                                                 ".md. Without a CUDA device: lists the stages and exits 0.")
    parser.add_argument("--out", default="gpu_check_out", help="output directory (default gpu_check_out/)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"total seconds for all stages (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--list", action="store_true", help="list the stages and exit, even with a GPU")
    return parser


def run_stage(stage: Stage, timeout_s: float, log: Path, root: Path) -> tuple[str, int | None, float]:
    """Run one stage in its own process group (a test's child processes too); kill the group at the timeout."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(stage.argv, cwd=root, env=child_env(stage, root), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "timeout", None, time.perf_counter() - start
    return ("passed" if rc == 0 else "failed"), rc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.budget <= 0:
        print("--budget must be positive", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    root = source_root()
    stages, notes = plan(out, root)
    has_gpu = torch.cuda.is_available()
    doc = report.new_report(has_gpu, args.budget, notes)
    if not has_gpu or args.list:
        print("no CUDA device: nothing run." if not has_gpu else "--list: nothing run.")
        print(f"With one, this would run (total budget {args.budget:.0f} s, from {root}):")
        for stage in stages:
            env = " ".join(f"{k}={v}" for k, v in stage.env.items())
            print(f"  {stage.name:<20} timeout {stage.timeout_s:>3} s  {stage.what}")
            print(f"  {'':<20} {env + ' ' if env else ''}{' '.join(stage.argv)}")
            doc["stages"].append(report.stage_entry(stage, "not run", None, 0.0, None))
        for note in notes:
            print(f"  note: {note}")
        report.write(out, doc)
        print(f"Wrote {out / 'gpu_acceptance.json'} and {out / 'gpu_acceptance.md'}")
        return 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for stage in stages:
        left = args.budget - (time.perf_counter() - start)
        if left < MIN_STAGE_S:
            doc["stages"].append(report.stage_entry(stage, "not run (budget spent)", None, 0.0, None))
            continue
        for stale in (stage.outcomes, stage.results):  # from an earlier run into the same --out
            if stale is not None and stale.exists():
                stale.unlink()
        log = out / "logs" / f"{stage.name}.log"
        print(f"[gpu-check] {stage.name}: {stage.what} (timeout {min(stage.timeout_s, left):.0f} s)", flush=True)
        status, rc, seconds = run_stage(stage, min(stage.timeout_s, left), log, root)
        entry = report.stage_entry(stage, status, rc, seconds, log)
        doc["stages"].append(entry)
        print(f"[gpu-check] {stage.name}: {status} in {seconds:.0f} s {report.one_line(entry)}", flush=True)
    doc["total_s"] = round(time.perf_counter() - start, 1)
    report.write(out, doc)
    print(f"Wrote {out / 'gpu_acceptance.json'} and {out / 'gpu_acceptance.md'}")
    return 0 if all(s["status"] == "passed" for s in doc["stages"]) else 1
