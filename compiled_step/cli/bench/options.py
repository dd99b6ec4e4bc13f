"""The bench's command-line options: the parser, their validation, the defaults of each mode (quick, CPU,
CUDA), and the rows they select."""

from __future__ import annotations

import argparse

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench.compile_time import DEFAULT_COMPILE_SIZES
from compiled_step.cli.bench import muon as muon_row
from compiled_step.cli.bench.methods import ANCHORS, MUON_ADAMW, PARAM_NORMS, BenchError, load_fused_step
from compiled_step.cli.bench.rows import ROW_KINDS, SMALL_FIRST, TINY_NUMEL, TINY_ROWS, TINY_THREADS, RowSpec

# Sizes per mode. CPU full: the >= 10 M-param goal layout. CUDA full: the >= 100 M-param goal layout.
_SIZES = {
    "quick": dict(d_model=64, n_layers=2, vocab=512, seq_len=64, small_tensors=64, small_numel=64,
                  triad_mib=8, rounds=3, warmup=2),
    "cpu": dict(d_model=512, n_layers=4, vocab=8192, seq_len=1024, small_tensors=1024, small_numel=256,
                triad_mib=128, rounds=20, warmup=3),
    "cuda": dict(d_model=1024, n_layers=8, vocab=32768, seq_len=1024, small_tensors=1024, small_numel=256,
                 triad_mib=1024, rounds=30, warmup=3),
}
_HEADLINE_MIN_PARAMS = {"cpu": 10_000_000, "cuda": 100_000_000}
_DEFAULT_ROWS = ",".join(ROW_KINDS)


def _csv_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BenchError(f"{what} is empty")
    if len(set(items)) != len(items):
        raise BenchError(f"{what} has duplicates: {text!r}")
    return items


def _positive(text: str, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise BenchError(f"{what} must be an integer, got {text!r}") from None
    if v <= 0:
        raise BenchError(f"{what} must be > 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compiled_step bench",
        description="Benchmark FusedStep against clip_grad_norm_ + torch.optim anchors, with a bandwidth "
        "roofline, compile times and peak memory. Results go to --out as bench.md, results.csv, "
        "compile_times.csv, results.json and bench.png.",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out/)")
    p.add_argument("--quick", action="store_true",
                   help="tiny layouts, few rounds, no compile-time subprocesses (for tests); figures only, "
                   "no met/gap verdicts")
    p.add_argument("--rows", default=_DEFAULT_ROWS,
                   help=f"comma list of rows out of {','.join(ROW_KINDS)} (default all; tiny100/tiny1000: "
                   f"{TINY_NUMEL}-element tensors on {TINY_THREADS} thread, host work only)")
    p.add_argument("--methods", default=None,
                   help=f"comma list out of A,B,C,D,fused,{PARAM_NORMS} (default all; B is required: ratios are "
                   f"to B; {PARAM_NORMS} is FusedStep with param_norms=True, its cost is judged against fused)")
    p.add_argument("--bucket-size", default=None,
                   help="FusedStep bucket_size; a comma list benches one fused method per size "
                   "(default: FusedStep's own default)")
    p.add_argument("--no-compile", action="store_true",
                   help="FusedStep(compile=False) and no anchor C: a fast smoke run of the plumbing")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 20 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method before timing")
    p.add_argument("--d-model", type=int, default=None, help="GPT layout width")
    p.add_argument("--n-layers", type=int, default=None, help="GPT layout depth")
    p.add_argument("--vocab", type=int, default=None, help="GPT layout vocabulary")
    p.add_argument("--seq-len", type=int, default=None, help="GPT layout position-embedding rows")
    p.add_argument("--small-tensors", type=int, default=None, help="tensor count of the many-small layout")
    p.add_argument("--small-numel", type=int, default=None, help="average tensor size of the many-small layout")
    p.add_argument("--small-with-c", action="store_true",
                   help="also run anchor C on the many-small and tiny layouts (its compile is linear in the "
                   "tensor count: minutes for 1024 tensors)")
    p.add_argument("--triad-mib", type=int, default=None, help="size of each triad array in MiB")
    p.add_argument("--compile-sizes", default=None,
                   help="comma list of tensor counts for compile time (default 16,64,256,1024; none with --quick)")
    p.add_argument("--skip-compile-time", action="store_true", help="skip the compile-time subprocesses")
    p.add_argument("--compile-timeout", type=float, default=600.0,
                   help="seconds allowed for one compile-time subprocess (default 600)")
    p.add_argument("--inductor-cache", choices=("fresh", "default"), default="fresh",
                   help="fresh (default): each row compiles into its own empty Inductor cache, so kernels "
                   "are generated for that row's sizes; default: use the process's usual cache directory")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--step-memory-size", type=int, default=None, metavar="N",
                   help="side of the matrices of the first-step / resume / rebuild memory cases (fresh "
                   "subprocesses; default 2048: 8 x 2048x2048 fp32, P = 128 MiB; 0 skips them; none with --quick "
                   "unless given)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before starting, wait up to SECONDS for the 1-minute load average to drop below "
                   "0.7 (other processes on the cores make every timing meaningless); default 0: no wait")
    p.add_argument("--profile", action="store_true",
                   help="write a torch.profiler op table for the fused method and B of each row to --out")
    p.add_argument("--write-benchmarks-md", nargs="?", const="BENCHMARKS.md", default=None, metavar="PATH",
                   help="also regenerate BENCHMARKS.md (or PATH) from this run")
    p.add_argument("--low-precision", default=None, metavar="THREADS",
                   help="run only the low-precision state rows (bf16 moments, stochastically rounded bf16 params, "
                   "torchao's optimizers) at these thread counts, e.g. 1,2; writes low_precision.md to --out "
                   "(CPU; --rounds, default 11)")
    p.add_argument("--cpu-adam", default=None, metavar="THREADS",
                   help="run only the CPU AdamW rows: FusedStep against DeepSpeedCPUAdam (when deepspeed is "
                   "installed: the deepspeed extra) and torch's fused AdamW, one subprocess per thread count, e.g. "
                   "1,2; writes cpu_adam.md to --out (CPU; --rounds, default 15)")
    return p


def resolve(args: argparse.Namespace) -> None:
    """Validate options and fill mode-dependent defaults, raising BenchError with a clear message."""
    args.device_obj = _resolve_device(args.device)
    mode = "quick" if args.quick else args.device_obj.type
    for key, value in _SIZES[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        elif getattr(args, key) <= 0:
            raise BenchError(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    args.headline_min_params = _HEADLINE_MIN_PARAMS[args.device_obj.type]

    args.row_keys = _csv_list(args.rows, "--rows")
    bad = [r for r in args.row_keys if r not in ROW_KINDS]
    if bad:
        raise BenchError(f"--rows: unknown {bad}; choose from {','.join(ROW_KINDS)}")
    methods = _resolve_methods(args)
    _expand_fused_methods(args, methods)
    if SMALL_FIRST in args.row_keys and "fused" not in methods:
        if args.rows != _DEFAULT_ROWS:
            raise BenchError(f"--rows {SMALL_FIRST} needs the fused method in --methods")
        args.row_keys.remove(SMALL_FIRST)
        args.notes.append(f"Row {SMALL_FIRST} was skipped: it times FusedStep, which --methods leaves out.")
    if args.skip_compile_time or "fused" not in methods:
        args.compile_sizes_list = []
    elif args.compile_sizes is not None:
        args.compile_sizes_list = [_positive(s, "--compile-sizes") for s in _csv_list(args.compile_sizes,
                                                                                         "--compile-sizes")]
    else:
        args.compile_sizes_list = [] if args.quick else list(DEFAULT_COMPILE_SIZES)
    if args.step_memory_size is None:
        args.step_memory_size = 0 if args.quick or "fused" not in methods else 2048
    elif args.step_memory_size < 0:
        raise BenchError(f"--step-memory-size must be >= 0, got {args.step_memory_size}")
    if args.wait_idle < 0:
        raise BenchError(f"--wait-idle must be >= 0, got {args.wait_idle}")
    if args.compile_timeout <= 0:
        raise BenchError(f"--compile-timeout must be > 0, got {args.compile_timeout}")
    for name in ("rounds", "warmup"):
        if getattr(args, name) <= 0:
            raise BenchError(f"--{name} must be > 0")


def _resolve_device(text: str) -> torch.device:
    """--device as a torch.device: cpu, or a CUDA device that exists here, with its index."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise BenchError(f"--device {text!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch.cuda.is_available() is False")
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current GPU, named so the report says which
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {text!r}: only cpu and cuda are supported")
    return device


def _resolve_methods(args: argparse.Namespace) -> list[str]:
    """--methods checked (B is required), without C under --no-compile (noted in args.notes)."""
    explicit_methods = args.methods is not None
    methods = _csv_list(args.methods, "--methods") if explicit_methods else [*ANCHORS, "fused", PARAM_NORMS]
    bad = [m for m in methods if m not in (*ANCHORS, "fused", PARAM_NORMS)]
    if bad:
        raise BenchError(f"--methods: unknown {bad}; choose from A,B,C,D,fused,{PARAM_NORMS}")
    if "B" not in methods:
        raise BenchError("--methods must include B: every ratio in the table is to anchor B")
    args.notes = []
    if args.no_compile and "C" in methods:
        if explicit_methods:
            raise BenchError("--no-compile excludes anchor C (it is a torch.compile'd step); drop C from --methods")
        methods.remove("C")
        args.notes.append("Anchor C was skipped: --no-compile.")
    return methods


def _expand_fused_methods(args: argparse.Namespace, methods: list[str]) -> None:
    """One fused method per --bucket-size (``fused[b=N]`` when there are several): sets args.method_names,
    args.bucket_of, args.fused_bucket_sizes and args.fused_name (the one goals are judged on)."""
    if args.bucket_size is None:
        buckets: list[int | None] = [None]
    else:
        buckets = [_positive(b, "--bucket-size") for b in _csv_list(args.bucket_size, "--bucket-size")]
    args.fused_bucket_sizes = buckets
    args.bucket_of: dict[str, int | None] = {}
    expanded = []
    for m in methods:
        if m != "fused":
            expanded.append(m)
            continue
        for b in buckets:
            name = "fused" if len(buckets) == 1 else f"fused[b={b}]"
            args.bucket_of[name] = b
            expanded.append(name)
    args.method_names = expanded
    args.bucket_of[PARAM_NORMS] = buckets[0]  # beside the first fused method, whose cost it adds to
    fused_names = [m for m in expanded if m.startswith("fused") and m != PARAM_NORMS]
    # Goals are judged on the first fused method (the first --bucket-size).
    args.fused_name = fused_names[0] if fused_names else "fused"
    if fused_names or PARAM_NORMS in expanded:
        load_fused_step()  # fail now with a clear message, not after minutes of anchors


def _muon_adamw_methods(methods: list[str]) -> list[str]:
    """The Muon + AdamW row runs A, B, D and FusedStep: C and fused+norms are dropped (with a note)."""
    notes = [muon_row.ROW_NOTE]
    for m, why in muon_row.NOT_RUN.items():
        if m in methods:
            methods.remove(m)
            notes.append(f"{m} is not run on the Muon + AdamW row: {why}.")
    return notes


def _small_first_methods(methods: list[str]) -> list[str]:
    """The small-first row times B (the drift control) and the fused method(s) only: its goal compares
    FusedStep's median with the headline row's."""
    dropped = [m for m in methods if m != "B" and not (m.startswith("fused") and m != PARAM_NORMS)]
    for m in dropped:
        methods.remove(m)
    return [f"Only B and FusedStep run on this row ({', '.join(dropped)} not): it is the headline layout again, "
            "timed after a small FusedStep compiled first; its goal is FusedStep's median against the "
            "headline row's, B's ratio beside it shows the machine's drift between the rows."] if dropped else []


def row_specs(args) -> list[RowSpec]:
    gpt = L.gpt_layout(args.d_model, args.n_layers, args.vocab, args.seq_len)
    small = L.many_small_layout(args.small_tensors, args.small_numel)
    specs = []
    for key in args.row_keys:
        opt, dtype, family = ROW_KINDS[key]
        methods = list(args.method_names)
        notes = []
        if family in ("small", "tiny") and "C" in methods and not args.small_with_c:
            methods.remove("C")
            notes.append("Anchor C skipped on this layout: its compile time grows linearly with the "
                         "tensor count (pass --small-with-c to include it).")
        if family == "fsdp2" and "C" in methods:
            methods.remove("C")
            notes.append("Anchor C skipped on the FSDP2 row: the row shows what each method issues for FSDP2 "
                         "shards; the compiled-optimizer recipe is compared on the plain GPT row.")
        if opt == MUON_ADAMW:
            notes += _muon_adamw_methods(methods)
        if key == SMALL_FIRST:
            notes += _small_first_methods(methods)
        if family == "tiny":
            layout, threads = L.many_small_layout(TINY_ROWS[key], TINY_NUMEL), TINY_THREADS
        else:
            layout, threads = (gpt if family in ("gpt", "fsdp2") else small), None
        specs.append(RowSpec(key, opt, dtype, layout, tuple(methods), tuple(notes), threads, fsdp2=family == "fsdp2",
                             small_first=key == SMALL_FIRST))
    return specs
