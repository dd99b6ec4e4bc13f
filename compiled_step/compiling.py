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
import os
import sys
import time
from typing import Callable

import torch

from compiled_step.planning import ROW

log = logging.getLogger("compiled_step")

# The size hint every flat buffer's row count compiles with (2^24 elements, 64 MiB of fp32 grads), whatever the first
# call's size.
# Why: under ``dynamic=True`` Inductor takes a reduction's split (how many blocks share Phase A's sum over a
# buffer) and other heuristics from the first compile's size hint, and bakes them into the graph; Dynamo's cache
# and Inductor's on-disk FX graph cache are shared by every FusedStep of a process and machine. Without a fixed
# hint, a small group (or a test's 2 K-element buffer) compiled first gives a 7B model's buffer its one-block
# split (10-50x slower on a GPU). ``mark_dynamic(hint_override=...)`` replaces the hint, and is part of the FX
# cache key. A large hint only costs a small buffer a few idle blocks.
ROWS_HINT = 1 << 16


# Inductor settings for the step's graphs (``compile_settings``), and why:
#
# * ``cpp.dynamic_threads``: with symbolic sizes the CPU backend's parallel-depth heuristic finds no
#   usable size hint and emits *serial* loops (measured: the fp64 norm of 16 x 1M floats took 3.4 ms
#   serial vs 1.75 ms with both cores). This makes every loop an OpenMP region the runtime splits.
# * ``assume_aligned_inputs`` (GPU only: Inductor ignores it on the CPU): under ``dynamic=True`` every
#   storage offset is a symbol, so Inductor cannot prove an input 16-byte aligned (``tensor_is_aligned``)
#   and its Triton pointers lose ``tt.divisibility=16``: scalar loads instead of 128-bit ones
#   (pytorch#176653: 1.5-3.4x slower). Our buffers all start 16-byte aligned (``storage.LEAD``, rows
#   and slots on 16-byte boundaries). Inductor checks ``data_ptr() % 16`` on every call and copies an
#   input that is not aligned (writing mutations back): a misaligned tensor (a user's grad in the
#   functional API, a param that is a view at an odd offset) costs a copy, never a wrong result.
# * no autotuning at the first run: ``triton.autotune_pointwise=False`` (pointwise kernels),
#   ``test_configs.force_filter_reduction_configs`` (reductions, persistent reductions, scans: one
#   config each, the filter of Inductor's deterministic mode), max-autotune and coordinate descent off
#   even if the user turned them on, combo kernels untuned. A kernel with several Triton configs is
#   benchmarked on its first run, and ``CachingAutotuner`` clones every argument it mutates for each
#   benchmark (near the memory limit it copies them to pinned host memory instead): params and
#   optimizer state, 12 B/param for fp32 AdamW. With one config nothing is benchmarked or cloned, and
#   the reduction order of the fp64 partial norms no longer depends on timing.
# * combo kernels, pointwise only, untuned (Triton only: Inductor leaves CPU kernels out of them). A
#   bucket update is one pointwise kernel per tensor; Inductor combines up to
#   ``combo_kernel_max_num_nodes`` independent kernels of a graph (and at most 250 arguments) into one
#   launch, so a bucket of 16 tensors with its step counts is one launch instead of 17. Reductions stay
#   out: a combo of persistent reductions over a symbolic size raises in Inductor ("Dynamic shape on
#   reduction dimension is not supported"), and the FP8 bucket update's amax is such a reduction.
#   Read from Inductor's source (2.13, 2.14); not yet run on a GPU.
# * ``emulate_precision_casts``: a bfloat16 intermediate is rounded to bfloat16 as eager rounds it,
#   instead of staying in fp32 inside a fused kernel. Muon's Newton-Schulz runs in bfloat16 as
#   torch's does; with this its batched, compiled form gives torch's values bit for bit (measured on
#   the CPU). The other rules compute in fp32 and round once at the store, so they have no bfloat16
#   intermediates for it to act on. torch < 2.13 does not honour it in CPU code (``CASTS_FUSED_AWAY``).
#
# A dotted name is a sub-config. Settings this torch lacks are left out (``inductor_settings``): all of
# these exist in torch 2.13 and 2.14.
_INDUCTOR_SETTINGS = {
    "cpp.dynamic_threads": True,
    "assume_aligned_inputs": True,
    "triton.autotune_pointwise": False,
    "test_configs.force_filter_reduction_configs": True,
    "max_autotune": False,
    "max_autotune_pointwise": False,
    "coordinate_descent_tuning": False,
    "combo_kernels": True,
    "combo_kernels_pointwise_only": True,
    "combo_kernels_autotune": 0,
    "benchmark_combo_kernel": False,
    "combo_kernel_max_num_nodes": 64,
    "emulate_precision_casts": True,
}
# torch < 2.13: Inductor's CPU code fuses ``x.bfloat16() / norm`` into one fp32 division and drops the bfloat16
# roundings of x and of the norm, emulate_precision_casts or not (measured on torch 2.11; 2.13 and 2.14 keep
# them). Code that needs such a rounding does it on the bits there (``rules/muon.py``).
CASTS_FUSED_AWAY = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)
# Combo kernels are turned on only where every setting that keeps them safe here exists.
_COMBO_SETTINGS = ("combo_kernels", "combo_kernels_pointwise_only", "combo_kernels_autotune",
                   "benchmark_combo_kernel", "combo_kernel_max_num_nodes")
_MISSING_LOGGED = False  # the missing settings are logged once per process
# The documented process-wide switch for combo kernels (FusedStepConfig.combo_kernels=None reads it): "0" off,
# "1" on, unset the default (on where every setting exists). The GPU acceptance command runs the CUDA tests
# under both values, which a per-object option cannot reach in tests that build their own FusedStep.
COMBO_ENV = "COMPILED_STEP_COMBO_KERNELS"


def combo_kernels_supported() -> bool:
    """Whether this torch's Inductor has every setting combo kernels need here (``_COMBO_SETTINGS``)."""
    import torch._inductor.config as inductor_config

    return all(_has_setting(inductor_config, k) for k in _COMBO_SETTINGS)


def resolve_combo_kernels(choice: bool | None) -> bool:
    """The combo-kernel setting to compile with: the option, else ``COMPILED_STEP_COMBO_KERNELS``, else on where
    supported. Raises ``ValueError`` when asked for on a torch that lacks their settings, or for a bad value."""
    if choice is None:
        value = os.environ.get(COMBO_ENV, "").strip()
        if value not in ("", "0", "1"):
            raise ValueError(f"{COMBO_ENV} must be 0, 1 or unset, got {value!r}")
        if value == "":
            return combo_kernels_supported()
        choice = value == "1"
    if choice and not combo_kernels_supported():
        raise ValueError(f"combo_kernels=True needs Inductor settings torch {torch.__version__} lacks (all of "
                         + ", ".join(_COMBO_SETTINGS) + "); pass combo_kernels=False or None")
    return choice


def _has_setting(config, dotted: str) -> bool:
    owner = config
    for part in dotted.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


def inductor_settings(combo_kernels: bool = True) -> dict[str, object]:
    """The Inductor settings ``compile_settings`` applies: ``_INDUCTOR_SETTINGS`` less those this torch lacks.

    The one version-aware place for them. Missing settings are logged once at INFO on the
    ``compiled_step`` logger; combo kernels stay off unless all of their settings exist, and when
    ``combo_kernels`` is False (then Inductor's own default, off, is left untouched).
    """
    import torch._inductor.config as inductor_config

    global _MISSING_LOGGED
    present = {k: v for k, v in _INDUCTOR_SETTINGS.items() if _has_setting(inductor_config, k)}
    missing = sorted(set(_INDUCTOR_SETTINGS) - set(present))
    combo_off = any(k not in present for k in _COMBO_SETTINGS)
    if combo_off or not combo_kernels:  # e.g. torch 2.11 has combo kernels but not combo_kernel_max_num_nodes
        present = {k: v for k, v in present.items() if k not in _COMBO_SETTINGS}
    if missing and not _MISSING_LOGGED:
        _MISSING_LOGGED = True
        log.info("torch %s's Inductor lacks %s: compiling the step's graphs without %s%s", torch.__version__,
                 ", ".join(missing), "it" if len(missing) == 1 else "them",
                 "; combo kernels stay off (they need all of " + ", ".join(_COMBO_SETTINGS) + ")" if combo_off else "")
    return present


@contextlib.contextmanager
def compile_settings(combo_kernels: bool = True):
    """Dynamo/ShapeEnv/Inductor settings for the step's graphs, applied at the call site (no global side effects).

    Entered only around calls that go through Dynamo (the first step after a plan is built); the
    replayed calls of later steps enter nothing. ``Compiler.get`` adds the one per-argument setting:
    every dim of a tensor argument after the first is static (see ``static_widths``).

    ShapeEnv and Dynamo:

    * ``use_duck_shape=False``: by default two inputs of equal size share one size symbol, and a
      later call with a different equality pattern recompiles.
    * ``backed_size_oblivious=True``: by default a size of 0 or 1 is specialised, so a bias of one
      element or an empty FSDP shard would compile a new graph.
    * ``recompile_limit`` raised and ``fail_on_recompile_limit_hit``: the few structural variants
      (optimizer rule x amsgrad x dtype x norm kind) share code objects; past the default limit
      of 8 Dynamo would silently fall back to eager. We would rather fail loudly.

    Inductor: ``inductor_settings(combo_kernels)`` (the comment above ``_INDUCTOR_SETTINGS`` says why each).
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True), dynamo_config.patch(
        recompile_limit=64, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True
    ), inductor_config.patch(inductor_settings(combo_kernels)):
        yield


def static_widths(args) -> None:
    """Mark every dim after the first of every tensor in ``args`` (nested lists too) static for Dynamo.

    The step's functions are written so that only a tensor's leading dim depends on the model: the
    flat buffers are ``[rows, ROW]``, the table ``[slots, K]``, the hyperparameters ``[groups, H]``,
    the partials ``[groups, 2]``, and bucket members are 1-D. Under ``dynamic=True`` the widths would
    be symbols too; as constants, Inductor indexes a row with ``x0 * 256`` and the table with
    ``slot * K`` (no ``index // ks`` per element on a GPU), the CPU loop over a row is 16 full
    vectors with no masked tail, and ``256 * rows`` is provably a multiple of 16. Each width is a
    constant by design (``planning.ROW``, the rule's columns), so no model compiles another graph.
    A flat buffer's row count stays a symbol whose size hint is ``ROWS_HINT``, whatever this call's size.
    """
    tensors = list(_tensors(args))
    rows = {t.shape[0] for t in tensors if _is_flat_buffer(t)}
    for t in tensors:
        if t.dim() > 1:
            torch._dynamo.mark_static(t, list(range(1, t.dim())))
        # A flat buffer's row count, and its row -> slot index (``[rows]`` int), which must share the hint:
        # the fake tensors of an op over both would otherwise disagree on the size.
        if _is_flat_buffer(t) or (t.dim() == 1 and not t.is_floating_point() and t.shape[0] in rows):
            torch._dynamo.mark_dynamic(t, 0, hint_override=ROWS_HINT)


def _is_flat_buffer(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] == ROW


def _tensors(args):
    """The tensors of ``args``, nested lists and tuples included."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from _tensors(arg)


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


def _with_static_widths(compiled: Callable) -> Callable:
    """``compiled``, marking its arguments' widths static first (``static_widths``). Only calls that go
    through Dynamo pay for it: replays call the recorded graph directly."""

    def call(*args, **kwargs):
        static_widths([*args, *kwargs.values()])
        return compiled(*args, **kwargs)

    call.__wrapped__ = compiled
    return call


_ANNOUNCED = False  # the one-line stderr notice is printed once per process


class Compiler:
    """Compiles the step's functions once per (function, backend) and tells the user about compiles.

    Compiled wrappers are cached at class level, so every FusedStep in a process (and every test)
    shares the same Dynamo cache entries and Inductor's on-disk cache.
    """

    _cache: dict[tuple[Callable, object], Callable] = {}

    def __init__(self, backend="inductor", enabled: bool = True, verbose: bool = False, notice: bool = True,
                 combo_kernels: bool | None = None):
        self.backend = backend
        self._combo_choice = combo_kernels  # resolved at first use (no environment read at import)
        self._combo: bool | None = None
        self.enabled = enabled
        self.verbose = verbose
        self.notice = notice
        self._seen: set = set()

    @property
    def combo_kernels(self) -> bool:
        """Whether this compiler's graphs use combo kernels (``resolve_combo_kernels``), fixed at first use."""
        if self._combo is None:
            self._combo = resolve_combo_kernels(self._combo_choice)
        return self._combo

    def get(self, fn: Callable, static_widths: bool = True) -> Callable:
        """``fn`` compiled (or ``fn`` itself with ``compile=False``). ``static_widths=False`` leaves every
        dim symbolic: for stacks of matrices, whose widths are the model's (one graph for all shapes)."""
        if not self.enabled:
            return fn
        # Combo kernels change the generated code, so graphs compiled with and without them are kept apart:
        # a backend object of its own gives them Dynamo cache entries of their own.
        key = (fn, self.backend, static_widths, self.combo_kernels)
        compiled = Compiler._cache.get(key)
        if compiled is None:
            compiled = torch.compile(fn, backend=_RecordingBackend(self.backend), dynamic=True, fullgraph=True)
            if static_widths:
                compiled = _with_static_widths(compiled)
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
