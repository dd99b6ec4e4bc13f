"""Replaying the prepared step as CUDA graphs: the thin CUDA-only layer over ``program.Program``.

The program's calls read and write only persistent tensors, and its compiled calls are recorded on
the first run, so after that run the whole list can be captured: each *segment* of consecutive
capturable calls becomes one CUDA graph, replayed with one launch. Collectives are inside a segment
when the process group can be captured (NCCL); otherwise (gloo) they run eagerly between segments.

Limits: nothing is captured on the CPU (the recorded program replays there call by call); with
``offload_optimizer_state`` the state buffers are reallocated every step, so nothing is captured;
``error_if_nonfinite`` splits the step after the finish (the host reads the finite flag there).
A capture that fails is reported with a warning and the plan runs uncaptured from then on.
"""

from __future__ import annotations

import logging
import warnings

import torch

from compiled_step.program import COLLECTIVE, Call, Program

log = logging.getLogger("compiled_step")


def _capturable(call: Call) -> bool:
    if call.kind != COLLECTIVE:
        return True
    try:
        import torch.distributed as dist

        reduction = call.args[0]
        return dist.get_backend(reduction.process_group) == "nccl"
    except Exception:  # no process group information: do not capture it
        return False


class _Segment:
    def __init__(self, calls: list[Call], capturable: bool):
        self.calls = calls
        self.capturable = capturable
        self.graph: torch.cuda.CUDAGraph | None = None


def _segments(calls: list[Call]) -> list[_Segment]:
    segments: list[_Segment] = []
    for call in calls:
        capturable = _capturable(call)
        if segments and segments[-1].capturable and capturable:
            segments[-1].calls.append(call)
        else:
            segments.append(_Segment([call], capturable))
    return segments


class Runner:
    """Runs a program's two halves: call by call, or as CUDA graphs once every call is recorded."""

    def __init__(self, program: Program, device: torch.device, capture: bool):
        self.program = program
        self.capture = capture and device.type == "cuda"
        self.runs = 0
        self._parts: dict[str, list[_Segment]] | None = None

    @property
    def captured(self) -> bool:
        return self._parts is not None

    def run_norm(self) -> None:
        self._run("norm")

    def run_update(self) -> None:
        self._run("update")
        self.runs += 1

    def _run(self, part: str) -> None:
        calls = self.program.norm if part == "norm" else self.program.update
        if self.capture and self._parts is None and self.runs >= 1:
            self._try_capture()
        if self._parts is None:
            for call in calls:
                call.run(self.program.compiler)
            return
        for segment in self._parts[part]:
            if segment.graph is not None:
                segment.graph.replay()
            else:
                for call in segment.calls:
                    call.run(self.program.compiler)

    def _try_capture(self) -> None:
        """Capture every capturable segment (both halves). Called before the norm half of a run."""
        parts = {"norm": _segments(self.program.norm), "update": _segments(self.program.update)}
        try:
            for segments in parts.values():
                for segment in segments:
                    if segment.capturable and all(c.recorded or c.kind != "compiled" for c in segment.calls):
                        segment.graph = self._capture(segment.calls)
        except Exception as error:  # noqa: BLE001 -- reported, then the plan runs uncaptured
            warnings.warn(f"compiled_step: capturing the step as a CUDA graph failed ({type(error).__name__}: "
                          f"{error}); this plan runs without CUDA graphs. Pass cuda_graphs=False to silence.",
                          stacklevel=4)
            self.capture = False
            return
        self._parts = parts
        log.info("captured the step as %d CUDA graph(s)",
                 sum(s.graph is not None for segments in parts.values() for s in segments))

    def _capture(self, calls: list[Call]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call.run(self.program.compiler)
        torch.cuda.current_stream().wait_stream(stream)
        return graph
