"""Reductions of partial norms across ranks. The only module that calls ``torch.distributed``.

Single-process plans have nothing to reduce; the partials of all groups are combined locally.
"""

from __future__ import annotations

import torch

from compiled_step import norms
from compiled_step.kernels import NormKind


def reduce_partials(kind: NormKind, partials: list[torch.Tensor], plan) -> torch.Tensor:
    """Combine the per-group partials (already scaled) into the global ``[w]`` partial."""
    device = plan.norm_device
    if not partials:
        return torch.zeros(kind.partial_width, dtype=torch.float64, device=device)
    return norms.combine(kind, torch.stack([p.to(device) for p in partials]))
