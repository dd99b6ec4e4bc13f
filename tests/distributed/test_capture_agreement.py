"""Ranks agree on the CUDA-graph capture before any replay; FP8 scales are stored without a host transfer.

NCCL requires capture to be uniform across the ranks of a communicator: a rank whose capture failed
runs its collectives eagerly while its peers replay captured ones, and they wait forever. So every
rank that captures sends its outcome (one ``all_gather_object`` over the default group) before any
replay, and one failure makes every rank fall back and warn.

On gloo (CPU, 2 ranks) the capture itself is faked: ``LoggedCapture`` records a segment and its graph
replays the calls (``fail=True`` raises as a failed capture does), injected on rank 1 only. The
agreement, the fallback, the segmenting around the (gloo, hence eager) collective and the replays are
the real code. A spy on ``collectives.agree`` puts the agreement into the same event log, which
shows it happened after every capture and before the first replay. The same worker runs on NCCL with
the real capture (``capture_cuda_graph``) when 2 GPUs are present (skipped here: never ran).

Reference: eager ``clip_grad_norm_`` + ``torch.optim.AdamW`` on the full (unsharded) tensors, in the
parent; fp32 tolerance ``rtol=1e-5, atol=1e-6`` as in test_parity.py (the fp64 norm and fused
arithmetic differ from torch's in the last bits; the sharded norm sums partials in another order).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.distributed as dist

from .harness import run_distributed

TIMEOUT = 180.0  # seconds for the scenarios themselves; a hang fails the test here instead of blocking
STEPS = 5  # step 0 builds; the injected runner runs step 1 call by call, captures at step 2, replays after
TOL = dict(rtol=1e-5, atol=1e-6)
SHAPES = {"w1": ((8, 6), "shard"), "w2": ((6,), "shard"), "w3": ((5, 5), "replicate")}
NO_TORCHAO = None if importlib.util.find_spec("torchao") is not None else "torchao is not installed"


def _full_tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, (shape, _) in SHAPES.items()}


class LoggedCapture:
    """``capture_segment`` for the Runner: logs each capture, and each replay of what it returns.

    ``real`` is the capture function to wrap (``capture_cuda_graph`` on a GPU); without it the graph is a
    CPU stand-in whose replay runs the calls. ``fail`` raises instead of capturing."""

    def __init__(self, log: list, fail: bool, real=None):
        self.log, self.fail, self.real = log, fail, real

    def __call__(self, calls, compiler, device, pool=None):
        self.log.append("capture")
        if self.fail:
            raise RuntimeError("capture failed on this rank (injected)")
        graph = self.real(calls, compiler, device, pool=pool) if self.real is not None else None
        return _LoggedGraph(self.log, graph, calls, compiler)


class _LoggedGraph:
    def __init__(self, log, graph, calls, compiler):
        self.log, self.graph, self.calls, self.compiler = log, graph, calls, compiler

    def replay(self):
        self.log.append("replay")
        if self.graph is not None:
            self.graph.replay()
        else:
            for call in self.calls:
                call.run(self.compiler)


def _capture_worker(rank: int, world_size: int, device_type: str, fail_rank: int | None) -> dict:
    """Shard(0) and Replicate DTensor params on a 1-D mesh; a Runner whose capture fails on ``fail_rank``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from compiled_step import FusedStep, collectives, cuda_graphs

    if device_type == "cuda":
        torch.cuda.set_device(rank)
    mesh = init_device_mesh(device_type, (world_size,))
    placement = {"shard": [Shard(0)], "replicate": [Replicate()]}
    params = {name: torch.nn.Parameter(distribute_tensor(t.to(device_type), mesh, placement[SHAPES[name][1]]))
              for name, t in _full_tensors(0).items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    fused = FusedStep(opt, max_grad_norm=1.0, compile=device_type == "cuda", compile_notice=False, bucket_size=4,
                      pack_threshold=20)
    log: list = []
    original_agree = collectives.agree

    def logged_agree(payload):
        log.append("agree")
        return original_agree(payload)

    out: dict = {"norms": [], "warnings": []}
    for step in range(STEPS):
        if step == 1:  # after the plan is built: the plan's own agreement is not the one under test
            collectives.agree = logged_agree
            real = cuda_graphs.capture_cuda_graph if device_type == "cuda" else None
            fused.engine.use_runner(cuda_graphs.Runner(fused.program, fused.plan.device, True,
                                                       LoggedCapture(log, fail=rank == fail_rank, real=real)))
        for name, g in _full_tensors(100 + step, scale=3.0).items():
            grad = distribute_tensor(g.to(device_type), mesh, placement[SHAPES[name][1]])
            p = params[name]
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)  # into FusedStep's grad buffers
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["norms"].append(float(fused.step()))
        out["warnings"] += [str(w.message) for w in caught if "CUDA graphs" in str(w.message)]
        fused.zero_grad()
    collectives.agree = original_agree
    norm_segments = cuda_graphs._segments(fused.program.norm, fused.program.compiler)
    out.update(log=log, captured=fused.cuda_graph_captured, graphs=fused.engine.built.runner.graphs,
               collective_segments=[s.capturable for s in norm_segments if s.calls[0].runs_as == "collective"],
               params={name: p.full_tensor().cpu() for name, p in params.items()})
    if device_type == "cpu":
        out["backends"] = _backends(mesh)
    return out


def _backends(mesh) -> dict:
    """What ``cuda_backend_of`` reads from real gloo groups."""
    from compiled_step.cuda_graphs import cuda_backend_of

    cpu_only = dist.new_group(list(range(dist.get_world_size())), backend="cpu:gloo")
    return {"world": cuda_backend_of(dist.group.WORLD), "world_config": dist.get_backend_config(dist.group.WORLD),
            "mesh": cuda_backend_of(mesh.get_group()), "cpu_only": cuda_backend_of(cpu_only),
            "cpu_only_config": dist.get_backend_config(cpu_only)}


def _reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """Eager torch on the full tensors: clip_grad_norm_ then AdamW, every step."""
    params = {name: torch.nn.Parameter(t) for name, t in _full_tensors(0).items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    norms = []
    for step in range(STEPS):
        for name, g in _full_tensors(100 + step, scale=3.0).items():
            params[name].grad = g
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)))
        opt.step()
    return norms, {name: p.detach() for name, p in params.items()}


def _assert_matches_reference(results):
    ref_norms, ref_params = _reference()
    for rank, res in enumerate(results):
        assert res["norms"] == pytest.approx(ref_norms, rel=1e-5), rank
        for name, value in ref_params.items():
            torch.testing.assert_close(res["params"][name], value, **TOL, msg=lambda m: f"rank {rank} {name}: {m}")


@pytest.fixture(scope="module")
def one_rank_fails() -> list[dict]:
    return run_distributed(_capture_worker, world_size=2, args=("cpu", 1), timeout=TIMEOUT)


@pytest.fixture(scope="module")
def every_rank_captures() -> list[dict]:
    return run_distributed(_capture_worker, world_size=2, args=("cpu", None), timeout=TIMEOUT)


def test_a_capture_failing_on_one_rank_makes_every_rank_fall_back_before_any_replay(one_rank_fails):
    rank0, rank1 = one_rank_fails
    # Rank 0 captured both of its capturable norm segments and its update segment; rank 1 failed at
    # its first. Each then agreed once, and neither ever replayed a graph.
    assert rank0["log"] == ["capture", "capture", "capture", "agree"]
    assert rank1["log"] == ["capture", "agree"]
    for res in one_rank_fails:
        assert not res["captured"] and res["graphs"] == 0
        assert len(res["warnings"]) == 1, res["warnings"]  # once, on every rank, naming the rank that failed
        assert ("capturing the step as CUDA graphs failed (rank 1: RuntimeError: capture failed on this rank "
                "(injected)); this plan runs without CUDA graphs on every rank") in res["warnings"][0]
    _assert_matches_reference(one_rank_fails)


def test_when_every_rank_captures_the_agreement_precedes_the_first_replay(every_rank_captures):
    for res in every_rank_captures:
        log = res["log"]
        assert log[:4] == ["capture", "capture", "capture", "agree"], log
        # Steps 2, 3, 4 replay the three graphs each; the gloo collective runs eagerly between them.
        assert log[4:] == ["replay"] * 9 and log.count("agree") == 1
        assert res["captured"] and res["graphs"] == 3 and res["warnings"] == []
        assert res["collective_segments"] == [False]
    _assert_matches_reference(every_rank_captures)


def test_gloo_groups_are_never_captured(every_rank_captures):
    for res in every_rank_captures:
        backends = res["backends"]
        # A gloo group runs CUDA tensors through gloo ("cpu:gloo,cuda:gloo"); a "cpu:gloo" group has
        # no CUDA backend at all. Neither can be captured (collective_capturable).
        assert backends["world_config"] == "cpu:gloo,cuda:gloo"
        assert backends["world"] == "gloo" and backends["mesh"] == "gloo"
        assert backends["cpu_only_config"] == "cpu:gloo" and backends["cpu_only"] is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
@pytest.mark.parametrize("fail_rank", [1, None])
def test_nccl_capture_agreement_on_two_gpus(fail_rank):
    """The real thing: rank 0 captures the NCCL all-reduce for real; with rank 1's capture failing,
    both must run it eagerly (a hang fails by the timeout), else both replay it."""
    results = run_distributed(_capture_worker, world_size=2, args=("cuda", fail_rank), timeout=TIMEOUT,
                              backend="nccl")
    for res in results:
        assert res["collective_segments"] == [True]  # NCCL on CUDA tensors: inside a segment
        assert res["captured"] is (fail_rank is None)
        assert res["log"].index("agree") == res["log"].count("capture")  # after every capture, before replays
    _assert_matches_reference(results)


# ---------------------------------------------------------------------- FP8 scales, stored per step


def _fp8_worker(rank: int, world_size: int) -> dict:
    """torchao Float8Linear weights under FSDP2, ``fp8_weights`` in reverse order, so that the targets'
    scales are a permutation of ``fused.fp8_scales``. Every op of ``fused.step()`` that reads
    ``fused.fp8_scales`` is recorded (a dispatch mode): ``store`` must gather with the index built with
    the plan, the same tensor every step, never index with a Python list (a host-to-device copy on CUDA)."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from compiled_step import FusedStep

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(8, 4))
    convert_to_float8_training(model, config=Float8LinearConfig(enable_fsdp_float8_all_gather=True))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    weights = [layer.weight for layer in model]
    fused = FusedStep(torch.optim.AdamW(model.parameters(), lr=1e-2), max_grad_norm=1.0, model_parts=[model],
                      fp8_weights=weights[::-1], compile=False, compile_notice=False, bucket_size=4, pack_threshold=20)

    class ReadsOfScales(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if args and args[0] is fused.fp8_scales:
                self.ops.append((str(func), args[1:]))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(100 + rank)
    out = {"index_is_same": [], "ops": [], "stored_match": []}
    first_index = None
    for step in range(3):
        for p in model.parameters():
            local = torch.randn(p.to_local().shape, generator=gen)
            if p.grad is None:
                p.grad = DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride())
            else:
                p.grad.to_local().copy_(local)
        mode = ReadsOfScales()
        with mode:
            fused.step()
        fused.zero_grad()
        gathers = [rest for op, rest in mode.ops if op == "aten.index_select.default"]
        out["ops"].append(sorted({op for op, _ in mode.ops}))
        assert len(gathers) == 1, mode.ops
        index = gathers[0][1]
        first_index = index if first_index is None else first_index
        out["index_is_same"].append(index is first_index)
        out["index"] = index.tolist()
        stored = [float(layer.weight._local_tensor._precomputed_scale) for layer in model]
        out["stored_match"].append(stored == [float(fused.fp8_scales[2 - i]) for i in range(3)])
    return out


@pytest.mark.skipif(NO_TORCHAO is not None, reason=str(NO_TORCHAO))
def test_fp8_scales_are_stored_through_the_index_built_with_the_plan():
    for res in run_distributed(_fp8_worker, world_size=2, timeout=TIMEOUT):
        assert res["index"] == [2, 1, 0]  # target i (module order) holds fp8_weights[2 - i]
        assert res["index_is_same"] == [True, True, True]  # one tensor, built with the plan, reused
        for ops in res["ops"]:
            assert "aten.index.Tensor" not in ops, ops  # no indexing with a host list
        assert res["stored_match"] == [True, True, True]


# ---------------------------------------------------------------------- PP token count on the host


def _pp_tokens_worker(rank: int, world_size: int) -> dict:
    """``num_label_tokens`` as a CPU tensor with PP on: read on the host (a blocking host-to-device copy
    every step on CUDA params otherwise). The only op that may see it is the read itself; the step
    must equal the one given the same count as an int (bit equality: the same float arithmetic)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils._python_dispatch import TorchDispatchMode

    from compiled_step import FusedStep

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("pp", "dp"))
    sides = []
    for _ in range(2):
        params = [torch.nn.Parameter(t) for t in _full_tensors(0).values()]
        sides.append((params, FusedStep(torch.optim.AdamW(params, lr=1e-2), max_grad_norm=1.0, compile=False,
                                        device_mesh=mesh, pp_axis_name="pp")))
    tokens = torch.tensor(12)

    class OpsOnTokens(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(a is tokens for a in args):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    out = {"ops": [], "norms_equal": [], "params_equal": None}
    for step in range(3):
        for params, _ in sides:
            for p, g in zip(params, _full_tensors(100 + step, scale=3.0).values()):
                p.grad = g.clone()
        mode = OpsOnTokens()
        with mode:
            norm = sides[0][1].step(num_label_tokens=tokens, dp_group_size=world_size)
        out["ops"].append(mode.ops)
        out["norms_equal"].append(torch.equal(norm, sides[1][1].step(num_label_tokens=12, dp_group_size=world_size)))
    out["params_equal"] = all(torch.equal(a, b) for a, b in zip(sides[0][0], sides[1][0]))
    return out


def test_a_cpu_token_count_is_read_on_the_host_never_copied_to_the_device():
    for res in run_distributed(_pp_tokens_worker, world_size=2, timeout=TIMEOUT):
        for ops in res["ops"]:
            assert set(ops) <= {"aten._local_scalar_dense.default"}, ops
        assert res["norms_equal"] == [True, True, True] and res["params_equal"]
