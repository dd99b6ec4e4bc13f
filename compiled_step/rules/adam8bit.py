"""torchao's ``Adam8bit`` and ``AdamW8bit`` (8-bit: uint8 codes of a 256-entry map, blocks of 256 by default, or the
optimizer's block_size): the rule for these optimizer types. The math, the state layout and what is refused are
``quantized_adam.py``'s, for this module's ``FORMAT``."""

from __future__ import annotations

import torch
from torchao.optim import Adam8bit, AdamW8bit

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

NAME = "adam8bit"
OPTIMIZERS = (Adam8bit, AdamW8bit)  # the exact types this rule serves (rules.rule_for registers them)
FORMAT = quantized_adam.FORMATS["8bit"]


def variant(optimizer, group: dict) -> Variant:
    return quantized_adam.variant(FORMAT, optimizer)


def group_values(optimizer, group: dict, where: str) -> list:
    return quantized_adam.group_values(FORMAT, optimizer, group, where)


def assemble(key: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return quantized_adam.assemble(FORMAT, key, parts, shape, dtype)


def disassemble(key: str, value: torch.Tensor, declared: dict[str, StateTensor]) -> dict[str, torch.Tensor]:
    return quantized_adam.disassemble(FORMAT, key, value, declared)
