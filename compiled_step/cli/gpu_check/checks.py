"""The GPU acceptance run's own checks, each run as a subprocess by ``command.py``:

* ``sync-debug``: per rule (AdamW, Adam, SGD, Muon with AdamW for the non-matrices), two warm-up steps
  (compile, capture), then three steps under ``torch.cuda.set_sync_debug_mode("error")``: a host sync
  in the steady-state step raises. Grads are made on the device before the window (a copy from
  pageable host memory is itself a sync).
* ``offload``: AdamW steps with ``offload_optimizer_state=True`` against the same steps without it,
  tolerance 0 (the same kernels on the same device; the moves are copies): a write past a state buffer
  lands in another buffer and shows as a difference. Between steps every state storage is freed and
  device memory is back to what it was with params and grads alone (tolerance: 0 bytes of state).
  ``command.py`` runs it under ``compute-sanitizer --tool memcheck`` with the caching allocator off
  where that tool exists, so an out-of-bounds access is reported by the driver itself.

``python -m compiled_step.cli.gpu_check.checks {sync-debug,offload} --json PATH [--no-compile]``;
exit status 0 when every check passed, 1 otherwise; the results go to PATH.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

SHAPES = [(256, 128), (128,), (), (64, 64), (64, 64), (1000,), (3, 4, 5), (128, 256)]


def _params(device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def _grads(params, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(p.shape, generator=gen) * 3).to(p.device) for p in params] for _ in range(steps)]


def _optimizers(rule: str, params):
    if rule == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if rule == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if rule == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if rule == "muon":
        matrices = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        return [torch.optim.Muon(matrices, lr=2e-2), torch.optim.AdamW(rest, lr=1e-2)]
    raise ValueError(rule)


def _write(params, grads) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)  # device to device, into FusedStep's grad buffers


def sync_debug_one(rule: str, compile: bool) -> dict:
    from compiled_step import FusedStep

    params = _params("cuda")
    fused = FusedStep(_optimizers(rule, params), max_grad_norm=1.0, compile=compile, compile_notice=False)
    grads = _grads(params, 5)
    for t in range(2):  # the first step compiles and records, the second captures: both may sync
        _write(params, grads[t])
        fused.step()
        fused.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(2, 5):
            _write(params, grads[t])
            norm = fused.step()
            fused.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    finite = bool(torch.isfinite(norm))
    return {"passed": finite, "norm": float(norm), "cuda_graph_captured": bool(fused.cuda_graph_captured)}


def offload_check(compile: bool, steps: int = 4) -> dict:
    from compiled_step import FusedStep

    runs = {}
    for offload in (False, True):
        params = _params("cuda")
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        fused = FusedStep(opt, max_grad_norm=1.0, compile=compile, compile_notice=False,
                          offload_optimizer_state=offload)
        grads = _grads(params, steps)
        resident, freed = [], True
        for t in range(steps):
            _write(params, grads[t])
            fused.step()
            torch.cuda.synchronize()
            if offload:
                freed &= all(w.untyped_storage().nbytes() == 0 for gb in fused.engine.storage.groups
                             for w in gb.state.values())
                resident.append(torch.cuda.memory_allocated())
        runs[offload] = (params, opt, resident, freed)
    params_off, opt_off, _, _ = runs[False]
    params_on, opt_on, resident, freed = runs[True]
    same_params = all(torch.equal(a, b) for a, b in zip(params_off, params_on))
    same_state = all(torch.equal(opt_off.state[a][k].cpu(), opt_on.state[b][k].cpu())
                     for a, b in zip(params_off, params_on) for k in ("exp_avg", "exp_avg_sq", "step"))
    state_on_host = all(v.device.type == "cpu" for st in opt_on.state.values() for v in st.values())
    steady = len(set(resident[1:])) == 1  # from step 2 on (step 1 builds): no state kept from one step to the next
    return {"passed": same_params and same_state and state_on_host and freed and steady,
            "params_equal": same_params, "state_equal": same_state, "state_on_host": state_on_host,
            "device_state_freed_between_steps": freed, "allocated_after_each_step": resident}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiled_step.cli.gpu_check.checks")
    parser.add_argument("check", choices=("sync-debug", "offload"))
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--no-compile", action="store_true", help="FusedStep(compile=False)")
    args = parser.parse_args(argv)
    compile = not args.no_compile
    results: dict[str, dict] = {}
    cases = ["adamw", "adam", "sgd", "muon"] if args.check == "sync-debug" else ["offload"]
    for case in cases:
        start = time.perf_counter()
        try:
            results[case] = sync_debug_one(case, compile) if args.check == "sync-debug" else offload_check(compile)
        except Exception as exc:  # recorded per case: one failing rule does not hide the others
            results[case] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-4000:]}
        results[case]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{args.check} {case}: {'passed' if results[case]['passed'] else 'FAILED'}", flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["passed"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
