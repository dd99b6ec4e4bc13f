"""SGD (``torch.optim.SGD``), matching torch's single-tensor numerics.

torch's reference math per param::

    g = -g if maximize else g
    g = g + wd * p
    if momentum != 0:
        buf = g.clone() on the first step, else buf * momentum + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p = p + (-lr) * g

``momentum != 0`` changes the graph (it adds the momentum buffer); nesterov and the first-step
rule are selected per tensor with ``torch.where`` so they do not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.rules.common import host_float, reject_common_options

USES_STEP = False  # the scalar table is computed from per-param step counts
NAME = "sgd"

COLUMNS = ("neg_lr", "wd", "momentum", "one_minus_dampening", "nesterov", "first")
_NEG_LR, _WD, _MOMENTUM, _ONE_MINUS_DAMPENING, _NESTEROV, _FIRST = range(len(COLUMNS))


class Variant(NamedTuple):
    """Structural options: each distinct value compiles its own Phase B graph."""

    momentum: bool


def validate_group(group: dict, kind: str) -> None:
    reject_common_options(group, kind)
    for key in ("lr", "momentum", "dampening", "weight_decay"):
        host_float(group[key], name=key)


def variant(group: dict) -> Variant:
    return Variant(momentum=host_float(group["momentum"], name="momentum") != 0.0)


def needs_state(var: Variant) -> bool:
    """torch keeps SGD state only for the momentum buffer."""
    return var.momentum


def state_tensors(p: torch.Tensor, state: dict, var: Variant, step_device: torch.device):
    """``(momentum_buffer,)`` or ``()``, plus ``None`` (SGD keeps no step count).

    torch creates the momentum buffer as a clone of the first step's grad. The compiled update
    needs a tensor to write into, so FusedStep creates it as zeros and marks the tensor as being
    on its first step; the ``first`` column then makes the update store ``g`` exactly as torch does.
    """
    if not var.momentum:
        return (), None
    if state.get("momentum_buffer") is None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["_compiled_step_first"] = True
    return (state["momentum_buffer"],), None


def pop_first_flags(states: list[dict]) -> list[float]:
    """1.0 for tensors whose momentum buffer FusedStep just created (torch's first step), else 0.0."""
    return [1.0 if s.pop("_compiled_step_first", False) else 0.0 for s in states]


def scalar_table(optimizer, group: dict, first: torch.Tensor) -> torch.Tensor:
    """Per-tensor scalars ``[n, len(COLUMNS)]`` float32; ``first`` is float ``[n]`` (1 = first step)."""
    lr = host_float(group["lr"], name="lr")
    wd = host_float(group["weight_decay"], name="weight_decay")
    momentum = host_float(group["momentum"], name="momentum")
    dampening = host_float(group["dampening"], name="dampening")
    nesterov = 1.0 if group["nesterov"] else 0.0
    n = first.shape[0]
    table = torch.empty((n, len(COLUMNS)), dtype=torch.float64, device=first.device)
    table[:, :_FIRST] = torch.tensor([-lr, wd, momentum, 1.0 - dampening, nesterov], dtype=torch.float64).to(
        first.device, non_blocking=True
    )
    table[:, _FIRST] = first
    return table.to(torch.float32)


def _math(p32, g_raw, buf32, grad_coef, col):
    """One SGD update in fp32; ``col(k)`` is a 0-d value or a per-element vector (packed)."""
    g = g_raw.float() * grad_coef + col(_WD) * p32
    buf_new = None
    if buf32 is not None:
        buf_new = torch.where(col(_FIRST) != 0, g, buf32 * col(_MOMENTUM) + col(_ONE_MINUS_DAMPENING) * g)
        g = torch.where(col(_NESTEROV) != 0, g + col(_MOMENTUM) * buf_new, buf_new)
    return p32 + col(_NEG_LR) * g, buf_new


def update(
    params: list[torch.Tensor],  # B x [n_i] param shards, flattened, fp32 or bf16; mutated
    grads: list[torch.Tensor],  # B x [n_i] grads, unscaled and unclipped; read only
    momentum_buffers: list[torch.Tensor] | None,  # B x [n_i] momentum buffers (param dtype), or None; mutated
    table: torch.Tensor,  # [B, len(COLUMNS)] float32 per-tensor scalars
    grad_coef: torch.Tensor,  # [] float32: scale * clip coefficient * (-1 if maximize)
    finite: torch.Tensor,  # [] bool: total norm is finite; False keeps everything bit-identical
    compute_amax: bool = False,  # graph constant: also return max|p| of the stored params (FP8 scales)
) -> torch.Tensor | None:  # [B] float32 amax per param when compute_amax, else None
    amaxes = []
    for j in range(len(params)):
        p = params[j]
        buf = momentum_buffers[j] if momentum_buffers is not None else None
        p32 = p.float()
        buf32 = buf.float() if buf is not None else None
        p_new, buf_new = _math(p32, grads[j], buf32, grad_coef, lambda k: table[j, k])
        if buf is not None:
            buf.copy_(torch.where(finite, buf_new, buf32))
        p_stored = torch.where(finite, p_new, p32).to(p.dtype)
        p.copy_(p_stored)
        if compute_amax:
            amaxes.append(p_stored.abs().amax().float())
    return torch.stack(amaxes) if compute_amax else None


def update_packed(
    param: torch.Tensor,  # [n] small params packed end to end (param dtype); mutated
    grad: torch.Tensor,  # [n] their grads packed the same way (zeros where a param has no grad)
    momentum_buffer: torch.Tensor | None,  # [n] momentum arena (state tensors are views into it); mutated
    segment: torch.Tensor,  # [n] int32: row of ``table`` for each element
    table: torch.Tensor,  # [S, len(COLUMNS)] float32 per-tensor scalars
    active: torch.Tensor,  # [S] bool: the tensor has a grad this step
    grad_coef: torch.Tensor,  # [] float32
    finite: torch.Tensor,  # [] bool
) -> None:
    p32 = param.float()
    buf32 = momentum_buffer.float() if momentum_buffer is not None else None
    rows = table[segment]
    p_new, buf_new = _math(p32, grad, buf32, grad_coef, lambda k: rows[:, k])
    keep = finite & active[segment]
    if momentum_buffer is not None:
        momentum_buffer.copy_(torch.where(keep, buf_new, buf32))
    param.copy_(torch.where(keep, p_new, p32))


def state_keys(var: Variant) -> tuple[str, ...]:
    return ("momentum_buffer",) if var.momentum else ()


def packed_state_args(var: Variant, arenas: dict) -> tuple:
    """``update_packed``'s state arguments: the momentum arena, or None without momentum."""
    return (arenas["momentum_buffer"] if var.momentum else None,)


def state_lists(var: Variant, per_param_state: list[tuple[torch.Tensor, ...]]) -> tuple:
    return ([s[0] for s in per_param_state] if var.momentum else None,)


def per_tensor_vector(states: list[dict], steps: list, device: torch.device) -> torch.Tensor:
    """The per-tensor input of ``scalar_table``: 1.0 where this is the tensor's first momentum step."""
    return torch.tensor(pop_first_flags(states), dtype=torch.float32).to(device, non_blocking=True)
