"""What a demo run depends on (``DemoConfig``, validated on construction), the agreement tolerances and
their reasons, and what a run produces (``StepMetrics`` per step, ``DemoResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiled_step.cli.models import PRESETS

# Agreement tolerances.
# Both runs are fp32 and start bit-identical, so step 0's loss is identical. They are not expected
# to stay bit-identical: FusedStep accumulates the norm in fp64 (clip_grad_norm_ in fp32) and its
# compiled kernels round differently from torch's foreach kernels, so the clip coefficient and the
# updates differ by rounding (~1e-7 relative), and training carries those differences forward.
# The bounds are relative to the reference and hold at every step of the run.
# Measured on CPU (torch 2.13, small model, 200 steps, compiled FusedStep), the largest drift over
# adamw / adam / sgd, clip on/off, norm_type 2 / inf, seeds 0 and 1, and the tiny model was
# 1.1e-5 for the loss and 1.2e-4 for the grad norm (SGD lr 0.3, momentum 0.9: the most chaotic
# trajectory); AdamW with the defaults stays below 3e-7 and 3e-6. The tolerances leave ~100x above
# the worst of these for longer runs and other machines. They still catch small real bugs, though
# not instantly: on the tiny model a 1% learning-rate error moves the loss by 7e-4 after 6 steps
# and 1.6e-3 after 10, a 2% error by 3e-3 after 10 (tests/test_demo.py checks that the demo calls
# that run DISAGREE); a wrong clip coefficient shows up at the first clipped step.
LOSS_RTOL = 1e-3
# The grad norm drifts ~10x more than the loss (measured above): the loss averages over every
# prediction, while the gradient of a model that is learning is a small residual, whose size
# changes relatively more for the same tiny difference in the weights.
GRAD_NORM_RTOL = 1e-2

_OPTIMIZERS = ("adamw", "adam", "sgd")
# Defaults chosen so that the small model's loss falls visibly within the default 40 steps.
_DEFAULT_LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.3}
# AdamW's decoupled decay is the common setup; Adam's and SGD's weight decay is an L2 term
# in the gradient, which rarely appears with them, so they default to none.
_DEFAULT_WEIGHT_DECAY = {"adamw": 0.1, "adam": 0.0, "sgd": 0.0}


class DemoOptionError(ValueError):
    """A bad demo option. The CLI prints it as a one-line error; callers can catch ValueError."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything a demo run depends on. Validated on construction (ValueError)."""

    steps: int = 40
    model: str = "small"
    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimizer's default in _DEFAULT_LR
    weight_decay: float | None = None  # None: the optimizer's default in _DEFAULT_WEIGHT_DECAY
    momentum: float = 0.9  # SGD only
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still computed and compared)
    norm_type: float = 2.0
    batch_size: int = 16
    seed: int = 0
    out: Path | None = None  # None: runs/<name derived from the config>
    compile: bool = True
    fsdp: int = 0  # 0: no FSDP; N: N data-parallel ranks
    device: str | None = None  # None: cuda if available, else cpu
    progress: bool = True
    overwrite: bool = False  # replace the demo's files in an output folder that holds a previous run

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise DemoOptionError(f"--steps must be a positive integer, got {self.steps!r}")
        if self.model not in PRESETS:
            raise DemoOptionError(f"--model must be one of {sorted(PRESETS)}, got {self.model!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise DemoOptionError(f"--optimizer must be one of {list(_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise DemoOptionError(f"--lr must be a positive finite number, got {self.lr!r}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise DemoOptionError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (0.0 <= self.momentum < 1.0):
            raise DemoOptionError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and not math.isnan(self.max_grad_norm)):
            raise DemoOptionError(
                f"--max-grad-norm must be > 0 (use --no-clip to disable clipping), got {self.max_grad_norm!r}"
            )
        if not (self.norm_type == math.inf or (math.isfinite(self.norm_type) and self.norm_type > 0)):
            raise DemoOptionError(f"--norm-type must be > 0 or inf, got {self.norm_type!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DemoOptionError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.fsdp, int) or self.fsdp < 0:
            raise DemoOptionError(f"--fsdp must be a positive number of ranks, got {self.fsdp!r}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except RuntimeError as e:
                raise DemoOptionError(f"--device {self.device!r} is not a torch device: {e}") from None
            if dev.type not in ("cpu", "cuda"):
                raise DemoOptionError(f"--device must be cpu or cuda, got {self.device!r}")
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise DemoOptionError(
                    f"--device {self.device} was requested but CUDA is not available here "
                    f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
                )
            if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
                raise DemoOptionError(
                    f"--device {self.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
                )

    # Resolved values ------------------------------------------------------------------------------
    @property
    def resolved_lr(self) -> float:
        return _DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def resolved_weight_decay(self) -> float:
        return _DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay

    @property
    def clipping(self) -> bool:
        return self.max_grad_norm is not None and math.isfinite(self.max_grad_norm)

    @property
    def run_name(self) -> str:
        # Deterministic, so the name says what the run was; a second run of the same command finds
        # the first one's folder and refuses to replace it without --overwrite.
        mode = "compiled" if self.compile else "eager"
        fsdp = f"-fsdp{self.fsdp}" if self.fsdp else ""
        return f"demo-{self.model}-{self.optimizer}-{mode}{fsdp}-seed{self.seed}"

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / self.run_name


@dataclass
class StepMetrics:
    step: int
    loss_eager: float
    loss_fused: float
    grad_norm_eager: float
    grad_norm_fused: float
    # Time of the part FusedStep replaces: clip_grad_norm_ + optimizer.step() vs fused.step().
    opt_s_eager: float
    opt_s_fused: float
    # Time of the whole iteration: forward, backward, the above, zero_grad.
    iter_s_eager: float
    iter_s_fused: float


@dataclass
class DemoResult:
    config: DemoConfig
    metrics: list[StepMetrics]
    n_params: int
    loss_floor: float  # entropy rate of the data: the best mean loss any model can reach
    device: str
    world_size: int
    device_name: str = ""  # e.g. the GPU's name, or the CPU model
    summary: dict[str, Any] = field(default_factory=dict)
    fused_step: Any = field(default=None, repr=False)  # for dump_run_graphs; not part of the summary

    @property
    def agree(self) -> bool:
        return bool(self.summary["agree"])
