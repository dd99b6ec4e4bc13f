"""``param_norms=True`` on real gloo processes (world 2 and 4): global per-param norms, no new collective.

Scenarios reuse ``_workers_norms``' builders: FSDP2 ``fully_shard`` (1-D), HSDP, TP on a 2-D (dp, tp)
mesh, Shard(0)/Shard(1)/Replicate/float64 DTensors on one mesh, EP experts as DTensors Shard(0) on the
EP mesh, plain per-rank experts (their norms are the rank's own experts'), EP + FSDP on one 2-D mesh,
and PP stages with FSDP2 inside. Each runs packed (``pack_threshold=12``) and bucketed (0), with norm
types 1, 2 and inf, FusedStep(compile=False): the compiled graphs are the same functions, checked
against the same reference single-process in ``tests/test_param_norms.py``.

Reference (torch only): each param's grad materialised with ``full_tensor()`` (or the rank's own tensor
for plain params), times its hand-computed scale, ``torch.linalg.vector_norm`` in float64; rtol 1e-12
(fp64 accumulation of fp32 grads in another order, and the collectives' summation order).
The collectives of two steps with ``param_norms=True`` must be exactly those without it; the second
step's are all-reduces only (the first also agrees on the plan).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from . import _workers_norms as builders
from ._workers_common import BUCKET, CollectiveRecorder, _make_optimizer, snapshot_grads
from .harness import run_distributed

NORM_RTOL = 1e-12
NORM_TYPES = (1.0, 2.0, math.inf)
SCENARIOS = {
    2: ("fsdp", "mixed_1d", "ep_dtensor", "ep_plain"),
    4: ("fsdp", "hsdp", "tp_2d", "ep_dtensor", "ep_plain", "ep_fsdp_2d", "pp_fsdp"),
}


def _run(rank: int, world_size: int, name: str, norm_type: float, pack_threshold: int, param_norms: bool) -> dict:
    from compiled_step import FusedStep

    setup = getattr(builders, name)(rank, world_size)
    opt = _make_optimizer(setup)
    fused = FusedStep(opt, max_grad_norm=1.0, norm_type=norm_type, compile=False, bucket_size=BUCKET,
                      pack_threshold=pack_threshold, model_parts=setup.model_parts, param_norms=param_norms,
                      **setup.fused_kwargs)
    calls = []
    for t in range(2):  # the first step builds the plan (the ranks agree on it: an all_gather_object)
        setup.set_grads(t)
        grads, _ = snapshot_grads(setup.named)
        with CollectiveRecorder(setup.groups) as recorder:
            fused.step(**setup.step_kwargs)
        calls.append(recorder.calls)
        fused.zero_grad()
    key_of = {id(p): key for key, p in setup.named}
    order = [key_of[id(p)] for group in opt.param_groups for p in group["params"]]
    record = {"calls": calls, "order": order, "grads": grads, "scales": dict(setup.scales)}
    if param_norms:
        record["norms"] = fused.param_norms.clone()
        record["by_name"] = fused.param_norms_by_name()
    return record


def _worker(rank: int, world_size: int) -> dict:
    out = {}
    for name in SCENARIOS[world_size]:
        for norm_type in NORM_TYPES:
            for pack_threshold in (12, 0):
                key = (name, norm_type, pack_threshold)
                out[key] = {flag: _run(rank, world_size, name, norm_type, pack_threshold, flag)
                            for flag in (False, True)}
    return out


@functools.cache
def _results(world_size: int) -> list[dict]:
    return run_distributed(_worker, world_size=world_size, timeout=600)


CASES = [(w, name, nt, pt) for w, names in SCENARIOS.items() for name in names for nt in NORM_TYPES for pt in (12, 0)]


@pytest.mark.parametrize("world_size,name,norm_type,pack_threshold", CASES,
                         ids=[f"w{w}-{n}-p{nt}-pack{pt}" for w, n, nt, pt in CASES])
def test_param_norms_equal_full_tensor_norms(world_size, name, norm_type, pack_threshold):
    world = _results(world_size)
    for rank, result in enumerate(world):
        rec = result[(name, norm_type, pack_threshold)][True]
        norms = rec["norms"]
        assert norms.dtype == torch.float64 and norms.shape == (len(rec["order"]),)
        ref = torch.stack([torch.linalg.vector_norm(rec["grads"][k].double() * rec["scales"].get(k, 1.0), norm_type)
                           for k in rec["order"]])
        torch.testing.assert_close(norms, ref, rtol=NORM_RTOL, atol=0, msg=lambda m: f"rank {rank}: {m}")
        assert (ref > 0).sum() >= len(ref) // 2  # the check sees real grads, not zeros
        assert list(rec["by_name"].values()) == norms.tolist()


@pytest.mark.parametrize("world_size,name,norm_type,pack_threshold", CASES,
                         ids=[f"w{w}-{n}-p{nt}-pack{pt}" for w, n, nt, pt in CASES])
def test_param_norms_add_no_collective(world_size, name, norm_type, pack_threshold):
    for rank, result in enumerate(_results(world_size)):
        off, on = result[(name, norm_type, pack_threshold)][False], result[(name, norm_type, pack_threshold)][True]
        assert on["calls"] == off["calls"], f"rank {rank}"
        assert all(not label.startswith("other:") for label, _ in on["calls"][1]), on["calls"][1]
