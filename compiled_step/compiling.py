"""torch.compile for the step's pure functions, and the record-then-replay of their calls.

Why buckets and flat buffers with dynamic sizes: one graph over N tensors compiles in time linear in
N (on 2 CPU cores: 16 tensors ~8 s, 256 tensors ~2 min). A graph over one flat buffer, or over a
fixed-length list of B tensors whose sizes are symbolic, is compiled once, whatever the model. The
ShapeEnv settings that make that hold are in ``compile_settings``.

Why record and replay: calling a ``torch.compile``d function costs ~60 us of host time on a small CPU
(Dynamo's frame evaluation, guards and wrappers), more than the kernels of a small model. FusedStep
calls each compiled function with the same persistent tensors every step, so the first call goes
through Dynamo (which compiles, or picks the cached graph whose guards hold for exactly these
tensors), and the backend records the compiled callable and the flattened arguments Dynamo passed
it. Later calls invoke that callable directly with those arguments (~14 us). This is the host-side
analogue of a CUDA graph: the recorded arguments are the same tensor objects, so the replay is
valid as long as those tensors keep their metadata, which FusedStep guarantees by rebuilding its
program (and recording again) whenever the plan changes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable

import torch

log = logging.getLogger("compiled_step")


@contextlib.contextmanager
def compile_settings():
    """Dynamo/ShapeEnv settings for the step's graphs, applied at the call site (no global side effects).

    Entered only around calls that go through Dynamo (the first step after a plan is built); the
    replayed calls of later steps enter nothing.

    * ``use_duck_shape=False``: by default two inputs of equal size share one size symbol, and a
      later call with a different equality pattern recompiles.
    * ``backed_size_oblivious=True``: by default a size of 0 or 1 is specialised, so a bias of one
      element or an empty FSDP shard would compile a new graph.
    * ``recompile_limit`` raised and ``fail_on_recompile_limit_hit``: the few structural variants
      (optimizer rule x amsgrad x dtype x norm kind) share code objects; past the default limit
      of 8 Dynamo would silently fall back to eager. We would rather fail loudly.
    * Inductor's ``cpp.dynamic_threads``: with symbolic sizes the CPU backend's parallel-depth
      heuristic finds no usable size hint and emits *serial* loops (measured: the fp64 norm of
      16 x 1M floats took 3.4 ms serial vs 1.75 ms with both cores). This makes every loop an
      OpenMP region and lets the runtime split it.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True), dynamo_config.patch(
        recompile_limit=64, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True
    ), inductor_config.patch({"cpp.dynamic_threads": True}):
        yield


class Recording:
    """Where the backend leaves the callable and arguments of the call it is asked to run."""

    def __init__(self):
        self.compiled: Callable | None = None
        self.args: list | None = None


_ARMED: list[Recording] = []  # the recording the next compiled call fills (a stack: calls do not nest)


@contextlib.contextmanager
def recording() -> Recording:
    """Record the compiled callable and flattened arguments of the one compiled call in the block."""
    rec = Recording()
    _ARMED.append(rec)
    try:
        yield rec
    finally:
        _ARMED.pop()


class _Replayable:
    """What the recording backend returns to Dynamo: runs the compiled graph, recording the call."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled

    def __call__(self, *args):
        # Dynamo calls a backend's callable with the flattened graph inputs, positionally (whatever
        # ``_boxed_call`` says: AOTAutograd's wrapper copies that attribute without being boxed).
        if _ARMED and _ARMED[-1].compiled is None:
            _ARMED[-1].compiled, _ARMED[-1].args = self.compiled, list(args)
        return self.compiled(*args)


class _RecordingBackend:
    """Wraps a torch.compile backend so that the callables it returns record the calls they run."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        if isinstance(self.backend, str):
            from torch._dynamo.backends.registry import lookup_backend

            compiled = lookup_backend(self.backend)(gm, example_inputs)
        else:
            compiled = self.backend(gm, example_inputs)
        return _Replayable(compiled)


_ANNOUNCED = False  # the one-line stderr notice is printed once per process


class Compiler:
    """Compiles the step's functions once per (function, backend) and tells the user about compiles.

    Compiled wrappers are cached at class level, so every FusedStep in a process (and every test)
    shares the same Dynamo cache entries and Inductor's on-disk cache.
    """

    _cache: dict[tuple[Callable, object], Callable] = {}

    def __init__(self, backend="inductor", enabled: bool = True, verbose: bool = False, notice: bool = True):
        self.backend = backend
        self.enabled = enabled
        self.verbose = verbose
        self.notice = notice
        self._seen: set = set()

    def get(self, fn: Callable) -> Callable:
        if not self.enabled:
            return fn
        key = (fn, self.backend)
        compiled = Compiler._cache.get(key)
        if compiled is None:
            compiled = torch.compile(fn, backend=_RecordingBackend(self.backend), dynamic=True, fullgraph=True)
            Compiler._cache[key] = compiled
        return compiled

    @contextlib.contextmanager
    def first_call(self, signature: tuple, label: str):
        """Announce a call that may compile, so that a 20 s pause is never silent.

        ``signature`` is everything that selects a graph (function, variant, dtypes, devices).
        The first one in the process prints one line on stderr (unless ``notice=False``); every
        compile is logged at INFO on the ``compiled_step`` logger, and printed with ``verbose``.
        A call that turns out to hit Dynamo's cache (under 0.5 s) is logged at DEBUG only.
        """
        if not self.enabled or signature in self._seen:
            yield
            return
        global _ANNOUNCED
        if self.notice and not _ANNOUNCED:
            _ANNOUNCED = True
            print("compiled_step: compiling the optimizer step's graphs (first step only; this can take tens of "
                  "seconds). Silence with FusedStep(..., compile_notice=False) or "
                  "logging.getLogger('compiled_step').", file=sys.stderr, flush=True)
        if self.verbose:
            print(f"compiled_step: compiling {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self._seen.add(signature)
        elapsed = time.perf_counter() - start
        if elapsed >= 0.5:
            log.info("compiled %s in %.1f s", label, elapsed)
        else:
            log.debug("%s was already compiled (%.2f s)", label, elapsed)
        if self.verbose:
            print(f"compiled_step: {label} ready in {elapsed:.1f} s", file=sys.stderr, flush=True)
