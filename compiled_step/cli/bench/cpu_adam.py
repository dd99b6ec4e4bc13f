"""The CPU AdamW rows (``bench --cpu-adam THREADS``): FusedStep against DeepSpeed's hand-written CPU Adam and
torch's fused AdamW, and a roofline this machine's tuned kernels set.

The layout is the blocks of a 12-layer, d_model 512 GPT (embeddings left out): 37.8 M params in 144 tensors,
in two param groups (decayed matrices, undecayed biases and norms), AdamW lr 1e-3, betas (0.9, 0.95),
weight decay 0.1, clip at 1.0 (always active: the grads are N(0, 1)).

Methods, each on its own copy of the same params and grads:

* ``fused``: ``FusedStep(AdamW)``, the global norm, the clip and the update;
* ``B``: ``clip_grad_norm_(foreach=True)`` + ``AdamW(fused=True)``;
* ``DS+clip``: ``clip_grad_norm_(foreach=True)`` + ``DeepSpeedCPUAdam`` (AVX2/AVX512 C++ with OpenMP, JIT-built
  by the ``deepspeed`` package with ``DS_ACCELERATOR=cpu``; the ``deepspeed`` extra pins it);
* ``DS``: ``DeepSpeedCPUAdam`` alone, no clip;
* ``torch``: ``AdamW(fused=True)`` alone, no clip.

Every thread count runs in a fresh subprocess with ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` set to
it, so torch, Inductor's kernels and DeepSpeed's OpenMP loops all run on that many threads. In it every method
is built and warmed up, then the methods are timed interleaved, one step each per round, the grads restored
and a buffer twice the last-level cache written before each step; the figures are medians over rounds.

**Bytes moved per param** are the least each method must move: AdamW alone reads p, g, exp_avg, exp_avg_sq and
writes p, exp_avg, exp_avg_sq (7 streams: 28 B/param in fp32); with the clip, g is read once more for the norm
(32 B/param). A clip that writes the clipped grads back (``clip_grad_norm_``) moves more than that; it is
counted at 32 all the same, so its GB/s is what it *would* need, not what it moved.

**The roofline** is this machine's best streaming bandwidth: the highest of the median GB/s of STREAM's triad,
the in-place triad (``measure.Triad``), and the two tuned kernels that have the AdamW access pattern (4 streams
read, 3 written): ``DS`` and ``torch``, each at 28 B/param. Each method's fraction of the roofline is its
GB/s over the roofline's. The goal ``fused vs DS`` compares bytes per second: FusedStep's 32 B/param against
DeepSpeed's 28, both over their own medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench.measure import CacheFlusher, Triad, local_shard, max_abs_diff

LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
DESCRIPTIONS = {
    "fused": "FusedStep (clip + AdamW)",
    "B": "clip_grad_norm_ + AdamW(fused=True)",
    "DS+clip": "clip_grad_norm_ + DeepSpeedCPUAdam",
    "DS": "DeepSpeedCPUAdam alone (no clip)",
    "torch": "AdamW(fused=True) alone (no clip)",
    "torch-flat": "torch._fused_adamw_ on four flat buffers placed apart (roofline probe)",
}
FLAT = "torch-flat"  # timed in the rounds beside the methods; its params are not the layout's
CLIPPED = ("fused", "B", "DS+clip")  # read the grads once more, for the norm
TORCH_STATE = ("B", "torch", "torch-flat")  # torch.optim's state: moments in the params' dtype
GOALS = dict(fused_vs_ds_bytes=0.95, fused_vs_ds_clip=1.3, fused_vs_b=1.3)
DEEPSPEED_MISSING = "deepspeed is not installed (pip install -e '.[deepspeed]'; its CPU Adam JIT-builds on first use)"


BLOCKS = (512, 12)  # d_model, n_layers of the layout


# Printed under the tables: what the figures mean.
DEFINITIONS = (
    "**B/param** is the least each method must move: AdamW reads p, g and both moments and writes p and the moments "
    "(28 B/param for float32 params and moments); a clipped method reads g once more for the norm (32). "
    "`clip_grad_norm_` moves more than that (it writes the clipped grads back) and is counted at 32 all the same. "
    "**GB/s** = n_params x B/param / median time.",
    "**Roofline**: this machine's best streaming bandwidth, measured in the same process and rounds: the highest "
    "median GB/s of STREAM's triad (`a = b + s*c`), the in-place triad (`a += s*c`; both 12 B/element) and the "
    "tuned kernels with AdamW's own access pattern (4 streams read, 3 written; 28 B/param): DeepSpeedCPUAdam "
    "alone, torch's `AdamW(fused=True)` alone, and torch's `_fused_adamw_` on four flat buffers placed apart in "
    "their pages (float32 only). **Fraction of roofline** = GB/s / roofline GB/s.",
    "**Goals** (issue 25): FusedStep's GB/s at >= 0.95 of DeepSpeedCPUAdam-alone's (FusedStep counted with its "
    "norm read, DeepSpeed without one), and >= 1.3x the step time of clip + DeepSpeedCPUAdam and of B, at every "
    "thread count. **max abs diff (vs)**: the largest param difference from the named method after the same "
    "steps; the unclipped methods follow another trajectory by design.",
)


def layout(blocks: tuple[int, int] = BLOCKS) -> L.Layout:
    """The blocks of gpt_layout(d_model, n_layers), embeddings and final norm left out: by default 144 tensors,
    37.8 M params."""
    d_model, n_layers = blocks
    gpt = L.gpt_layout(d_model, n_layers)
    return L.Layout(f"gpt blocks(d_model={d_model},n_layers={n_layers})",
                    tuple(s for s in gpt.specs if s.name.startswith("h")))


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def bytes_per_param(method: str, param_dtype: torch.dtype) -> int:
    """p, g and the two moments read, p and the moments written; the clipped methods read g once more. FusedStep
    (``fp32_moments`` for bfloat16 params) and DeepSpeed keep float32 moments; torch's AdamW keeps them in the
    params' dtype."""
    p = torch.empty((), dtype=param_dtype).element_size()
    state = p if method in TORCH_STATE else 4
    return 2 * p + p + 2 * 2 * state + (p if method in CLIPPED else 0)


def _optimizer(method: str, params: list[torch.Tensor], lay: L.Layout) -> torch.optim.Optimizer:
    groups = L.param_groups(lay, params, weight_decay=WEIGHT_DECAY)
    if method.startswith("DS"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415 -- optional, JIT-built

        return DeepSpeedCPUAdam(groups, lr=LR, betas=BETAS, eps=EPS, adamw_mode=True)
    if method == "fused":
        from compiled_step import fp32_moments  # noqa: PLC0415

        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
        # bfloat16 params: float32 moments, as DeepSpeed keeps them (a no-op for float32 params)
        return fp32_moments(opt) if params[0].dtype == torch.bfloat16 else opt
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True)


def build(method: str, params: list[torch.Tensor], lay: L.Layout, clip_params: list[torch.Tensor] | None = None
          ) -> Callable[[], object]:
    """Method ``method`` stepping ``params``; the clipped ones clip ``clip_params`` (default ``params``): FSDP2's
    DTensor params, whose norm torch reduces across ranks, where DeepSpeed steps their local tensors."""
    opt = _optimizer(method, params, lay)
    clip_params = params if clip_params is None else clip_params
    if method == "fused":
        from compiled_step import FusedStep  # noqa: PLC0415

        return FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False).step
    if method in CLIPPED:
        def step() -> None:
            torch.nn.utils.clip_grad_norm_(clip_params, MAX_NORM, foreach=True)
            opt.step()
        return step
    return opt.step


def worker(threads: int, rounds: int, warmup: int, dtype: torch.dtype, methods: list[str],
           blocks: tuple[int, int] = BLOCKS, fsdp_offload: bool = False) -> dict:
    """One thread count, in this process: every method timed interleaved. Returns medians and checks.
    ``fsdp_offload``: the params are FSDP2 shards under ``CPUOffloadPolicy`` (one gloo rank, ``_offload_shards``)."""
    if not fsdp_offload:
        return _worker(threads, rounds, warmup, dtype, methods, blocks, None)
    from compiled_step.cli.bench import fsdp  # noqa: PLC0415 -- torch.distributed only for this row

    with fsdp.single_process_group(torch.device("cpu")) as mesh:
        return _worker(threads, rounds, warmup, dtype, methods, blocks, mesh) | {"fsdp_offload": True}


def _offload_shards(lay: L.Layout, params: list[torch.Tensor], mesh) -> list[torch.Tensor]:
    """``params`` as FSDP2 shards kept on the CPU (``CPUOffloadPolicy``), one FSDP unit per block and the root. On
    one rank each shard is the whole tensor, but they are DTensors: FusedStep stages the small ones and updates the
    large ones in buckets, as on N ranks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard  # noqa: PLC0415

    root = torch.nn.Module()
    blocks: dict[str, torch.nn.Module] = {}
    where = []
    for spec, p in zip(lay.specs, params):
        head, _, rest = spec.name.partition(".")
        block = blocks.get(head)
        if block is None:
            block = blocks[head] = torch.nn.Module()
            root.add_module(head, block)
        name = rest.replace(".", "_")
        block.register_parameter(name, torch.nn.Parameter(p.detach()))
        where.append((block, name))
    policy = CPUOffloadPolicy(pin_memory=False)
    for block in blocks.values():
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(root, mesh=mesh, offload_policy=policy)
    return [getattr(block, name) for block, name in where]


def _local_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """DeepSpeed's view of FSDP2 shards: plain params over the same local storage; ``give`` points their grads at
    the shards' local grads."""
    return [torch.nn.Parameter(p.to_local(), requires_grad=True) for p in params]


def _worker(threads: int, rounds: int, warmup: int, dtype: torch.dtype, methods: list[str],
            blocks: tuple[int, int], mesh) -> dict:
    torch.set_num_threads(threads)
    lay = layout(blocks)
    grads = L.make_grads(lay, dtype=dtype, seed=1)
    params = {m: L.make_params(lay, dtype=dtype, seed=0) for m in methods}
    stepped = dict(params)  # what each method's optimizer steps: DeepSpeed steps the shards' local tensors
    if mesh is not None:
        from compiled_step.cli.bench.fsdp import sharded_grad  # noqa: PLC0415

        for m in methods:
            params[m] = _offload_shards(lay, params[m], mesh)
            stepped[m] = _local_params(params[m]) if m.startswith("DS") else params[m]
    steps, first_s = {}, {}

    def give(m: str) -> None:
        with torch.no_grad():
            for p, q, g in zip(params[m], stepped[m], grads):
                if p.grad is None:
                    p.grad = sharded_grad(p, g.clone()) if mesh is not None else g.clone()
                else:
                    local_shard(p.grad).copy_(g)
                if q is not p:
                    q.grad = local_shard(p.grad)

    for m in methods:
        give(m)
        t0 = time.perf_counter()
        steps[m] = build(m, stepped[m], lay, clip_params=params[m])
        steps[m]()
        first_s[m] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            give(m)
            steps[m]()
    # torch's fused kernel keeps state in the param dtype: it probes the fp32 access pattern only
    probe = _flat_probe(lay.n_params, dtype) if dtype == torch.float32 and mesh is None else None
    if probe is not None:
        first_s[FLAT] = math.nan
    triad = Triad(64 << 20 >> 2, torch.device("cpu"))
    flusher = CacheFlusher(torch.device("cpu"), 64 << 20)
    times = {m: [] for m in methods}
    triads = []
    if probe is not None:
        times[FLAT] = []
    for _ in range(rounds):
        triads.append(triad.measure(3))
        for m in methods:
            give(m)
            flusher()
            t0 = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t0)
        if probe is not None:
            flusher()
            t0 = time.perf_counter()
            probe()
            times[FLAT].append(time.perf_counter() - t0)
    # the reference every method's params are compared with: B for float32 params; for bfloat16 params, whose B
    # keeps bfloat16 moments, DeepSpeed's clipped step (float32 moments, as FusedStep's) where it runs
    ref = "DS+clip" if dtype != torch.float32 and "DS+clip" in methods else ("B" if "B" in methods else methods[0])
    return {
        "threads": threads, "dtype": str(dtype).replace("torch.", ""), "n_params": lay.n_params, "fsdp_offload": False,
        "n_tensors": lay.n_tensors, "rounds": rounds, "first_s": first_s,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "min_s": {m: min(t) for m, t in times.items()},
        "stream_gbps": statistics.median(t[0] for t in triads),
        "in_place_gbps": statistics.median(t[1] for t in triads),
        # Same init, grads and step count: every method should sit on B's trajectory (fp32 rounding apart).
        "max_abs_diff_vs": ref,
        "max_abs_diff": {m: max_abs_diff(params[m], params[ref]) for m in methods} | {m: math.nan for m in times if m not in params},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
    }


def _flat_probe(n: int, dtype: torch.dtype) -> Callable[[], None]:
    """torch's fused AdamW kernel on four flat buffers of ``n`` elements placed apart in their pages (FusedStep's
    own placement, ``storage._row_buffer``): the AdamW access pattern with nothing else in the way."""
    from compiled_step.storage import ROW, _row_buffer  # noqa: PLC0415

    rows = -(-n // ROW)
    p, g, m, v = (_row_buffer(rows, dtype, torch.device("cpu"), stream=k).view(-1)[:n] for k in range(4))
    gen = torch.Generator().manual_seed(3)
    for x in (p, g, m):
        x.copy_(torch.randn(x.shape, generator=gen))
    v.copy_(torch.rand(v.shape, generator=gen))
    step = torch.ones(())

    def run() -> None:
        torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=LR, beta1=BETAS[0], beta2=BETAS[1],
                            weight_decay=WEIGHT_DECAY, eps=EPS, amsgrad=False, maximize=False)
    run()  # warm: its pages are touched before it is timed
    return run


def gbps(result: dict, method: str) -> float:
    dtype = getattr(torch, result["dtype"])
    return result["n_params"] * bytes_per_param(method, dtype) / result["median_s"][method] / 1e9


def roofline(result: dict) -> tuple[float, str]:
    """The highest median bandwidth of the triads and the tuned AdamW kernels (DS, torch), and which set it."""
    candidates = {"STREAM triad": result["stream_gbps"], "in-place triad": result["in_place_gbps"]}
    for m in ("DS", "torch", FLAT):
        if m in result["median_s"]:
            candidates[f"{m} ({DESCRIPTIONS[m]})"] = gbps(result, m)
    source = max(candidates, key=candidates.get)
    return candidates[source], source


def run_subprocess(threads: int, rounds: int, warmup: int, dtype: str, methods: list[str], log,
                   blocks: tuple[int, int] = BLOCKS, fsdp_offload: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "compiled_step.cli.bench.cpu_adam", "--threads", str(threads), "--rounds",
           str(rounds), "--warmup", str(warmup), "--dtype", dtype, "--methods", ",".join(methods),
           "--blocks", ",".join(map(str, blocks))] + (["--fsdp-offload"] if fsdp_offload else [])
    log(f"bench --cpu-adam: {threads} thread(s), {dtype}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {threads}-thread run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(result: dict) -> str:
    return result["dtype"] + (", FSDP2 shards (CPUOffloadPolicy)" if result.get("fsdp_offload") else "")


def table(results: list[dict], notes: list[str]) -> str:
    first = results[0]
    lines = [f"### CPU AdamW: FusedStep, DeepSpeedCPUAdam and torch ({first['n_params'] / 1e6:.1f} M params in "
             f"{first['n_tensors']} tensors; FusedStep and DeepSpeed keep float32 moments, torch's AdamW moments in the params' dtype; medians of {first['rounds']} interleaved rounds, one "
             "process per thread count)", "",
             "| params | threads | method | median ms | B/param | GB/s | fraction of roofline | max abs diff (vs) "
             "| first step s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        roof, source = roofline(r)
        dtype = getattr(torch, r["dtype"])
        for m, t in r["median_s"].items():
            g = gbps(r, m)
            lines.append(f"| {_label(r)} | {r['threads']} | {DESCRIPTIONS[m]} | {t * 1e3:.1f} | "
                         f"{bytes_per_param(m, dtype)} | {g:.1f} | {g / roof:.2f} | {r['max_abs_diff'][m]:.1e} ({r['max_abs_diff_vs']}) | "
                         f"{r['first_s'][m]:.1f} |")
    lines += ["", "| params | threads | roofline GB/s | set by | STREAM triad GB/s | in-place triad GB/s |",
              "|---|---:|---:|---|---:|---:|"]
    for r in results:
        roof, source = roofline(r)
        lines.append(f"| {_label(r)} | {r['threads']} | {roof:.1f} | {source} | {r['stream_gbps']:.1f} | "
                     f"{r['in_place_gbps']:.1f} |")
    lines += ["", "| params | threads | goal | target | measured | status |", "|---|---:|---|---:|---:|---|"]
    for r in results:
        med = r["median_s"]
        dtype = getattr(torch, r["dtype"])
        bpp = f"{bytes_per_param('fused', dtype)} vs {bytes_per_param('DS', dtype)} B/param"
        checks = [(f"FusedStep GB/s / DS GB/s ({bpp})", "fused_vs_ds_bytes",
                   gbps(r, "fused") / gbps(r, "DS") if "DS" in med else None),
                  ("speedup over DS+clip", "fused_vs_ds_clip", med["DS+clip"] / med["fused"] if "DS+clip" in med
                   else None),
                  ("speedup over B", "fused_vs_b", med["B"] / med["fused"])]
        for name, key, value in checks:
            status = "not run" if value is None else ("met" if value >= GOALS[key] else "gap")
            shown = "-" if value is None else f"{value:.2f}"
            lines.append(f"| {_label(r)} | {r['threads']} | {name} | >= {GOALS[key]} | {shown} | {status} |")
    lines += ["", *DEFINITIONS, ""] + [f"_{n}_" for n in notes] + [""]
    return "\n".join(lines)


def measure(threads: list[int], rounds: int, log, dtypes: tuple[str, ...] = ("float32",), warmup: int = 3,
            blocks: tuple[int, int] = BLOCKS, fsdp_offload: bool = False) -> tuple[list[dict], list[str]]:
    """Every (dtype, thread count) in its own subprocess: their results, and the table's notes."""
    methods = ["fused", "B", "torch"]
    notes = []
    if deepspeed_available():
        methods[2:2] = ["DS+clip", "DS"]
    else:
        notes.append(DEEPSPEED_MISSING + ": the DS rows and goals are not run.")
    results = [run_subprocess(t, rounds, warmup, d, methods, log, blocks) for d in dtypes for t in threads]
    if fsdp_offload:  # float32 params as FSDP2 shards under CPUOffloadPolicy; torch's fused AdamW on DTensors as B
        results += [run_subprocess(t, rounds, warmup, "float32", methods, log, blocks, True) for t in threads]
    return results, notes


def run(threads: list[int], rounds: int, log, dtypes: tuple[str, ...] = ("float32", "bfloat16"), warmup: int = 3
        ) -> str:
    return table(*measure(threads, rounds, log, dtypes, warmup, fsdp_offload=True))


def _main() -> None:
    p = argparse.ArgumentParser(description="one thread count of bench --cpu-adam (run by it in a subprocess)")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--methods", default="fused,B,DS+clip,DS,torch")
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)), help="d_model,n_layers of the layout")
    p.add_argument("--fsdp-offload", action="store_true", help="the params as FSDP2 shards under CPUOffloadPolicy")
    a = p.parse_args()
    blocks = tuple(int(x) for x in a.blocks.split(","))
    result = worker(a.threads, a.rounds, a.warmup, getattr(torch, a.dtype), a.methods.split(","), blocks,
                    a.fsdp_offload)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
