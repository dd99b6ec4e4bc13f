"""One row of the tables: a layout x optimizer x dtype. Every method is warmed up on its own, then the
methods are timed interleaved, one step each per round, with the triads measured in every round."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench import muon as muon_row
from compiled_step.cli.bench.measure import (
    CacheFlusher,
    Triad,
    count_step_ops,
    max_abs_diff,
    peak_extra_bytes,
    sync,
    unique_graphs,
)
from compiled_step.cli.bench.methods import (
    MAX_GRAD_NORM,
    MUON_ADAMW,
    BenchError,
    Method,
    build_method,
    floor_bytes_per_param,
    restore_grads,
)

ROW_KINDS = {
    # key: (optimizer, param dtype, layout family)
    "adamw": ("adamw", torch.float32, "gpt"),
    "sgd": ("sgd", torch.float32, "gpt"),
    "adamw-bf16": ("adamw", torch.bfloat16, "gpt"),
    "small": ("adamw", torch.float32, "small"),
    "tiny100": ("adamw", torch.float32, "tiny"),
    "tiny1000": ("adamw", torch.float32, "tiny"),
    "fsdp2": ("adamw", torch.float32, "fsdp2"),  # the GPT layout as FSDP2 shards (one process, one rank)
    # Muon on the GPT layout's hidden matrices, AdamW on the rest; FusedStep([muon, adamw]).
    MUON_ADAMW: (MUON_ADAMW, torch.float32, "gpt"),
    # The headline again, after a small FusedStep compiled and stepped in the same process and the same
    # Inductor cache: its speed must not depend on which size compiled first (compiling.ROWS_HINT).
    "small_first": ("adamw", torch.float32, "gpt"),
}
SMALL_FIRST = "small_first"
# The small FusedStep of that row: the --quick GPT layout (about 0.1 M params; its buffers have few rows).
SMALL_FIRST_LAYOUT = dict(d_model=64, n_layers=2, vocab=512, seq_len=64)
# Tiny-tensor rows: tensor count, and one intra-op thread so the step time is host work only.
TINY_ROWS = {"tiny100": 100, "tiny1000": 1000}
TINY_NUMEL = 16
TINY_THREADS = 1


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
    compiled_calls: int | None = None  # FusedStep only: calls of compiled graphs per step (its program's)

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
    bytes_per_param: float  # an integer for one optimizer; the mean over the params for Muon + AdamW
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
    # Timed in the same rounds as the methods but not methods (muon_adamw: Newton-Schulz alone).
    probe_times_s: dict[str, list[float]] = field(default_factory=dict)

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
    fsdp2: bool = False  # the params are FSDP2 shards (``fsdp.py``)
    small_first: bool = False  # a small FusedStep compiles and steps first, in the row's cache (SMALL_FIRST)


def run_row(spec: RowSpec, **kwargs) -> RowResult:
    """Warm up every method of the row, time them interleaved round by round, then compare each to B and
    count its peak memory and ops in one more step each (keywords: ``_run_row``'s). The FSDP2 row runs
    inside a one-rank process group."""
    if not spec.fsdp2:
        return _run_row(spec, **kwargs)
    from compiled_step.cli.bench import fsdp  # noqa: PLC0415 -- torch.distributed only for this row

    with fsdp.single_process_group(kwargs["device"]) as mesh:
        return _run_row(spec, mesh=mesh, **kwargs)


def _run_row(spec: RowSpec, *, device: torch.device, triad: Triad, flusher: CacheFlusher, rounds: int, warmup: int,
             compile_fused: bool, bucket_sizes: dict[str, int | None], measure_memory: bool,
             log: Callable[[str], None], mesh=None) -> RowResult:
    ref_grads = L.make_grads(spec.layout, dtype=spec.dtype, device=device, seed=1)
    row = _new_row(spec, ref_grads)
    log(f"[{spec.key}] {spec.layout.describe()}{' as FSDP2 shards' if spec.fsdp2 else ''}, {spec.dtype}, "
        f"grad norm {row.grad_norm:.1f}, {row.threads} thread(s); methods {', '.join(spec.methods)}")
    if spec.small_first:
        row.notes.append(_step_a_small_fused_step_first(spec, device=device, warmup=warmup,
                                                        compile_fused=compile_fused, log=log))
    methods, compiled_counts = _warm_up(spec, ref_grads, device=device, warmup=warmup, compile_fused=compile_fused,
                                        bucket_sizes=bucket_sizes, log=log, mesh=mesh)
    probes = _probes(spec, methods, ref_grads)
    times, triad_bw, graphs_during = _timed_rounds(methods, ref_grads, device=device, triad=triad,
                                                   flusher=flusher, rounds=rounds, probes=probes)
    row.probe_times_s = {name: times.pop(name) for name in probes}
    _set_bandwidth(row, triad_bw, spec.layout.n_params)
    for m in methods:
        row.methods.append(MethodResult(
            row=spec.key, method=m.name, times_s=times[m.name], floor_s=row.floor_s,
            graphs_compiled=compiled_counts[m.name],
            # Dynamo's counter is global, so a recompile is attributed to the row, not to one method.
            graphs_during_timing=graphs_during,
        ))
    if graphs_during:
        row.notes.append(f"{graphs_during} graph(s) were compiled during the timed rounds")
    _compare_to_b(row, methods)
    if muon_row.NEWTON_SCHULZ in row.probe_times_s:
        b = row.method("B")
        fused = next((m for m in row.methods if m.method.startswith("fused")), None)
        row.notes.append(muon_row.newton_schulz_note(spec.layout, row.probe_times_s[muon_row.NEWTON_SCHULZ],
                                                     None if b is None else b.median_s,
                                                     None if fused is None else fused.median_s))
    _measure_one_step(row, methods, ref_grads, device=device, measure_memory=measure_memory)
    for res in row.methods:
        log(f"  {res.method:>10}: median {res.median_s * 1e3:8.3f} ms  "
            f"x{res.speedup_vs_b:5.2f} vs B  roofline {res.roofline_fraction:5.2f}  "
            f"{res.aten_ops} ATen ops/step"
            + (f", {res.compiled_calls} compiled calls/step" if res.compiled_calls is not None else "")
            + _launches_text(res))
    return row


def _new_row(spec: RowSpec, ref_grads: list[torch.Tensor]) -> RowResult:
    """The row's result before measuring: its sizes and floor bytes; the reference grads must clip."""
    layout = spec.layout
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in ref_grads])))
    if not math.isfinite(grad_norm) or grad_norm <= MAX_GRAD_NORM:
        raise BenchError(f"reference grads must be finite and clip (norm {grad_norm} vs {MAX_GRAD_NORM})")
    bpp = floor_bytes_per_param(spec.optimizer, spec.dtype, layout)
    itemsize = torch.empty((), dtype=spec.dtype).element_size()
    return RowResult(
        key=spec.key, optimizer=spec.optimizer, dtype=str(spec.dtype).replace("torch.", ""),
        layout=layout.name, n_params=layout.n_params, n_tensors=layout.n_tensors,
        param_bytes=layout.n_params * itemsize, bytes_per_param=bpp, bandwidth_gbps=math.nan,
        floor_s=math.nan, grad_norm=grad_norm, notes=list(spec.notes), threads=torch.get_num_threads(),
    )


def _step_a_small_fused_step_first(spec: RowSpec, *, device: torch.device, warmup: int, compile_fused: bool,
                                   log: Callable[[str], None]) -> str:
    """Compile and step a small FusedStep (SMALL_FIRST_LAYOUT) before the row's methods are built, so they
    compile in the same process into an Inductor cache it has warmed; it is gone before they are timed.
    Returns the row's note."""
    layout = L.gpt_layout(**SMALL_FIRST_LAYOUT)
    grads = L.make_grads(layout, dtype=spec.dtype, device=device, seed=2)
    t0 = time.perf_counter()
    small = build_method(_first_fused(spec), optimizer=spec.optimizer, layout=layout, dtype=spec.dtype,
                         device=device, ref_grads=grads, compile_fused=compile_fused, bucket_size=None)
    before = unique_graphs()
    for _ in range(warmup):
        restore_grads(small, grads)
        small.step()
    sync(device)
    compiled = unique_graphs() - before
    log(f"  small FusedStep first: {layout.describe()} in {time.perf_counter() - t0:.1f}s ({compiled} graphs)")
    return (f"A small FusedStep ({layout.describe()}) was built and stepped {warmup} times first ({compiled} "
            "Dynamo graphs compiled), in this process and this row's Inductor cache; then the methods were built "
            "and timed.")


def _first_fused(spec: RowSpec) -> str:
    fused = [m for m in spec.methods if m.startswith("fused")]
    if not fused:
        raise BenchError(f"row {spec.key} needs a fused method")
    return fused[0]


def _warm_up(spec: RowSpec, ref_grads: list[torch.Tensor], *, device: torch.device, warmup: int,
             compile_fused: bool, bucket_sizes: dict[str, int | None],
             log: Callable[[str], None], mesh=None) -> tuple[list[Method], dict[str, int]]:
    """Build each method and warm it up in isolation: the first steps compile (C, fused) and allocate
    optimizer state. Returns the methods and the Dynamo graphs each compiled."""
    methods: list[Method] = []
    compiled_counts: dict[str, int] = {}
    for name in spec.methods:
        t0 = time.perf_counter()
        m = build_method(
            name, optimizer=spec.optimizer, layout=spec.layout, dtype=spec.dtype, device=device,
            ref_grads=ref_grads, compile_fused=compile_fused, bucket_size=bucket_sizes.get(name), mesh=mesh,
        )
        before = unique_graphs()
        for _ in range(warmup):
            restore_grads(m, ref_grads)
            m.step()
        sync(device)
        compiled_counts[name] = unique_graphs() - before
        log(f"  warmed {name} in {time.perf_counter() - t0:.1f}s ({compiled_counts[name]} graphs)")
        methods.append(m)
    return methods, compiled_counts


def _probes(spec: RowSpec, methods: list[Method], ref_grads: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """Work timed beside the methods, by name: on the Muon + AdamW row, torch's Newton-Schulz alone."""
    if spec.optimizer != MUON_ADAMW:
        return {}
    muon = methods[0].optimizers[0]  # every method's Muon has the same hyperparameters
    return {muon_row.NEWTON_SCHULZ: muon_row.newton_schulz_probe(muon, spec.layout, ref_grads)}


def _timed_rounds(methods: list[Method], ref_grads: list[torch.Tensor], *, device: torch.device, triad: Triad,
                  flusher: CacheFlusher, rounds: int, probes: dict[str, Callable[[], None]]
                  ) -> tuple[dict[str, list[float]], list[tuple[float, float]], int]:
    """Per round: the triads, then one step of each method from restored grads and a flushed cache, then
    each probe from a flushed cache. Returns the times per method and probe, the triads' (STREAM,
    in-place) GB/s per round, and the graphs Dynamo compiled meanwhile (should be 0)."""
    times: dict[str, list[float]] = {name: [] for name in [m.name for m in methods] + list(probes)}
    triad_bw: list[tuple[float, float]] = []  # per round: (STREAM, in-place) best-of-3 GB/s
    graphs_before = unique_graphs()
    for _ in range(rounds):
        triad_bw.append(triad.measure(3))
        for m in methods:
            restore_grads(m, ref_grads)
            times[m.name].append(_timed(m.step, device, flusher))
        for name, probe in probes.items():
            times[name].append(_timed(probe, device, flusher))
    return times, triad_bw, unique_graphs() - graphs_before


def _timed(fn: Callable[[], object], device: torch.device, flusher: CacheFlusher) -> float:
    flusher()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _set_bandwidth(row: RowResult, triad_bw: list[tuple[float, float]], n_params: int) -> None:
    """The row's bandwidth (the higher of the two triads' medians over rounds) and its roofline floor."""
    row.stream_gbps = statistics.median(bw[0] for bw in triad_bw)
    row.in_place_gbps = statistics.median(bw[1] for bw in triad_bw)
    row.bandwidth_gbps = max(row.stream_gbps, row.in_place_gbps)
    row.floor_s = n_params * row.bytes_per_param / (row.bandwidth_gbps * 1e9)
    row.best_bandwidth_gbps = max(max(bw) for bw in triad_bw)


def _compare_to_b(row: RowResult, methods: list[Method]) -> None:
    """Speedup over anchor B, and the largest param difference from B's params."""
    ref = next((m for m in methods if m.name == "B"), None)
    b_result = row.method("B")
    for m, res in zip(methods, row.methods):
        if b_result is not None:
            res.speedup_vs_b = b_result.median_s / res.median_s
        if ref is not None:
            # Same init, same grads, same number of steps: every method should sit on B's trajectory.
            res.max_abs_diff_vs_b = max_abs_diff(m.params, ref.params)


def _measure_one_step(row: RowResult, methods: list[Method], ref_grads: list[torch.Tensor], *,
                      device: torch.device, measure_memory: bool) -> None:
    """One more step per method for its peak extra memory (unless not asked for), one for its op counts."""
    if measure_memory:
        for m, res in zip(methods, row.methods):
            restore_grads(m, ref_grads)
            res.peak_extra_bytes = peak_extra_bytes(m.step, device)
    for m, res in zip(methods, row.methods):
        restore_grads(m, ref_grads)
        ops = count_step_ops(m.step, device)
        res.aten_ops, res.kernel_launches, res.graph_launches = ops.aten_ops, ops.kernel_launches, ops.graph_launches
        program = getattr(getattr(m.step, "__self__", None), "program", None)  # FusedStep's prepared calls
        if program is not None:
            kinds = {}
            for call in program.calls:
                kinds[call.runs_as] = kinds.get(call.runs_as, 0) + 1
            res.compiled_calls = kinds.get("compiled", 0)  # every call of the program runs once per step
            row.notes.append(f"{m.name}: {len(program.calls)} calls per step ("
                             + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + "), each a whole sharding "
                             "group or bucket: on the CPU the compiled ones run Inductor's C++ kernels directly, on "
                             "CUDA they are replayed as CUDA graphs (kernel launches in the table)")


def _launches_text(res: MethodResult) -> str:
    if res.kernel_launches is None:
        return ""
    graphs = f" ({res.graph_launches} graph)" if res.graph_launches else ""
    return f"  {res.kernel_launches} kernel launches/step{graphs}"
