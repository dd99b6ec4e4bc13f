"""Measurement primitives: device sync, the triad roofline, the cache flusher, ATen ops and launches per
step, peak extra memory (torch.profiler), Dynamo's graph counter, and the conditions a row runs under
(intra-op threads, a fresh Inductor cache)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


def sync(device: torch.device) -> None:
    # CPU kernels (eager and Inductor's C++) return when done; only CUDA needs a sync around a timer.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            sync(self.device)
            t0 = time.perf_counter()
            fn()
            sync(self.device)
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
    sync(device)
    with quiet_profiler(), profile(activities=activities) as prof:
        step()
        sync(device)
    names = [e.name for e in prof.events()]
    aten = sum(1 for n in names if n.startswith("aten::"))
    if not cuda:
        return StepOps(aten)
    graphs = sum(1 for n in names if n in _GRAPH_LAUNCHES)
    return StepOps(aten, sum(1 for n in names if n in _KERNEL_LAUNCHES) + graphs, graphs)


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
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


def unique_graphs() -> int:
    from torch._dynamo.utils import counters  # noqa: PLC0415 -- keep import light for --help

    return int(counters["stats"]["unique_graphs"])


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the FSDP2 row: one rank, so the whole tensor), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((local_shard(x).detach().float() - local_shard(y).detach().float()).abs().max())
               for x, y in zip(a, b))


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
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


@contextlib.contextmanager
def row_inductor_cache(fresh: bool):
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
