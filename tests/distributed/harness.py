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
backend="gloo", num_threads=1, startup_timeout=120.0)``:

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
* ``timeout`` bounds ``fn`` itself, counted from the moment every rank has joined the
  process group; start-up (spawn, importing torch, rendezvous) has its own
  ``startup_timeout``, so a loaded machine does not eat into ``fn``'s time. Past either,
  every rank still alive dumps its Python stacks (``faulthandler``, when ``fn`` had started)
  and is killed, and :class:`DistributedTimeoutError` is raised with those stacks. The
  process group's own collective timeout is ``timeout`` too.
* ``num_threads`` sets ``torch.set_num_threads`` in each rank, so ranks do not
  oversubscribe a small machine.

Spawning costs about two seconds per process (importing torch), so a test module should
run once and check several things inside one run (collect results, assert in the parent).
"""

from __future__ import annotations

import faulthandler
import gc
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
from torch.multiprocessing.spawn import ProcessException

__all__ = ["DistributedRunError", "DistributedTimeoutError", "run_distributed"]

# Seconds between the faulthandler stack dump and the parent's kill, for the dump to land.
_DUMP_GRACE_S = 2.0


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
        "started": os.path.join(workdir, f"rank{rank}.started"),
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
        try:
            torch.set_num_threads(num_threads)
            store = dist.FileStore(os.path.join(workdir, "store"), world_size)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
            )
            # All ranks have met: the clock for ``timeout`` starts now (the parent starts its
            # own when every rank has written this marker). If this rank is still running
            # when the parent gives up, faulthandler dumps every thread's stack into a file the
            # parent reads -- the only way to see where a collective hung. It fires a grace
            # period before the parent's kill so the dump lands.
            faulthandler.dump_traceback_later(max(0.5, timeout - _DUMP_GRACE_S), exit=False, file=stacks_file)
            with open(paths["started"], "w") as marker:
                marker.write("started")
            try:
                result = fn(rank, world_size, *args, **kwargs)
            except BaseException:
                dist.destroy_process_group()  # no barrier: a failed peer would never reach it
                raise
            # Every rank's last gloo work completes before any rank tears its pairs down, and what fn built
            # (models, FusedSteps, meshes hold the group) is collected first, so the gloo backend's threads are
            # joined here, not during interpreter shutdown: torch 2.11 aborted a rank there now and then
            # ("terminate called without an active exception", SIGABRT; the demo's teardown had the same).
            try:
                dist.barrier()
            except RuntimeError:  # a peer failed or hangs: the parent reports that peer; this rank's result stands
                pass
            gc.collect()
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


def _kill_and_raise(context: Any, workdir: str, world_size: int, what: str) -> None:
    alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
    for process in context.processes:
        if process.is_alive():
            process.kill()
    for process in context.processes:
        process.join(5)
    reports = _collect_reports(workdir, world_size, include_stacks=True)
    raise DistributedTimeoutError(f"{what}; ranks still running: {alive}\n" + _format(reports), reports)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 120.0,
    backend: str = "gloo",
    num_threads: int = 1,
    startup_timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; see module doc."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0 or startup_timeout <= 0:
        raise ValueError(f"timeouts must be positive, got timeout={timeout}, startup_timeout={startup_timeout}")
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
        try:
            # Phase 1: start-up (spawn, import torch, rendezvous), which a loaded machine can
            # make slow; bounded separately so that ``timeout`` is the time ``fn`` gets.
            startup_deadline = time.monotonic() + startup_timeout
            finished = False
            while not all(os.path.exists(_paths(workdir, r)["started"]) for r in range(world_size)):
                if context.join(timeout=0.2):
                    finished = True
                    break
                if time.monotonic() >= startup_deadline:
                    what = f"{fn.__name__} did not start within {startup_timeout}s"
                    _kill_and_raise(context, workdir, world_size, what)
            # Phase 2: running ``fn``.
            deadline = time.monotonic() + timeout + _DUMP_GRACE_S
            while not finished:
                finished = context.join(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                if not finished and time.monotonic() >= deadline:
                    what = f"{fn.__name__} on {world_size} ranks ran past {timeout}s"
                    _kill_and_raise(context, workdir, world_size, what)
        except ProcessException as exc:
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


# Workers for the harness's own tests (tests/distributed/test_fsdp_accumulation.py). They
# live here because this module is cheap to import in a child (torch only).


def _selftest_rank_one_raises(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one exploded on purpose")
    dist.barrier()  # rank 0 waits on a peer that died; the harness must not hang here
    return rank


def _selftest_rank_zero_hangs(rank: int, world_size: int) -> int:
    if rank == 0:
        _selftest_sleep_forever()
    return rank


def _selftest_sleep_forever() -> None:
    time.sleep(3600)
