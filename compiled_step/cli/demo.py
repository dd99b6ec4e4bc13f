"""``python -m compiled_step demo``: train the built-in LM with FusedStep next to the eager reference.

Two copies of the same model start from the same weights and see the same batches. One steps with
the reference, ``clip_grad_norm_(params, max_norm, norm_type)`` then ``optimizer.step()``; the other
with ``FusedStep.step()``. The demo shows the progress, prints a summary (final losses, how far the
two trajectories drifted apart, the step-time ratio) and writes per-step metrics, a plot and the
compiled graphs into an output folder. The exit status is 0 when the two runs agree within the
stated tolerance and 1 when they do not, so the demo doubles as an end-to-end check.

The output folder (``runs/<name>/`` by default) must not hold a previous run: the demo refuses to
start (exit status 2) unless ``--overwrite`` is given, which replaces the demo's own files there.
``--device cuda`` runs both copies on the GPU and times each call between ``torch.cuda.synchronize()``
calls; the summary says which device ran and what was timed. matplotlib (the plot) and tqdm (the
progress bar on a terminal) come with the ``cli`` extra; without them the demo stops with one line
that says so (exit status 2).

Data parallel: ``torchrun --nproc_per_node N -m compiled_step demo --fsdp N`` shards both copies
with FSDP2 (gloo on CPU, NCCL on CUDA); each rank draws its own batches. ``--fsdp 1`` also works
without torchrun (a one-process group).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compiled_step.cli.extras import MissingExtraError, require_cli_extra
from compiled_step.cli.models import PRESETS, MarkovData, build_model, param_groups
from compiled_step.cli.progress import StepProgress, is_terminal

__all__ = ["DemoConfig", "DemoOptionError", "DemoResult", "LOSS_RTOL", "GRAD_NORM_RTOL", "parse_args", "run", "main"]

# --- Agreement tolerances -------------------------------------------------------------------------
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


# --- Pieces a test can swap ---------------------------------------------------------------------------

def _make_optimizer(cfg: DemoConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.resolved_weight_decay)
    lr = cfg.resolved_lr
    # foreach=True pins the reference to the foreach implementation (the default on CUDA, and what
    # FusedStep is compared against); fused=True would be invisible to torch.compile anyway.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, foreach=True)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, foreach=True)


def _make_fused_step(optimizer: torch.optim.Optimizer, cfg: DemoConfig, *, model: torch.nn.Module,
                     mesh: Any | None) -> Any:
    # Imported here, not at module level: `python -m compiled_step demo --help` and the model
    # tests must not depend on the core being importable.
    from compiled_step import FusedStep

    kwargs: dict[str, Any] = {
        # None disables clipping; the reference gets max_norm=inf, whose coefficient
        # min(1, inf / norm) is exactly 1. Both still compute and return the norm.
        "max_grad_norm": cfg.max_grad_norm if cfg.clipping else None,
        "norm_type": cfg.norm_type,
        "compile": cfg.compile,
        "compile_notice": False,  # the demo shows its own progress line for the first step
    }
    if mesh is not None:
        # FSDP params are DTensors that carry their own mesh; model_parts gives the plan the
        # params' names for its messages.
        kwargs["model_parts"] = [model]
    return FusedStep(optimizer, **kwargs)


# --- Running ------------------------------------------------------------------------------------------

def _resolve_device(cfg: DemoConfig) -> torch.device:
    if cfg.device is not None:
        dev = torch.device(cfg.device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and cfg.fsdp:
        # One GPU per rank: torchrun says which through LOCAL_RANK.
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    elif dev.type == "cuda" and dev.index is None:
        # torch.cuda.set_device refuses a device without an index ("cuda"), and the summary should
        # name the GPU that ran: take the current one.
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without a sync a timer would measure the launch only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def _timing_note(device: torch.device) -> str:
    """What the step and iteration times measure on this device (printed in the summary)."""
    what = "wall clock of clip_grad_norm_ + optimizer.step() and of fused.step(), and of whole iterations"
    if device.type == "cuda":
        return f"{what}, with torch.cuda.synchronize() before and after each, so GPU kernel time is included"
    return f"{what} (CPU ops return when done)"


class _Distributed:
    """Sets up (and later tears down) the process group and the 1-D mesh for --fsdp."""

    def __init__(self, cfg: DemoConfig, device: torch.device) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.dist = dist
        self.owns_group = False
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            env_world = os.environ.get("WORLD_SIZE")
            if env_world is None:
                if cfg.fsdp != 1:
                    raise DemoOptionError(
                        f"--fsdp {cfg.fsdp} needs {cfg.fsdp} processes: run it as "
                        f"`torchrun --nproc_per_node {cfg.fsdp} -m compiled_step demo --fsdp {cfg.fsdp}`"
                    )
                # A one-process group needs no rendezvous; an in-memory store is enough.
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            else:
                dist.init_process_group(backend)
            self.owns_group = True
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if self.world_size != cfg.fsdp:
            self.close()
            raise DemoOptionError(
                f"--fsdp {cfg.fsdp} does not match the {self.world_size} processes started; "
                f"use torchrun --nproc_per_node {cfg.fsdp}"
            )
        self.mesh = init_device_mesh(device.type, (self.world_size,))

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (each rank's loss is on its own batch)."""
        values = values.clone()
        self.dist.all_reduce(values, op=self.dist.ReduceOp.SUM)
        return values / self.world_size

    def close(self) -> None:
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _shard(model: torch.nn.Module, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    # Blocks first, then the root (embeddings, final norm, head): the usual FSDP2 wrapping, which
    # gives one all-gather per block.
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _as_float(t: torch.Tensor) -> float:
    # Under FSDP the reference's clip_grad_norm_ returns a DTensor; full_tensor() makes it a plain
    # (replicated) value. FusedStep may do the same.
    full = getattr(t, "full_tensor", None)
    return float((full() if full is not None else t).detach())


def run(cfg: DemoConfig, *, log: Callable[[str], None] = print) -> DemoResult | None:
    """Train both copies. Returns the result on rank 0 and None on the other ranks."""
    device = _resolve_device(cfg)
    dist_ctx = _Distributed(cfg, device) if cfg.fsdp else None
    try:
        return _train(cfg, device, dist_ctx, log)
    finally:
        if dist_ctx is not None:
            dist_ctx.close()


def _train(cfg: DemoConfig, device: torch.device, dist_ctx: _Distributed | None,
           log: Callable[[str], None]) -> DemoResult | None:
    rank = dist_ctx.rank if dist_ctx else 0
    world = dist_ctx.world_size if dist_ctx else 1
    is_main = rank == 0
    say = log if is_main else (lambda _msg: None)

    # Same seed, same weights: the fused copy is a deep copy taken before anything touches either.
    model_eager = build_model(cfg.model, seed=cfg.seed)
    model_fused = copy.deepcopy(model_eager)
    n_params = sum(p.numel() for p in model_eager.parameters())
    model_eager.to(device)
    model_fused.to(device)
    mesh = None
    if dist_ctx is not None:
        mesh = dist_ctx.mesh
        _shard(model_eager, mesh)
        _shard(model_fused, mesh)

    opt_eager = _make_optimizer(cfg, model_eager)
    opt_fused = _make_optimizer(cfg, model_fused)
    fused = _make_fused_step(opt_fused, cfg, model=model_fused, mesh=mesh)
    clip_norm = cfg.max_grad_norm if cfg.clipping else math.inf

    mcfg = model_eager.cfg
    data = MarkovData(mcfg.vocab_size, mcfg.seq_len, seed=cfg.seed)
    loss_floor = data.entropy_rate()
    # Batches come from their own generator, distinct per rank (data parallel), and both copies
    # consume the same batch each step.
    batch_gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + 1 + rank)

    say(
        f"demo: model={cfg.model} ({n_params / 1e6:.2f} M params, {mcfg.n_layers} layers, d_model={mcfg.d_model}, "
        f"vocab={mcfg.vocab_size}, seq_len={mcfg.seq_len}) optimizer={cfg.optimizer} lr={cfg.resolved_lr:g} "
        f"max_grad_norm={cfg.max_grad_norm if cfg.clipping else 'off'} norm_type={cfg.norm_type:g} "
        f"batch={cfg.batch_size} steps={cfg.steps} device={device} ({_device_name(device)}) "
        f"FusedStep={'compiled' if cfg.compile else 'eager (--no-compile)'}"
        + (f" fsdp={world} ranks" if dist_ctx else "")
    )
    say(f"demo: data = random Markov chain, loss floor (entropy rate) {loss_floor:.3f}, "
        f"uniform guess {math.log(mcfg.vocab_size):.3f}")

    def eager_side(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        _sync(device)
        t0 = time.perf_counter()
        loss = model_eager(x, y)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        gn = torch.nn.utils.clip_grad_norm_(model_eager.parameters(), clip_norm, cfg.norm_type)
        opt_eager.step()
        _sync(device)
        t2 = time.perf_counter()
        opt_eager.zero_grad(set_to_none=True)
        _sync(device)
        return loss.detach(), gn.detach(), t2 - t1, time.perf_counter() - t0

    def fused_side(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        _sync(device)
        t0 = time.perf_counter()
        loss = model_fused(x, y)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        gn = fused.step()
        _sync(device)
        t2 = time.perf_counter()
        fused.zero_grad()
        _sync(device)
        return loss.detach(), gn.detach(), t2 - t1, time.perf_counter() - t0

    metrics: list[StepMetrics] = []
    first_label = "compiling FusedStep" if cfg.compile else "first step"
    with StepProgress(cfg.steps, desc="training", enabled=cfg.progress and is_main) as bar:
        for step in range(cfg.steps):
            x, y = (t.to(device) for t in data.batch(cfg.batch_size, batch_gen))
            # Alternate which copy goes first so neither one always runs on a cold cache.
            order = (eager_side, fused_side) if step % 2 == 0 else (fused_side, eager_side)
            if step == 0:
                with bar.first_step(first_label):
                    outs = {f: f(x, y) for f in order}
            else:
                outs = {f: f(x, y) for f in order}
            (le, ge, oe, ie), (lf, gf, of, if_) = outs[eager_side], outs[fused_side]
            losses = torch.stack([le.float(), lf.float()])
            if dist_ctx is not None:
                losses = dist_ctx.mean(losses)
            m = StepMetrics(step=step, loss_eager=float(losses[0]), loss_fused=float(losses[1]),
                            grad_norm_eager=_as_float(ge), grad_norm_fused=_as_float(gf),
                            opt_s_eager=oe, opt_s_fused=of, iter_s_eager=ie, iter_s_fused=if_)
            metrics.append(m)
            bar.update(loss=m.loss_fused, ref=m.loss_eager, gnorm=m.grad_norm_fused)

    if not is_main:
        return None
    result = DemoResult(config=cfg, metrics=metrics, n_params=n_params, loss_floor=loss_floor,
                        device=str(device), world_size=world, device_name=_device_name(device))
    result.summary = _summarize(result)
    result.fused_step = fused
    return result


def _rel(a: float, b: float) -> float:
    """|a - b| relative to the reference b (inf when b is 0 and a is not, nan stays nan)."""
    if a == b:
        return 0.0
    return abs(a - b) / abs(b) if b != 0 else math.inf


def _summarize(result: DemoResult) -> dict[str, Any]:
    ms = result.metrics
    loss_rel = [_rel(m.loss_fused, m.loss_eager) for m in ms]
    gn_rel = [_rel(m.grad_norm_fused, m.grad_norm_eager) for m in ms]
    all_finite = all(math.isfinite(v) for m in ms for v in
                     (m.loss_eager, m.loss_fused, m.grad_norm_eager, m.grad_norm_fused))
    max_loss_rel = max(loss_rel)
    max_gn_rel = max(gn_rel)
    # The first step includes torch.compile, so it is left out; with one step there is nothing left.
    timed = ms[1:]
    opt_ratio = iter_ratio = med_opt_e = med_opt_f = med_iter_e = med_iter_f = None
    if timed:
        med_opt_e = statistics.median(m.opt_s_eager for m in timed)
        med_opt_f = statistics.median(m.opt_s_fused for m in timed)
        med_iter_e = statistics.median(m.iter_s_eager for m in timed)
        med_iter_f = statistics.median(m.iter_s_fused for m in timed)
        # Median of the per-step ratios: each ratio compares two runs of the same step, so a
        # slow step caused by something else on the machine affects both sides of it.
        opt_ratio = statistics.median(m.opt_s_eager / m.opt_s_fused for m in timed)
        iter_ratio = statistics.median(m.iter_s_eager / m.iter_s_fused for m in timed)
    return {
        "final_loss_eager": ms[-1].loss_eager,
        "final_loss_fused": ms[-1].loss_fused,
        "first_loss": ms[0].loss_eager,
        "loss_floor": result.loss_floor,
        "max_rel_loss_diff": max_loss_rel,
        "max_rel_loss_diff_step": loss_rel.index(max_loss_rel),
        "max_rel_grad_norm_diff": max_gn_rel,
        "max_rel_grad_norm_diff_step": gn_rel.index(max_gn_rel),
        # Step 0 compares the norms of identical gradients: only the arithmetic differs there.
        "step0_rel_grad_norm_diff": gn_rel[0],
        "loss_rtol": LOSS_RTOL,
        "grad_norm_rtol": GRAD_NORM_RTOL,
        "all_finite": all_finite,
        "agree": all_finite and max_loss_rel <= LOSS_RTOL and max_gn_rel <= GRAD_NORM_RTOL,
        "first_step_s_fused": ms[0].iter_s_fused,
        "first_step_s_eager": ms[0].iter_s_eager,
        "median_opt_s_eager": med_opt_e,
        "median_opt_s_fused": med_opt_f,
        "median_opt_ratio_eager_over_fused": opt_ratio,
        "median_iter_s_eager": med_iter_e,
        "median_iter_s_fused": med_iter_f,
        "median_iter_ratio_eager_over_fused": iter_ratio,
    }


# --- Reporting ----------------------------------------------------------------------------------------

def format_summary(result: DemoResult) -> str:
    s, cfg = result.summary, result.config
    lines = [
        f"summary: {cfg.model} model, {cfg.optimizer}, {len(result.metrics)} steps, "
        f"FusedStep {'compiled' if cfg.compile else 'eager'}, {result.device}"
        + (f" ({result.device_name})" if result.device_name else "")
        + (f", FSDP x{result.world_size}" if cfg.fsdp else ""),
        f"  loss            first {s['first_loss']:.4f} -> final eager {s['final_loss_eager']:.4f}, "
        f"fused {s['final_loss_fused']:.4f} (floor {s['loss_floor']:.4f})",
        f"  max rel. diff   loss {s['max_rel_loss_diff']:.2e} (step {s['max_rel_loss_diff_step']}, "
        f"tolerance {LOSS_RTOL:.0e}), grad norm {s['max_rel_grad_norm_diff']:.2e} "
        f"(step {s['max_rel_grad_norm_diff_step']}, tolerance {GRAD_NORM_RTOL:.0e}); "
        f"step-0 grad norm {s['step0_rel_grad_norm_diff']:.2e}",
        "  verdict         " + ("AGREE: FusedStep matches clip_grad_norm_ + optimizer.step() within tolerance"
                                if s["agree"] else
                                "DISAGREE: FusedStep drifted beyond tolerance"
                                + ("" if s["all_finite"] else " (non-finite values)")),
        f"  first step      fused {s['first_step_s_fused']:.1f}s"
        + (" (includes torch.compile)" if cfg.compile else "") + f", eager {s['first_step_s_eager']:.2f}s",
    ]
    lines.append(f"  timed           on {result.device}: {_timing_note(torch.device(result.device))}")
    if s["median_opt_ratio_eager_over_fused"] is not None:
        n = len(result.metrics)
        lines += [
            f"  step time       median over steps 1..{n - 1}: clip_grad_norm_+step {s['median_opt_s_eager'] * 1e3:.2f} ms, "
            f"fused.step {s['median_opt_s_fused'] * 1e3:.2f} ms -> eager/fused "
            f"{s['median_opt_ratio_eager_over_fused']:.2f}x",
            f"  iteration time  median: eager {s['median_iter_s_eager'] * 1e3:.1f} ms, "
            f"fused {s['median_iter_s_fused'] * 1e3:.1f} ms -> eager/fused "
            f"{s['median_iter_ratio_eager_over_fused']:.2f}x (forward+backward included)",
        ]
    else:
        lines.append("  step time       n/a: only the first (compiling) step ran; use --steps >= 2")
    return "\n".join(lines)


def write_metrics(result: DemoResult, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "metrics.csv"
    names = list(StepMetrics.__dataclass_fields__)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for m in result.metrics:
            writer.writerow(asdict(m))
    json_path = out_dir / "summary.json"
    cfg = asdict(result.config)
    cfg["out"] = str(result.config.out_dir)
    cfg["lr"] = result.config.resolved_lr
    cfg["weight_decay"] = result.config.resolved_weight_decay
    payload = {
        "config": cfg,
        "model": asdict(PRESETS[result.config.model]) | {"n_params": result.n_params},
        "device": result.device,
        "device_name": result.device_name,
        "timed": _timing_note(torch.device(result.device)),
        "world_size": result.world_size,
        "torch": torch.__version__,
        "summary": result.summary,
    }
    # allow_nan: inf shows up legitimately (norm_type=inf); json writes it as Infinity.
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    return csv_path, json_path


def plot_metrics(result: DemoResult, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = curves_figure(result)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curves_figure(result: DemoResult) -> Any:
    """The three panels of curves.png (loss, grad norm, relative differences) as a matplotlib Figure."""
    # Lazy and headless: importing the demo must not import matplotlib, and Agg needs no display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result.metrics
    steps = [m.step for m in ms]
    fig, (ax_loss, ax_gn, ax_rel) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(steps, [m.loss_eager for m in ms], label="eager clip_grad_norm_ + step", lw=2.5, alpha=0.6)
    ax_loss.plot(steps, [m.loss_fused for m in ms], label="FusedStep", lw=1.2, ls="--")
    ax_loss.axhline(result.loss_floor, color="grey", lw=0.8, ls=":", label="loss floor (entropy rate)")
    ax_loss.set(title="training loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax_loss.legend()

    ax_gn.plot(steps, [m.grad_norm_eager for m in ms], label="eager", lw=2.5, alpha=0.6)
    ax_gn.plot(steps, [m.grad_norm_fused for m in ms], label="FusedStep", lw=1.2, ls="--")
    if result.config.clipping:
        ax_gn.axhline(result.config.max_grad_norm, color="grey", lw=0.8, ls=":", label="max_grad_norm")
    ax_gn.set(title=f"grad norm before clipping (p={result.config.norm_type:g})", xlabel="step",
              ylabel=f"total {result.config.norm_type:g}-norm of all grads")
    ax_gn.legend()

    # Relative differences on a log axis; exact zeros (step 0's loss) are drawn at a floor so
    # the log scale can show them.
    tiny = 1e-12
    ax_rel.semilogy(steps, [max(_rel(m.loss_fused, m.loss_eager), tiny) for m in ms], label="loss")
    ax_rel.semilogy(steps, [max(_rel(m.grad_norm_fused, m.grad_norm_eager), tiny) for m in ms], label="grad norm")
    ax_rel.axhline(LOSS_RTOL, color="C0", lw=0.8, ls=":", label="loss tolerance")
    ax_rel.axhline(GRAD_NORM_RTOL, color="C1", lw=0.8, ls=":", label="grad-norm tolerance")
    ax_rel.set(title="|fused - eager| / |eager|  (exact 0 drawn at 1e-12)", xlabel="step",
               ylabel="relative difference")
    ax_rel.legend()
    fig.suptitle(f"compiled_step demo: {result.config.run_name} on {result.device}")
    fig.tight_layout()
    return fig


def dump_graphs(out_dir: Path, fused: Any, log: Callable[[str], None] = print) -> list | None:
    """Write the run's compiled graphs with compiled_step.cli.graphs.dump_run_graphs, if it exists.

    Returns what dump_run_graphs returns (the paths it wrote), or None when it is not available.
    A missing graphs module or function is reported in a printed line (never skipped silently);
    an error inside dump_run_graphs propagates.
    """
    import importlib

    try:
        # import_module, not `from compiled_step.cli import graphs`: only the former raises a
        # ModuleNotFoundError that names the missing module, which separates "the graphs module is
        # not there" from "it is there but broken".
        graphs = importlib.import_module("compiled_step.cli.graphs")
    except ModuleNotFoundError as e:
        if e.name != "compiled_step.cli.graphs":
            raise  # the graphs module exists but one of its own imports is missing: that is a real error
        log("graphs: NOT written: compiled_step.cli.graphs is not in this checkout")
        return None
    dump = getattr(graphs, "dump_run_graphs", None)
    if dump is None:
        log("graphs: NOT written: compiled_step.cli.graphs has no dump_run_graphs(out_dir, fused) yet")
        return None
    written = dump(out_dir, fused)
    return list(written) if written is not None else []


# --- Output folder ------------------------------------------------------------------------------------

# What a run writes into its folder: these files, and dump_run_graphs' files under graphs/.
OUTPUT_FILES = ("metrics.csv", "summary.json", "curves.png")
GRAPHS_DIR = "graphs"


def check_out_dir(cfg: DemoConfig) -> None:
    """Refuse (DemoOptionError) an output folder that is not empty, unless cfg.overwrite.

    Checked before training, on every rank, so a second run of the same command stops at once
    instead of replacing the first run's results after minutes of work.
    """
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise DemoOptionError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise DemoOptionError(
            f"{out}/ is not empty (a previous run?); pass --overwrite to replace the demo's files there, "
            "or --out to write somewhere else"
        )


def clear_previous_outputs(out_dir: Path) -> None:
    """Remove a previous run's files (OUTPUT_FILES and graphs/), so none of them survives stale."""
    import shutil

    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / GRAPHS_DIR).is_dir():
        shutil.rmtree(out_dir / GRAPHS_DIR)


def _cli_modules(cfg: DemoConfig) -> list[str]:
    """The cli extra's modules this run imports: matplotlib for the plot, tqdm for a bar on a terminal."""
    return ["matplotlib"] + (["tqdm"] if cfg.progress and is_terminal(sys.stderr) else [])


# --- Command line -------------------------------------------------------------------------------------

def _float_or_inf(text: str) -> float:
    try:
        return float(text)  # float() already accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compiled_step demo",
        description="Train the built-in transformer LM twice from the same init and the same batches: "
        "with clip_grad_norm_ + optimizer.step() and with FusedStep; compare and time them.",
    )
    p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    p.add_argument("--model", choices=sorted(PRESETS), default="small",
                   help="model preset: tiny (~0.1 M params) or small (~1.9 M, default)")
    p.add_argument("--optimizer", choices=_OPTIMIZERS, default="adamw", help="default adamw")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in _DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on matrices (default: adamw 0.1, adam/sgd 0)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    clip = p.add_mutually_exclusive_group()
    clip.add_argument("--max-grad-norm", type=_float_or_inf, default=1.0,
                      help="clip the total grad norm to this (default 1.0; 'inf' disables clipping)")
    clip.add_argument("--no-clip", action="store_true",
                      help="disable clipping (the grad norm is still computed and compared)")
    p.add_argument("--norm-type", type=_float_or_inf, default=2.0, help="p of the grad p-norm (default 2; 'inf')")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step per rank (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the data (default 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/demo-<model>-<optimizer>-<compiled|eager>-seed<seed>); "
                   "it must not hold a previous run unless --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo's files (metrics.csv, summary.json, curves.png, graphs/) in an output "
                   "folder that already holds a run; other files there are left alone")
    p.add_argument("--no-compile", action="store_true", help="run FusedStep eagerly (no torch.compile)")
    p.add_argument("--fsdp", type=int, default=0, metavar="N",
                   help="shard both copies with FSDP2 over N ranks; run under "
                   "`torchrun --nproc_per_node N -m compiled_step demo --fsdp N`")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output at all (without it: a bar on a terminal, a few plain lines otherwise)")
    return p


def parse_args(argv: list[str]) -> DemoConfig:
    """Parse the command line into a validated DemoConfig. Bad values raise ValueError."""
    a = build_parser().parse_args(argv)
    return DemoConfig(
        steps=a.steps, model=a.model, optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay,
        momentum=a.momentum, max_grad_norm=None if a.no_clip else a.max_grad_norm, norm_type=a.norm_type,
        batch_size=a.batch_size, seed=a.seed, out=a.out, compile=not a.no_compile, fsdp=a.fsdp,
        device=a.device, progress=not a.no_progress, overwrite=a.overwrite,
    )


def main(argv: list[str]) -> int:
    """Run the demo. Returns 0 if FusedStep agreed with the reference, 1 if not, 2 on bad options,
    an output folder that holds a previous run (without --overwrite) or a missing cli extra."""
    try:
        cfg = parse_args(argv)
        require_cli_extra("the demo", _cli_modules(cfg))
        check_out_dir(cfg)
        result = run(cfg)
    except (DemoOptionError, MissingExtraError) as e:
        # Only the demo's own option errors become a one-line message; any other exception
        # (including a ValueError from inside FusedStep) keeps its traceback.
        print(f"python -m compiled_step demo: error: {e}", file=sys.stderr)
        return 2
    if result is None:  # not rank 0: rank 0 reports
        return 0
    out_dir = cfg.out_dir
    if cfg.overwrite:
        clear_previous_outputs(out_dir)
    print(format_summary(result))
    csv_path, json_path = write_metrics(result, out_dir)
    png_path = plot_metrics(result, out_dir / "curves.png")
    print(f"output: {out_dir}/ ({csv_path.name}, {json_path.name}, {png_path.name})")
    print("graphs: writing the run's graphs (dump_run_graphs re-captures them on synthetic tensors)...",
          flush=True)
    written = dump_graphs(out_dir, result.fused_step)
    if written is not None:
        names = ", ".join(sorted(str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p)
                                 for p in written))
        print(f"graphs: {len(written)} file(s) in {out_dir}/: {names}")
    return 0 if result.agree else 1
