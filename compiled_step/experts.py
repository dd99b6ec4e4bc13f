"""Expert (MoE) params and NeMo Automodel's PP/EP gradient scale factors.

Expert params are recognised three ways:

1. DTensors whose device mesh has the EP axis (``ep_axis_name`` in ``mesh_dim_names``);
2. params whose fully qualified name matches ``_TE_EXPERT_PARAM_PATTERN`` (TransformerEngine's grouped
   experts, in MoE blocks named ``mlp`` or ``moe``);
3. params of modules marked with ``mark_experts(module)``.
"""

from __future__ import annotations

import numbers
import re

import torch

# NeMo Automodel's pattern, widened to MoE blocks named ``moe`` as well as ``mlp``. Matches e.g.
# ``model.layers.3.mlp.experts.gate_up_linear.weight0`` and ``layers.0.moe.experts.down_linear.bias7``.
_TE_EXPERT_PARAM_PATTERN = re.compile(r"(^|\.)(mlp|moe)\.experts\.(gate_up_linear|down_linear)\.(weight|bias)\d+")

_MARKER = "_compiled_step_is_expert"


def mark_experts(module: torch.nn.Module) -> torch.nn.Module:
    """Mark every param of ``module`` (recursively) as an expert param. Returns ``module``."""
    setattr(module, _MARKER, True)
    return module


def expert_param_ids(model_parts, ep_axis_name: str | None) -> frozenset[int]:
    """``id()`` of every expert param in ``model_parts`` (see the module docstring)."""
    ids = set()
    for part in model_parts or ():
        marked_prefixes = [name for name, m in part.named_modules() if getattr(m, _MARKER, False)]
        for name, p in part.named_parameters():
            if _is_ep_dtensor(p, ep_axis_name) or _TE_EXPERT_PARAM_PATTERN.search(name):
                ids.add(id(p))
            elif any(prefix == "" or name.startswith(prefix + ".") for prefix in marked_prefixes):
                ids.add(id(p))
    return frozenset(ids)


def _is_ep_dtensor(p, ep_axis_name) -> bool:
    if not ep_axis_name:
        return False
    mesh = getattr(p, "device_mesh", None)
    return mesh is not None and ep_axis_name in (mesh.mesh_dim_names or ())


def param_names(model_parts) -> dict[int, str]:
    return {id(p): name for part in model_parts or () for name, p in part.named_parameters()}


def check_replication_factor(expert_tp_replication_factor) -> int:
    """NeMo Automodel's contract: an int >= 1 (a bool is not an int here)."""
    if isinstance(expert_tp_replication_factor, bool) or not isinstance(expert_tp_replication_factor, int):
        raise TypeError(
            f"expert_tp_replication_factor must be an integer, got {type(expert_tp_replication_factor).__name__}"
        )
    if expert_tp_replication_factor < 1:
        raise ValueError(f"expert_tp_replication_factor must be >= 1, got {expert_tp_replication_factor}")
    return expert_tp_replication_factor


def pp_divisor(pp_enabled: bool, num_label_tokens, dp_group_size):
    """``num_label_tokens / dp_group_size`` when PP is on and both are given, else None.

    ``num_label_tokens`` may be a 0-d tensor (counted on the device, never read on the host); a zero
    count then leaves the grads unscaled, as NeMo Automodel does for a zero Python count.
    """
    if not pp_enabled or num_label_tokens is None or dp_group_size is None or dp_group_size == 0:
        return None
    if isinstance(num_label_tokens, torch.Tensor):
        tokens = num_label_tokens.reshape(()).to(torch.float64)
        divisor = tokens / float(dp_group_size)
        return torch.where(divisor != 0, divisor, torch.ones_like(divisor))
    if isinstance(num_label_tokens, bool) or not isinstance(num_label_tokens, numbers.Real):
        raise TypeError(f"num_label_tokens must be a number or a 0-d tensor, got {type(num_label_tokens).__name__}")
    divisor = num_label_tokens / dp_group_size
    return float(divisor) if divisor != 0 else None


def ep_ratio(moe_mesh, dp_group_size, expert_tp_replication_factor: int) -> float | None:
    """``(dp_group_size / ep_shard_size) * expert_tp_replication_factor`` when ``moe_mesh`` and
    ``dp_group_size`` are given, else None. ``ep_shard_size`` is the size of ``moe_mesh["ep_shard"]``, or 1."""
    if moe_mesh is None or dp_group_size is None:
        return None
    names = moe_mesh.mesh_dim_names or ()
    ep_shard_size = moe_mesh["ep_shard"].size() if "ep_shard" in names else 1
    if ep_shard_size <= 0:
        return None
    return float(dp_group_size) / float(ep_shard_size) * float(expert_tp_replication_factor)
