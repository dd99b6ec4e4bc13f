"""torchao's Adam and AdamW types, one rule per state format (``quantized_adam.format_rule``): the math, the state
layout and what is refused are ``quantized_adam.py``'s. ``rules.rule_for`` imports this module (and torchao) only
when it is handed a torchao optimizer.

* ``adam8bit``: ``Adam8bit``/``AdamW8bit``, uint8 codes of a 256-entry map, blocks of 256 by default;
* ``adam4bit``: ``Adam4bit``/``AdamW4bit``, 4-bit codes two per byte, blocks of 128 by default;
* ``adamfp8``: ``AdamFp8``/``AdamWFp8``, float8_e4m3fn codes (kept as uint8 bits), blocks of 256 by default;
* ``torchao_adamw``: ``_AdamW``, plain state in the param's dtype (its block size is infinite).

Each honours ``bf16_stochastic_round`` for bfloat16 params with FusedStep's counter-based bits (seeded by
``FusedStepConfig.stochastic_rounding_seed``), not torchao's ``torch.randint``: unbiased like torchao's,
deterministic under the seed, the draws themselves different.
"""

from __future__ import annotations

from torchao.optim import Adam4bit, Adam8bit, AdamFp8, AdamW4bit, AdamW8bit, AdamWFp8, _AdamW

from compiled_step.rules.quantized_adam import FORMATS, format_rule

adam8bit = format_rule("adam8bit", (Adam8bit, AdamW8bit), FORMATS["8bit"])
adam4bit = format_rule("adam4bit", (Adam4bit, AdamW4bit), FORMATS["4bit"])
adamfp8 = format_rule("adamfp8", (AdamFp8, AdamWFp8), FORMATS["fp8"])
torchao_adamw = format_rule("torchao_adamw", (_AdamW,), FORMATS["plain"])

RULES = (adam8bit, adam4bit, adamfp8, torchao_adamw)
