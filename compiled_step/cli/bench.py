"""``python -m compiled_step bench``: FusedStep against the anchors, the bandwidth roofline, compile time.

What is measured, and how:

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
* **Roofline.** In every round two triads on arrays far larger than the cache are timed best-of-3:
  STREAM's ``a = b + s*c`` (``torch.add(b, c, alpha=s, out=a)``) and the in-place ``a = a + s*c``
  (``a.add_(c, alpha=s)``), each counted at 12 B/element. The bandwidth is the higher of their medians
  over rounds. Why both: on a CPU the STREAM triad's store to ``a`` first reads ``a``'s cache line
  (write-allocate), so it understates the bandwidth that in-place updates such as an optimizer's get
  (on this machine the in-place triad measures far higher), and a roofline built on it alone let
  anchor B appear to run above 1.0. The floor for a step is ``n_params * B/param / bandwidth`` where
  B/param is the minimal traffic: each of p, g and the optimizer state read once and p and the state
  written once, plus one extra read of g for the norm (32 B/param for fp32 AdamW, 24 for fp32 SGD with
  momentum, 16 for bf16 AdamW whose state is bf16 as in torch.optim). Fraction of roofline =
  floor time / method time.
* **Compile time.** For each tensor count N, a fresh subprocess (fresh Dynamo) with a fresh, empty
  ``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR``) times the first ``fused.step()``: cold. A
  second fresh subprocess reusing that cache directory times it again: warm.
* **Per-step overhead** is FusedStep's median step time on the many-small layout (1024 tensors of a
  few hundred elements), minus that layout's roofline floor.
* **Tiny tensors, host work only.** Rows ``tiny100`` and ``tiny1000``: AdamW on 100 and on 1000 tensors
  of about 16 elements, run with ``torch.set_num_threads(1)`` (restored afterwards). Their memory
  traffic is negligible, so the step time is the host's work: Python, dispatch, guards, launches. The
  figure is the ratio t_B / t_FusedStep.
* **Ops and kernel launches per step.** One more steady-state step per method, under
  ``torch.profiler``: the number of ATen ops the profiler records (every ``aten::`` event, nested ones
  included: the eager dispatcher work of the step), and on CUDA the number of kernel launches
  (``cudaLaunchKernel``/``cuLaunchKernel`` events and their ``Ex`` variants) plus CUDA-graph launches
  (``cudaGraphLaunch``), which are also shown on their own.
* **Peak memory.** One extra step per method, after timing. On CPU every c10 allocator event is recorded
  with ``torch.profiler(profile_memory=True)`` and the peak of the running sum of allocations minus
  frees is the step's peak extra memory (RSS is too coarse and noisy for this). The profiler does not
  see frees of blocks allocated before it started, so this is an upper bound. On CUDA it is
  ``max_memory_allocated()`` minus ``memory_allocated()`` before the step.
* **Inductor cache.** By default each row compiles into its own fresh, empty Inductor cache: with
  dynamic shapes the C++ backend picks serial or OpenMP-parallel loops from the size hints of the
  first compile, and a cached graph compiled earlier for tiny tensors would run serially here.
* **Profiler noise.** torch's profiler (kineto) prints ``USDT: ... profiler_start`` and
  ``profiler_stop`` on stderr for every session it starts. While the bench profiles, native stderr
  is captured and replayed without those two lines; everything else (errors included) is kept.
* **``--quick``** runs tiny layouts for a few rounds to check the plumbing. Its figures are reported,
  but no goal gets a met/gap verdict: at those sizes and round counts the ratios swing from run to run.

Anchors: (A) ``clip_grad_norm_(foreach=True)`` + ``optimizer(foreach=True)``; (B) the same clip +
``optimizer(fused=True)``; (C) eager ``clip_grad_norm_`` + a ``torch.compile``d ``optimizer.step()``
with a tensor lr (PyTorch's compiled-optimizer recipe); (D) the seed's eager path: ``g.div_(s)`` on
every grad, a norm per param group, clip, ``optimizer.step()`` (foreach).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from compiled_step.cli import PACKAGE_PARENT
from compiled_step.cli import layouts as L
from compiled_step.cli.extras import MissingExtraError, require_cli_extra

__all__ = ["main"]

ANCHORS = ("A", "B", "C", "D")
# One line per method: the legend of bench.md, BENCHMARKS.md and bench.png.
METHOD_DESCRIPTIONS = {
    "A": "clip_grad_norm_(foreach=True) + optimizer(foreach=True)",
    "B": "clip_grad_norm_(foreach=True) + optimizer(fused=True)",
    "C": "clip_grad_norm_(foreach=True) + torch.compile'd optimizer.step() with a tensor lr "
         "(PyTorch's compiled-optimizer recipe)",
    "D": "the seed's eager path: g.div_(s) on every grad, a norm per param group, clip, optimizer.step() (foreach)",
    "fused": "FusedStep.step(): norm + clip + update in one compiled step",
}
ROW_KINDS = {
    # key: (optimizer, param dtype, layout family)
    "adamw": ("adamw", torch.float32, "gpt"),
    "sgd": ("sgd", torch.float32, "gpt"),
    "adamw-bf16": ("adamw", torch.bfloat16, "gpt"),
    "small": ("adamw", torch.float32, "small"),
    "tiny100": ("adamw", torch.float32, "tiny"),
    "tiny1000": ("adamw", torch.float32, "tiny"),
}
# Tiny-tensor rows: tensor count, and one intra-op thread so the step time is host work only.
TINY_ROWS = {"tiny100": 100, "tiny1000": 1000}
TINY_NUMEL = 16
TINY_THREADS = 1
DEFAULT_COMPILE_SIZES = (16, 64, 256, 1024)
MAX_GRAD_NORM = 1.0
# The seed divides grads by num_label_tokens / dp_group_size before clipping; any s != 1 costs the same
# full read+write pass, which is the point of anchor D.
SEED_SCALE = 2.0
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
SGD_HP = dict(lr=1e-2, momentum=0.9)
WEIGHT_DECAY = 0.1
# Goals from the performance issue. CPU: this 2-core machine; CUDA: >= 100 M params on one GPU.
# tiny_speedup_b: t_B / t_FusedStep on the tiny rows (a CPU goal; on CUDA the figure is shown without one).
GOALS = {
    "cpu": dict(roofline=0.90, speedup_b=1.3, cold_s=20.0, warm_s=5.0, overhead_ms=2.0, peak_frac=0.01,
                tiny_speedup_b=2.0),
    "cuda": dict(roofline=0.85, speedup_b=1.5, cold_s=20.0, warm_s=5.0, overhead_ms=2.0, peak_frac=0.01,
                 tiny_speedup_b=None),
}
NO_VERDICT = "no verdict (--quick)"


def describe_method(name: str, *, compiled: bool = True) -> str:
    """The legend line of a method name as the tables use it (A-D, fused, fused[b=N])."""
    if name in ANCHORS:
        return METHOD_DESCRIPTIONS[name]
    if name.startswith("fused"):
        text = METHOD_DESCRIPTIONS["fused"] if compiled else "FusedStep.step() with compile=False (eager)"
        bucket = re.fullmatch(r"fused\[b=(\d+)\]", name)
        return text + (f", bucket_size={bucket.group(1)}" if bucket else "")
    return name


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


def _source_revision() -> str:
    """The git commit of the compiled_step being measured, and whether its files had local changes."""
    root = PACKAGE_PARENT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compiled_step"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return head.stdout.strip() + (" with uncommitted changes in compiled_step/" if dirty else "")


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
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "source": _source_revision(),
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
    """Two triads on arrays far larger than the cache: the bandwidth torch itself reaches here.

    * STREAM's ``a = b + s*c`` (``torch.add(b, c, alpha=s, out=a)``), counted as STREAM does: 12 B per
      element. On a CPU, storing to ``a`` without having read it first also reads its cache line
      (write-allocate), so this understates what the memory system delivers.
    * the in-place ``a = a + s*c`` (``a.add_(c, alpha=s)``): 12 B per element, every byte really
      moved, and the access pattern of an optimizer update (read-modify-write of the same array).

    The roofline uses the higher of the two, so no method can beat it by exploiting a bandwidth the
    triad failed to measure.
    """

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        self.device = device
        self.a = torch.empty(n, device=device)
        self.b = torch.rand(n, device=device)
        self.c = torch.rand(n, device=device)
        self.a.copy_(self.b)
        self._sign = 1.0

    def _best_time(self, fn: Callable[[], object], repeats: int) -> float:
        best = math.inf
        for _ in range(repeats):
            _sync(self.device)
            t0 = time.perf_counter()
            fn()
            _sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return best

    def _in_place(self) -> None:
        # Alternate the sign so ``a`` stays bounded however many rounds run.
        self._sign = -self._sign
        self.a.add_(self.c, alpha=0.5 * self._sign)

    def measure(self, repeats: int) -> tuple[float, float]:
        """Best-of-``repeats`` bandwidth in GB/s of (STREAM triad, in-place triad)."""
        stream = self._best_time(lambda: torch.add(self.b, self.c, alpha=0.5, out=self.a), repeats)
        in_place = self._best_time(self._in_place, repeats)
        return self.bytes_moved / stream / 1e9, self.bytes_moved / in_place / 1e9

    @property
    def bytes_moved(self) -> int:
        return 12 * self.n  # read two arrays, write one


class CacheFlusher:
    """Writes a buffer twice the last-level cache so each timed step starts from DRAM, like the triad."""

    def __init__(self, device: torch.device, cache_bytes: int) -> None:
        self.buf = torch.empty(max(2 * cache_bytes, 8 << 20) // 4, device=device)
        self.k = 0

    def __call__(self) -> None:
        self.k += 1
        self.buf.fill_(float(self.k))


# kineto, torch's profiler backend, writes these two lines to stderr for every profiling session; its
# log level cannot drop them without also dropping its errors (USDT is its highest severity).
_PROFILER_NOISE = re.compile(rb"^USDT:.*\] profiler_(start|stop)\s*$")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Hide kineto's ``USDT: ... profiler_start/stop`` lines, and nothing else.

    They are written by native code straight to file descriptor 2, so ``sys.stderr`` cannot filter
    them: fd 2 goes to a temporary file for the duration of the block, and every line of it except
    those two is written back to the real fd 2 when the block ends (errors and warnings are kept,
    only delayed to the block's end).
    """
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                kept = [line for line in tmp.read().splitlines(keepends=True) if not _PROFILER_NOISE.match(line)]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        os.close(saved)


_KERNEL_LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel",
                              "cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel"})
_GRAPH_LAUNCHES = frozenset({"cudaGraphLaunch", "cuGraphLaunch"})


@dataclass(frozen=True)
class StepOps:
    """What one step asks of the host, counted with torch.profiler."""

    aten_ops: int  # every aten:: event, nested ones included
    kernel_launches: int | None = None  # CUDA: kernel launches + graph launches; None on CPU
    graph_launches: int | None = None  # CUDA: cudaGraphLaunch events (a replay of a captured graph)


def count_step_ops(step: Callable[[], object], device: torch.device) -> StepOps:
    """Run ``step()`` once under the profiler and count its ATen ops (and CUDA launches)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 -- only needed here

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with quiet_profiler(), profile(activities=activities) as prof:
        step()
        _sync(device)
    names = [e.name for e in prof.events()]
    aten = sum(1 for n in names if n.startswith("aten::"))
    if not cuda:
        return StepOps(aten)
    graphs = sum(1 for n in names if n in _GRAPH_LAUNCHES)
    return StepOps(aten, sum(1 for n in names if n in _KERNEL_LAUNCHES) + graphs, graphs)


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

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    aten_ops: int | None = None  # ATen ops in one steady-state step (profiler, nested included)
    kernel_launches: int | None = None  # CUDA only: kernel + graph launches in that step
    graph_launches: int | None = None  # CUDA only: of which CUDA-graph launches

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
    # Best-round view: the fastest triad and each method's fastest round. On a shared machine the
    # median includes rounds where another process held a core; the best round is the closest
    # estimate of the uncontended speed. Goals are judged on medians; this is shown beside them.
    best_bandwidth_gbps: float = math.nan
    stream_gbps: float = math.nan  # median STREAM triad (a = b + s*c), 12 B/element counted
    in_place_gbps: float = math.nan  # median in-place triad (a = a + s*c)
    threads: int = 0  # torch intra-op threads while the row ran (1 for the tiny rows)
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
    notes: tuple[str, ...] = ()
    threads: int | None = None  # torch.set_num_threads for this row; None: leave as is


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
        floor_s=math.nan, grad_norm=grad_norm, notes=list(spec.notes), threads=torch.get_num_threads(),
    )
    log(f"[{spec.key}] {layout.describe()}, {spec.dtype}, grad norm {grad_norm:.1f}, "
        f"{row.threads} thread(s); methods {', '.join(spec.methods)}")

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
    triad_bw: list[tuple[float, float]] = []  # per round: (STREAM, in-place) best-of-3 GB/s
    graphs_before = _unique_graphs()
    for r in range(rounds):
        triad_bw.append(triad.measure(3))
        for m in methods:
            _restore(m, ref_grads)
            flusher()
            _sync(device)
            t0 = time.perf_counter()
            m.step()
            _sync(device)
            times[m.name].append(time.perf_counter() - t0)
    graphs_during = _unique_graphs() - graphs_before

    row.stream_gbps = statistics.median(bw[0] for bw in triad_bw)
    row.in_place_gbps = statistics.median(bw[1] for bw in triad_bw)
    row.bandwidth_gbps = max(row.stream_gbps, row.in_place_gbps)
    row.floor_s = layout.n_params * bpp / (row.bandwidth_gbps * 1e9)
    row.best_bandwidth_gbps = max(max(bw) for bw in triad_bw)
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
    for m, res in zip(methods, row.methods):
        _restore(m, ref_grads)
        ops = count_step_ops(m.step, device)
        res.aten_ops, res.kernel_launches, res.graph_launches = ops.aten_ops, ops.kernel_launches, ops.graph_launches
    for res in row.methods:
        log(f"  {res.method:>10}: median {res.median_s * 1e3:8.3f} ms  "
            f"x{res.speedup_vs_b:5.2f} vs B  roofline {res.roofline_fraction:5.2f}  "
            f"{res.aten_ops} ATen ops/step" + _launches_text(res))
    return row


def _launches_text(res: MethodResult) -> str:
    if res.kernel_launches is None:
        return ""
    graphs = f" ({res.graph_launches} graph)" if res.graph_launches else ""
    return f"  {res.kernel_launches} kernel launches/step{graphs}"


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


_CHILD_CODE = "import sys; from compiled_step.cli.bench import _compile_child_main as m; sys.exit(m(sys.argv[1:]))"


def _compile_child_main(argv: list[str]) -> int:
    """Runs in a fresh interpreter: build N tensors, time the first fused.step(). Prints one JSON line."""
    p = argparse.ArgumentParser(prog="compiled_step.cli.bench child")
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


# --------------------------------------------------------------------------------------------------
# Goals, computed from the measurements


@dataclass
class Goal:
    name: str
    target: str
    measured: str
    status: str  # "met", "gap" or "not measured"


def _status(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "gap")


def best_round(row: RowResult, m: MethodResult) -> tuple[float, float]:
    """(fraction of roofline, speedup vs B) from the best triad and the fastest rounds."""
    floor_best = row.n_params * row.bytes_per_param / (row.best_bandwidth_gbps * 1e9)
    b = row.method("B")
    return floor_best / min(m.times_s), (min(b.times_s) / min(m.times_s)) if b else math.nan


def evaluate_goals(rows: list[RowResult], compile_results: list[CompileResult], device: torch.device,
                   fused_name: str, headline_min_params: int, *, verdicts: bool = True) -> list[Goal]:
    """The goals with their measured figures. ``verdicts=False`` (``--quick``) keeps the figures and
    replaces every met/gap with NO_VERDICT: quick layouts are too small and noisy to judge."""
    goals = _goals(rows, compile_results, device, fused_name, headline_min_params)
    if not verdicts:
        for goal in goals:
            if goal.status in ("met", "gap"):
                goal.status = NO_VERDICT
    return goals


def _goals(rows: list[RowResult], compile_results: list[CompileResult], device: torch.device,
           fused_name: str, headline_min_params: int) -> list[Goal]:
    g = GOALS["cuda" if device.type == "cuda" else "cpu"]
    goals = []
    head = next((r for r in rows if r.key == "adamw"), None)
    fused = head.method(fused_name) if head else None

    goals.append(Goal(
        f"headline layout is >= {headline_min_params / 1e6:.0f} M params (AdamW fp32)",
        f">= {headline_min_params / 1e6:.0f} M",
        "-" if head is None else f"{head.n_params / 1e6:.1f} M in {head.n_tensors} tensors",
        _status(None if head is None else head.n_params >= headline_min_params)))
    best = best_round(head, fused) if fused is not None and not math.isnan(head.best_bandwidth_gbps) else None
    goals.append(Goal(
        "FusedStep fraction of the bandwidth roofline (headline)", f">= {g['roofline']:.2f}",
        "-" if fused is None else f"{fused.roofline_fraction:.2f}"
        + ("" if best is None else f" (best round: {best[0]:.2f})"),
        _status(None if fused is None else fused.roofline_fraction >= g["roofline"])))
    goals.append(Goal(
        "FusedStep speedup over anchor B (headline, t_B / t)", f">= {g['speedup_b']:.2f}x",
        "-" if fused is None or math.isnan(fused.speedup_vs_b) else f"{fused.speedup_vs_b:.2f}x"
        + ("" if best is None or math.isnan(best[1]) else f" (best rounds: {best[1]:.2f}x)"),
        _status(None if fused is None or math.isnan(fused.speedup_vs_b) else fused.speedup_vs_b >= g["speedup_b"])))

    compiled = [c for c in compile_results if c.compiled]
    for kind, key in (("cold", "cold_s"), ("warm", "warm_s")):
        if not compiled:
            goals.append(Goal(f"{kind} compile time, every tensor count", f"<= {g[key]:.0f} s", "-",
                              "not measured"))
            continue
        parts, ok = [], True
        for c in compiled:
            v = getattr(c, key)
            parts.append(f"{c.n_tensors}: " + (f"{v:.1f} s" if v is not None else (c.error or "failed")))
            ok = ok and v is not None and v <= g[key]
        ns = {c.n_tensors for c in compiled}
        # The goal is "whether the model has 16 or 1024 tensors": both ends must have been measured.
        span_ok = {16, 1024} <= ns
        goals.append(Goal(f"{kind} compile time, every tensor count", f"<= {g[key]:.0f} s",
                          "; ".join(parts) + ("" if span_ok else " (16 and 1024 not both measured)"),
                          _status(ok and span_ok)))

    small = next((r for r in rows if r.key == "small"), None)
    sf = small.method(fused_name) if small else None
    if sf is None:
        goals.append(Goal("per-step overhead, many small tensors", f"<= {g['overhead_ms']:.0f} ms", "-",
                          "not measured"))
    else:
        overhead_ms = (sf.median_s - small.floor_s) * 1e3
        goals.append(Goal(
            f"per-step overhead, {small.n_tensors} small tensors (step time - roofline floor)",
            f"<= {g['overhead_ms']:.0f} ms",
            f"{overhead_ms:.2f} ms (step {sf.median_s * 1e3:.2f} ms, floor {small.floor_s * 1e3:.2f} ms)",
            _status(overhead_ms <= g["overhead_ms"])))

    for key, n in TINY_ROWS.items():
        tiny = next((r for r in rows if r.key == key), None)
        tf = tiny.method(fused_name) if tiny else None
        tb = tiny.method("B") if tiny else None
        target = g["tiny_speedup_b"]
        name = f"tiny tensors, host work only: FusedStep speedup over B, {n} tensors, 1 thread (t_B / t)"
        target_text = "-" if target is None else f">= {target:.2f}x"
        if tf is None or tb is None:
            goals.append(Goal(name, target_text, "-", "not measured"))
            continue
        goals.append(Goal(
            name, target_text,
            f"{tf.speedup_vs_b:.2f}x (FusedStep {_ms(tf.median_s)} ms, B {_ms(tb.median_s)} ms)",
            "figure only, no goal on this device" if target is None else _status(tf.speedup_vs_b >= target)))

    if fused is None or fused.peak_extra_bytes is None:
        goals.append(Goal("no param-sized temporaries: peak extra memory during the step",
                          f"< {g['peak_frac']:.0%} of param bytes", "-", "not measured"))
    else:
        frac = fused.peak_extra_bytes / head.param_bytes
        goals.append(Goal(
            "no param-sized temporaries: peak extra memory during the step (headline)",
            f"< {g['peak_frac']:.0%} of param bytes ({head.param_bytes * g['peak_frac'] / 2**20:.2f} MiB)",
            f"{fused.peak_extra_bytes / 2**20:.3f} MiB = {frac:.2%} of param bytes", _status(frac < g["peak_frac"])))
    goals.append(Goal("Inductor bytes accessed per param (fp32 AdamW)", "<= 32 B",
                      "pinned by the expecttest regression test, not by this bench", "not measured"))
    return goals


# --------------------------------------------------------------------------------------------------
# Output: markdown, CSV, JSON, PNG


def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}" if x < 0.1 else f"{x * 1e3:.1f}"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def methods_legend(rows: list[RowResult], *, compiled: bool = True) -> list[str]:
    """``name: description`` for every method in ``rows``, in table order (anchors A-D, FusedStep)."""
    names = list(dict.fromkeys(m.method for r in rows for m in r.methods))
    return [f"{n}: {describe_method(n, compiled=compiled)}" for n in names]


def markdown_tables(rows: list[RowResult], compile_results: list[CompileResult], goals: list[Goal],
                    machine: dict, *, compiled: bool = True, quick: bool = False) -> str:
    out = []
    if quick:
        out.append("_--quick: tiny layouts and few rounds, to check the plumbing. The figures are reported "
                   "but not judged: at these sizes they swing from run to run, so no goal gets a met/gap "
                   "verdict._\n")
    out.append("| goal | target | measured | status |\n|---|---|---|---|")
    out += [f"| {g.name} | {g.target} | {g.measured} | **{g.status}** |" for g in goals]
    out.append("")
    out.append("Methods (every speedup is relative to anchor B):\n")
    out += [f"- **{line.split(': ', 1)[0]}**: {line.split(': ', 1)[1]}" for line in methods_legend(rows, compiled=compiled)]
    out.append("")
    cuda = any(m.kernel_launches is not None for r in rows for m in r.methods)
    for r in rows:
        threads = (f" {r.threads} thread (torch.set_num_threads({r.threads})): host work only."
                   if r.key in TINY_ROWS else f" {r.threads} threads.")
        out.append(
            f"**{r.key}**: {r.optimizer} {r.dtype}, {r.layout}, {r.n_params / 1e6:.2f} M params in "
            f"{r.n_tensors} tensors. Floor {r.bytes_per_param} B/param x {r.n_params / 1e6:.2f} M at "
            f"{r.bandwidth_gbps:.1f} GB/s (medians of per-round best triads: STREAM a = b + s*c "
            f"{r.stream_gbps:.1f}, in-place a += s*c {r.in_place_gbps:.1f}; best round {r.best_bandwidth_gbps:.1f}) "
            f"= {_ms(r.floor_s)} ms. {len(r.methods[0].times_s)} rounds.{threads}\n")
        launches_head, launches_rule = (" kernel launches/step |", "---:|") if cuda else ("", "")
        out.append("| method | median ms | IQR ms | min ms | speedup vs B (t_B/t) | fraction of roofline | "
                   f"peak extra MiB | max abs diff vs B | ATen ops/step |{launches_head}\n"
                   f"|---|---:|---:|---:|---:|---:|---:|---:|---:|{launches_rule}")
        for m in r.methods:
            launches = ""
            if cuda:
                launches = " - |" if m.kernel_launches is None else (
                    f" {m.kernel_launches}" + (f" ({m.graph_launches} graph)" if m.graph_launches else "") + " |")
            out.append(
                f"| {m.method} | {_ms(m.median_s)} | {_ms(m.iqr_s)} | {_ms(min(m.times_s))} | {m.speedup_vs_b:.2f}x | "
                f"{m.roofline_fraction:.2f} | {_mib(m.peak_extra_bytes)} | {m.max_abs_diff_vs_b:.1e} | "
                f"{_fmt_num(m.aten_ops)} |{launches}")
        out += [f"\n_{n}_" for n in r.notes]
        out.append("")
    if compile_results:
        out.append("Compile time of the first `fused.step()` (fresh subprocess; cold: empty Inductor cache "
                   "dir; warm: the same dir again). AdamW fp32, tensors of varied sizes around 4096.\n")
        out.append("| tensors | cold s | warm s | graphs (cold) | graphs (warm) | graphs at 2nd step | "
                   "steady step ms | note |\n|---:|---:|---:|---:|---:|---:|---:|---|")
        for c in compile_results:
            note = c.error or ("" if c.compiled else "compile=False: plumbing only, not a compile time")
            out.append(
                f"| {c.n_tensors} | {_fmt_num(c.cold_s)} | {_fmt_num(c.warm_s)} | {_fmt_num(c.graphs_cold)} | "
                f"{_fmt_num(c.graphs_warm)} | {_fmt_num(c.second_step_graphs)} | {_fmt_num(c.steady_ms)} | {note} |")
        out.append("")
    return "\n".join(out)


def _fmt_num(x) -> str:
    if x is None:
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.2f}"


RESULT_FIELDS = [
    "device", "row", "optimizer", "dtype", "layout", "n_params", "n_tensors", "method", "median_ms", "iqr_ms",
    "min_ms", "rounds", "speedup_vs_b", "bytes_per_param", "bandwidth_gbps", "floor_ms", "roofline_fraction",
    "stream_triad_gbps", "in_place_triad_gbps", "best_bandwidth_gbps", "best_round_roofline_fraction",
    "best_round_speedup_vs_b",
    "peak_extra_bytes", "max_abs_diff_vs_b", "graphs_compiled", "graphs_during_timing", "threads",
    "aten_ops", "kernel_launches", "graph_launches",
]


def result_records(rows: list[RowResult], device: torch.device) -> list[dict]:
    recs = []
    for r in rows:
        for m in r.methods:
            recs.append(dict(
                device=str(device), row=r.key, optimizer=r.optimizer, dtype=r.dtype, layout=r.layout,
                n_params=r.n_params, n_tensors=r.n_tensors, method=m.method, median_ms=m.median_s * 1e3,
                iqr_ms=m.iqr_s * 1e3, min_ms=min(m.times_s) * 1e3, rounds=len(m.times_s),
                speedup_vs_b=m.speedup_vs_b, bytes_per_param=r.bytes_per_param,
                bandwidth_gbps=r.bandwidth_gbps, floor_ms=r.floor_s * 1e3,
                best_bandwidth_gbps=r.best_bandwidth_gbps, stream_triad_gbps=r.stream_gbps,
                in_place_triad_gbps=r.in_place_gbps,
                best_round_roofline_fraction=best_round(r, m)[0], best_round_speedup_vs_b=best_round(r, m)[1],
                roofline_fraction=m.roofline_fraction, peak_extra_bytes=m.peak_extra_bytes,
                max_abs_diff_vs_b=m.max_abs_diff_vs_b, graphs_compiled=m.graphs_compiled,
                graphs_during_timing=m.graphs_during_timing, threads=r.threads, aten_ops=m.aten_ops,
                kernel_launches=m.kernel_launches, graph_launches=m.graph_launches,
            ))
    return recs


def write_csv(path: Path, records: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for rec in records:
            w.writerow({k: ("" if rec.get(k) is None else rec[k]) for k in fields})


COMPILE_FIELDS = ["n_tensors", "compiled", "cold_s", "warm_s", "graphs_cold", "graphs_warm",
                  "second_step_graphs", "steady_ms", "error"]


def write_png(path: Path, rows: list[RowResult], compile_results: list[CompileResult], device_name: str,
              *, compiled: bool = True) -> list[str]:
    """Draw bench.png; returns the legend's lines (``name: description`` per method)."""
    import matplotlib  # noqa: PLC0415 -- lazy: only the bench needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    has_compile = any(c.cold_s is not None for c in compile_results)
    methods = list(dict.fromkeys(m.method for r in rows for m in r.methods))
    legend = methods_legend(rows, compiled=compiled)
    # The legend spells out every method (anchors A-D, FusedStep) below the panels, one per line.
    legend_in = 0.2 * len(legend) + 0.2
    height = 4.5 + legend_in
    fig, axes = plt.subplots(1, 3 if has_compile else 2, figsize=(16 if has_compile else 11, height))
    width = 0.8 / max(1, len(methods))
    for ax, attr, title in ((axes[0], "roofline_fraction", "fraction of bandwidth roofline (higher is better)"),
                            (axes[1], "speedup_vs_b", "speedup vs anchor B, t_B / t (higher is better)")):
        for j, name in enumerate(methods):
            xs, ys = [], []
            for i, r in enumerate(rows):
                m = r.method(name)
                if m is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(getattr(m, attr))
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.set_xticks(range(len(rows)), [r.key for r in rows])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
    # Ratios: 2x and 0.5x are equally far from 1, and one slow anchor must not flatten every other bar.
    axes[1].set_yscale("log")
    fig.legend([Patch(color=f"C{j}") for j in range(len(methods))], legend, loc="lower left",
               bbox_to_anchor=(0.01, 0.0), ncol=1, fontsize=8, frameon=False)
    if has_compile:
        ax = axes[2]
        ok = [c for c in compile_results if c.cold_s is not None]
        ax.plot([c.n_tensors for c in ok], [c.cold_s for c in ok], "o-", label="cold")
        okw = [c for c in ok if c.warm_s is not None]
        ax.plot([c.n_tensors for c in okw], [c.warm_s for c in okw], "s-", label="warm")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # flat lines near the goal read as a trend without the zero
        ax.set_xlabel("parameter tensors")
        ax.set_ylabel("first fused.step() s")
        ax.set_title("FusedStep compile time", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"compiled_step bench on {device_name}", fontsize=11)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return legend


def benchmarks_md(command: str, machine: dict, tables: str, goals: list[Goal], started: str,
                  duration_s: float) -> str:
    gaps = [g for g in goals if g.status == "gap"]
    unjudged = any(g.status == NO_VERDICT for g in goals)
    lines = [
        "# Benchmarks",
        "",
        "Generated by the bench command below; do not edit by hand, rerun it. Numbers come from one process, "
        "with the methods interleaved round by round and the median reported; this machine is shared and "
        "noisy, so compare ratios measured side by side rather than absolute times across runs.",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        f"- device: `{machine['device']}` ({machine['device_name']})",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_cores']} cores available, "
        f"torch intra-op threads {machine['torch_threads']}",
        f"- torch {machine['torch']}, Python {machine['python']}, {machine['platform']}",
        f"- run started {started}, took {duration_s / 60:.1f} min; 1-minute load average "
        f"{_fmt_load(machine.get('load_average_at_start'))} at the start and "
        f"{_fmt_load(machine.get('load_average_at_end'))} at the end (anything well above 0 means other "
        "processes shared the cores while this ran)",
        f"- Inductor cache: {machine.get('inductor_cache', 'default')}",
        f"- compiled_step source: {machine.get('source', 'unknown')}",
        "",
        "## Results",
        "",
        tables,
        "## Gaps",
        "",
    ]
    if gaps:
        lines += [f"- **{g.name}**: measured {g.measured}, target {g.target}." for g in gaps]
    elif unjudged:
        lines.append("- not judged: a --quick run gives figures only.")
    else:
        lines.append("- none among the goals measured here.")
    lines += ["", "## Method", "", _method_text(), ""]
    return "\n".join(lines)


def _fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _method_text() -> str:
    # The module docstring is BENCHMARKS.md's method section, so the two cannot drift apart.
    doc = __doc__ or ""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else doc
    return body.strip()


# --------------------------------------------------------------------------------------------------
# Command line

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
    p.add_argument("--rows", default=",".join(ROW_KINDS),
                   help=f"comma list of rows out of {','.join(ROW_KINDS)} (default all; tiny100/tiny1000: "
                   f"{TINY_NUMEL}-element tensors on {TINY_THREADS} thread, host work only)")
    p.add_argument("--methods", default=None,
                   help="comma list out of A,B,C,D,fused (default all; B is required: ratios are to B)")
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
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before starting, wait up to SECONDS for the 1-minute load average to drop below "
                   "0.7 (other processes on the cores make every timing meaningless); default 0: no wait")
    p.add_argument("--profile", action="store_true",
                   help="write a torch.profiler op table for the fused method and B of each row to --out")
    p.add_argument("--write-benchmarks-md", nargs="?", const="BENCHMARKS.md", default=None, metavar="PATH",
                   help="also regenerate BENCHMARKS.md (or PATH) from this run")
    return p


def _resolve(args: argparse.Namespace) -> None:
    """Validate options and fill mode-dependent defaults, raising BenchError with a clear message."""
    try:
        args.device_obj = torch.device(args.device)
    except RuntimeError as exc:
        raise BenchError(f"--device {args.device!r} is not a torch device ({exc})") from None
    if args.device_obj.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch.cuda.is_available() is False")
    if args.device_obj.type == "cuda":
        if args.device_obj.index is None:  # "cuda": the current GPU, named so the report says which
            args.device_obj = torch.device("cuda", torch.cuda.current_device())
        elif args.device_obj.index >= torch.cuda.device_count():
            raise BenchError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.device_obj.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {args.device!r}: only cpu and cuda are supported")
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

    explicit_methods = args.methods is not None
    methods = _csv_list(args.methods, "--methods") if explicit_methods else [*ANCHORS, "fused"]
    bad = [m for m in methods if m not in (*ANCHORS, "fused")]
    if bad:
        raise BenchError(f"--methods: unknown {bad}; choose from A,B,C,D,fused")
    if "B" not in methods:
        raise BenchError("--methods must include B: every ratio in the table is to anchor B")
    args.notes = []
    if args.no_compile and "C" in methods:
        if explicit_methods:
            raise BenchError("--no-compile excludes anchor C (it is a torch.compile'd step); drop C from --methods")
        methods.remove("C")
        args.notes.append("Anchor C was skipped: --no-compile.")

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
    fused_names = [m for m in expanded if m.startswith("fused")]
    # Goals are judged on the first fused method (the first --bucket-size).
    args.fused_name = fused_names[0] if fused_names else "fused"
    if fused_names:
        _load_fused_step()  # fail now with a clear message, not after minutes of anchors

    if args.skip_compile_time or "fused" not in methods:
        args.compile_sizes_list = []
    elif args.compile_sizes is not None:
        args.compile_sizes_list = [_positive(s, "--compile-sizes") for s in _csv_list(args.compile_sizes,
                                                                                         "--compile-sizes")]
    else:
        args.compile_sizes_list = [] if args.quick else list(DEFAULT_COMPILE_SIZES)
    if args.wait_idle < 0:
        raise BenchError(f"--wait-idle must be >= 0, got {args.wait_idle}")
    if args.compile_timeout <= 0:
        raise BenchError(f"--compile-timeout must be > 0, got {args.compile_timeout}")
    for name in ("rounds", "warmup"):
        if getattr(args, name) <= 0:
            raise BenchError(f"--{name} must be > 0")


def _row_specs(args) -> list[RowSpec]:
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
        if family == "tiny":
            layout, threads = L.many_small_layout(TINY_ROWS[key], TINY_NUMEL), TINY_THREADS
        else:
            layout, threads = (gpt if family == "gpt" else small), None
        specs.append(RowSpec(key, opt, dtype, layout, tuple(methods), tuple(notes), threads))
    return specs


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    """torch.set_num_threads(n) for the block (None: unchanged), restored afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _profile_methods(row_spec: RowSpec, args, log) -> None:
    """Op-level profile of B and the fused method(s) on this row, to show where the step spends time."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    device = args.device_obj
    ref_grads = L.make_grads(row_spec.layout, dtype=row_spec.dtype, device=device, seed=1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in [m for m in row_spec.methods if m == "B" or m.startswith("fused")]:
        m = build_method(name, optimizer=row_spec.optimizer, layout=row_spec.layout, dtype=row_spec.dtype,
                         device=device, ref_grads=ref_grads, compile_fused=not args.no_compile,
                         bucket_size=args.bucket_of.get(name))
        for _ in range(args.warmup):
            _restore(m, ref_grads)
            m.step()
        with quiet_profiler(), profile(activities=acts) as prof:
            for _ in range(3):
                _restore(m, ref_grads)
                _sync(device)
                m.step()
                _sync(device)
        path = Path(args.out) / f"profile_{row_spec.key}_{name.replace('[', '_').replace('=', '').rstrip(']')}.txt"
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25) + "\n")
        log(f"  profile of {name} -> {path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _resolve(args)
        # bench.png needs matplotlib (the cli extra): say so now, not after the whole run.
        require_cli_extra("the bench", ["matplotlib"])
        return _run(args, argv)
    except (BenchError, MissingExtraError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _row_inductor_cache(fresh: bool):
    """A fresh, private Inductor cache for one row, so its kernels are compiled for its own sizes.

    Why: with dynamic shapes, Inductor's C++ backend decides whether a loop gets an OpenMP parallel
    region from the size *hints* of the first compile, and the FX graph cache key does not include
    those hints. A graph first compiled on tiny tensors (a test run, the many-small row) is then served
    from the cache, single-threaded, to a 20 M-param model. A fresh cache per row measures what a user
    of that model gets on a clean machine, whatever ran before. ``fresh_cache`` also clears Inductor's
    in-process caches that remember the old directory.
    """
    if not fresh:
        yield
        return
    from torch._inductor.utils import clear_caches, fresh_cache  # noqa: PLC0415 -- private, torch pinned

    try:
        with fresh_cache():
            yield
    finally:
        clear_caches()  # forget paths inside the directory fresh_cache just deleted


def _wait_idle(max_s: float, log: Callable[[str], None], threshold: float = 0.7) -> None:
    if not hasattr(os, "getloadavg"):
        return
    deadline = time.monotonic() + max_s
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        log(f"waiting for the machine to go idle: 1-min load average {load:.2f} >= {threshold}")
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]
    if load >= threshold:
        log(f"still busy after {max_s:.0f}s (load {load:.2f}); measuring anyway, the load is recorded")


def _run(args, argv: list[str]) -> int:
    device = args.device_obj
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    outputs = ", ".join(OUTPUT_FILES) + (f"; also {args.write_benchmarks_md}" if args.write_benchmarks_md else "")
    log(f"bench: outputs go to {out.resolve()}/ ({outputs})")

    if args.wait_idle > 0:
        _wait_idle(args.wait_idle, log)
    # Started after any --wait-idle: the reported duration is the benchmark's own.
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    machine = machine_info(device)
    log(f"bench on {machine['device']} ({machine['device_name']}), torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, 1-min load average {_fmt_load(machine['load_average_at_start'])}")
    triad = Triad(args.triad_mib * (1 << 20) // 4, device)
    flusher = CacheFlusher(device, machine["last_level_cache_bytes"])
    rows = []
    for spec in _row_specs(args):
        # Anchor C's compiled fn has one code object for every row; Dynamo caches per code object with
        # guards on the optimizer, so each row would add a recompile towards the limit of 8. The previous
        # rows' objects are dead by now, so their compiled code can go.
        torch._dynamo.reset()
        with _row_inductor_cache(args.inductor_cache == "fresh"), _num_threads(spec.threads):
            row = run_row(spec, device=device, triad=triad, flusher=flusher, rounds=args.rounds,
                          warmup=args.warmup, compile_fused=not args.no_compile, bucket_sizes=args.bucket_of,
                          measure_memory=not args.no_memory, log=log)
            if args.profile:
                _profile_methods(spec, args, log)
        rows.append(row)

    compile_results = measure_compile_times(args.compile_sizes_list, args, log) if args.compile_sizes_list else []
    machine["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine["inductor_cache"] = ("a fresh empty cache directory per row" if args.inductor_cache == "fresh"
                                 else "the process's default cache directory")
    goals = evaluate_goals(rows, compile_results, device, args.fused_name, args.headline_min_params,
                           verdicts=not args.quick)
    tables = markdown_tables(rows, compile_results, goals, machine, compiled=not args.no_compile, quick=args.quick)
    if args.notes:
        tables += "\n" + "\n".join(f"_{n}_" for n in args.notes) + "\n"
    duration = time.perf_counter() - t_start

    (out / "bench.md").write_text(tables + "\n")
    write_csv(out / "results.csv", result_records(rows, device), RESULT_FIELDS)
    write_csv(out / "compile_times.csv", [c.__dict__ for c in compile_results], COMPILE_FIELDS)
    (out / "results.json").write_text(json.dumps({
        "command": _command(argv), "machine": machine, "started": started, "duration_s": duration,
        "rows": [{**{k: v for k, v in r.__dict__.items() if k != "methods"},
                  "methods": [{**m.__dict__, "median_s": m.median_s, "roofline_fraction": m.roofline_fraction}
                              for m in r.methods]} for r in rows],
        "compile": [c.__dict__ for c in compile_results],
        "goals": [g.__dict__ for g in goals],
    }, indent=1, default=str))
    write_png(out / "bench.png", rows, compile_results, machine["device_name"], compiled=not args.no_compile)
    if args.write_benchmarks_md:
        Path(args.write_benchmarks_md).write_text(
            benchmarks_md(_command(argv), machine, tables, goals, started, duration))
    log("\n" + tables)
    log(f"bench: wrote {out.resolve()}/ ({', '.join(OUTPUT_FILES)}) in {duration:.0f}s"
        + (f"; and {Path(args.write_benchmarks_md).resolve()}" if args.write_benchmarks_md else ""))
    return 0


OUTPUT_FILES = ("bench.md", "results.csv", "compile_times.csv", "results.json", "bench.png")


def _command(argv: list[str]) -> str:
    return "python -m compiled_step bench" + ("" if not argv else " " + shlex.join(argv))


if __name__ == "__main__":
    sys.exit(main())
