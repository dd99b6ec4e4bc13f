"""Replaying the prepared step as CUDA graphs: the thin CUDA-only layer over ``program.Program``.

The program's calls read and write only persistent tensors, and its compiled calls are recorded on
the first run, so from the second run on the program can be captured: each *segment* of
consecutive capturable calls becomes one CUDA graph, replayed with one launch. Capturable are the
eager calls, the compiled calls once recorded (with ``compile=False``, the plain functions), and a
collective that runs on CUDA tensors through NCCL (``collective_capturable``). Any other collective
(gloo, or a process group with no CUDA backend) runs eagerly between segments.

How one segment is captured (``capture_cuda_graph``):

* under ``torch.cuda.device(params' device)``, on a side stream of that device: kernels launched on
  another device are not captured, and with params on ``cuda:1`` and ``cuda:0`` current the graph
  came out empty;
* in ``capture_error_mode="thread_local"``: in the default "global" mode, a DataLoader
  ``pin_memory`` thread or an async checkpoint writer that touches CUDA during the capture kills it;
* with the device's current stream restored however the capture ends (``torch.cuda.graph``'s
  ``__exit__`` skips restoring it when ``capture_end`` raises, torch 2.11 to 2.14);
* a graph that captured nothing raises (torch's own "The CUDA Graph is empty" warning from
  ``capture_end``, the only node count it offers without ``cuda.bindings``): replaying it would
  silently skip the step's work;
* in the one memory pool every segment of the plan shares (``graph_pool``): a graph keeps its pool's
  peak for as long as it lives, so with a pool each the step would hold the sum of every segment's
  temporaries (Muon's Newton-Schulz, Phase A's partials, ...) for good, rather than the largest one.
  Sharing is safe because the calls keep no tensor past their call (they write persistent buffers):
  a segment's memory is free again when its capture ends, and the segments replay one at a time on
  one stream.

Agreement: whether an NCCL collective is captured must be the same on every rank of its
communicator, or ranks that replay a captured all-reduce wait forever for one that runs it eagerly.
So after capturing, every rank of the default group sends its outcome (one ``all_gather_object``,
``collectives.agree``) before any replay, and if any rank failed every rank drops its graphs and
warns. The default group, not the program's groups: a rank that falls back forces its peers in
every group it shares to fall back, and they their peers in other groups, which spans every rank;
every rank builds its plan at the same step (plans agree over the default group too), so every rank
captures at the same step. Outside a distributed run (or with one rank) no collective is called.

Limits: nothing is captured on the CPU (the recorded program replays there call by call); with
``offload_optimizer_state`` the state buffers are reallocated every step, so nothing is captured;
``error_if_nonfinite`` splits the step after the finish (the host reads the finite flag there).
Captured collectives are invisible to the NCCL watchdog (the README's "Known differences" says what that
means for a run).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable

import torch

from compiled_step import checks, collectives
from compiled_step.program import COLLECTIVE, COMPILED, Call, Program

log = logging.getLogger("compiled_step")

# What ``CUDAGraph::capture_end`` warns (TORCH_WARN, a Python UserWarning) when the graph has no node.
EMPTY_GRAPH_WARNING = "The CUDA Graph is empty"


# ---------------------------------------------------------------------- what can be captured


def cuda_backend_of(process_group) -> str | None:
    """The name of the backend that runs ``process_group``'s collectives on CUDA tensors ("nccl",
    "gloo", ...), or None when the group has no backend for CUDA.

    Not ``dist.get_backend(pg)``: for a group made with several backends ("cpu:gloo,cuda:nccl", which
    ``init_process_group()`` without a backend makes on a GPU machine) it says "undefined". The group's
    own backend for the CUDA device type is what runs a CUDA collective (torch 2.11 to 2.14:
    ``ProcessGroup._get_backend(device)`` raises ``RuntimeError`` when there is none).
    """
    try:
        backend = process_group._get_backend(torch.device("cuda"))
    except RuntimeError:  # "No backend type associated with device type cuda"
        return None
    return backend.name()


def collective_capturable(device_type: str, cuda_backend: str | None) -> bool:
    """Whether a collective can be captured: it runs on CUDA tensors (the reduction's device type)
    through NCCL. gloo on CUDA tensors copies through the host, which a capture cannot hold."""
    return device_type == "cuda" and cuda_backend == "nccl"


def _capturable(call: Call, compiler) -> bool:
    if call.runs_as == COLLECTIVE:
        reduction = call.args[0]
        return collective_capturable(reduction.device_type, cuda_backend_of(reduction.process_group))
    # A compiled call that was not recorded would go through Dynamo (and maybe compile) inside the capture.
    return call.runs_as != COMPILED or not compiler.enabled or call.recorded


def _touches_elements(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() > 0
    if isinstance(value, (list, tuple)):
        return any(_touches_elements(v) for v in value)
    if isinstance(value, dict):
        return any(_touches_elements(v) for v in value.values())
    return False


def _launches_work(calls: list[Call]) -> bool:
    """Whether any call has a non-empty tensor to work on, among what the program's calls carry (their
    args, kwargs, or the tensor of a bound method such as ``row.zero_``). A segment that has none (a rank
    whose shards are all empty) rightly captures nothing: it is not captured, rather than reported empty."""
    return any(_touches_elements([getattr(c.fn, "__self__", None), c.args, c.kwargs]) for c in calls)


class _Segment:
    def __init__(self, calls: list[Call], capturable: bool):
        self.calls = calls
        self.capturable = capturable
        self.graph = None  # a torch.cuda.CUDAGraph (or what the capture function returned) once captured


def _segments(calls: list[Call], compiler) -> list[_Segment]:
    segments: list[_Segment] = []
    for call in calls:
        capturable = _capturable(call, compiler)
        if segments and segments[-1].capturable and capturable:
            segments[-1].calls.append(call)
        else:
            segments.append(_Segment([call], capturable))
    return segments


# ---------------------------------------------------------------------- capturing one segment


def graph_pool(device: torch.device):
    """A new CUDA graph memory pool for ``device``'s captures (None on another device: nothing to share)."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        return torch.cuda.graph_pool_handle()


def capture_cuda_graph(calls: list[Call], compiler, device: torch.device, pool=None) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``calls``, captured on a side stream of ``device`` (the params' device), its
    memory from ``pool`` (a ``graph_pool`` handle shared with the plan's other segments; None: its own).

    Raises when the capture fails (the calls raised, or did something a capture cannot hold) or
    captured no kernel. The device's current stream is the same afterwards, whatever happened.
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # its __exit__ restores the current stream, also on an exception
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                for call in calls:
                    call.run(compiler)
            except BaseException as error:
                _end_abandoned_capture(graph, error)
                raise
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
    check_capture_warnings(caught, calls)
    return graph


def _end_abandoned_capture(graph, error: BaseException) -> None:
    """End a capture whose calls raised, so that the stream leaves capture mode. ``capture_end`` of an
    invalidated capture raises too (cudaErrorStreamCaptureInvalidated); the calls' error is the one
    that says what happened, so that one propagates, with this one attached as a note."""
    try:
        graph.capture_end()
    except Exception as secondary:  # noqa: BLE001 -- reported on the error that propagates
        error.add_note(f"ending the abandoned CUDA graph capture also failed: {type(secondary).__name__}: "
                       f"{secondary}")


def check_capture_warnings(caught: list[warnings.WarningMessage], calls: list[Call]) -> None:
    """Raise if ``capture_end`` warned that the graph is empty; re-issue any other warning it gave."""
    empty = False
    for message in caught:
        if EMPTY_GRAPH_WARNING in str(message.message):
            empty = True
        else:
            warnings.warn_explicit(message.message, message.category, message.filename, message.lineno)
    if empty:
        raise RuntimeError(f"the CUDA graph of {len(calls)} call(s) ({calls[0].label!r} ...) captured no kernel, "
                           "so replaying it would skip them; were their tensors on another device than the capture's?")


# ---------------------------------------------------------------------- running a program


# (calls, compiler, device, pool=...) -> a graph with .replay()
CaptureFunction = Callable[..., object]


class Runner:
    """Runs a program's two halves: call by call, or as CUDA graphs from the second run on.

    ``capture``: try to capture (FusedStep passes it for CUDA params with ``cuda_graphs=True`` and no
    offloading). ``capture_segment`` makes one graph of a list of calls (default
    ``capture_cuda_graph``), from the memory pool ``new_pool(device)`` makes once for all of them
    (default ``graph_pool``); both are parameters so that the capture logic around them can be tested
    without a GPU.
    """

    def __init__(self, program: Program, device: torch.device, capture: bool,
                 capture_segment: CaptureFunction = capture_cuda_graph,
                 new_pool: Callable[[torch.device], object] = graph_pool):
        self.program = program
        self.device = device
        self.capture = capture
        self.capture_segment = capture_segment
        self.new_pool = new_pool
        self.runs = 0
        self._parts: dict[str, list[_Segment]] | None = None

    @property
    def graphs(self) -> int:
        """How many CUDA graphs replace calls of the step (0 until a capture succeeded on every rank)."""
        if self._parts is None:
            return 0
        return sum(s.graph is not None for segments in self._parts.values() for s in segments)

    @property
    def captured(self) -> bool:
        """Whether the step is replayed as (at least one) CUDA graph."""
        return self.graphs > 0

    def run_norm(self) -> None:
        self._run("norm")

    def run_update(self) -> None:
        self._run("update")
        self.runs += 1

    def _run(self, part: str) -> None:
        if self.capture and self._parts is None and self.runs >= 1:
            self._try_capture()
        compiler = self.program.compiler
        if self._parts is None:
            for call in self.program.norm if part == "norm" else self.program.update:
                call.run(compiler)
            return
        for segment in self._parts[part]:
            if segment.graph is not None:
                segment.graph.replay()
            else:
                for call in segment.calls:
                    call.run(compiler)

    def _try_capture(self) -> None:
        """Capture both halves (before the norm half of the second run), agree with the other ranks,
        and keep the graphs only if every rank captured. One attempt per plan, whatever its outcome."""
        self.capture = False
        parts, error = None, None
        try:
            parts = self._capture_parts()
        except Exception as exc:  # noqa: BLE001 -- agreed on with the other ranks, then reported on every rank
            error = f"{type(exc).__name__}: {exc}"
        failures = _agree_on_capture(error, self.device)
        if failures:
            _warn_capture_failed(failures)
            return
        self._parts = parts
        log.info("captured the step as %d CUDA graph(s)", self.graphs)

    def _capture_parts(self) -> dict[str, list[_Segment]]:
        compiler = self.program.compiler
        parts = {"norm": _segments(self.program.norm, compiler), "update": _segments(self.program.update, compiler)}
        to_capture = [s for segments in parts.values() for s in segments if s.capturable and _launches_work(s.calls)]
        pool = self.new_pool(self.device) if to_capture else None  # one pool for every segment of the plan
        for segment in to_capture:
            segment.graph = self.capture_segment(segment.calls, compiler, self.device, pool=pool)
        return parts


def _agree_on_capture(error: str | None, device: torch.device) -> list[tuple[int, str]]:
    """``(rank, error)`` of every rank whose capture failed: this rank's alone outside a distributed run
    (no collective), else every rank's, from one ``all_gather_object`` over the default group (on the
    params' device, for NCCL)."""
    rank_world = collectives.world()
    if rank_world is None or rank_world[1] == 1:
        return [] if error is None else [(0 if rank_world is None else rank_world[0], error)]
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        outcomes = collectives.agree(error)
    return [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]


def _warn_capture_failed(failures: list[tuple[int, str]]) -> None:
    rank_world = collectives.world()
    if rank_world is None or rank_world[1] == 1:
        what, scope = failures[0][1], ""
    else:
        what = "; ".join(f"rank {rank}: {error}" for rank, error in failures)
        scope = " on every rank (NCCL requires capture to be uniform across the ranks)"
    warnings.warn(f"compiled_step: capturing the step as CUDA graphs failed ({what}); this plan runs without "
                  f"CUDA graphs{scope}. Pass cuda_graphs=False to silence.", stacklevel=checks.user_stacklevel())
