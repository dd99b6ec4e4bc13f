"""The methods under test: anchors A-D and FusedStep, each stepping its own copy of a layout's params.

Every method gets the same initial params, the same reference grads and the same hyperparameters; the
package docstring says what each anchor is and why it is there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from compiled_step.cli import layouts as L
from compiled_step.cli.bench.errors import BenchError  # noqa: F401 -- raised here; importers take it from here too
from compiled_step.cli.bench.measure import local_shard

ANCHORS = ("A", "B", "C", "D")
PARAM_NORMS = "fused+norms"  # FusedStep with param_norms=True: what the option costs, beside "fused"
# One line per method: the legend of bench.md, BENCHMARKS.md and bench.png.
METHOD_DESCRIPTIONS = {
    "A": "clip_grad_norm_(foreach=True) + optimizer(foreach=True)",
    "B": "clip_grad_norm_(foreach=True) + optimizer(fused=True)",
    "C": "clip_grad_norm_(foreach=True) + torch.compile'd optimizer.step() with a tensor lr "
         "(PyTorch's compiled-optimizer recipe)",
    "D": "NeMo Automodel's eager path: g.div_(s) on every grad, a norm per param group, clip, optimizer.step() (foreach)",
    "fused": "FusedStep.step(): norm + clip + update in one compiled step",
    PARAM_NORMS: "FusedStep.step() with param_norms=True (each param's grad norm, from the same Phase A read)",
}
# The Muon + AdamW row: Muon on the layout's hidden matrices, AdamW on the rest. Anchors A, B and D step
# both optimizers (torch.optim.Muon has no foreach or fused implementation; A and B differ in AdamW's).
MUON_ADAMW = "muon_adamw"
MUON_HP = dict(lr=2e-2, momentum=0.95)  # torch's defaults otherwise: nesterov, 5 Newton-Schulz steps
MAX_GRAD_NORM = 1.0
# NeMo Automodel divides grads by num_label_tokens / dp_group_size before clipping; any s != 1 costs the same
# full read+write pass, which is the point of anchor D.
SEED_SCALE = 2.0
ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
SGD_HP = dict(lr=1e-2, momentum=0.9)
WEIGHT_DECAY = 0.1


def describe_method(name: str, *, compiled: bool = True) -> str:
    """The legend line of a method name as the tables use it (A-D, fused, fused[b=N])."""
    if name in ANCHORS:
        return METHOD_DESCRIPTIONS[name]
    if name == PARAM_NORMS:
        return METHOD_DESCRIPTIONS[name] + ("" if compiled else ", compile=False (eager)")
    if name.startswith("fused"):
        text = METHOD_DESCRIPTIONS["fused"] if compiled else "FusedStep.step() with compile=False (eager)"
        bucket = re.fullmatch(r"fused\[b=(\d+)\]", name)
        return text + (f", bucket_size={bucket.group(1)}" if bucket else "")
    return name


@dataclass
class Method:
    name: str
    params: list[torch.Tensor]
    optimizers: list[torch.optim.Optimizer]  # stepped in this order (Muon, then AdamW)
    step: Callable[[], object]


def floor_bytes_per_param(optimizer: str, dtype: torch.dtype, layout: L.Layout | None = None) -> float:
    """Minimal traffic: p, g and each state tensor read once, p and state written once, g read again
    for the norm. AdamW has 2 state tensors (exp_avg, exp_avg_sq), SGD-momentum and Muon 1 (the
    momentum buffer); torch.optim keeps state in the param dtype. Muon + AdamW: the mean over
    ``layout``'s params (Muon's 1 state tensor on the hidden matrices, AdamW's 2 on the rest); its
    Newton-Schulz matmuls are compute, not traffic, and are not in this floor."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    def per_param(n_state: int) -> int:
        return itemsize * (2 * (n_state + 1) + 2)

    if optimizer == MUON_ADAMW:
        if layout is None:
            raise ValueError("the Muon + AdamW floor depends on the layout: pass layout=")
        muon = sum(s.numel for s in layout.specs if s.hidden_matrix)
        return (muon * per_param(1) + (layout.n_params - muon) * per_param(2)) / layout.n_params
    return per_param({"adamw": 2, "sgd": 1}[optimizer])


_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
_HP = {"adamw": ADAMW_HP, "sgd": SGD_HP}


def make_optimizer(kind: str, groups: list[dict], **overrides) -> torch.optim.Optimizer:
    return _OPTIMIZERS[kind](groups, **{**_HP[kind], **overrides})


def make_optimizers(kind: str, layout: L.Layout, params: list[torch.Tensor],
                    **overrides) -> list[torch.optim.Optimizer]:
    """The row's optimizers over ``params``: one (AdamW or SGD, decayed and undecayed groups), or for
    Muon + AdamW the two, Muon first; ``overrides`` (foreach, fused, a tensor lr) go to AdamW."""
    if kind == MUON_ADAMW:
        muon_groups, adamw_groups = L.muon_adamw_groups(layout, params, weight_decay=WEIGHT_DECAY)
        return [torch.optim.Muon(muon_groups, **MUON_HP), make_optimizer("adamw", adamw_groups, **overrides)]
    return [make_optimizer(kind, L.param_groups(layout, params, weight_decay=WEIGHT_DECAY), **overrides)]


def _step_all(opts: list[torch.optim.Optimizer]) -> None:
    for opt in opts:
        opt.step()


def _clip(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, norm_type=2.0, foreach=True)


def _compiled_step_fn(opt: torch.optim.Optimizer) -> Callable[[], None]:
    # PyTorch's compiled-optimizer recipe, verbatim: fullgraph=False because Optimizer.step breaks the
    # graph on purpose around the update (_use_grad_for_differentiable).
    @torch.compile(fullgraph=False)
    def fn() -> None:
        opt.step()

    return fn


def _seed_style_step(opts: list[torch.optim.Optimizer], params: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    group_grads = [[p.grad for p in g["params"] if p.grad is not None] for opt in opts for g in opt.param_groups]

    def step() -> torch.Tensor:
        # Separate scale pass, one kernel per grad, as NeMo Automodel's scale_grads_and_clip_grad_norm does.
        for grads in group_grads:
            for g in grads:
                g.div_(SEED_SCALE)
        # One norm per group (NeMo Automodel's sharding groups), then the total over groups.
        partial = [torch.nn.utils.get_total_norm(gs, 2.0, foreach=True) for gs in group_grads]
        total = torch.nn.utils.get_total_norm(partial, 2.0, foreach=True)
        torch.nn.utils.clip_grads_with_norm_(params, MAX_GRAD_NORM, total, foreach=True)
        _step_all(opts)
        return total

    return step


def load_fused_step():
    try:
        from compiled_step import FusedStep  # noqa: PLC0415 -- optional until the core lands
    except ImportError as exc:
        raise BenchError(
            f"FusedStep is not available ({exc}); pass --methods A,B,C,D to bench the anchors only"
        ) from exc
    return FusedStep


def build_method(
    name: str,
    *,
    optimizer: str,
    layout: L.Layout,
    dtype: torch.dtype,
    device: torch.device,
    ref_grads: list[torch.Tensor],
    compile_fused: bool,
    bucket_size: int | None,
    mesh=None,
) -> Method:
    """Method ``name`` stepping its own copy of ``layout``'s params (FSDP2 shards on ``mesh`` if given)."""
    params = L.make_params(layout, dtype=dtype, device=device, seed=0)
    if mesh is not None:
        from compiled_step.cli.bench import fsdp  # noqa: PLC0415 -- torch.distributed only for this row

        params = fsdp.shard(layout, params, mesh)
        for p, g in zip(params, ref_grads):
            p.grad = fsdp.sharded_grad(p, g.clone())
    else:
        for p, g in zip(params, ref_grads):
            p.grad = g.clone()
    if name == "A":
        opts = make_optimizers(optimizer, layout, params, foreach=True)
        return Method(name, params, opts, lambda: (_clip(params), _step_all(opts)))
    if name == "B":
        opts = make_optimizers(optimizer, layout, params, fused=True)
        return Method(name, params, opts, lambda: (_clip(params), _step_all(opts)))
    if name == "C":
        if optimizer == MUON_ADAMW:
            raise BenchError("anchor C (a torch.compile'd optimizer.step()) is not run on the Muon + AdamW row")
        # A float lr would be guarded as a constant (and recompile under a scheduler); the recipe makes it
        # a 0-d tensor. Its value is the same as every other method's. foreach/fused are left at their
        # defaults, as in the recipe: eager foreach rejects a tensor lr without capturable=True.
        opts = make_optimizers(optimizer, layout, params, lr=torch.tensor(_HP[optimizer]["lr"], device=device))
        fn = _compiled_step_fn(opts[0])
        return Method(name, params, opts, lambda: (_clip(params), fn()))
    if name == "D":
        opts = make_optimizers(optimizer, layout, params, foreach=True)
        return Method(name, params, opts, _seed_style_step(opts, params))
    if name.startswith("fused"):
        FusedStep = load_fused_step()
        opts = make_optimizers(optimizer, layout, params)
        kwargs = dict(max_grad_norm=MAX_GRAD_NORM, norm_type=2.0, compile=compile_fused,
                      param_norms=name == PARAM_NORMS)
        if bucket_size is not None:
            kwargs["bucket_size"] = bucket_size
        fused = FusedStep(opts[0] if len(opts) == 1 else opts, **kwargs)
        return Method(name, params, opts, fused.step)
    raise BenchError(f"unknown method {name!r}")


def restore_grads(m: Method, ref_grads: list[torch.Tensor]) -> None:
    """Copy the reference grads back into the method's ``.grad`` (the anchors clip them in place); into
    the local shards of DTensor grads (the FSDP2 row: one rank, so the whole tensor)."""
    with torch.no_grad():
        torch._foreach_copy_([local_shard(p.grad) for p in m.params], ref_grads)
