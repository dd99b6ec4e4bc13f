"""Run a function in ``world_size`` real processes joined by a gloo process group.

API::

    from tests.distributed.harness import run_distributed   # or: from .harness import ...

    def _worker(rank: int, world_size: int, *args, **kwargs):   # module level, importable
        mesh = init_device_mesh("cpu", (world_size,))            # default group is ready
        ...
        return {"loss": loss.item()}                             # anything torch.save can write

    results = run_distributed(_worker, world_size=2, args=(...,), timeout=120)
    results[rank]   # the value rank ``rank`` returned

``run_distributed(fn, world_size=2, *, args=(), kwargs=None, timeout=120.0,
backend="gloo", num_threads=1)``:

* Starts ``world_size`` fresh interpreters (``spawn``), each initialising the default
  process group with ``backend`` from a ``FileStore`` in a private temporary directory
  (no TCP port, nothing listens on the network), then calls
  ``fn(rank, world_size, *args, **kwargs)``, then destroys the process group.
* ``fn`` must be picklable by reference: a module-level function of a module the child can
  import (the child gets the parent's ``sys.path``; pytest test modules qualify).
  Arguments and return values travel through pickle / ``torch.save``.
* Returns the ``world_size`` return values, indexed by rank.
* If any rank raises, raises :class:`DistributedRunError` carrying every failed rank's
  formatted traceback (``.tracebacks``: rank -> text); its message shows them all, so the
  pytest failure shows where each rank failed. The other ranks are terminated.
* If the run takes longer than ``timeout`` seconds (a hang in a collective, usually), every
  rank still alive dumps its Python stacks (``faulthandler``) and is killed, and
  :class:`DistributedTimeoutError` is raised with those stacks.
* ``num_threads`` sets ``torch.set_num_threads`` in each rank, so ranks do not
  oversubscribe a small machine.

Spawning costs about two seconds per process (importing torch), so a test module should
run once and check several things inside one run (collect results, assert in the parent).
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "DistributedTimeoutError", "run_distributed"]

# Seconds between the faulthandler stack dump and the parent's kill, for the dump to land.
_DUMP_GRACE_S = 3.0


class DistributedRunError(AssertionError):
    """One or more ranks raised. ``tracebacks`` maps rank to its formatted traceback."""

    def __init__(self, message: str, tracebacks: Mapping[int, str]) -> None:
        super().__init__(message)
        self.tracebacks = dict(tracebacks)


class DistributedTimeoutError(DistributedRunError):
    """The run exceeded its timeout. ``tracebacks`` holds errors and stack dumps per rank."""


def _paths(workdir: str, rank: int) -> dict[str, str]:
    return {
        "result": os.path.join(workdir, f"rank{rank}.result.pt"),
        "error": os.path.join(workdir, f"rank{rank}.error.txt"),
        "stacks": os.path.join(workdir, f"rank{rank}.stacks.txt"),
    }


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    workdir: str,
    backend: str,
    timeout: float,
    num_threads: int,
) -> None:
    paths = _paths(workdir, rank)
    with open(paths["stacks"], "w") as stacks_file:
        # If this rank is still running when the parent gives up, dump every thread's stack
        # into a file the parent reads: the only way to see where a collective hung.
        # Dump early enough to land before the parent's kill even if this rank started late.
        faulthandler.dump_traceback_later(max(1.0, timeout - 2 * _DUMP_GRACE_S), exit=False, file=stacks_file)
        try:
            torch.set_num_threads(num_threads)
            store = dist.FileStore(os.path.join(workdir, "store"), world_size)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
            )
            try:
                result = fn(rank, world_size, *args, **kwargs)
            finally:
                dist.destroy_process_group()
            torch.save(result, paths["result"])
        except BaseException:
            with open(paths["error"], "w") as err:
                err.write(traceback.format_exc())
            raise
        finally:
            faulthandler.cancel_dump_traceback_later()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return text if text.strip() else None


def _collect_reports(workdir: str, world_size: int, include_stacks: bool) -> dict[int, str]:
    reports = {}
    for rank in range(world_size):
        paths = _paths(workdir, rank)
        parts = []
        if (error := _read(paths["error"])) is not None:
            parts.append(error)
        if include_stacks and (stacks := _read(paths["stacks"])) is not None:
            parts.append("stacks at timeout:\n" + stacks)
        if parts:
            reports[rank] = "\n".join(parts)
    return reports


def _format(reports: Mapping[int, str]) -> str:
    return "\n".join(f"----- rank {rank} -----\n{text}" for rank, text in sorted(reports.items()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 120.0,
    backend: str = "gloo",
    num_threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; see module doc."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"{fn!r} cannot be pickled by reference for a spawned process; use a module-level function"
        ) from exc
    kwargs = dict(kwargs or {})

    workdir = tempfile.mkdtemp(prefix="compiled_step_dist_")
    try:
        context = mp.start_processes(
            _child,
            args=(fn, world_size, tuple(args), kwargs, workdir, backend, timeout, num_threads),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout + _DUMP_GRACE_S
        try:
            while not context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                    for process in context.processes:
                        if process.is_alive():
                            process.kill()
                    for process in context.processes:
                        process.join(5)
                    reports = _collect_reports(workdir, world_size, include_stacks=True)
                    raise DistributedTimeoutError(
                        f"{fn.__name__} on {world_size} ranks ran past {timeout}s; ranks still running: {alive}\n"
                        + _format(reports),
                        reports,
                    )
        except mp.ProcessException as exc:
            # join() raises on the first failed rank and terminates the rest; our own files
            # have every failed rank's traceback, not only the first.
            for process in context.processes:
                process.join(5)
            reports = _collect_reports(workdir, world_size, include_stacks=False)
            if not reports:
                reports = {getattr(exc, "error_index", -1): str(exc)}
            raise DistributedRunError(
                f"{fn.__name__} failed on rank(s) {sorted(reports)} of {world_size}:\n" + _format(reports), reports
            ) from None
        return [torch.load(_paths(workdir, rank)["result"], weights_only=False) for rank in range(world_size)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
