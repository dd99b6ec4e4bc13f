"""The training loop: two copies of the built-in model from the same weights and the same batches, one
stepped with ``clip_grad_norm_`` + ``optimizer.step()``, the other with ``FusedStep.step()``, each timed;
on a device of its choice and, with ``--fsdp``, sharded with FSDP2."""

from __future__ import annotations

import copy
import functools
import gc
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from compiled_step.cli.devices import device_name

from compiled_step.cli.demo.config import DemoConfig, DemoOptionError, DemoResult, StepMetrics
from compiled_step.cli.demo.summary import summarize
from compiled_step.cli.models import MarkovData, build_model, param_groups
from compiled_step.cli.progress import StepProgress


# The pieces a test can swap: the reference's optimizer and the FusedStep.

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

    def close(self, *, finished: bool = False) -> None:
        """Destroy the group this demo created. ``finished``: every rank got here normally, so a barrier first
        lets each rank's last gloo work complete before any rank tears its pairs down (without it, torch 2.11
        aborted a rank at exit about once in 20 runs: "terminate called without an active exception"). After
        an error there is no barrier: another rank may never reach it."""
        if self.owns_group and self.dist.is_initialized():
            if finished and self.world_size > 1:
                self.dist.barrier()
            # The models, FusedSteps and mesh of the run hold the group too; collected now, the gloo backend is
            # destroyed (its threads joined) here rather than during interpreter shutdown.
            self.mesh = None
            gc.collect()
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
        result = _train(cfg, device, dist_ctx, log)
    except BaseException:
        if dist_ctx is not None:
            dist_ctx.close()
        raise
    if dist_ctx is not None:
        dist_ctx.close(finished=True)
    return result


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
    mesh = _place(model_eager, model_fused, device=device, dist_ctx=dist_ctx)

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
    _announce(say, cfg, mcfg, n_params=n_params, device=device, world=world if dist_ctx else None,
              loss_floor=loss_floor)

    def eager_step() -> torch.Tensor:
        gn = torch.nn.utils.clip_grad_norm_(model_eager.parameters(), clip_norm, cfg.norm_type)
        opt_eager.step()
        return gn

    eager_side = functools.partial(_timed_iteration, model_eager, device=device, step=eager_step,
                                   zero_grad=lambda: opt_eager.zero_grad(set_to_none=True))
    fused_side = functools.partial(_timed_iteration, model_fused, device=device, step=fused.step,
                                   zero_grad=fused.zero_grad)
    metrics = _train_steps(cfg, data, batch_gen, eager_side, fused_side, device=device, dist_ctx=dist_ctx,
                           progress=cfg.progress and is_main)
    if not is_main:
        return None
    result = DemoResult(config=cfg, metrics=metrics, n_params=n_params, loss_floor=loss_floor,
                        device=str(device), world_size=world, device_name=device_name(device))
    result.summary = summarize(result)
    result.fused_step = fused
    return result


def _place(*models: torch.nn.Module, device: torch.device, dist_ctx: _Distributed | None) -> Any | None:
    """Move the copies to the device and, under --fsdp, shard them; returns the mesh (None without FSDP)."""
    for model in models:
        model.to(device)
    if dist_ctx is None:
        return None
    for model in models:
        _shard(model, dist_ctx.mesh)
    return dist_ctx.mesh


def _announce(say: Callable[[str], None], cfg: DemoConfig, mcfg: Any, *, n_params: int, device: torch.device,
              world: int | None, loss_floor: float) -> None:
    """The two lines that open a run: the model, optimizer and device; the data and its loss floor."""
    say(
        f"demo: model={cfg.model} ({n_params / 1e6:.2f} M params, {mcfg.n_layers} layers, d_model={mcfg.d_model}, "
        f"vocab={mcfg.vocab_size}, seq_len={mcfg.seq_len}) optimizer={cfg.optimizer} lr={cfg.resolved_lr:g} "
        f"max_grad_norm={cfg.max_grad_norm if cfg.clipping else 'off'} norm_type={cfg.norm_type:g} "
        f"batch={cfg.batch_size} steps={cfg.steps} device={device} ({device_name(device)}) "
        f"FusedStep={'compiled' if cfg.compile else 'eager (--no-compile)'}"
        + (f" fsdp={world} ranks" if world is not None else "")
    )
    say(f"demo: data = random Markov chain, loss floor (entropy rate) {loss_floor:.3f}, "
        f"uniform guess {math.log(mcfg.vocab_size):.3f}")


def _timed_iteration(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
                     step: Callable[[], torch.Tensor], zero_grad: Callable[[], object]
                     ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Forward, backward, ``step()`` (clip + update, or fused.step(); returns the grad norm) and
    ``zero_grad()``: (loss, grad norm, seconds of step(), seconds of the whole iteration)."""
    _sync(device)
    t0 = time.perf_counter()
    loss = model(x, y)
    loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    gn = step()
    _sync(device)
    t2 = time.perf_counter()
    zero_grad()
    _sync(device)
    return loss.detach(), gn.detach(), t2 - t1, time.perf_counter() - t0


def _train_steps(cfg: DemoConfig, data: MarkovData, batch_gen: torch.Generator, eager_side: Callable,
                 fused_side: Callable, *, device: torch.device, dist_ctx: _Distributed | None,
                 progress: bool) -> list[StepMetrics]:
    """The training loop: both copies on the same batch each step, with the progress bar."""
    metrics: list[StepMetrics] = []
    first_label = "compiling FusedStep" if cfg.compile else "first step"
    with StepProgress(cfg.steps, desc="training", enabled=progress) as bar:
        for step in range(cfg.steps):
            x, y = (t.to(device) for t in data.batch(cfg.batch_size, batch_gen))
            # Alternate which copy goes first so neither one always runs on a cold cache.
            order = (eager_side, fused_side) if step % 2 == 0 else (fused_side, eager_side)
            if step == 0:
                with bar.first_step(first_label):
                    outs = {f: f(x, y) for f in order}
            else:
                outs = {f: f(x, y) for f in order}
            m = _step_metrics(step, outs[eager_side], outs[fused_side], dist_ctx)
            metrics.append(m)
            bar.update(loss=m.loss_fused, ref=m.loss_eager, gnorm=m.grad_norm_fused)
    return metrics


def _step_metrics(step: int, eager: tuple, fused: tuple, dist_ctx: _Distributed | None) -> StepMetrics:
    """One step's metrics from both sides' (loss, grad norm, step s, iteration s); losses averaged over ranks."""
    (le, ge, oe, ie), (lf, gf, of, if_) = eager, fused
    losses = torch.stack([le.float(), lf.float()])
    if dist_ctx is not None:
        losses = dist_ctx.mean(losses)
    return StepMetrics(step=step, loss_eager=float(losses[0]), loss_fused=float(losses[1]),
                       grad_norm_eager=_as_float(ge), grad_norm_fused=_as_float(gf),
                       opt_s_eager=oe, opt_s_fused=of, iter_s_eager=ie, iter_s_fused=if_)
