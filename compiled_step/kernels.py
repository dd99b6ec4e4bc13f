"""Compiled local math: Phase A partial norms, and the machinery that compiles every bucket function.

Everything here is a pure tensor function of explicit inputs. Orchestration (which tensors go in
which bucket, collectives, state) lives in ``fused_step.py``; the update rules live in ``rules/``.

Why buckets with dynamic sizes: one graph over N tensors compiles in time linear in N (on 2 CPU
cores: 16 tensors ~8 s, 256 tensors ~2 min). A graph over a fixed-length list of B tensors whose
sizes are symbolic is compiled once and called N/B times, so compile cost does not grow with the
model. Three ShapeEnv settings make that hold (see ``compile_settings``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Callable, NamedTuple

import torch

log = logging.getLogger("compiled_step")


class NormKind(NamedTuple):
    """How partial norms are accumulated for a ``norm_type``.

    ``kind`` is ``"sum"`` (Σ|g|^p for p = 1 or 2, one fp64 pass), ``"max"`` (p = inf) or
    ``"scaled"`` (any other finite p: per-tensor max first, then Σ(|g|/max)^p, so that neither huge
    nor tiny grads overflow or underflow fp64 for large p, the way NeMo scales by the max).
    """

    kind: str
    p: float

    @staticmethod
    def of(norm_type: float) -> "NormKind":
        if math.isinf(norm_type):
            return NormKind("max", math.inf)
        if norm_type in (1.0, 2.0):
            return NormKind("sum", float(norm_type))
        return NormKind("scaled", float(norm_type))

    @property
    def partial_width(self) -> int:
        """Length of a partial-norm vector: 1, or 2 (max, scaled sum) for the scaled kind."""
        return 2 if self.kind == "scaled" else 1


# ---------------------------------------------------------------------------------------------
# Phase A: partial norms of one bucket. Nothing is written to the grads.
# ---------------------------------------------------------------------------------------------


def partial_norm_sum(
    grads: list[torch.Tensor],  # B x [n_i] grads, any float dtype
    p: float,  # 1.0 or 2.0 (a graph constant)
) -> torch.Tensor:  # [1] float64: Σ |g|^p over the bucket
    if p == 2.0:
        terms = [g.double().square().sum() for g in grads]
    else:
        terms = [g.double().abs().sum() for g in grads]
    return torch.stack(terms).sum().reshape(1)


def partial_norm_max(
    grads: list[torch.Tensor],  # B x [n_i] grads
) -> torch.Tensor:  # [1] float64: max |g| over the bucket (NaN propagates)
    # Buckets never hold empty tensors (the orchestrator leaves them out), so amax has a value.
    terms = [g.abs().amax().double() for g in grads]
    return torch.stack(terms).amax().reshape(1)


def partial_norm_scaled(
    grads: list[torch.Tensor],  # B x [n_i] grads
    p: torch.Tensor,  # [] float64 norm order (a tensor, so every finite p shares one graph)
) -> torch.Tensor:  # [2] float64: (M, S) with Σ|g|^p = M^p * S over the bucket
    maxes, sums = [], []
    for g in grads:
        a = g.double().abs()
        m = a.amax()  # buckets never hold empty tensors
        safe_m = torch.where(m > 0, m, torch.ones_like(m))
        maxes.append(m)
        sums.append((a / safe_m).pow(p).sum())
    return combine_scaled(torch.stack(maxes), torch.stack(sums), p)


def combine_scaled(
    maxes: torch.Tensor,  # [k] float64 per-part maxima M_i
    sums: torch.Tensor,  # [k] float64 per-part scaled sums S_i = Σ(|g|/M_i)^p
    p: torch.Tensor | float,  # norm order
) -> torch.Tensor:  # [2] float64: (M, S) of the union, M = max M_i
    top = maxes.amax()
    safe_top = torch.where(top > 0, top, torch.ones_like(top))
    weights = torch.where(maxes > 0, (maxes / safe_top).pow(p), torch.zeros_like(maxes))
    return torch.stack([top, (weights * sums).sum()])


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def compile_settings():
    """Dynamo/ShapeEnv settings for bucket graphs, applied at the call site (no global side effects).

    * ``use_duck_shape=False``: by default two inputs of equal size share one size symbol, and a
      later bucket with a different equality pattern recompiles.
    * ``backed_size_oblivious=True``: by default a size of 0 or 1 is specialised, so a bias of one
      element or an empty FSDP shard would compile a new graph.
    * ``recompile_limit`` raised and ``fail_on_recompile_limit_hit``: the few structural variants
      (optimizer rule x amsgrad x dtype x norm kind) share code objects; past the default limit
      of 8 Dynamo would silently fall back to eager. We would rather fail loudly.
    * Inductor's ``cpp.dynamic_threads``: with one size symbol per tensor, the CPU backend's
      parallel-depth heuristic finds no usable size hint and emits *serial* loops (measured: the
      fp64 norm of 16 x 1M floats took 3.4 ms serial vs 1.75 ms with both cores). This makes every
      loop an OpenMP region and lets the runtime split it.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False, backed_size_oblivious=True), dynamo_config.patch(
        recompile_limit=64, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True
    ), inductor_config.patch({"cpp.dynamic_threads": True}):
        yield


class Compiler:
    """Compiles bucket functions once per (function, backend) and reports first-call compiles.

    Compiled wrappers are cached at module level, so every FusedStep in a process (and every test)
    shares the same Dynamo cache entries and Inductor's on-disk cache.
    """

    _cache: dict[tuple[Callable, object], Callable] = {}

    def __init__(self, backend="inductor", enabled: bool = True, verbose: bool = False):
        self.backend = backend
        self.enabled = enabled
        self.verbose = verbose
        self._seen: set = set()

    def get(self, fn: Callable) -> Callable:
        if not self.enabled:
            return fn
        key = (fn, self.backend)
        compiled = Compiler._cache.get(key)
        if compiled is None:
            compiled = torch.compile(fn, backend=self.backend, dynamic=True, fullgraph=True)
            Compiler._cache[key] = compiled
        return compiled

    @contextlib.contextmanager
    def first_call(self, signature: tuple, label: str):
        """Announce a call that may compile, so a 20 s pause is never silent.

        ``signature`` is everything that selects a graph (function, variant, dtypes, devices).
        """
        if not self.enabled or signature in self._seen:
            yield
            return
        start = time.perf_counter()
        message = f"compiled_step: compiling {label} (first call with this signature)"
        log.info(message)
        if self.verbose:
            print(message + " ...", file=sys.stderr, flush=True)
        yield
        self._seen.add(signature)
        elapsed = time.perf_counter() - start
        log.info("compiled_step: %s ready in %.1f s", label, elapsed)
        if self.verbose:
            print(f"compiled_step: {label} ready in {elapsed:.1f} s", file=sys.stderr, flush=True)
