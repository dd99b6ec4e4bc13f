"""The low-precision state rows (``bench --low-precision``): FusedStep with bf16 moments, with bfloat16 params
rounded stochastically (torch's AdamW with ``stochastic_rounding="params"``, and torchao's
``_AdamW(bf16_stochastic_round=True)`` as it is), and (where torchao is installed) with torchao's AdamW8bit,
AdamW4bit and AdamWFp8, each
next to the eager step a user has today, on one layout, in one process.

Each row times both methods interleaved (``rounds`` medians; grads restored and the cache flushed before every
step), at each thread count asked for, and reports:

* ms per step and the speedup of FusedStep over the reference;
* the bytes per param FusedStep's step moves (params read and written, grads read twice: the norm and the
  update, each state tensor read and written) and their fraction of the roofline (the best triad bandwidth
  measured in the same process: ``measure.Triad``);
* state bytes per param of each method (what its ``optimizer.state`` holds);
* FusedStep's first step (its compile included) and the graphs it compiled (Dynamo's unique graphs).

The references, and why: with bf16 moments no eager torch path runs on the CPU (torch's single-tensor, foreach
and fused AdamW all refuse bfloat16 state for float32 params; only CUDA's fused kernel has that path), so the
reference is what the same user runs without them: ``clip_grad_norm_`` + ``AdamW(fused=True)`` with float32
state. For stochastically rounded bfloat16 params, torchao's ``_AdamW(bf16_stochastic_round=True)`` after
``clip_grad_norm_`` (torchao compiles its step per param shape). For AdamW8bit, AdamW4bit and AdamWFp8,
torchao's own step after ``clip_grad_norm_``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from compiled_step.cli.bench.measure import CacheFlusher, Triad, num_threads, peak_extra_bytes, unique_graphs

LR, MAX_NORM = 1e-3, 1.0
# A transformer-like layout: d_model 512, 4 blocks of 4 matrices (qkv/out/up/down shapes) with their biases and
# norms, and an embedding: 16.8 M params in 35 tensors, every tensor a multiple of torchao's 256-element blocks.
D = 512


def layout() -> list[tuple[int, ...]]:
    shapes = [(8192, D)]
    for _ in range(4):
        shapes += [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D), (3 * D,), (D,), (4 * D,), (D,)]
    shapes += [(D,), (D,)]
    return shapes


@dataclass
class Format:
    name: str
    param_dtype: torch.dtype
    fused: Callable[[list[torch.Tensor]], Callable[[], object]]  # params -> step
    reference: Callable[[list[torch.Tensor]], Callable[[], object]] | None
    reference_name: str
    state_bytes: float  # per param, FusedStep's state as the format keeps it (what bytes_moved reads and writes)
    optimizers: dict = field(default_factory=dict)  # filled by the builders: name -> optimizer, for state bytes


def _state_bytes_per_param(opt: torch.optim.Optimizer, n: int) -> float:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                inner = [getattr(v, a) for a in getattr(v, "__tensor_flatten__", lambda: ([], None))()[0]] or [v]
                total += sum(t.numel() * t.element_size() for t in inner)
    return total / n


def formats() -> list[Format]:
    from compiled_step import FusedStep, bf16_moments

    out = []

    def fused_moments(params, fmt):
        opt = bf16_moments(torch.optim.AdamW(params, lr=LR))
        fmt.optimizers["fused"] = opt
        return FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False).step

    def reference_fp32(params, fmt):
        opt = torch.optim.AdamW(params, lr=LR, fused=True)
        fmt.optimizers["reference"] = opt

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        return step

    moments = Format("bf16 moments (fp32 params)", torch.float32, None, None,
                     "clip_grad_norm_ + AdamW(fused=True), fp32 state", 4.0)
    moments.fused = lambda ps: fused_moments(ps, moments)
    moments.reference = lambda ps: reference_fp32(ps, moments)
    out.append(moments)

    def fused_sr(params, fmt):
        opt = torch.optim.AdamW(params, lr=LR)
        fmt.optimizers["fused"] = opt
        return FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False, stochastic_rounding="params").step

    sr = Format("bf16 params, stochastic rounding", torch.bfloat16, None, None, "", 4.0)
    sr.fused = lambda ps: fused_sr(ps, sr)
    try:
        from torchao.optim import _AdamW  # noqa: PLC0415 -- optional

        def reference_ao(params, fmt):
            opt = _AdamW(params, lr=LR, bf16_stochastic_round=True)
            fmt.optimizers["reference"] = opt

            def step():
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
                opt.step()
            return step
        sr.reference = lambda ps: reference_ao(ps, sr)
        sr.reference_name = "clip_grad_norm_ + torchao _AdamW(bf16_stochastic_round=True)"

        def fused_ao(params, fmt):  # the one-line swap: FusedStep takes torchao's optimizer as it is
            opt = _AdamW(params, lr=LR, bf16_stochastic_round=True)
            fmt.optimizers["fused"] = opt
            return FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False).step

        sr_ao = Format("bf16 params, torchao _AdamW(bf16_stochastic_round=True)", torch.bfloat16, None, None,
                       sr.reference_name, 4.0)
        sr_ao.fused = lambda ps: fused_ao(ps, sr_ao)
        sr_ao.reference = lambda ps: reference_ao(ps, sr_ao)
    except ImportError:
        sr.reference_name, sr_ao = "(torchao not installed)", None
    out.append(sr)
    if sr_ao is not None:
        out.append(sr_ao)

    try:
        from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8  # noqa: PLC0415 -- optional
    except ImportError:
        return out

    def fused_quantized(params, fmt, cls):
        opt = cls(params, lr=LR)
        fmt.optimizers["fused"] = opt
        return FusedStep(opt, max_grad_norm=MAX_NORM, compile_notice=False).step

    def reference_quantized(params, fmt, cls):
        opt = cls(params, lr=LR)
        fmt.optimizers["reference"] = opt

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        return step

    # torchao's formats: two moments of (code bytes per param) each, and one float32 scale per block each.
    for cls, code_bytes, block in ((AdamW8bit, 1, 256), (AdamW4bit, 0.5, 128), (AdamWFp8, 1, 256)):
        fmt = Format(f"torchao {cls.__name__} (fp32 params)", torch.float32, None, None,
                     f"clip_grad_norm_ + torchao {cls.__name__}'s own step", 2 * (code_bytes + 4 / block))
        fmt.fused = lambda ps, fmt=fmt, cls=cls: fused_quantized(ps, fmt, cls)
        fmt.reference = lambda ps, fmt=fmt, cls=cls: reference_quantized(ps, fmt, cls)
        out.append(fmt)
    return out


def bytes_per_param(fmt: Format) -> float:
    """Params read and written, grads read by the norm and by the update, state read and written."""
    p = torch.finfo(fmt.param_dtype).bits // 8
    return 2 * p + 2 * p + 2 * fmt.state_bytes


def _params(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype)) for s in shapes]


def run(threads: list[int], rounds: int, log) -> str:
    shapes = layout()
    n = sum(torch.Size(s).numel() for s in shapes)
    triad = Triad(64 << 20 >> 2, torch.device("cpu"))
    flusher = CacheFlusher(torch.device("cpu"), 64 << 20)
    lines = [f"### Low-precision state ({n / 1e6:.1f} M params in {len(shapes)} tensors, AdamW lr {LR}, clip at "
             f"{MAX_NORM}; medians of {rounds} interleaved steps)", "",
             "| format | threads | FusedStep ms | reference ms | speedup | B/param moved | roofline GB/s | "
             "fraction of roofline | state B/param (fused / ref) | first step s | graphs | peak extra / param bytes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for fmt in formats():
        grads = [(torch.randn(s, generator=torch.Generator().manual_seed(1 + i)) * 0.05).to(fmt.param_dtype)
                 for i, s in enumerate(shapes)]
        fused_params = _params(shapes, fmt.param_dtype)
        ref_params = _params(shapes, fmt.param_dtype) if fmt.reference else None

        def give(params):
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

        give(fused_params)
        fused_step = fmt.fused(fused_params)
        graphs_before = unique_graphs()
        t0 = time.perf_counter()
        fused_step()
        first = time.perf_counter() - t0
        graphs = unique_graphs() - graphs_before
        ref_step = None
        if fmt.reference:
            give(ref_params)
            ref_step = fmt.reference(ref_params)
            ref_step()
        give(fused_params)
        peak = peak_extra_bytes(fused_step, torch.device("cpu"))
        param_bytes = n * torch.finfo(fmt.param_dtype).bits // 8
        state_fused = _state_bytes_per_param(fmt.optimizers["fused"], n)
        state_ref = _state_bytes_per_param(fmt.optimizers["reference"], n) if ref_step else float("nan")
        for t in threads:
            with num_threads(t):
                _, roof = triad.measure(5)
                times = {"fused": [], "ref": []}
                for _ in range(rounds):
                    for name, params, step in (("fused", fused_params, fused_step), ("ref", ref_params, ref_step)):
                        if step is None:
                            continue
                        give(params)
                        flusher()
                        t0 = time.perf_counter()
                        step()
                        times[name].append(time.perf_counter() - t0)
            fused_ms = statistics.median(times["fused"]) * 1e3
            ref_ms = statistics.median(times["ref"]) * 1e3 if times["ref"] else float("nan")
            moved = bytes_per_param(fmt)
            gbs = moved * n / (fused_ms / 1e3) / 1e9
            lines.append(f"| {fmt.name} | {t} | {fused_ms:.1f} | {ref_ms:.1f} | {ref_ms / fused_ms:.2f}x | "
                         f"{moved:.0f} | {roof:.1f} | {gbs / roof:.2f} | {state_fused:.1f} / {state_ref:.1f} | "
                         f"{first:.1f} | {graphs} | {peak / param_bytes:.2f} |")
            log(lines[-1])
        lines.append("")
    refs = "; ".join(f"{f.name}: {f.reference_name}" for f in formats())
    lines += ["", f"_References: {refs}._", ""]
    return "\n".join(lines)
