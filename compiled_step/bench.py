"""``python -m compiled_step bench``: FusedStep against the anchors, the bandwidth roofline, compile time.

What is measured, and how (this docstring is also the method section of ``BENCHMARKS.md``):

* **Step time.** Every method gets its own copy of the same initial params and the same optimizer
  hyperparameters. Reference grads are generated once per row (seeded N(0, 1), so finite, and their
  total 2-norm is about sqrt(n_params), far above ``max_grad_norm``, so clipping is always active).
  Before *every* timed step, for every method, the reference grads are copied back into ``.grad`` (the
  anchors clip grads in place, FusedStep does not; restoring for all keeps the treatment identical) and
  a scratch buffer twice the last-level cache is written, so no method starts with a warm cache. Only
  the step itself is timed (``synchronize`` around it on CUDA only). Methods run interleaved, one step
  each per round (A, B, C, D, fused, A, B, ...), so drift in machine load hits all of them alike; the
  reported time is the median over rounds. Every method runs the same number of steps, so afterwards
  all params should agree with anchor B's: the largest difference is reported as a sanity check.
* **Roofline.** In every round a triad ``a = b + s*c`` (``torch.add(b, c, alpha=s, out=a)`` on arrays
  far larger than the cache) is timed best-of-3; the bandwidth is 12 B/element over the median of those
  per-round bests (STREAM's byte count). The floor for a step is ``n_params * B/param / bandwidth`` where
  B/param is the minimal traffic: each of p, g and the optimizer state read once and p and the state
  written once, plus one extra read of g for the norm (32 B/param for fp32 AdamW, 24 for fp32 SGD with
  momentum, 16 for bf16 AdamW whose state is bf16 as in torch.optim). Fraction of roofline =
  floor time / method time.
* **Compile time.** For each tensor count N, a fresh subprocess (fresh Dynamo) with a fresh, empty
  ``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR``) times the first ``fused.step()``: cold. A
  second fresh subprocess reusing that cache directory times it again: warm.
* **Per-step overhead** is FusedStep's median step time on the many-small layout (1024 tensors of a
  few hundred elements), minus that layout's roofline floor.
* **Peak memory.** One extra step per method, after timing. On CPU every c10 allocator event is recorded
  with ``torch.profiler(profile_memory=True)`` and the peak of the running sum of allocations minus
  frees is the step's peak extra memory (RSS is too coarse and noisy for this). On CUDA it is
  ``max_memory_allocated()`` minus ``memory_allocated()`` before the step.

Anchors: (A) ``clip_grad_norm_(foreach=True)`` + ``optimizer(foreach=True)``; (B) the same clip +
``optimizer(fused=True)``; (C) eager ``clip_grad_norm_`` + a ``torch.compile``d ``optimizer.step()``
with a tensor lr (PyTorch's compiled-optimizer recipe); (D) the seed's eager path: ``g.div_(s)`` on
every grad, a norm per param group, clip, ``optimizer.step()`` (foreach).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from compiled_step import layouts as L

__all__ = ["main"]

ANCHORS = ("A", "B", "C", "D")
METHOD_DESCRIPTIONS = {
    "A": "clip_grad_norm_(foreach) + optimizer(foreach=True)",
    "B": "clip_grad_norm_(foreach) + optimizer(fused=True)",
    "C": "clip_grad_norm_(foreach) + torch.compile'd optimizer.step(), tensor lr",
    "D": "seed-style: g.div_(s) per grad, norm per group, clip, optimizer.step()",
    "fused": "FusedStep: norm + clip + update, compiled",
}
ROW_KINDS = {
    # key: (optimizer, param dtype, layout family)
    "adamw": ("adamw", torch.float32, "gpt"),
    "sgd": ("sgd", torch.float32, "gpt"),
    "adamw-bf16": ("adamw", torch.bfloat16, "gpt"),
    "small": ("adamw", torch.float32, "small"),
}
DEFAULT_COMPILE_SIZES = (16, 64, 256, 1024)
MAX_GRAD_NORM = 1.0
# The seed divides grads by num_label_tokens / dp_group_size before clipping; any s != 1 costs the same
# full read+write pass, which is the point of anchor D.
SEED_SCALE = 2.0
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
SGD_HP = dict(lr=1e-2, momentum=0.9)
WEIGHT_DECAY = 0.1
# Goals from the performance issue. CPU: this 2-core machine; CUDA: >= 100 M params on one GPU.
GOALS = {
    "cpu": dict(roofline=0.90, speedup_b=1.3, cold_s=20.0, warm_s=5.0, overhead_ms=2.0, peak_frac=0.01),
    "cuda": dict(roofline=0.85, speedup_b=1.5, cold_s=20.0, warm_s=5.0, overhead_ms=2.0, peak_frac=0.01),
}


class BenchError(Exception):
    """A bad option or an unavailable method: reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# Device helpers


def _sync(device: torch.device) -> None:
    # CPU kernels (eager and Inductor's C++) return when done; only CUDA needs a sync around a timer.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: torch.device) -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "last_level_cache_bytes": _last_level_cache_bytes(device),
    }
    return info


# --------------------------------------------------------------------------------------------------
# Methods


@dataclass
class Method:
    name: str
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: Callable[[], object]


def floor_bytes_per_param(optimizer: str, dtype: torch.dtype) -> int:
    """Minimal traffic: p, g and each state tensor read once, p and state written once, g read again
    for the norm. AdamW has 2 state tensors (exp_avg, exp_avg_sq), SGD-momentum 1; torch.optim keeps
    state in the param dtype."""
    n_state = {"adamw": 2, "sgd": 1}[optimizer]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize * (2 * (n_state + 1) + 2)


_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
_HP = {"adamw": ADAMW_HP, "sgd": SGD_HP}


def _make_optimizer(kind: str, groups: list[dict], **overrides) -> torch.optim.Optimizer:
    return _OPTIMIZERS[kind](groups, **{**_HP[kind], **overrides})


def _clip(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, norm_type=2.0, foreach=True)


def _compiled_step_fn(opt: torch.optim.Optimizer) -> Callable[[], None]:
    # PyTorch's compiled-optimizer recipe, verbatim: fullgraph=False because Optimizer.step breaks the
    # graph on purpose around the update (_use_grad_for_differentiable).
    @torch.compile(fullgraph=False)
    def fn() -> None:
        opt.step()

    return fn


def _seed_style_step(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    group_grads = [[p.grad for p in g["params"] if p.grad is not None] for g in opt.param_groups]

    def step() -> torch.Tensor:
        # Separate scale pass, one kernel per grad, as the seed's scale_grads_and_clip_grad_norm does.
        for grads in group_grads:
            for g in grads:
                g.div_(SEED_SCALE)
        # One norm per group (the seed's sharding groups), then the total over groups.
        partial = [torch.nn.utils.get_total_norm(gs, 2.0, foreach=True) for gs in group_grads]
        total = torch.nn.utils.get_total_norm(partial, 2.0, foreach=True)
        torch.nn.utils.clip_grads_with_norm_(params, MAX_GRAD_NORM, total, foreach=True)
        opt.step()
        return total

    return step


def _load_fused_step():
    try:
        from compiled_step import FusedStep  # noqa: PLC0415 -- optional until the core lands
    except ImportError as exc:
        raise BenchError(
            f"FusedStep is not available ({exc}); pass --methods A,B,C,D to bench the anchors only"
        ) from exc
    return FusedStep


def build_method(
    name: str,
    *,
    optimizer: str,
    layout: L.Layout,
    dtype: torch.dtype,
    device: torch.device,
    ref_grads: list[torch.Tensor],
    compile_fused: bool,
    bucket_size: int | None,
) -> Method:
    params = L.make_params(layout, dtype=dtype, device=device, seed=0)
    for p, g in zip(params, ref_grads):
        p.grad = g.clone()
    groups = L.param_groups(layout, params, weight_decay=WEIGHT_DECAY)
    if name == "A":
        opt = _make_optimizer(optimizer, groups, foreach=True)
        return Method(name, params, opt, lambda: (_clip(params), opt.step()))
    if name == "B":
        opt = _make_optimizer(optimizer, groups, fused=True)
        return Method(name, params, opt, lambda: (_clip(params), opt.step()))
    if name == "C":
        # A float lr would be guarded as a constant (and recompile under a scheduler); the recipe makes it
        # a 0-d tensor. Its value is the same as every other method's. foreach/fused are left at their
        # defaults, as in the recipe: eager foreach rejects a tensor lr without capturable=True.
        opt = _make_optimizer(optimizer, groups, lr=torch.tensor(_HP[optimizer]["lr"], device=device))
        fn = _compiled_step_fn(opt)
        return Method(name, params, opt, lambda: (_clip(params), fn()))
    if name == "D":
        opt = _make_optimizer(optimizer, groups, foreach=True)
        return Method(name, params, opt, _seed_style_step(opt, params))
    if name.startswith("fused"):
        FusedStep = _load_fused_step()
        opt = _make_optimizer(optimizer, groups)
        kwargs = dict(max_grad_norm=MAX_GRAD_NORM, norm_type=2.0, compile=compile_fused)
        if bucket_size is not None:
            kwargs["bucket_size"] = bucket_size
        fused = FusedStep(opt, **kwargs)
        return Method(name, params, opt, fused.step)
    raise BenchError(f"unknown method {name!r}")


# --------------------------------------------------------------------------------------------------
# Measurement primitives


class Triad:
    """``a = b + s*c`` on arrays far larger than the cache: the bandwidth torch itself reaches here."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.device = device
        self.a = torch.empty(n, device=device)
        self.b = torch.rand(n, device=device)
        self.c = torch.rand(n, device=device)

    def best_of(self, repeats: int) -> float:
        best = math.inf
        for _ in range(repeats):
            _sync(self.device)
            t0 = time.perf_counter()
            torch.add(self.b, self.c, alpha=0.5, out=self.a)
            _sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return best

    @property
    def bytes_moved(self) -> int:
        return 12 * self.n  # STREAM convention: read b, read c, write a; write-allocate not counted


class CacheFlusher:
    """Writes a buffer twice the last-level cache so each timed step starts from DRAM, like the triad."""

    def __init__(self, device: torch.device, cache_bytes: int) -> None:
        self.buf = torch.empty(max(2 * cache_bytes, 8 << 20) // 4, device=device)
        self.k = 0

    def __call__(self) -> None:
        self.k += 1
        self.buf.fill_(float(self.k))


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above what was allocated when it started."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 -- only needed here

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The FunctionEvent tree attributes allocations to ops and drops the order; the raw kineto records
    # keep every alloc (+nbytes) and free (-nbytes) with its timestamp, which is what a peak needs.
    records = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    records.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in records:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters  # noqa: PLC0415 -- keep import light for --help

    return int(counters["stats"]["unique_graphs"])


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# One row: a layout x optimizer x dtype, every method interleaved


@dataclass
class MethodResult:
    row: str
    method: str
    times_s: list[float]
    floor_s: float
    graphs_compiled: int  # unique Dynamo graphs compiled during this method's warmup
    graphs_during_timing: int = 0  # should be 0: any recompile inside the timed rounds is reported
    speedup_vs_b: float = math.nan
    peak_extra_bytes: int | None = None
    max_abs_diff_vs_b: float = math.nan

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr_s(self) -> float:
        if len(self.times_s) < 2:
            return 0.0
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q[2] - q[0]

    @property
    def roofline_fraction(self) -> float:
        return self.floor_s / self.median_s


@dataclass
class RowResult:
    key: str
    optimizer: str
    dtype: str
    layout: str
    n_params: int
    n_tensors: int
    param_bytes: int
    bytes_per_param: int
    bandwidth_gbps: float
    floor_s: float
    grad_norm: float
    methods: list[MethodResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def method(self, name: str) -> MethodResult | None:
        return next((m for m in self.methods if m.method == name), None)


@dataclass(frozen=True)
class RowSpec:
    key: str
    optimizer: str
    dtype: torch.dtype
    layout: L.Layout
    methods: tuple[str, ...]


def run_row(
    spec: RowSpec,
    *,
    device: torch.device,
    triad: Triad,
    flusher: CacheFlusher,
    rounds: int,
    warmup: int,
    compile_fused: bool,
    bucket_sizes: dict[str, int | None],
    measure_memory: bool,
    log: Callable[[str], None],
) -> RowResult:
    layout = spec.layout
    ref_grads = L.make_grads(layout, dtype=spec.dtype, device=device, seed=1)
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in ref_grads])))
    if not math.isfinite(grad_norm) or grad_norm <= MAX_GRAD_NORM:
        raise BenchError(f"reference grads must be finite and clip (norm {grad_norm} vs {MAX_GRAD_NORM})")
    bpp = floor_bytes_per_param(spec.optimizer, spec.dtype)
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    row = RowResult(
        key=spec.key, optimizer=spec.optimizer, dtype=str(spec.dtype).replace("torch.", ""),
        layout=layout.name, n_params=layout.n_params, n_tensors=layout.n_tensors,
        param_bytes=layout.n_params * itemsize, bytes_per_param=bpp, bandwidth_gbps=math.nan,
        floor_s=math.nan, grad_norm=grad_norm,
    )
    log(f"[{spec.key}] {layout.describe()}, {spec.dtype}, grad norm {grad_norm:.1f}; "
        f"methods {', '.join(spec.methods)}")

    methods: list[Method] = []
    compiled_counts: dict[str, int] = {}
    for name in spec.methods:
        t0 = time.perf_counter()
        m = build_method(
            name, optimizer=spec.optimizer, layout=layout, dtype=spec.dtype, device=device,
            ref_grads=ref_grads, compile_fused=compile_fused, bucket_size=bucket_sizes.get(name),
        )
        before = _unique_graphs()
        # Warm up in isolation: the first steps compile (C, fused) and allocate optimizer state.
        for _ in range(warmup):
            _restore(m, ref_grads)
            m.step()
        _sync(device)
        compiled_counts[name] = _unique_graphs() - before
        log(f"  warmed {name} in {time.perf_counter() - t0:.1f}s ({compiled_counts[name]} graphs)")
        methods.append(m)

    times: dict[str, list[float]] = {m.name: [] for m in methods}
    triad_best: list[float] = []
    graphs_before = _unique_graphs()
    for r in range(rounds):
        triad_best.append(triad.best_of(3))
        for m in methods:
            _restore(m, ref_grads)
            flusher()
            _sync(device)
            t0 = time.perf_counter()
            m.step()
            _sync(device)
            times[m.name].append(time.perf_counter() - t0)
    graphs_during = _unique_graphs() - graphs_before

    row.bandwidth_gbps = triad.bytes_moved / statistics.median(triad_best) / 1e9
    row.floor_s = layout.n_params * bpp / (row.bandwidth_gbps * 1e9)
    for m in methods:
        row.methods.append(MethodResult(
            row=spec.key, method=m.name, times_s=times[m.name], floor_s=row.floor_s,
            graphs_compiled=compiled_counts[m.name],
            # Dynamo's counter is global, so a recompile is attributed to the row, not to one method.
            graphs_during_timing=graphs_during,
        ))
    if graphs_during:
        row.notes.append(f"{graphs_during} graph(s) were compiled during the timed rounds")

    ref = next((m for m in methods if m.name == "B"), None)
    b_result = row.method("B")
    for m, res in zip(methods, row.methods):
        if b_result is not None:
            res.speedup_vs_b = b_result.median_s / res.median_s
        if ref is not None:
            # Same init, same grads, same number of steps: every method should sit on B's trajectory.
            res.max_abs_diff_vs_b = _max_abs_diff(m.params, ref.params)
    if measure_memory:
        for m, res in zip(methods, row.methods):
            _restore(m, ref_grads)
            res.peak_extra_bytes = peak_extra_bytes(m.step, device)
    for res in row.methods:
        log(f"  {res.method:>10}: median {res.median_s * 1e3:8.3f} ms  "
            f"x{res.speedup_vs_b:5.2f} vs B  roofline {res.roofline_fraction:5.2f}")
    return row


def _restore(m: Method, ref_grads: list[torch.Tensor]) -> None:
    with torch.no_grad():
        torch._foreach_copy_([p.grad for p in m.params], ref_grads)

# --------------------------------------------------------------------------------------------------
# Compile time, in fresh subprocesses


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


_CHILD_CODE = "import sys; from compiled_step.bench import _compile_child_main as m; sys.exit(m(sys.argv[1:]))"


def _compile_child_main(argv: list[str]) -> int:
    """Runs in a fresh interpreter: build N tensors, time the first fused.step(). Prints one JSON line."""
    p = argparse.ArgumentParser(prog="compiled_step.bench child")
    p.add_argument("--n-tensors", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bucket-size", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    FusedStep = _load_fused_step()
    layout = L.n_tensor_layout(a.n_tensors)
    params = L.make_params(layout, device=device)
    for prm, g in zip(params, L.make_grads(layout, device=device)):
        prm.grad = g
    opt = _make_optimizer("adamw", L.param_groups(layout, params, weight_decay=WEIGHT_DECAY))
    kwargs = dict(max_grad_norm=MAX_GRAD_NORM, norm_type=2.0, compile=not a.no_compile)
    if a.bucket_size is not None:
        kwargs["bucket_size"] = a.bucket_size
    fused = FusedStep(opt, **kwargs)
    step_times, graphs = [], []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        fused.step()
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        graphs.append(_unique_graphs())
    print(json.dumps({"first_s": step_times[0], "steady_s": step_times[2], "graphs": graphs[0],
                      "second_step_graphs": graphs[1] - graphs[0]}))
    return 0


def _run_child(n: int, cache_dir: str, args, timeout: float) -> dict:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    # The child imports compiled_step from wherever this process did, installed or not.
    pkg_root = str(Path(__file__).resolve().parent.parent)
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
