"""torchao's ``_AdamW`` (``torchao.optim._AdamW``: plain state in the param's dtype, and ``bf16_stochastic_round``
for bfloat16 params): the rule for this optimizer type. Its math is torchao's ``single_param_adam``, the same as
the quantized formats' (``quantized_adam.py``) with no param's state quantized (its block size is infinite);
with ``bf16_stochastic_round=True`` its bfloat16 params round stochastically, with FusedStep's counter-based bits
(``rules.common.random_bits16``, seeded by ``FusedStepConfig.stochastic_rounding_seed``), not torchao's
``torch.randint``: unbiased like torchao's, deterministic under the seed, no generator state."""

from __future__ import annotations

import torch
from torchao.optim import _AdamW

from compiled_step.rules import quantized_adam
from compiled_step.rules.common import StateTensor
from compiled_step.rules.quantized_adam import (  # noqa: F401  (the rule contract's names, shared by the formats)
    HP_COLUMNS,
    KIND,
    LOCAL_SHARDS,
    LOW_PRECISION_KEYS,
    PARAM_NDIMS,
    ROW_SHARDED,
    STATE_KEYS,
    STATE_PARTS,
    STEP_KEY,
    STOCHASTIC_ROUNDING,
    TABLE_COLUMNS,
    Variant,
    call_bytes,
    count_at_bind,
    lr_ratio,
    rounds_itself,
    slot_table,
    state_keys,
    state_layout,
    update_matrices,
)

NAME = "torchao_adamw"
OPTIMIZERS = (_AdamW,)  # the exact types this rule serves (rules.rule_for registers them)
FORMAT = quantized_adam.FORMATS["plain"]


def variant(optimizer, group: dict) -> Variant:
    return quantized_adam.variant(FORMAT, optimizer)


def group_values(optimizer, group: dict, where: str) -> list:
    return quantized_adam.group_values(FORMAT, optimizer, group, where)


def assemble(key: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return quantized_adam.assemble(FORMAT, key, parts, shape, dtype)


def disassemble(key: str, value: torch.Tensor, declared: dict[str, StateTensor]) -> dict[str, torch.Tensor]:
    return quantized_adam.disassemble(FORMAT, key, value, declared)
