"""Adam and AdamW (``torch.optim.Adam`` / ``torch.optim.AdamW``), matching torch's numerics.

torch's reference math per param (single-tensor and foreach paths agree)::

    g   = -g if maximize else g
    g   = g + wd * p                      # Adam (L2), not AdamW
    p   = p * (1 - lr * wd)               # AdamW / Adam(decoupled_weight_decay=True)
    m   = m.lerp(g, 1 - beta1)
    v   = v * beta2 + (1 - beta2) * g * g
    vm  = max(vm, v)  ; v_used = vm       # amsgrad
    bc1 = 1 - beta1 ** step ; bc2 = 1 - beta2 ** step     (step already incremented)
    p   = p + (-lr / bc1) * m / (sqrt(v_used) / sqrt(bc2) + eps)

Adam's L2 term and AdamW's decoupled decay are both always present in the one graph, with the
unused one set to its identity (``l2 = 0`` or ``decay = 1``), so Adam and AdamW share a graph.
``maximize`` is folded into the sign of the grad coefficient. Only ``amsgrad`` changes the graph,
because it adds a state tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.rules.common import host_float, reject_common_options

USES_STEP = True  # the scalar table is computed from per-param step counts
NAME = "adam"

# Columns of the per-tensor scalar table, in order.
COLUMNS = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay", "l2", "neg_step_size", "bc2_sqrt")
_ONE_MINUS_BETA1, _BETA2, _ONE_MINUS_BETA2, _EPS, _DECAY, _L2, _NEG_STEP_SIZE, _BC2_SQRT = range(len(COLUMNS))


class Variant(NamedTuple):
    """Structural options: each distinct value compiles its own Phase B graph."""

    amsgrad: bool


def validate_group(group: dict, kind: str) -> None:
    reject_common_options(group, kind)
    for key in ("lr", "eps", "weight_decay"):
        host_float(group[key], name=key)
    beta1, beta2 = group["betas"]
    host_float(beta1, name="betas[0]")
    host_float(beta2, name="betas[1]")


def variant(group: dict) -> Variant:
    return Variant(amsgrad=bool(group["amsgrad"]))


def needs_state(var: Variant) -> bool:
    return True


def is_decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))


def state_tensors(p: torch.Tensor, state: dict, var: Variant, step_device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(exp_avg, exp_avg_sq[, max_exp_avg_sq])`` and the step tensor, created as torch does.

    torch.optim keeps ``step`` as a float32 0-d tensor (on the param's device when capturable or
    fused, else on the CPU). FusedStep gates the step increment with an on-device finite flag, so
    it keeps ``step`` on the param's device as the capturable/fused paths do; torch.optim's
    ``step()`` accepts that layout too, so switching back and forth keeps working.
    """
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if var.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif var.amsgrad and "max_exp_avg_sq" not in state:
        # amsgrad switched on after the state was created: torch would fail; start the max at 0.
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if state["step"].device != step_device:
        state["step"] = state["step"].to(device=step_device, dtype=torch.float32)
    tensors = (state["exp_avg"], state["exp_avg_sq"])
    if var.amsgrad:
        tensors += (state["max_exp_avg_sq"],)
    return tensors, state["step"]


def scalar_table(optimizer, group: dict, steps: torch.Tensor) -> torch.Tensor:
    """Per-tensor scalars ``[n, len(COLUMNS)]`` float32 for the tensors whose ``steps`` are given.

    ``steps`` (float32 ``[n]``) holds each tensor's step count *before* this update, as torch
    increments before computing the bias corrections. The math is done in float64, like torch's
    Python-float scalars, then rounded to float32 the way a Python scalar is rounded when it meets
    a float32 tensor in an ATen kernel.
    """
    lr = host_float(group["lr"], name="lr")
    beta1 = host_float(group["betas"][0], name="betas[0]")
    beta2 = host_float(group["betas"][1], name="betas[1]")
    eps = host_float(group["eps"], name="eps")
    wd = host_float(group["weight_decay"], name="weight_decay")
    decoupled = is_decoupled(optimizer, group)
    decay = 1.0 - lr * wd if decoupled else 1.0
    l2 = 0.0 if decoupled else wd

    n = steps.shape[0]
    table = torch.empty((n, len(COLUMNS)), dtype=torch.float64, device=steps.device)
    table[:, :_NEG_STEP_SIZE] = torch.tensor(
        [1.0 - beta1, beta2, 1.0 - beta2, eps, decay, l2], dtype=torch.float64
    ).to(steps.device, non_blocking=True)
    step = steps.to(torch.float64) + 1.0
    bias_correction1 = 1.0 - torch.pow(beta1, step)
    bias_correction2 = 1.0 - torch.pow(beta2, step)
    table[:, _NEG_STEP_SIZE] = -(lr / bias_correction1)
    table[:, _BC2_SQRT] = bias_correction2.sqrt()
    return table.to(torch.float32)


def _math(p32, g_raw, m32, v32, vm32, grad_coef, col):
    """One Adam/AdamW update in fp32. ``col(k)`` gives column k of the scalar table, either a 0-d
    value (one tensor per row) or a per-element vector (packed tensors); the math is the same."""
    g = g_raw.float() * grad_coef + col(_L2) * p32
    p_decayed = p32 * col(_DECAY)
    m_new = torch.lerp(m32, g, col(_ONE_MINUS_BETA1))
    v_new = v32 * col(_BETA2) + col(_ONE_MINUS_BETA2) * g * g
    vm_new = torch.maximum(vm32, v_new) if vm32 is not None else None
    v_used = vm_new if vm_new is not None else v_new
    denom = v_used.sqrt() / col(_BC2_SQRT) + col(_EPS)
    p_new = p_decayed + col(_NEG_STEP_SIZE) * m_new / denom
    return p_new, m_new, v_new, vm_new


def _store(keep, pairs) -> None:
    """Write ``new`` into each tensor where ``keep``, else its old value (bit-identical on a skip)."""
    for dst, new, old32 in pairs:
        dst.copy_(torch.where(keep, new, old32))


def update(
    params: list[torch.Tensor],  # B x [n_i] param shards, flattened, fp32 or bf16; mutated
    grads: list[torch.Tensor],  # B x [n_i] grads, unscaled and unclipped; read only
    exp_avgs: list[torch.Tensor],  # B x [n_i] first moments (param dtype); mutated
    exp_avg_sqs: list[torch.Tensor],  # B x [n_i] second moments (param dtype); mutated
    max_exp_avg_sqs: list[torch.Tensor] | None,  # B x [n_i] amsgrad maxima, or None; mutated
    table: torch.Tensor,  # [B, len(COLUMNS)] float32 per-tensor scalars
    grad_coef: torch.Tensor,  # [] float32: scale * clip coefficient * (-1 if maximize)
    finite: torch.Tensor,  # [] bool: total norm is finite; False keeps everything bit-identical
    compute_amax: bool = False,  # graph constant: also return max|p| of the stored params (FP8 scales)
) -> torch.Tensor | None:  # [B] float32 amax per param when compute_amax, else None
    amaxes = []
    for j in range(len(params)):
        p, m, v = params[j], exp_avgs[j], exp_avg_sqs[j]
        vm = max_exp_avg_sqs[j] if max_exp_avg_sqs is not None else None
        p32, m32, v32 = p.float(), m.float(), v.float()
        vm32 = vm.float() if vm is not None else None
        p_new, m_new, v_new, vm_new = _math(p32, grads[j], m32, v32, vm32, grad_coef, lambda k: table[j, k])
        _store(finite, [(m, m_new, m32), (v, v_new, v32)] + ([(vm, vm_new, vm32)] if vm is not None else []))
        p_stored = torch.where(finite, p_new, p32).to(p.dtype)
        p.copy_(p_stored)
        if compute_amax:  # a reduction over the values being stored: same loop, no extra read
            amaxes.append(p_stored.abs().amax().float())
    return torch.stack(amaxes) if compute_amax else None


def update_packed(
    param: torch.Tensor,  # [n] small params packed end to end (param dtype); mutated
    grad: torch.Tensor,  # [n] their grads packed the same way (zeros where a param has no grad)
    exp_avg: torch.Tensor,  # [n] first-moment arena (state tensors are views into it); mutated
    exp_avg_sq: torch.Tensor,  # [n] second-moment arena; mutated
    max_exp_avg_sq: torch.Tensor | None,  # [n] amsgrad arena, or None; mutated
    segment: torch.Tensor,  # [n] int32: which packed tensor (row of ``table``) each element belongs to
    table: torch.Tensor,  # [S, len(COLUMNS)] float32 per-tensor scalars
    active: torch.Tensor,  # [S] bool: the tensor has a grad this step (torch skips it otherwise)
    grad_coef: torch.Tensor,  # [] float32
    finite: torch.Tensor,  # [] bool
) -> None:
    p32, m32, v32 = param.float(), exp_avg.float(), exp_avg_sq.float()
    vm32 = max_exp_avg_sq.float() if max_exp_avg_sq is not None else None
    rows = table[segment]  # [n, K]: per-element view of the per-tensor scalars
    p_new, m_new, v_new, vm_new = _math(p32, grad, m32, v32, vm32, grad_coef, lambda k: rows[:, k])
    keep = finite & active[segment]
    pairs = [(param, p_new, p32), (exp_avg, m_new, m32), (exp_avg_sq, v_new, v32)]
    _store(keep, pairs + ([(max_exp_avg_sq, vm_new, vm32)] if max_exp_avg_sq is not None else []))


STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def state_keys(var: Variant) -> tuple[str, ...]:
    return STATE_KEYS if var.amsgrad else STATE_KEYS[:2]


def packed_state_args(var: Variant, arenas: dict) -> tuple:
    """``update_packed``'s state arguments: the arenas, with None for an absent amsgrad maximum."""
    return (arenas["exp_avg"], arenas["exp_avg_sq"], arenas["max_exp_avg_sq"] if var.amsgrad else None)


def state_lists(var: Variant, per_param_state: list[tuple[torch.Tensor, ...]]) -> tuple:
    """Transpose per-param state tuples into the update's list arguments."""
    exp_avgs = [s[0] for s in per_param_state]
    exp_avg_sqs = [s[1] for s in per_param_state]
    max_sqs = [s[2] for s in per_param_state] if var.amsgrad else None
    return exp_avgs, exp_avg_sqs, max_sqs


def per_tensor_vector(states: list[dict], steps: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The per-tensor input of ``scalar_table``: each tensor's step count before this update."""
    return torch.stack(steps).to(device=device, dtype=torch.float32)
