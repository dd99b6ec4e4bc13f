"""The capture runner's logic, checked without a GPU (``compiled_step/cuda_graphs.py``).

What a CPU cannot do is faked, and only that: a CUDA graph (``FakeCapture`` records a segment's
calls and its ``replay()`` runs them, or it raises like a failed capture) and an NCCL backend (a
process group object whose CUDA backend is named "nccl"). Everything around them is the real code:
which calls form a segment, when the capture is tried, the agreement, the fallback, the replay. The
real capture (``capture_cuda_graph``) is exercised by tests/test_cuda.py on a GPU; the multi-rank
agreement by tests/distributed/test_capture_agreement.py on gloo.

Reference for the numeric checks: eager ``clip_grad_norm_`` + ``torch.optim.AdamW`` on copies of the
params; fp32 tolerance ``rtol=1e-5, atol=1e-6`` as in test_parity.py (the fp64 norm and fused
arithmetic differ from torch's in the last bits).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from compiled_step import FusedStep, collectives, cuda_graphs, program
from compiled_step.planning import Reduction
from conftest import BUCKET, PACK, make_grads, make_params, set_grads, write_grads

TOL = dict(rtol=1e-5, atol=1e-6)


class FakeGraph:
    """A captured segment, CPU edition: replaying it runs its calls, in order."""

    def __init__(self, calls, compiler, log):
        self.calls, self.compiler, self.log = list(calls), compiler, log

    def replay(self):
        self.log.append(("replay", len(self.calls)))
        for call in self.calls:
            call.run(self.compiler)


class FakeCapture:
    """``capture_segment`` for the Runner: records what it was asked to capture; ``fail`` raises instead."""

    def __init__(self, fail: bool = False):
        self.fail, self.log, self.devices, self.pools = fail, [], [], []

    def __call__(self, calls, compiler, device, pool=None):
        self.log.append(("capture", [c.label for c in calls]))
        self.devices.append(device)
        self.pools.append(pool)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing (injected)")
        return FakeGraph(calls, compiler, self.log)


def _install(fused: FusedStep, capture: FakeCapture) -> cuda_graphs.Runner:
    """Give the built plan a Runner that captures with ``capture`` (FusedStep itself never tries on the CPU).
    Through the engine's seam for it (``Engine.use_runner``): the Runner is what is under test."""
    runner = cuda_graphs.Runner(fused.program, fused.plan.device, True, capture)
    fused.engine.use_runner(runner)
    return runner


def _pair(**options):
    ours, ref = make_params(), make_params()
    fused = FusedStep(torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1), max_grad_norm=1.0, bucket_size=BUCKET,
                      pack_threshold=PACK, compile_notice=False, **options)
    return ours, fused, ref, torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)


def _step_both(ours, fused, ref, ref_opt, step):
    grads = make_grads(ours, step)
    set_grads(ref, grads)
    write_grads(ours, grads)
    norm = fused.step()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    ref_opt.step()
    fused.zero_grad()
    return norm, ref_norm


def _assert_close(ours, ref):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)


@pytest.fixture
def no_collectives(monkeypatch):
    """A single process must never call a collective: any call to the agreement fails the test."""

    def refuse(payload):
        raise AssertionError(f"collectives.agree called in a single process (payload {payload!r})")

    monkeypatch.setattr(collectives, "agree", refuse)


# ---------------------------------------------------------------------- the runner around the capture


def test_captured_segments_replay_from_the_second_run_and_match_eager_torch(no_collectives):
    ours, fused, ref, ref_opt = _pair()
    _step_both(ours, fused, ref, ref_opt, 0)  # builds, compiles, records
    capture = FakeCapture()
    runner = _install(fused, capture)
    _step_both(ours, fused, ref, ref_opt, 1)  # the new runner's first run: call by call
    assert capture.log == [] and not fused.cuda_graph_captured
    for step in range(2, 5):
        norm, ref_norm = _step_both(ours, fused, ref, ref_opt, step)
        torch.testing.assert_close(norm, ref_norm.double(), rtol=1e-5, atol=0)
    # One segment per half (no collective in a single process), each captured once and replayed
    # every step after; the step's work ran only through the replays.
    assert [entry[0] for entry in capture.log] == ["capture", "capture"] + ["replay", "replay"] * 3
    norm_labels, update_labels = capture.log[0][1], capture.log[1][1]
    assert norm_labels == [c.label for c in fused.program.norm]
    assert update_labels == [c.label for c in fused.program.update]
    assert capture.devices == [torch.device("cpu")] * 2  # the plan's device is handed to the capture
    assert runner.graphs == 2 and fused.cuda_graph_captured
    _assert_close(ours, ref)


def test_a_failed_capture_warns_runs_uncaptured_and_is_not_retried(no_collectives):
    ours, fused, ref, ref_opt = _pair()
    _step_both(ours, fused, ref, ref_opt, 0)
    capture = FakeCapture(fail=True)
    _install(fused, capture)
    _step_both(ours, fused, ref, ref_opt, 1)
    with pytest.warns(UserWarning, match=r"capturing the step as CUDA graphs failed \(RuntimeError: operation not "
                                         r"permitted .*\(injected\)\); this plan runs without CUDA graphs\."):
        _step_both(ours, fused, ref, ref_opt, 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiled_step", category=UserWarning)  # once per plan, never again
        for step in range(3, 5):
            _step_both(ours, fused, ref, ref_opt, step)
    assert [entry[0] for entry in capture.log] == ["capture"]  # one attempt, no replay
    assert not fused.cuda_graph_captured
    _assert_close(ours, ref)


def test_one_rank_world_agrees_without_a_collective(monkeypatch, no_collectives):
    monkeypatch.setattr(collectives, "world", lambda: (0, 1))  # rank arithmetic only
    ours, fused, ref, ref_opt = _pair()
    _step_both(ours, fused, ref, ref_opt, 0)
    _install(fused, FakeCapture(fail=True))
    _step_both(ours, fused, ref, ref_opt, 1)
    with pytest.warns(UserWarning, match="this plan runs without CUDA graphs. Pass"):
        _step_both(ours, fused, ref, ref_opt, 2)
    _assert_close(ours, ref)


def test_uncompiled_programs_are_captured_too(no_collectives):
    """With compile=False the compiled calls are the plain functions: capturable after the first run."""
    ours, fused, ref, ref_opt = _pair(compile=False)
    _step_both(ours, fused, ref, ref_opt, 0)
    capture = FakeCapture()
    runner = _install(fused, capture)
    for step in range(1, 4):
        _step_both(ours, fused, ref, ref_opt, step)
    assert runner.graphs == 2
    _assert_close(ours, ref)


def test_fused_step_itself_never_tries_to_capture_on_the_cpu():
    """FusedStep asks for a capture only for CUDA params: on the CPU the real capture would fail (and warn)."""
    ours, fused, ref, ref_opt = _pair()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compiled_step", category=UserWarning)
        for step in range(3):
            _step_both(ours, fused, ref, ref_opt, step)
    assert not fused.cuda_graph_captured


# ---------------------------------------------------------------------- which calls form a segment


class _Backend:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class FakeGroup:
    """A process group's backend lookup (what ``ProcessGroup._get_backend`` answers). NCCL cannot be
    created without a GPU, so its name is what is faked; the real gloo answer is in the distributed test."""

    def __init__(self, cuda_backend: str | None):
        self.cuda_backend = cuda_backend

    def _get_backend(self, device):
        if device.type != "cuda" or self.cuda_backend is None:
            raise RuntimeError(f"No backend type associated with device type {device.type}")
        return _Backend(self.cuda_backend)


class _Compiler:
    def __init__(self, enabled):
        self.enabled = enabled


def _collective(backend, device_type="cuda"):
    reduction = Reduction(FakeGroup(backend), device_type, "dp")
    return program.Call(f"all_reduce {backend} {device_type}", program.COLLECTIVE, lambda *a: None, (reduction,))


def _compiled(label, recorded=True):
    call = program.Call(label, program.COMPILED, lambda *a: None)
    if recorded:
        call._replay, call._replay_args = (lambda *a: None), []
    return call


def _layout(calls, compiler_enabled=True):
    return [([c.label for c in s.calls], s.capturable)
            for s in cuda_graphs._segments(calls, _Compiler(compiler_enabled))]


def test_cuda_backend_of_a_group_is_its_backend_for_the_cuda_device():
    assert cuda_graphs.cuda_backend_of(FakeGroup("nccl")) == "nccl"
    assert cuda_graphs.cuda_backend_of(FakeGroup("gloo")) == "gloo"
    assert cuda_graphs.cuda_backend_of(FakeGroup(None)) is None  # e.g. init_process_group("cpu:gloo")


@pytest.mark.parametrize("device_type,backend,capturable", [
    ("cuda", "nccl", True),
    ("cuda", "gloo", False),  # gloo copies CUDA tensors through the host
    ("cuda", None, False),  # the group has no CUDA backend
    ("cpu", "nccl", False),  # the partials travel to the CPU (CPUOffloadPolicy meshes)
    ("cpu", "gloo", False),
])
def test_a_collective_is_captured_only_on_cuda_tensors_through_nccl(device_type, backend, capturable):
    assert cuda_graphs.collective_capturable(device_type, backend) is capturable
    calls = [_compiled("A"), _collective(backend, device_type), _compiled("finish")]
    if capturable:
        assert _layout(calls) == [(["A", calls[1].label, "finish"], True)]
    else:
        assert _layout(calls) == [(["A"], True), ([calls[1].label], False), (["finish"], True)]


def test_an_unrecorded_compiled_call_is_never_captured_unless_compile_is_off():
    calls = [_compiled("A"), _compiled("B", recorded=False), _compiled("C")]
    assert _layout(calls) == [(["A"], True), (["B"], False), (["C"], True)]
    assert _layout(calls, compiler_enabled=False) == [(["A", "B", "C"], True)]


def test_a_segment_without_elements_is_not_captured():
    empty, full = torch.empty(0), torch.zeros(3)
    calls_empty = [program.Call("zero an empty row", program.EAGER, empty.zero_),
                   program.Call("copy nothing", program.EAGER, torch.Tensor.copy_, (empty, empty))]
    assert not cuda_graphs._launches_work(calls_empty)
    assert cuda_graphs._launches_work([program.Call("zero", program.EAGER, full.zero_)])  # a bound method's tensor
    assert cuda_graphs._launches_work([program.Call("bucket", program.COMPILED, print, ([empty, [full]],))])


def test_every_segment_of_a_plan_is_captured_into_one_shared_memory_pool():
    """A CUDA graph keeps its pool's peak while it lives: one pool per segment would hold every segment's
    temporaries at once, for good. The runner makes one pool (for the plan's device) and captures every
    segment into it; it makes none when there is nothing to capture."""
    counter = torch.zeros(())
    count = program.Call("count", program.EAGER, torch.Tensor.add_, (counter, 1))
    made = []

    def new_pool(device):
        made.append((device, object()))
        return made[-1][1]

    capture = FakeCapture()
    prog = program.Program(norm=[count], update=[count], compiler=_Compiler(False))  # one segment per half
    runner = cuda_graphs.Runner(prog, torch.device("cpu"), True, capture, new_pool=new_pool)
    for _ in range(3):
        runner.run_norm()
        runner.run_update()
    assert runner.graphs == 2 and counter.item() == 6
    assert [device for device, _ in made] == [torch.device("cpu")]
    assert capture.pools == [made[0][1], made[0][1]]
    empty = program.Call("zero an empty row", program.EAGER, torch.empty(0).zero_)
    made.clear()
    runner = cuda_graphs.Runner(program.Program(norm=[empty], update=[empty], compiler=_Compiler(False)),
                                torch.device("cpu"), True, FakeCapture(), new_pool=new_pool)
    for _ in range(2):
        runner.run_norm()
        runner.run_update()
    assert made == [] and runner.graphs == 0


def test_captured_is_true_only_when_a_graph_replaces_calls(no_collectives):
    """A program whose only calls touch no element (a rank with empty shards) captures nothing: the
    runner agrees, keeps running the calls, and does not claim to be captured."""
    empty, counter = torch.empty(0), torch.zeros(())
    calls = [program.Call("zero an empty row", program.EAGER, empty.zero_)]
    counted = program.Call("count", program.EAGER, torch.Tensor.add_, (counter, 1))
    prog = program.Program(norm=calls, update=[counted], compiler=_Compiler(False))
    capture = FakeCapture()
    runner = cuda_graphs.Runner(prog, torch.device("cpu"), True, capture)
    for _ in range(3):
        runner.run_norm()
        runner.run_update()
    assert [entry[0] for entry in capture.log] == ["capture", "replay", "replay"]  # only the update half
    assert capture.log[0] == ("capture", ["count"])
    assert runner.graphs == 1 and runner.captured and counter.item() == 3  # run, then two replays
    runner = cuda_graphs.Runner(program.Program(norm=calls, update=list(calls), compiler=_Compiler(False)),
                                torch.device("cpu"), True, FakeCapture())
    for _ in range(3):
        runner.run_norm()
        runner.run_update()
    assert runner.graphs == 0 and not runner.captured and runner.capture is False  # tried once, nothing to capture


# ---------------------------------------------------------------------- the empty-graph check


def _warning(text, category=UserWarning):
    return warnings.WarningMessage(text, category, "CUDAGraph.cpp", 1)


def test_a_graph_torch_reports_empty_is_an_error():
    calls = [program.Call("Phase A partial norm, group 0", program.COMPILED, print)]
    message = ("The CUDA Graph is empty. This usually means that the graph was attempted to be captured on wrong "
               "device or stream. (Triggered internally at /pytorch/aten/src/ATen/cuda/CUDAGraph.cpp:146.)")
    with pytest.raises(RuntimeError, match=r"CUDA graph of 1 call\(s\) \('Phase A partial norm, group 0' \.\.\.\) "
                                           "captured no kernel"):
        cuda_graphs.check_capture_warnings([_warning(message)], calls)
    with pytest.warns(UserWarning, match="something else"):  # any other warning of capture_end is passed on
        cuda_graphs.check_capture_warnings([_warning("something else")], calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_graphs.check_capture_warnings([], calls)


# ---------------------------------------------------------------------- no per-step host-to-device copy


class _OpsOn:
    """Records every op whose arguments include ``tensor`` (by identity)."""

    def __init__(self, tensor):
        from torch.utils._python_dispatch import TorchDispatchMode

        target = tensor

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(a is target for a in args) or any(v is target for v in (kwargs or {}).values()):
                    self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self.mode.ops

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_a_cpu_grad_scale_tensor_is_read_on_the_host_never_copied_to_the_device():
    """On CUDA params a CPU tensor turned into a device operand costs a blocking host-to-device copy
    every step. Read on the host (free for a CPU tensor) it is a number: the only op it may see is
    the read itself (``_local_scalar_dense``). Reference for the values: the same step with the float."""
    ours, fused, _, _ = _pair(compile=False)  # compile=False: torch.compile refuses a dispatch mode
    twin_params = make_params()
    twin = FusedStep(torch.optim.AdamW(twin_params, lr=1e-2, weight_decay=0.1), max_grad_norm=1.0,
                     bucket_size=BUCKET, pack_threshold=PACK, compile=False)
    for step in range(3):
        grads = make_grads(ours, step)
        write_grads(ours, grads)
        write_grads(twin_params, grads)
        scale = torch.tensor(0.25)
        with _OpsOn(scale) as ops:
            norm = fused.step(grad_scale=scale)
        assert set(ops) <= {"aten._local_scalar_dense.default"}, ops
        assert torch.equal(norm, twin.step(grad_scale=0.25))  # same arithmetic: bit equality
        fused.zero_grad()
        twin.zero_grad()
    for a, b in zip(ours, twin_params):
        assert torch.equal(a, b)
