"""The Muon + AdamW row's own figures: what its methods are, the Newton-Schulz work every method of the
row does, and that work timed alone, so the ratio to anchor B can be read against it.

Muon orthogonalizes every hidden matrix with ``ns_steps`` Newton-Schulz iterations in bfloat16. The
matmul FLOPs are the same in every method; torch's Muon runs them one matrix at a time, FusedStep
batches same-shape matrices into one compiled call per shape. If they cost the same on both sides and
take most of anchor B's step, fusing the rest cannot gain much; if batching makes them cheaper, that
shows as a FusedStep step shorter than torch's Newton-Schulz alone.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench.methods import PARAM_NORMS

# Timed with the methods in every round, but not a method: no speedup, roofline or param check.
NEWTON_SCHULZ = "newton_schulz"


# What the methods are on this row (the legend's lines are the one-optimizer rows').
ROW_NOTE = (
    "Muon + AdamW: torch.optim.Muon (lr=0.02, momentum=0.95, nesterov, 5 Newton-Schulz steps, weight decay 0.1) on "
    "the hidden matrices (attention and MLP projections), torch.optim.AdamW on the rest (embeddings decayed, biases "
    "and norms not). A, B: clip_grad_norm_(foreach=True) over all params + Muon.step() + AdamW(foreach=True / "
    "fused=True).step() (Muon has no foreach or fused implementation); D: NeMo Automodel's eager path over both "
    "optimizers' groups, then both steps; fused: FusedStep([muon, adamw]).")
# Methods this row does not run, and why.
NOT_RUN = {
    "C": "anchor C is PyTorch's compiled-optimizer recipe for one optimizer; it is compared on the adamw row",
    PARAM_NORMS: "what param_norms=True costs is judged on the adamw row",
}


def newton_schulz_gflop(layout: L.Layout, ns_steps: int = 5) -> float:
    """GFLOP of one step's Newton-Schulz over ``layout``'s hidden matrices: per iteration, on X of
    s x l (s the smaller side), X X^T (2 s^2 l), the Gram polynomial's G G (2 s^3) and G' X (2 s^2 l)."""
    flop = 0
    for spec in layout.specs:
        if spec.hidden_matrix:
            s, l = sorted(spec.shape)
            flop += ns_steps * (4 * s * s * l + 2 * s ** 3)
    return flop / 1e9


def newton_schulz_probe(muon: torch.optim.Optimizer, layout: L.Layout,
                        ref_grads: list[torch.Tensor]) -> Callable[[], None]:
    """torch's own Newton-Schulz (``torch.optim._muon._zeropower_via_newtonschulz``, what
    ``Muon.step()`` calls per matrix) on the reference grads of the hidden matrices, with Muon's
    coefficients, steps and eps: the matmul part of every method's step, alone."""
    from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: PLC0415 -- private, torch pinned

    (group,) = muon.param_groups
    grads = [g for g, spec in zip(ref_grads, layout.specs) if spec.hidden_matrix]
    coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]

    def probe() -> None:
        for g in grads:
            _zeropower_via_newtonschulz(g, coefficients, steps, eps)

    return probe


def newton_schulz_note(layout: L.Layout, times_s: list[float], b_median_s: float | None,
                       fused_median_s: float | None) -> str:
    """The probe's median beside B's and FusedStep's."""
    ns = statistics.median(times_s)
    matrices = sum(s.hidden_matrix for s in layout.specs)
    text = (f"Newton-Schulz alone (torch's per-matrix _zeropower_via_newtonschulz, what Muon.step() runs, on the "
            f"{matrices} hidden matrices' grads: {newton_schulz_gflop(layout):.1f} GFLOP in bfloat16, timed in the "
            f"same rounds): median {ns * 1e3:.1f} ms")
    if b_median_s is not None:
        text += (f", {ns / b_median_s:.0%} of B's median step (the other {(b_median_s - ns) * 1e3:.1f} ms of B: the "
                 "clip, the momentum, the updates and AdamW)")
    if fused_median_s is not None:
        text += (f". FusedStep runs the same matmul FLOPs batched, one compiled call per matrix shape; its whole step "
                 f"is {fused_median_s / ns:.2f}x this median")
        if fused_median_s < ns:
            text += ": its batched Newton-Schulz costs less than torch's per-matrix one here"
    return text + ". The memory floor of this row leaves the matmuls out."
