"""Machinery shared by the multi-process norm and scaling tests.

Inside the ranks (``worker``): each scenario builds params (DTensors from ``fully_shard`` /
``distribute_tensor``, or plain per-rank tensors), gives them grads, runs ``FusedStep`` (and the
NeMo Automodel's functional API when ``compiled_step.nemo_compat`` exists) and records *materialised* data:
every grad and param as a full tensor (``DTensor.full_tensor()``; plain per-rank tensors as they
are, each under a global key, e.g. ``name@ep1`` for the experts of EP rank 1), the returned norms
and every ``torch.distributed`` collective issued inside ``step()``.

In the parent (``merge``, ``reference_norm``, ``reference_run``): the per-rank records are merged
into one global dict per step (the all-gather of the plain per-rank tensors; copies of the same
key on several ranks must be bit-identical, which also checks that every rank applied the same
update), and the reference is computed from that with torch only: ``torch.linalg.vector_norm`` of
the concatenated (scaled) grads, and an eager ``torch.optim`` step on the full tensors after
clipping by that norm. Nothing from ``compiled_step`` is used by the reference.

Spawning costs ~2 s per process (importing torch), so all scenarios of both test modules that use
a world size run in ONE spawn (``results(world_size)``, cached per pytest session) and the tests
assert on the returned records. A scenario that raises ends the spawn at once (a rank that went on
would leave the others hanging in a collective); every test of that world size then fails with the
tracebacks, which name the scenario. The outcome, good or bad, is cached: one spawn per session.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

BUCKET = 4  # tensors per compiled call: small, so buckets and the padded tail bucket are exercised
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon: coef = max_norm / (total + 1e-6)

# Modules whose ``SCENARIOS`` run in the shared spawn (see ``results``).
SCENARIO_MODULES = ("tests.distributed._workers_norms", "tests.distributed._workers_scaling")


# ----------------------------------------------------------------------------------------------
# Scenario description (built inside each rank)
# ----------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a scenario builds on one rank.

    ``named`` lists (global key, param) for every param this rank holds. A key names the same
    logical tensor on every rank that holds (a shard or a replica of) it; per-rank tensors that
    differ (EP experts, PP stages) get distinct keys.
    """

    named: list[tuple[str, torch.Tensor]]
    model_parts: list[nn.Module]
    set_grads: Callable[[int], None]  # gives every param its grad for step t (or leaves it None)
    opt_name: str = "SGD"
    opt_groups: list[tuple[list[str], dict]] = field(default_factory=list)  # (keys, hyperparameters)
    fused_kwargs: dict = field(default_factory=dict)  # distributed arguments of FusedStep
    step_kwargs: dict = field(default_factory=dict)  # num_label_tokens / dp_group_size
    scales: dict[str, float] = field(default_factory=dict)  # hand-computed grad scale per key (default 1)
    groups: dict[str, object] = field(default_factory=dict)  # label -> process group reduced over each step
    pp_mesh: object = None  # for _clip_grad_norm_impl(pp_mesh=...)


@dataclass(frozen=True)
class Scenario:
    name: str
    world_size: int
    build: Callable[..., Setup]  # build(rank, world_size, **options) -> Setup
    options: dict = field(default_factory=dict)
    norm_type: float = 2.0
    max_grad_norm: float | None = 1.0
    steps: int = 2
    functional: tuple[str, ...] = ("scale_grads_and_clip_grad_norm", "clip_grad_norm", "_clip_grad_norm_impl")
    magnitude: float = 1.0  # typical |param|, for the absolute tolerance of the update check
    clipped: bool = True  # whether the reference norm exceeds max_grad_norm (the clip is active)
    # FusedStep packs local shards of at most this many elements into one buffer and runs the rest
    # in buckets. 12 splits these small models between both paths (biases and small shards packed,
    # matrices bucketed, often in the same sharding group); some scenarios also run 0 (buckets only)
    # and FusedStep's default (everything here packed).
    pack_threshold: int | None = 12


def build_module(named: list[tuple[str, torch.Tensor]]) -> nn.Module:
    """A module holding ``named`` params under their dotted names (``layers.0.mlp.experts...``)."""
    root = nn.Module()
    for name, p in named:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, p)
    return root


def randn(shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Deterministic values, identical on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------
# Recording inside the ranks
# ----------------------------------------------------------------------------------------------

_OTHER_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "barrier",
    "send",
    "recv",
)


class CollectiveRecorder:
    """Records every ``torch.distributed.all_reduce`` (group label and op) and any other
    ``torch.distributed`` collective issued while active. ``compiled_step.collectives`` looks up
    ``torch.distributed.all_reduce`` at call time, so patching the module attribute sees it."""

    def __init__(self, labels: dict[str, object]):
        import torch.distributed as dist

        self.dist = dist
        self.labels = {pg.group_name: label for label, pg in labels.items()}
        self.calls: list[tuple[str, str]] = []
        self._saved = {}

    def _label(self, group) -> str:
        dist = self.dist
        if group is None:
            group = dist.distributed_c10d._get_default_group()
        if group.group_name in self.labels:
            return self.labels[group.group_name]
        return f"ranks{dist.get_process_group_ranks(group)}:{group.group_name}"

    def __enter__(self):
        dist = self.dist
        self._saved["all_reduce"] = original = dist.all_reduce

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append((self._label(group), str(op).split(".")[-1]))
            return original(tensor, op=op, group=group, async_op=async_op)

        dist.all_reduce = all_reduce
        for name in _OTHER_COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def other(*args, _name=name, _fn=fn, **kwargs):
                self.calls.append((f"other:{_name}", ""))
                return _fn(*args, **kwargs)

            setattr(dist, name, other)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.dist, name, fn)
        return False


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def snapshot_params(named) -> dict[str, torch.Tensor]:
    """Full params by key: ``full_tensor()`` for DTensors (a collective), the tensor itself otherwise."""
    out = {}
    for key, p in named:
        t = p.full_tensor() if _is_dtensor(p) else p
        out[key] = t.detach().clone()
    return out


def snapshot_grads(named) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Full grads by key, and the keys that have a grad on this rank.

    A DTensor param without a grad on this rank contributes a zero local shard to the gathered
    tensor (``full_tensor`` is a collective: every rank must take part); the parent treats a key as
    grad-less only if no rank had a grad for it."""
    from torch.distributed.tensor import DTensor

    out, present = {}, []
    for key, p in named:
        g = p.grad
        if _is_dtensor(p):
            if g is None:
                g = DTensor.from_local(
                    torch.zeros_like(p.to_local()), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                    run_check=False,
                )
            else:
                present.append(key)
            out[key] = g.full_tensor().detach().clone()
        elif g is not None:
            present.append(key)
            out[key] = g.detach().clone()
    return out, present


def _make_optimizer(setup: Setup) -> torch.optim.Optimizer:
    by_key = dict(setup.named)
    groups = [{"params": [by_key[k] for k in keys], **hyper} for keys, hyper in setup.opt_groups]
    if not groups:
        groups = [{"params": [p for _, p in setup.named]}]
    return getattr(torch.optim, setup.opt_name)(groups, lr=0.1, foreach=False)


def _run_fused(rank, world_size, sc: Scenario) -> dict:
    from compiled_step import FusedStep

    setup = sc.build(rank, world_size, **sc.options)
    opt = _make_optimizer(setup)
    fused = FusedStep(
        opt,
        max_grad_norm=sc.max_grad_norm,
        norm_type=sc.norm_type,
        compile=False,  # the compiled graphs are the same functions, tested single-process elsewhere
        bucket_size=BUCKET,
        model_parts=setup.model_parts,
        **({} if sc.pack_threshold is None else {"pack_threshold": sc.pack_threshold}),
        **setup.fused_kwargs,
    )
    record = {
        "before": snapshot_params(setup.named),
        "opt_name": setup.opt_name,
        "opt_groups": [(list(keys), dict(hyper)) for keys, hyper in setup.opt_groups]
        or [([k for k, _ in setup.named], {})],
        "scales": dict(setup.scales),
        "groups": sorted(setup.groups),
        "steps": [],
    }
    for t in range(sc.steps):
        setup.set_grads(t)
        grads, present = snapshot_grads(setup.named)
        with CollectiveRecorder(setup.groups) as recorder:
            norm = fused.step(**setup.step_kwargs)
        after = snapshot_params(setup.named)
        record["steps"].append(
            {
                "grads": grads,
                "present": present,
                "norm": norm.detach().clone(),
                "calls": recorder.calls,
                "after": after,
            }
        )
        fused.zero_grad()
    return record


def _functional_api():
    try:
        return importlib.import_module("compiled_step.nemo_compat")
    except ImportError:
        return None


def _run_functional(rank, world_size, sc: Scenario, fn_name: str) -> dict:
    """NeMo Automodel's functional API on a fresh copy of the scenario: returned norm, grads before/after.

    Its norm graphs run eagerly here (``COMPILE_NORMS``), as FusedStep runs with compile=False: a cold
    compile in every rank of every spawn would cost ~20 s per graph; they are tested compiled
    single-process (tests/test_nemo_compat.py)."""
    from unittest import mock

    api = _functional_api()
    setup = sc.build(rank, world_size, **sc.options)
    setup.set_grads(0)
    grads, present = snapshot_grads(setup.named)
    kw = setup.fused_kwargs
    pp_axis = kw.get("pp_axis_name")
    with mock.patch.object(api, "COMPILE_NORMS", False), CollectiveRecorder(setup.groups) as recorder:
        if fn_name == "scale_grads_and_clip_grad_norm":
            norm = api.scale_grads_and_clip_grad_norm(
                sc.max_grad_norm,
                setup.model_parts,
                norm_type=sc.norm_type,
                pp_enabled=pp_axis is not None,
                device_mesh=kw.get("device_mesh"),
                moe_mesh=kw.get("moe_mesh"),
                ep_axis_name=kw.get("ep_axis_name"),
                pp_axis_name=pp_axis,
                num_label_tokens=setup.step_kwargs.get("num_label_tokens"),
                dp_group_size=setup.step_kwargs.get("dp_group_size"),
                expert_tp_replication_factor=kw.get("expert_tp_replication_factor", 1),
            )
        elif fn_name == "clip_grad_norm":
            norm = api.clip_grad_norm(
                sc.max_grad_norm,
                setup.model_parts,
                norm_type=sc.norm_type,
                pp_enabled=pp_axis is not None,
                device_mesh=kw.get("device_mesh"),
                pp_axis_name=pp_axis,
                moe_mesh=kw.get("moe_mesh"),
                ep_axis_name=kw.get("ep_axis_name"),
            )
        elif fn_name == "_clip_grad_norm_impl":
            norm = api._clip_grad_norm_impl(
                [p for _, p in setup.named], sc.max_grad_norm, norm_type=sc.norm_type, pp_mesh=setup.pp_mesh
            )
        else:
            raise ValueError(fn_name)
    after, _ = snapshot_grads(setup.named)
    return {
        "grads": grads,
        "present": present,
        "after": after,
        "norm": torch.as_tensor(norm).detach().clone(),
        "is_tensor": isinstance(norm, torch.Tensor),
        "calls": recorder.calls,
    }


def _scenarios(world_size: int) -> list[Scenario]:
    out = []
    for name in SCENARIO_MODULES:
        out += [sc for sc in importlib.import_module(name).SCENARIOS if sc.world_size == world_size]
    return out


def worker(rank: int, world_size: int) -> dict:
    """Runs every scenario for ``world_size``; returns ``{name: record or {"error": traceback}}``."""
    import time

    torch.manual_seed(0)
    out = {}
    timing = out["__timing__"] = {}
    start_all = time.perf_counter()
    api = _functional_api()
    for sc in _scenarios(world_size):
        start = time.perf_counter()
        # Fail fast: a rank that raised and went on to the next scenario would leave the others
        # waiting in a collective until the timeout; raising ends the spawn at once and the harness
        # reports every rank's traceback, named by scenario.
        try:
            out[sc.name] = _run_fused(rank, world_size, sc)
            if api is not None:
                for fn_name in sc.functional:
                    out[f"{sc.name}/{fn_name}"] = _run_functional(rank, world_size, sc, fn_name)
        except Exception as exc:
            raise RuntimeError(f"scenario {sc.name} raised on rank {rank}") from exc
        timing[sc.name] = time.perf_counter() - start
    out["__functional_api__"] = api is not None
    timing["total"] = time.perf_counter() - start_all
    return out


_RESULTS: dict[int, list[dict] | BaseException] = {}


def results(world_size: int) -> list[dict]:
    """One spawn per world size per pytest session, shared by the norm and scaling tests. A failed
    spawn is cached too (re-raised to every later caller) so it is not re-run by every test."""
    from .harness import run_distributed

    if world_size not in _RESULTS:
        try:
            _RESULTS[world_size] = run_distributed(worker, world_size=world_size, timeout=240)
        except Exception as exc:
            _RESULTS[world_size] = exc
    outcome = _RESULTS[world_size]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def scenario(name: str) -> Scenario:
    for module in SCENARIO_MODULES:
        for sc in importlib.import_module(module).SCENARIOS:
            if sc.name == name:
                return sc
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# The reference, in the parent (torch only)
# ----------------------------------------------------------------------------------------------


def merge(dicts: list[dict[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Union of the ranks' ``{key: full tensor}``; a key held by several ranks must be bit-identical
    everywhere (replicas, or the same ``full_tensor()``)."""
    merged: dict[str, torch.Tensor] = {}
    for rank, d in enumerate(dicts):
        for key, t in d.items():
            if key in merged:
                same = merged[key].shape == t.shape and merged[key].dtype == t.dtype and torch.allclose(
                    merged[key], t, rtol=0, atol=0, equal_nan=True)  # bit-identical, NaN == NaN
                if not same:
                    diff = (merged[key].double() - t.double()).abs().max().item()
                    raise AssertionError(f"{what}[{key!r}] differs between ranks (rank {rank}: max |diff| {diff:.3e})")
            else:
                merged[key] = t
    return merged


def records(world: list[dict], name: str) -> list[dict]:
    recs = [r[name] for r in world]
    errors = [f"rank {i}:\n{r['error']}" for i, r in enumerate(recs) if "error" in r]
    if errors:
        raise AssertionError(f"scenario {name} raised:\n" + "\n".join(errors))
    return recs


def merged_steps(recs: list[dict]) -> list[dict]:
    """Per step: merged grads (only keys some rank had a grad for), merged params after, norms by rank."""
    out = []
    for t in range(len(recs[0]["steps"])):
        steps = [r["steps"][t] for r in recs]
        grads = merge([s["grads"] for s in steps], f"grads step {t}")
        present = set().union(*[set(s["present"]) for s in steps])
        out.append(
            {
                "grads": {k: v for k, v in grads.items() if k in present},
                "after": merge([s["after"] for s in steps], f"params after step {t}"),
                "norms": [s["norm"] for s in steps],
                "calls": [s["calls"] for s in steps],
            }
        )
    return out


def merged_scales(recs: list[dict]) -> dict[str, float]:
    scales: dict[str, float] = {}
    for r in recs:
        for key, value in r["scales"].items():
            assert scales.setdefault(key, value) == value, f"scale of {key!r} differs between ranks"
    return scales


def reference_norm(grads: dict[str, torch.Tensor], scales: dict[str, float], norm_type: float) -> torch.Tensor:
    """``torch.linalg.vector_norm`` of every (scaled) grad, concatenated, in float64 (fp32 would
    overflow for the 1e30 grads and underflow for the 1e-30 ones)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    flat = torch.cat([g.double().flatten() * scales.get(k, 1.0) for k, g in sorted(grads.items())])
    return torch.linalg.vector_norm(flat, norm_type)


def clip_coef(norm: torch.Tensor, max_grad_norm: float | None) -> float:
    if max_grad_norm is None:
        return 1.0
    return min(1.0, max_grad_norm / (float(norm) + CLIP_EPS))


def reference_run(recs: list[dict], steps: list[dict], norm_type: float, max_grad_norm):
    """Eager torch.optim on the full tensors: per step (reference norm, reference params after)."""
    before = merge([r["before"] for r in recs], "params before")
    scales = merged_scales(recs)
    params = {k: nn.Parameter(v.clone()) for k, v in before.items()}
    # Param group i of the reference holds every rank's keys of group i (PP stages, EP ranks).
    n_groups = max(len(r["opt_groups"]) for r in recs)
    groups = []
    for i in range(n_groups):
        keys, hyper = [], None
        for r in recs:
            if i < len(r["opt_groups"]):
                rank_keys, rank_hyper = r["opt_groups"][i]
                keys += [k for k in rank_keys if k not in keys]
                hyper = rank_hyper if hyper is None else hyper
                assert hyper == rank_hyper, f"param group {i} has different hyperparameters on different ranks"
        groups.append({"params": [params[k] for k in keys], **hyper})
    assert sorted(k for g in groups for k in map(id, g["params"])) == sorted(map(id, params.values()))
    opt = getattr(torch.optim, recs[0]["opt_name"])(groups, lr=0.1, foreach=False)
    out = []
    for step in steps:
        norm = reference_norm(step["grads"], scales, norm_type)
        if not torch.isfinite(norm):
            # FusedStep's documented contract (README): a non-finite total norm skips the step,
            # leaving params and optimizer state untouched (torch would write NaN everywhere).
            out.append((norm, {k: p.detach().clone() for k, p in params.items()}))
            continue
        coef = clip_coef(norm, max_grad_norm)
        for key, p in params.items():
            g = step["grads"].get(key)
            p.grad = None if g is None else (g.double() * scales.get(key, 1.0) * coef).to(p.dtype)
        opt.step()
        out.append((norm, {k: p.detach().clone() for k, p in params.items()}))
    return before, out


def expected_ops(norm_type: float) -> list[str]:
    """The ops of the all_reduces over one process group in one step."""
    if math.isinf(norm_type):
        return ["MAX"]
    if norm_type in (1.0, 2.0):
        return ["SUM"]
    return ["MAX", "SUM"]  # other p: max first, then the sum rescaled by it


# ----------------------------------------------------------------------------------------------
# Checks, in the parent. Tolerances:
#
# * NORM_RTOL = 1e-12 on the total norm. FusedStep accumulates in float64 and the reference is
#   torch.linalg.vector_norm on the float64-cast grads, so they differ only in summation order (and,
#   for p not in {1, 2, inf}, in the max-rescaling): a few float64 ulps, measured <= 4e-15. A real
#   bug (a shard missing, a replica counted twice, a reduction skipped) changes the norm by >= 1e-3.
# * UPDATE_TOL on fp32 params (rtol=1e-5, atol=1e-6 x the scenario's param magnitude), as in
#   tests/test_parity.py: FusedStep multiplies the grad by fp32(scale x clip coef) inside the
#   update where the reference rounds g x scale x coef once to fp32 before torch.optim's step, ~1
#   ulp per step; measured <= 2.5e-7 absolute here. A step moves params by 1e-3..1e-1, and every
#   scenario checks that each param with a grad moved by > 10 x the tolerance, so a clip
#   coefficient or scale off by 10% or more cannot pass.
# * FUNCTIONAL_RTOL = 1e-6 on clipped grads: g is multiplied in place by fp32(scale x coef), vs the
#   exact float64 product: <= 2 fp32 ulps (1.2e-7 relative).
# ----------------------------------------------------------------------------------------------

NORM_RTOL = 1e-12
UPDATE_RTOL, UPDATE_ATOL = 1e-5, 1e-6
FUNCTIONAL_RTOL = 1e-6


def _assert_norm(norms: list[torch.Tensor], ref: torch.Tensor, what: str) -> None:
    for rank, n in enumerate(norms):
        assert n.dtype == torch.float64 and n.dim() == 0, f"{what}: rank {rank} returned {n.dtype} shape {tuple(n.shape)}"
        assert torch.equal(n, norms[0]) or (n.isnan() and norms[0].isnan()), (
            f"{what}: ranks disagree on the total norm: {[float(x) for x in norms]}"
        )
    if not math.isfinite(float(ref)):  # NaN stays NaN, inf stays inf
        got = [float(n) for n in norms]
        assert all(math.isnan(g) for g in got) if math.isnan(float(ref)) else all(g == float(ref) for g in got), (
            f"{what}: norms {got} on the ranks, reference {float(ref)}"
        )
        return
    rel = abs(float(norms[0]) - float(ref)) / max(abs(float(ref)), 1e-300)
    assert rel <= NORM_RTOL, f"{what}: norm {float(norms[0])!r} vs reference {float(ref)!r} (rel err {rel:.2e})"


def check_fused(world: list[dict], name: str) -> None:
    """FusedStep's norm and updated params against the torch reference (see the tolerances above)."""
    sc = scenario(name)
    recs = records(world, name)
    steps = merged_steps(recs)
    before, reference = reference_run(recs, steps, sc.norm_type, sc.max_grad_norm)
    atol = UPDATE_ATOL * sc.magnitude
    previous = before
    for t, (step, (ref_norm, ref_params)) in enumerate(zip(steps, reference)):
        what = f"{name} step {t}"
        _assert_norm(step["norms"], ref_norm, what)
        finite = math.isfinite(float(ref_norm))
        if sc.max_grad_norm is not None and finite:
            assert (float(ref_norm) > sc.max_grad_norm) == sc.clipped, f"{what}: clip active={not sc.clipped} expected"
        assert sorted(step["after"]) == sorted(ref_params), f"{what}: keys differ"
        for key, ref in ref_params.items():
            got = step["after"][key]
            assert got.dtype == ref.dtype, f"{what}: {key} is {got.dtype}, expected {ref.dtype}"
            torch.testing.assert_close(got, ref, rtol=UPDATE_RTOL, atol=atol, msg=lambda m, k=key: f"{what}: {k}: {m}")
            if finite and key in step["grads"] and step["grads"][key].abs().max() > 0:
                moved = (ref.double() - previous[key].double()).abs().max().item()
                tol = atol + UPDATE_RTOL * ref.double().abs().max().item()
                assert moved > 10 * tol, f"{what}: {key} moved only {moved:.2e}: the check would not see a bug"
        previous = ref_params


def _by_group(calls) -> dict[str, list[str]]:
    by_group: dict[str, list[str]] = {}
    for label, op in calls:
        by_group.setdefault(label, []).append(op)
    return by_group


def check_collectives(world: list[dict], name: str) -> None:
    """Exactly one all_reduce per expected process group per step (MAX then SUM for p not in
    {1, 2, inf}), none over any other group, and no other torch.distributed collective, except the
    one ``all_gather_object`` of the first step, which agrees the plan across ranks."""
    sc = scenario(name)
    ops = expected_ops(sc.norm_type)
    for rank, rec in enumerate(records(world, name)):
        expected = {label: ops for label in rec["groups"]}
        for t, step in enumerate(rec["steps"]):
            got = _by_group(step["calls"])
            if t == 0:  # the first step builds the plan: one all_gather_object agrees it across ranks
                agreement = got.pop("other:all_gather_object", None)
                assert agreement == [""], f"{name} rank {rank}: plan agreement collectives {agreement}"
            assert got == expected, (
                f"{name} rank {rank} step {t}: collectives {step['calls']}, expected {expected}"
            )


def check_functional(world: list[dict], name: str, fn_name: str) -> None:
    """NeMo Automodel's functional API on the same scenario: the returned norm equals the reference, and
    the grads were clipped in place: g_after = g_before x scale x min(1, max / (norm + 1e-6))."""
    sc = scenario(name)
    recs = records(world, f"{name}/{fn_name}")
    grads = merge([r["grads"] for r in recs], "grads before")
    present = set().union(*[set(r["present"]) for r in recs])
    grads = {k: v for k, v in grads.items() if k in present}
    after = merge([r["after"] for r in recs], "grads after")
    scales = merged_scales(records(world, name)) if fn_name == "scale_grads_and_clip_grad_norm" else {}
    what = f"{name}/{fn_name}"
    if sc.max_grad_norm is None:  # NeMo Automodel returns 0.0 and only scales the grads
        for rank, r in enumerate(recs):
            assert float(r["norm"]) == 0.0, f"{what}: rank {rank} returned {r['norm']} without max_grad_norm"
        coef = 1.0
    else:
        for rank, r in enumerate(recs):
            assert r["is_tensor"], f"{what}: rank {rank} returned a {type(r['norm'])}, not a tensor"
        ref_norm = reference_norm(grads, scales, sc.norm_type)
        _assert_norm([r["norm"] for r in recs], ref_norm, what)
        coef = clip_coef(ref_norm, sc.max_grad_norm)
    if sc.max_grad_norm is not None:
        assert (coef < 1.0) == sc.clipped, f"{what}: clip active={coef < 1.0}, expected {sc.clipped}"
    for key, g in grads.items():
        expected = g.double() * scales.get(key, 1.0) * coef
        got = after[key]
        assert got.dtype == g.dtype, f"{what}: {key} grad dtype changed to {got.dtype}"
        atol = 1e-9 * expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=FUNCTIONAL_RTOL, atol=atol,
                                   msg=lambda m, k=key: f"{what}: {k}: {m}")
    ops = expected_ops(sc.norm_type)
    for rank, (r, fused_rec) in enumerate(zip(recs, records(world, name))):
        # Without max_grad_norm no norm is computed: no collective at all.
        expected = {label: ops for label in fused_rec["groups"]} if sc.max_grad_norm is not None else {}
        assert _by_group(r["calls"]) == expected, f"{what} rank {rank}: collectives {r['calls']}, expected {expected}"
