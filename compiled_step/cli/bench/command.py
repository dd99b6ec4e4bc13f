"""``python -m compiled_step bench``: options, then every row, the compile times, the goals, and the
outputs written (see the package docstring for what is measured and how)."""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench.compile_time import measure_compile_times
from compiled_step.cli.bench.fsdp import single_process_group
from compiled_step.cli.bench import step_memory
from compiled_step.cli.bench.goals import NO_VERDICT, evaluate_goals
from compiled_step.cli.bench.machine import machine_info, wait_idle
from compiled_step.cli.bench.measure import (
    CacheFlusher,
    Triad,
    num_threads,
    quiet_profiler,
    row_inductor_cache,
    sync,
)
from compiled_step.cli.bench.methods import BenchError, build_method, restore_grads
from compiled_step.cli.bench.options import build_parser, resolve, row_specs
from compiled_step.cli.bench.report import OUTPUT_FILES, fmt_load, markdown_tables, with_section, write_outputs
from compiled_step.cli.bench.rows import RowResult, RowSpec, run_row
from compiled_step.cli.extras import MissingExtraError, require_cli_extra

__all__ = ["main"]

STEP_MEMORY_COUNT = 8  # matrices (and vectors) of the step-memory cases


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.low_precision and args.cpu_adam:
            raise BenchError("--low-precision and --cpu-adam are separate runs: pass one")
        if args.low_precision:
            return _run_low_precision(args, argv)
        if args.cpu_adam:
            return _run_cpu_adam(args, argv)
        resolve(args)
        # bench.png needs matplotlib (the cli extra): say so now, not after the whole run.
        require_cli_extra("the bench", ["matplotlib"])
        return _run(args, argv)
    except (BenchError, MissingExtraError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


def _run_low_precision(args, argv: list[str]) -> int:
    from compiled_step.cli.bench import low_precision  # noqa: PLC0415 -- this mode only

    return _run_mode(args, argv, "low-precision", "Low-precision optimizer state", "low_precision.md",
                     lambda threads: low_precision.run(threads, args.rounds or 11, _log))


def _run_cpu_adam(args, argv: list[str]) -> int:
    from compiled_step.cli.bench import cpu_adam  # noqa: PLC0415 -- this mode only

    return _run_mode(args, argv, "cpu-adam", "CPU AdamW against DeepSpeedCPUAdam", "cpu_adam.md",
                     lambda threads: cpu_adam.run(threads, args.rounds or 15, _log))


def _run_mode(args, argv: list[str], name: str, title: str, filename: str, run) -> int:
    """One of the bench's own CPU modes (``--low-precision``, ``--cpu-adam``): its table to ``--out``/``filename``
    and, with ``--write-benchmarks-md``, to its own section of BENCHMARKS.md (``report.SECTIONS``)."""
    value = getattr(args, name.replace("-", "_"))
    try:
        threads = [int(t) for t in value.split(",")]
    except ValueError:
        raise BenchError(f"--{name} takes thread counts like 1,2; got {value!r}") from None
    if args.device != "cpu":
        raise BenchError(f"--{name} measures the CPU step (--device cpu)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(torch.device("cpu"))
    _log(f"bench --{name}: torch {machine['torch']}, threads {threads}")
    table = run(threads)
    header = (f"_{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, torch {machine['torch']}, "
              f"{machine['device_name']}, compiled_step {machine['source']}; 1-minute load average "
              f"{fmt_load(machine['load_average_at_start'])} at the start; command: `{_command(argv)}`_\n\n")
    (out / filename).write_text(header + table)
    if args.write_benchmarks_md:
        path = Path(args.write_benchmarks_md)
        path.write_text(with_section(path.read_text() if path.exists() else "# Benchmarks\n",
                                     f"## {title}\n\n" + header + table, name))
        _log(f"bench: wrote the {name} section of {path.resolve()}")
    _log("\n" + table)
    return 0


def _log(msg: str) -> None:
    print(msg, flush=True)


def _run(args, argv: list[str]) -> int:
    device = args.device_obj
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _log

    outputs = ", ".join(OUTPUT_FILES) + (f"; also {args.write_benchmarks_md}" if args.write_benchmarks_md else "")
    log(f"bench: outputs go to {out.resolve()}/ ({outputs})")

    if args.wait_idle > 0:
        wait_idle(args.wait_idle, log)
    # Started after any --wait-idle: the reported duration is the benchmark's own.
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    machine = machine_info(device)
    log(f"bench on {machine['device']} ({machine['device_name']}), torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, 1-min load average {fmt_load(machine['load_average_at_start'])}")
    rows = _run_rows(args, machine, log)

    compile_results = measure_compile_times(args.compile_sizes_list, args, log) if args.compile_sizes_list else []
    memory = (step_memory.measure_step_memory(step_memory.OPTIMIZERS, size=args.step_memory_size,
                                              count=STEP_MEMORY_COUNT, device=args.device,
                                              compile_fused=not args.no_compile, log=log)
              if args.step_memory_size else [])
    machine["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine["inductor_cache"] = ("a fresh empty cache directory per row" if args.inductor_cache == "fresh"
                                 else "the process's default cache directory")
    goals = evaluate_goals(rows, compile_results, device, args.fused_name, args.headline_min_params,
                           verdicts=not args.quick)
    if memory:
        memory_goal = step_memory.goal(memory)
        if args.quick and memory_goal.status in ("met", "gap"):
            memory_goal.status = NO_VERDICT
        goals.append(memory_goal)
    tables = markdown_tables(rows, compile_results, goals, machine, compiled=not args.no_compile, quick=args.quick)
    tables += step_memory.markdown_table(memory)
    if args.notes:
        tables += "\n" + "\n".join(f"_{n}_" for n in args.notes) + "\n"
    duration = time.perf_counter() - t_start

    write_outputs(out, command=_command(argv), machine=machine, started=started, duration_s=duration, tables=tables,
                  rows=rows, compile_results=compile_results, goals=goals, device=device,
                  compiled=not args.no_compile, benchmarks_md_path=args.write_benchmarks_md, step_memory=memory)
    log("\n" + tables)
    log(f"bench: wrote {out.resolve()}/ ({', '.join(OUTPUT_FILES)}) in {duration:.0f}s"
        + (f"; and {Path(args.write_benchmarks_md).resolve()}" if args.write_benchmarks_md else ""))
    return 0


def _run_rows(args, machine: dict, log: Callable[[str], None]) -> list[RowResult]:
    """Every row, each in its own Inductor cache (unless --inductor-cache default) and thread count."""
    device = args.device_obj
    triad = Triad(args.triad_mib * (1 << 20) // 4, device)
    flusher = CacheFlusher(device, machine["last_level_cache_bytes"])
    rows = []
    for spec in row_specs(args):
        # Anchor C's compiled fn has one code object for every row; Dynamo caches per code object with
        # guards on the optimizer, so each row would add a recompile towards the limit of 8. The previous
        # rows' objects are dead by now, so their compiled code can go.
        torch._dynamo.reset()
        with row_inductor_cache(args.inductor_cache == "fresh"), num_threads(spec.threads):
            row = run_row(spec, device=device, triad=triad, flusher=flusher, rounds=args.rounds,
                          warmup=args.warmup, compile_fused=not args.no_compile, bucket_sizes=args.bucket_of,
                          measure_memory=not args.no_memory, log=log)
            if args.profile:
                _profile_methods(spec, args, log)
        rows.append(row)
    return rows


def _profile_methods(row_spec: RowSpec, args, log) -> None:
    """Op-level profile of B and the fused method(s) on this row, to show where the step spends time."""
    device = args.device_obj
    if row_spec.fsdp2:
        with single_process_group(device) as mesh:
            _profile_methods_on(row_spec, args, log, mesh)
    else:
        _profile_methods_on(row_spec, args, log, None)


def _profile_methods_on(row_spec: RowSpec, args, log, mesh) -> None:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    device = args.device_obj
    ref_grads = L.make_grads(row_spec.layout, dtype=row_spec.dtype, device=device, seed=1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in [m for m in row_spec.methods if m == "B" or m.startswith("fused")]:
        m = build_method(name, optimizer=row_spec.optimizer, layout=row_spec.layout, dtype=row_spec.dtype,
                         device=device, ref_grads=ref_grads, compile_fused=not args.no_compile,
                         bucket_size=args.bucket_of.get(name), mesh=mesh)
        for _ in range(args.warmup):
            restore_grads(m, ref_grads)
            m.step()
        with quiet_profiler(), profile(activities=acts) as prof:
            for _ in range(3):
                restore_grads(m, ref_grads)
                sync(device)
                m.step()
                sync(device)
        path = Path(args.out) / f"profile_{row_spec.key}_{name.replace('[', '_').replace('=', '').rstrip(']')}.txt"
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25) + "\n")
        log(f"  profile of {name} -> {path}")


def _command(argv: list[str]) -> str:
    return "python -m compiled_step bench" + ("" if not argv else " " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
