"""DistributedDataParallel's bucket views as the grads FusedStep reads: no copy per step.

With ``gradient_as_bucket_view=True``, DDP points every ``p.grad`` at a view of its flat
communication bucket, in every backward where it is not that view already. FusedStep's own grad
buffers would lose that fight: DDP would copy into its bucket and re-point, and FusedStep would copy
back. So for the params of such a DDP module (found in ``model_parts``), FusedStep reads the grads
where DDP keeps them: Phase A and the bucket updates take them as they are (``planning``'s
*external* grads). The views are stable once DDP has rebuilt its buckets (after the first
iteration); a new view makes FusedStep rebuild its plan once, and the old plan lets go of the first
iteration's bucket.

DDP's buckets pack params end to end, so the views are not 16-byte aligned in general: on CUDA,
Inductor copies an input it compiled as aligned if a later call passes a misaligned one. With
``gradient_as_bucket_view=False`` DDP copies its reduced bucket into the grads FusedStep installed,
as it does for any grad, and nothing of this applies.
"""

from __future__ import annotations

import torch

from compiled_step.planning import local_tensor


def bucket_view_params(model_parts) -> frozenset[int]:
    """``id()`` of the params of every DDP module in ``model_parts`` with ``gradient_as_bucket_view=True``."""
    ids = set()
    for part in model_parts or ():
        for module in part.modules():
            if isinstance(module, torch.nn.parallel.DistributedDataParallel) and module.gradient_as_bucket_view:
                ids.update(id(p) for p in module.parameters())
    return frozenset(ids)


def is_bucket_view(grad: torch.Tensor | None) -> bool:
    """Whether ``grad`` looks like DDP's bucket view: a view of a flat (1-D) buffer that holds it.

    DDP's reducer makes each view as ``bucket.gradients.as_strided(...)`` (or ``narrow(...).view(...)``) of the
    bucket's 1-D buffer. A param alone in its bucket gets a buffer of exactly its size: after DDP's rebuild
    (second iteration) that is every param of more than ``bucket_cap_mb``, most LLM matrices at the default
    25 MB. Only params of a ``gradient_as_bucket_view=True`` DDP module are asked (``bucket_view_params``),
    and DDP re-points those grads at its views in every backward.
    """
    if grad is None:
        return False
    local = local_tensor(grad)
    base = local._base if local._is_view() else None
    return base is not None and base.dim() == 1 and base.numel() >= local.numel()


def external_grads(param_lists, candidates: frozenset[int]) -> dict[int, torch.Tensor]:
    """param id -> its grad, for the candidates whose grad is a DDP bucket view now."""
    if not candidates:
        return {}
    return {id(p): p.grad for params in param_lists for p in params
            if id(p) in candidates and is_bucket_view(p.grad)}
