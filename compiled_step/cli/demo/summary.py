"""The verdict of a run: how far the two trajectories drifted apart against the tolerances, the step-time
medians and ratios, and the summary's text."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from compiled_step.cli.demo.config import GRAD_NORM_RTOL, LOSS_RTOL, DemoResult


def timing_note(device: torch.device) -> str:
    """What the step and iteration times measure on this device (printed in the summary)."""
    what = "wall clock of clip_grad_norm_ + optimizer.step() and of fused.step(), and of whole iterations"
    if device.type == "cuda":
        return f"{what}, with torch.cuda.synchronize() before and after each, so GPU kernel time is included"
    return f"{what} (CPU ops return when done)"


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to the reference b (inf when b is 0 and a is not, nan stays nan)."""
    if a == b:
        return 0.0
    return abs(a - b) / abs(b) if b != 0 else math.inf


def summarize(result: DemoResult) -> dict[str, Any]:
    ms = result.metrics
    loss_rel = [rel_diff(m.loss_fused, m.loss_eager) for m in ms]
    gn_rel = [rel_diff(m.grad_norm_fused, m.grad_norm_eager) for m in ms]
    all_finite = all(math.isfinite(v) for m in ms for v in
                     (m.loss_eager, m.loss_fused, m.grad_norm_eager, m.grad_norm_fused))
    max_loss_rel = max(loss_rel)
    max_gn_rel = max(gn_rel)
    # The first step includes torch.compile, so it is left out; with one step there is nothing left.
    timed = ms[1:]
    opt_ratio = iter_ratio = med_opt_e = med_opt_f = med_iter_e = med_iter_f = None
    if timed:
        med_opt_e = statistics.median(m.opt_s_eager for m in timed)
        med_opt_f = statistics.median(m.opt_s_fused for m in timed)
        med_iter_e = statistics.median(m.iter_s_eager for m in timed)
        med_iter_f = statistics.median(m.iter_s_fused for m in timed)
        # Median of the per-step ratios: each ratio compares two runs of the same step, so a
        # slow step caused by something else on the machine affects both sides of it.
        opt_ratio = statistics.median(m.opt_s_eager / m.opt_s_fused for m in timed)
        iter_ratio = statistics.median(m.iter_s_eager / m.iter_s_fused for m in timed)
    return {
        "final_loss_eager": ms[-1].loss_eager,
        "final_loss_fused": ms[-1].loss_fused,
        "first_loss": ms[0].loss_eager,
        "loss_floor": result.loss_floor,
        "max_rel_loss_diff": max_loss_rel,
        "max_rel_loss_diff_step": loss_rel.index(max_loss_rel),
        "max_rel_grad_norm_diff": max_gn_rel,
        "max_rel_grad_norm_diff_step": gn_rel.index(max_gn_rel),
        # Step 0 compares the norms of identical gradients: only the arithmetic differs there.
        "step0_rel_grad_norm_diff": gn_rel[0],
        "loss_rtol": LOSS_RTOL,
        "grad_norm_rtol": GRAD_NORM_RTOL,
        "all_finite": all_finite,
        "agree": all_finite and max_loss_rel <= LOSS_RTOL and max_gn_rel <= GRAD_NORM_RTOL,
        "first_step_s_fused": ms[0].iter_s_fused,
        "first_step_s_eager": ms[0].iter_s_eager,
        "median_opt_s_eager": med_opt_e,
        "median_opt_s_fused": med_opt_f,
        "median_opt_ratio_eager_over_fused": opt_ratio,
        "median_iter_s_eager": med_iter_e,
        "median_iter_s_fused": med_iter_f,
        "median_iter_ratio_eager_over_fused": iter_ratio,
    }


def format_summary(result: DemoResult) -> str:
    s, cfg = result.summary, result.config
    lines = [
        f"summary: {cfg.model} model, {cfg.optimizer}, {len(result.metrics)} steps, "
        f"FusedStep {'compiled' if cfg.compile else 'eager'}, {result.device}"
        + (f" ({result.device_name})" if result.device_name else "")
        + (f", FSDP x{result.world_size}" if cfg.fsdp else ""),
        f"  loss            first {s['first_loss']:.4f} -> final eager {s['final_loss_eager']:.4f}, "
        f"fused {s['final_loss_fused']:.4f} (floor {s['loss_floor']:.4f})",
        f"  max rel. diff   loss {s['max_rel_loss_diff']:.2e} (step {s['max_rel_loss_diff_step']}, "
        f"tolerance {LOSS_RTOL:.0e}), grad norm {s['max_rel_grad_norm_diff']:.2e} "
        f"(step {s['max_rel_grad_norm_diff_step']}, tolerance {GRAD_NORM_RTOL:.0e}); "
        f"step-0 grad norm {s['step0_rel_grad_norm_diff']:.2e}",
        "  verdict         " + ("AGREE: FusedStep matches clip_grad_norm_ + optimizer.step() within tolerance"
                                if s["agree"] else
                                "DISAGREE: FusedStep drifted beyond tolerance"
                                + ("" if s["all_finite"] else " (non-finite values)")),
        f"  first step      fused {s['first_step_s_fused']:.1f}s"
        + (" (includes torch.compile)" if cfg.compile else "") + f", eager {s['first_step_s_eager']:.2f}s",
    ]
    lines.append(f"  timed           on {result.device}: {timing_note(torch.device(result.device))}")
    if s["median_opt_ratio_eager_over_fused"] is not None:
        n = len(result.metrics)
        lines += [
            f"  step time       median over steps 1..{n - 1}: clip_grad_norm_+step {s['median_opt_s_eager'] * 1e3:.2f} ms, "
            f"fused.step {s['median_opt_s_fused'] * 1e3:.2f} ms -> eager/fused "
            f"{s['median_opt_ratio_eager_over_fused']:.2f}x",
            f"  iteration time  median: eager {s['median_iter_s_eager'] * 1e3:.1f} ms, "
            f"fused {s['median_iter_s_fused'] * 1e3:.1f} ms -> eager/fused "
            f"{s['median_iter_ratio_eager_over_fused']:.2f}x (forward+backward included)",
        ]
    else:
        lines.append("  step time       n/a: only the first (compiling) step ran; use --steps >= 2")
    return "\n".join(lines)
