"""The finish, compiled: from the reduced partial norms to everything the updates read.

One call per step, between the collectives and Phase B. It writes, in place:

* the total norm, the finite flag and the skip counter;
* every tensor's row of the per-tensor table: whether it is updated (a finite norm and a grad), its
  grad coefficient (clip coefficient x group scale x sign) and the rule's scalars (``slot_table``).

Nothing is read on the host: a non-finite norm turns every ``apply`` to 0 and the updates keep every
value bit-identical.

The training-health options (``norm/health.py``) are its optional ``health`` input. Off (None, a graph
constant), the graph is the default step's, op for op; on, ``health.apply`` may skip a finite step (a
spike), replace the clip coefficient (ZClip) and write the options' state and the per-param norms.
"""

from __future__ import annotations

import torch

from compiled_step.norm import health as health_math
from compiled_step.norm.kinds import CLIP_EPS, combine, total_from


def finish(
    partials: torch.Tensor,  # [P, 2] float64: reduced partial norms (one row per group, or one after PP)
    order: torch.Tensor,  # [] float64: the norm order (read by the scaled kind)
    max_norm: torch.Tensor,  # [] float64: the clipping threshold; inf disables clipping
    hp: torch.Tensor,  # [G, H'] float64: each group's hyperparameters (the rule's HP_COLUMNS, then padding)
    slot_group: torch.Tensor,  # [S] int32: the group of each slot
    counts: torch.Tensor,  # [S] float32: per-tensor counts (Adam: steps; SGD: first-step flags)
    active: torch.Tensor,  # [S] bool: the tensor has a grad this step (scratch slots: False)
    total: torch.Tensor,  # [1] float64: written with the pre-clip total norm
    finite: torch.Tensor,  # [1] bool: written with isfinite(total)
    skipped: torch.Tensor,  # [1] int64: incremented when the total is not finite
    table: torch.Tensor,  # [S, K'] float32 (float64 with float64 params): written with every slot's scalars, K' >= K
    kind: str,  # graph constant: NormKind.kind
    p: float,  # graph constant: NormKind.p
    rule,  # graph constant: the rule module (its slot_table), or a tuple of them (several optimizers)
    slot_rule: torch.Tensor | None = None,  # [S] int32: with several rules, which one each slot's is
    health: health_math.HealthTensors | None = None,  # the training-health options' tensors; None: all off
) -> None:
    norm_order = order if kind == "scaled" else p
    t = total_from(kind, combine(kind, partials, norm_order), norm_order)
    ok = torch.isfinite(t)
    # min(1, max_norm / (total + eps)); with max_norm = inf this is exactly 1 for any finite total.
    coef = (max_norm / (t + CLIP_EPS)).clamp(max=1.0)
    apply = ok
    if health is not None:  # a graph constant: with every option off, not one op more
        apply, coef = health_math.apply(health, t, ok, coef, max_norm, kind, norm_order)
    # [1] outputs, not 0-d: torch 2.13 drops in-place writes to 0-d graph inputs.
    total.copy_(t.reshape(1))
    finite.copy_(ok.reshape(1))
    skipped.copy_(skipped + (~ok).to(skipped.dtype))
    slot_hp = hp[slot_group.long()]  # [S, H]
    _write_table(table, rule, slot_rule, slot_hp, counts, apply & active, coef)


def _write_table(table: torch.Tensor, rule, slot_rule: torch.Tensor | None, slot_hp: torch.Tensor,
                 counts: torch.Tensor, apply: torch.Tensor, coef: torch.Tensor) -> None:
    """Every slot's row of the per-tensor table, from its rule's ``slot_table`` (padded to the table's width).

    ``slot_table`` gets the table itself, not its dtype: Dynamo orders a graph's inputs by first use, a dtype
    read included, and reading it inside ``slot_table`` (after the counts) keeps the finish graph's inputs in
    the order they had before float64 tables.
    """
    if not isinstance(rule, tuple):
        scalars = rule.slot_table(slot_hp, counts, apply, coef, table)
        table.copy_(torch.nn.functional.pad(scalars, (0, table.shape[1] - scalars.shape[1])))
        return
    # Several rules: every rule's table for every slot (a few columns per slot), each slot keeping its own.
    which = slot_rule[:, None]
    out = torch.zeros_like(table)
    for index, r in enumerate(rule):
        scalars = r.slot_table(slot_hp, counts, apply, coef, table)
        out = torch.where(which == index, torch.nn.functional.pad(scalars, (0, table.shape[1] - scalars.shape[1])),
                          out)
    table.copy_(out)
