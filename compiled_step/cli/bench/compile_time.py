"""Compile time of the first ``fused.step()``, cold and warm, each in a fresh subprocess (fresh Dynamo):
cold with an empty Inductor cache directory, warm with the same directory again."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from compiled_step.cli import PACKAGE_PARENT
from compiled_step.cli import layouts as L
from compiled_step.cli.bench.measure import sync, unique_graphs
from compiled_step.cli.bench.methods import MAX_GRAD_NORM, WEIGHT_DECAY, load_fused_step, make_optimizer

DEFAULT_COMPILE_SIZES = (16, 64, 256, 1024)


@dataclass
class CompileResult:
    n_tensors: int
    cold_s: float | None = None
    warm_s: float | None = None
    steady_ms: float | None = None  # third step, for scale: first step minus this is ~compile
    graphs_cold: int | None = None
    graphs_warm: int | None = None
    second_step_graphs: int | None = None  # graphs compiled by the 2nd step: a recompile shows here
    compiled: bool = True
    error: str | None = None


_CHILD_CODE = ("import sys; from compiled_step.cli.bench.compile_time import _compile_child_main as m; "
               "sys.exit(m(sys.argv[1:]))")


def _compile_child_main(argv: list[str]) -> int:
    """Runs in a fresh interpreter: build N tensors, time the first fused.step(). Prints one JSON line."""
    p = argparse.ArgumentParser(prog="compiled_step.cli.bench child")
    p.add_argument("--n-tensors", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bucket-size", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    FusedStep = load_fused_step()
    layout = L.n_tensor_layout(a.n_tensors)
    params = L.make_params(layout, device=device)
    for prm, g in zip(params, L.make_grads(layout, device=device)):
        prm.grad = g
    opt = make_optimizer("adamw", L.param_groups(layout, params, weight_decay=WEIGHT_DECAY))
    kwargs = dict(max_grad_norm=MAX_GRAD_NORM, norm_type=2.0, compile=not a.no_compile)
    if a.bucket_size is not None:
        kwargs["bucket_size"] = a.bucket_size
    fused = FusedStep(opt, **kwargs)
    step_times, graphs = [], []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        fused.step()
        sync(device)
        step_times.append(time.perf_counter() - t0)
        graphs.append(unique_graphs())
    print(json.dumps({"first_s": step_times[0], "steady_s": step_times[2], "graphs": graphs[0],
                      "second_step_graphs": graphs[1] - graphs[0]}))
    return 0


def _run_child(n: int, cache_dir: str, args, timeout: float) -> dict:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    # The child imports compiled_step from wherever this process did, installed or not.
    pkg_root = str(PACKAGE_PARENT)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", _CHILD_CODE, "--n-tensors", str(n), "--device", args.device]
    if args.fused_bucket_sizes[0] is not None:
        cmd += ["--bucket-size", str(args.fused_bucket_sizes[0])]
    if args.no_compile:
        cmd.append("--no-compile")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"child exited {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def measure_compile_times(sizes, args, log) -> list[CompileResult]:
    results = []
    for n in sizes:
        res = CompileResult(n_tensors=n, compiled=not args.no_compile)
        with tempfile.TemporaryDirectory(prefix="compiled_step_inductor_") as cache_dir:
            try:
                cold = _run_child(n, cache_dir, args, args.compile_timeout)
                res.cold_s, res.graphs_cold = cold["first_s"], cold["graphs"]
                res.steady_ms, res.second_step_graphs = cold["steady_s"] * 1e3, cold["second_step_graphs"]
                warm = _run_child(n, cache_dir, args, args.compile_timeout)
                res.warm_s, res.graphs_warm = warm["first_s"], warm["graphs"]
            except subprocess.TimeoutExpired:
                res.error = f"timed out after {args.compile_timeout:.0f}s"
            except (RuntimeError, ValueError, KeyError) as exc:
                res.error = str(exc)
        log(f"[compile] {n:5d} tensors: cold {_fmt_s(res.cold_s)}  warm {_fmt_s(res.warm_s)}"
            + (f"  ({res.error})" if res.error else ""))
        results.append(res)
    return results


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"
