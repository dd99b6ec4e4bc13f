"""The norm stage: Phase A partial norms, their combination and the finish.

``kinds``     how a ``norm_type`` accumulates (sum of |g|^p, max, or max-scaled sum for other p)
``partials``  Phase A, compiled: a group's partial norm from its flat grad buffer (or a list of grads)
``finish``    compiled: the total norm, the clip coefficient, the finite flag and the skip counter,
              and every tensor's scalars for the update (``rules``)

The reductions across ranks between Phase A and the finish live in ``compiled_step.collectives``.
"""

from compiled_step.norm.kinds import CLIP_EPS, NormKind, combine, combine_scaled, total_from

__all__ = ["CLIP_EPS", "NormKind", "combine", "combine_scaled", "total_from"]
