"""Extra memory of the first step, of the first step after a resume, and of the step after a rebuild:
FusedStep beside eager torch (``clip_grad_norm_`` + ``optimizer.step()``), each case in a fresh process.

Why fresh processes: a step's extra memory is its peak resident memory minus resident memory before it.
The CPU allocator keeps no stats, but large blocks are mmap'd and returned at free, so the peak of live
bytes shows as ``VmHWM`` in ``/proc/self/status``, reset to the current RSS just before the step by
writing ``5`` to ``/proc/self/clear_refs`` (``ru_maxrss`` would keep the whole process's peak), with
glibc's mmap threshold fixed so that every large block is mmapped and returned at free (``run_case``). On CUDA
it is ``max_memory_allocated()`` minus ``memory_allocated()`` before the step. Compiles happen
beforehand, on small params of the same structure going through the same case, so no compiler memory
is counted.

The layout: ``count`` matrices of ``size x size`` and ``count`` vectors of ``size`` (fp32). AdamW steps
all of them; Muon + AdamW puts ``torch.optim.Muon`` on the matrices and AdamW on the vectors. Cases:

* ``first``: the first step of a new optimizer (its state is created).
* ``resume``: the first step after ``optimizer.load_state_dict`` of a checkpoint read back with
  ``torch.load``; the checkpoint dict is dropped after loading, on both sides (what the optimizer holds
  is then the only copy of the loaded state).
* ``rebuild``: after one step, ``add_param_group`` of a small new param (a structural change:
  FusedStep builds a new plan and moves params, grads and state into new buffers), new grad values
  written into the grads the params have (FusedStep's views), then one step.

The goal: FusedStep's extra memory in every case within eager torch's first step + 10% of param bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from compiled_step.cli import PACKAGE_PARENT
from compiled_step.cli.bench.methods import ADAMW_HP, MAX_GRAD_NORM, MUON_ADAMW, MUON_HP, WEIGHT_DECAY, \
    load_fused_step

CASES = ("first", "resume", "rebuild")
METHODS = ("eager", "fused")
OPTIMIZERS = ("adamw", MUON_ADAMW)
SLACK = 0.10  # of param bytes: FusedStep may need this much more than eager torch's first step
SMALL = 64  # side of the matrices the compiles are done on


@dataclass
class StepMemoryResult:
    optimizer: str
    case: str
    method: str
    size: int
    count: int
    param_bytes: int | None = None
    extra_bytes: int | None = None
    error: str | None = None

    @property
    def extra_of_params(self) -> float | None:
        """Extra memory as a multiple of param bytes (P)."""
        return None if self.extra_bytes is None else self.extra_bytes / self.param_bytes


# ---------------------------------------------------------------------------- the child


def _params(size: int, count: int, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(size, size)] * count + [(size,)] * count
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def _set_grads(params: list[torch.Tensor], seed: int, *, in_place: bool = False) -> None:
    """Fresh grads (new tensors, as autograd makes them where ``p.grad`` is None), or with ``in_place``
    new values written into the grads the params have (as a backward after ``zero_grad()`` does)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(p.device)
        if in_place and p.grad is not None:
            with torch.no_grad():
                p.grad.copy_(g)
        else:
            p.grad = g


def _optimizers(kind: str, params: list[torch.Tensor]) -> list[torch.optim.Optimizer]:
    """Muon first, then AdamW (as the bench's Muon + AdamW row); one AdamW for ``adamw``. torch's
    default implementation (foreach) for AdamW, as a training script gets it."""
    if kind == MUON_ADAMW:
        matrices = [p for p in params if p.ndim == 2]
        vectors = [p for p in params if p.ndim != 2]
        return [torch.optim.Muon(matrices, weight_decay=WEIGHT_DECAY, **MUON_HP),
                torch.optim.AdamW(vectors, weight_decay=WEIGHT_DECAY, **ADAMW_HP)]
    return [torch.optim.AdamW(params, weight_decay=WEIGHT_DECAY, **ADAMW_HP)]


def _stepper(method: str, params: list[torch.Tensor], opts: list[torch.optim.Optimizer], compile_fused: bool):
    if method == "eager":
        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, norm_type=2.0)
            for opt in opts:
                opt.step()
        return step
    FusedStep = load_fused_step()
    fused = FusedStep(opts[0] if len(opts) == 1 else opts, max_grad_norm=MAX_GRAD_NORM, norm_type=2.0,
                      compile=compile_fused)
    return fused.step


def _checkpoint(kind: str, params: list[torch.Tensor]) -> bytes:
    """An optimizer checkpoint of ``params`` after one eager step (on copies: the params stay as they are)."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    _set_grads(copies, seed=2)
    opts = _optimizers(kind, copies)
    for opt in opts:
        opt.step()
    buf = io.BytesIO()
    torch.save([opt.state_dict() for opt in opts], buf)
    return buf.getvalue()


def _prepare(kind: str, case: str, method: str, size: int, count: int, device: torch.device, compile_fused: bool):
    """Everything up to the measured step: returns (step, the layout's param bytes: P)."""
    params = _params(size, count, device)
    param_bytes = sum(p.numel() * p.element_size() for p in params)  # the rebuild's extra param is not counted
    if case == "resume":
        data = _checkpoint(kind, params)
        opts = _optimizers(kind, params)
        saved = torch.load(io.BytesIO(data), map_location=device)
        for opt, sd in zip(opts, saved):
            opt.load_state_dict(sd)
        del saved, data, sd  # the loaded state now lives in the optimizers only
    else:
        opts = _optimizers(kind, params)
    step = _stepper(method, params, opts, compile_fused)
    if case == "rebuild":
        _set_grads(params, seed=1)
        step()
        extra = torch.nn.Parameter(torch.randn(size, generator=torch.Generator().manual_seed(3)).to(device))
        extra.grad = torch.ones_like(extra)
        opts[-1].add_param_group({"params": [extra], "weight_decay": 0.0})
        params.append(extra)
    # At a rebuild the grads are the previous plan's views (FusedStep's) or the tensors eager torch kept.
    _set_grads(params, seed=4, in_place=case == "rebuild")
    return step, param_bytes


def _trim() -> None:
    """Return freed heap memory to the system, so RSS before the step holds live bytes only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_extra_bytes(step, device: torch.device) -> int:
    """Peak memory during ``step()`` above the memory in use when it starts (see the module docstring)."""
    _trim()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return max(0, _status_kib("VmHWM") - before) * 1024


def _child_main(argv: list[str]) -> int:
    """Runs in a fresh interpreter: one optimizer x case x method. Prints one JSON line."""
    p = argparse.ArgumentParser(prog="compiled_step.cli.bench.step_memory child")
    p.add_argument("--optimizer", choices=OPTIMIZERS, required=True)
    p.add_argument("--case", choices=CASES, required=True)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    compile_fused = not a.no_compile
    # Compiles (and every lazy first-use allocation) on small params going through the same case.
    warm_step, _ = _prepare(a.optimizer, a.case, a.method, SMALL, a.count, device, compile_fused)
    warm_step()
    del warm_step
    step, param_bytes = _prepare(a.optimizer, a.case, a.method, a.size, a.count, device, compile_fused)
    extra = measure_extra_bytes(step, device)
    print(json.dumps({"param_bytes": param_bytes, "extra_bytes": extra}))
    return 0


_CHILD_CODE = ("import sys; from compiled_step.cli.bench.step_memory import _child_main as m; "
               "sys.exit(m(sys.argv[1:]))")


# ---------------------------------------------------------------------------- the parent


def run_case(optimizer: str, case: str, method: str, *, size: int, count: int, device: str = "cpu",
             compile_fused: bool = True, cache_dir: str | None = None, timeout: float = 600.0) -> StepMemoryResult:
    """One case in a fresh subprocess (with ``cache_dir`` as its Inductor cache, when given)."""
    res = StepMemoryResult(optimizer, case, method, size, count)
    env = dict(os.environ)
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    # glibc mmaps blocks above a threshold and unmaps them at free, but raises the threshold to the size
    # of each mmapped block freed (up to 32 MiB): later blocks of that size come from the heap, whose
    # freed memory stays resident, and a step's RSS would count tensors freed before it as live. A fixed
    # threshold (its default, 128 KiB) keeps every large block mmapped: RSS then follows live bytes.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    pkg_root = str(PACKAGE_PARENT)  # the child imports compiled_step from where this process did
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", _CHILD_CODE, "--optimizer", optimizer, "--case", case, "--method", method,
           "--size", str(size), "--count", str(count), "--device", device]
    if not compile_fused:
        cmd.append("--no-compile")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        res.error = f"timed out after {timeout:.0f}s"
        return res
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        res.error = f"child exited {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return res
    out = json.loads(lines[-1])
    res.param_bytes, res.extra_bytes = out["param_bytes"], out["extra_bytes"]
    return res


def measure_step_memory(optimizers, *, size: int, count: int, device: str, compile_fused: bool, log,
                        timeout: float = 600.0) -> list[StepMemoryResult]:
    """Every optimizer x case x method, each in a fresh subprocess; one Inductor cache directory per
    optimizer, so only its first FusedStep case compiles cold."""
    results = []
    for optimizer in optimizers:
        with tempfile.TemporaryDirectory(prefix="compiled_step_inductor_") as cache_dir:
            for case in CASES:
                for method in METHODS:
                    res = run_case(optimizer, case, method, size=size, count=count, device=device,
                                   compile_fused=compile_fused, cache_dir=cache_dir, timeout=timeout)
                    shown = res.error or f"{res.extra_bytes / 2**20:.1f} MiB = {res.extra_of_params:.2f} P"
                    log(f"[memory] {optimizer} {case:7s} {method:5s}: {shown}")
                    results.append(res)
    return results


def bound_bytes(results: list[StepMemoryResult], optimizer: str) -> int | None:
    """Eager torch's first-step extra memory + SLACK of param bytes: what FusedStep may use in any case."""
    eager = next((r for r in results if r.optimizer == optimizer and r.case == "first" and r.method == "eager"), None)
    if eager is None or eager.extra_bytes is None:
        return None
    return eager.extra_bytes + int(SLACK * eager.param_bytes)


# ---------------------------------------------------------------------------- report


def markdown_table(results: list[StepMemoryResult]) -> str:
    """One row per optimizer x case: eager torch's and FusedStep's extra memory, and the bound."""
    if not results:
        return ""
    first = results[0]
    out = [f"Extra memory of a step: peak resident memory during the step minus memory before it, each case in a "
           f"fresh process, compiles done beforehand on small params (see the method section). {first.count} x "
           f"{first.size}x{first.size} fp32 matrices + {first.count} vectors of {first.size}; P = param bytes "
           f"({_mib(first.param_bytes)} MiB). Bound: eager torch's first step + {SLACK:.0%} of P.\n",
           "| optimizer | case | eager MiB | eager x P | FusedStep MiB | FusedStep x P | bound x P | within |\n"
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for optimizer in dict.fromkeys(r.optimizer for r in results):
        bound = bound_bytes(results, optimizer)
        for case in CASES:
            eager, fused = (next((r for r in results if (r.optimizer, r.case, r.method) == (optimizer, case, m)),
                                 None) for m in METHODS)
            cells = []
            for r in (eager, fused):
                ok = r is not None and r.extra_bytes is not None
                cells += [_mib(r.extra_bytes) if ok else (r.error if r else "-"),
                          f"{r.extra_of_params:.2f}" if ok else "-"]
            within = "-" if bound is None or fused is None or fused.extra_bytes is None else (
                "yes" if fused.extra_bytes <= bound else "**no**")
            shown_bound = "-" if bound is None else f"{bound / fused.param_bytes:.2f}" if fused and fused.param_bytes \
                else "-"
            out.append(f"| {optimizer} | {case} | {' | '.join(cells)} | {shown_bound} | {within} |")
    return "\n".join(out) + "\n"


def goal(results: list[StepMemoryResult]):
    """Lean: FusedStep's extra memory in every case within eager torch's first step + SLACK of P."""
    from compiled_step.cli.bench.goals import Goal  # noqa: PLC0415 -- goals imports the row modules

    name = "lean: extra memory at the first step, after a resume and at a rebuild (AdamW, Muon + AdamW)"
    target = f"<= eager torch's first step + {SLACK:.0%} of param bytes"
    fused = [r for r in results if r.method == "fused"]
    if not fused or any(r.extra_bytes is None for r in results):
        return Goal(name, target, "-" if not fused else "a case failed", "not measured")
    worst = max(fused, key=lambda r: r.extra_bytes - bound_bytes(results, r.optimizer))
    bound = bound_bytes(results, worst.optimizer)
    if bound is None:
        return Goal(name, target, "-", "not measured")
    ok = all(r.extra_bytes <= bound_bytes(results, r.optimizer) for r in fused)
    return Goal(name, target, f"closest: {worst.optimizer} {worst.case} {worst.extra_of_params:.2f} P against "
                f"{bound / worst.param_bytes:.2f} P", "met" if ok else "gap")


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"
