"""A differential harness: FusedStep beside eager ``torch.optim`` + ``clip_grad_norm_``, step by step.

A ``Case`` is a plain description of a run (optimizer, hyperparameters per group, dtype, shapes, clip, grad
scale, scheduler, and per step: the grads' seed, non-finite grads, params left out of the loss, lifecycle
events, how grads are zeroed). ``run_case(case)`` builds two independent copies of the params, one stepped by
FusedStep (the *fused side*), one by eager torch (the *reference*), runs both and compares after every step:
params, optimizer state and the returned norm, at the tolerance of the case's dtype (``TOLERANCES`` below says
why each is what it is). ``repr(case)`` is runnable Python, so a failing example prints its own repro:
``from differential import *; run_case(<repr>)`` (run from tests/).

The reference is eager torch, modelled where FusedStep documents a difference (README, "Guarantees" and
"Known differences"):
- a step whose total norm is not finite is skipped by FusedStep bit-identically; ``clip_grad_norm_`` would
  multiply the grads by NaN, so the reference skips ``optimizer.step()`` too (its LR scheduler still steps, as
  FusedStep's does: schedulers see a skipped fused step as taken);
- ``grad_scale`` multiplies the reference's grads in place before its clip;
- grads are zeroed (in place or to None) after every step on both sides: FusedStep never writes grads while
  ``clip_grad_norm_`` scales them in place, so grads accumulated across steps would differ by design.

Grads come from autograd (``loss = sum((p * G).sum())``, so ``p.grad == G`` exactly in every dtype): the
grad-restoring hooks and installed grad views are exercised as in training, which a ``p.grad = ...`` harness
would bypass.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch

from compiled_step import FusedStep

# ---------------------------------------------------------------------------------------------------------
# Tolerances, per param dtype. ``rtol`` and ``atol`` are torch.testing.assert_close's; params and state get
# ``atol`` scaled by the number of applied steps (differences compound along the trajectory), the norm does not.
#
# * float64: both sides compute in fp64; they differ only by evaluation order (fused multiply-adds, the
#   norm's reduction order), ~1e-16 relative per op. Adam divides by sqrt(v) + eps, which amplifies an
#   absolute difference by up to lr / eps per step when a grad is tiny, so ``atol`` is 1e-12 per step, far
#   above what correct code shows (~1e-15 measured) and far below a step computed in fp32 (~1e-7 relative).
# * float32: FusedStep accumulates the norm in fp64 where torch uses fp32 (~1 ulp on the clip coefficient)
#   and fuses the update's arithmetic (FMA): ~1e-7 relative per step, as in test_parity.py (rtol 1e-5,
#   atol 1e-6 per step, norm rtol 1e-5).
# * bfloat16 / float16: torch.optim rounds every intermediate (grads after clip, moments, the update) to the
#   param dtype, while FusedStep computes in fp32 (the norm in fp64) and rounds once per stored tensor. Each
#   step the two may therefore differ by a rounding of the param (one ulp: 2**-8 relative in bf16, 2**-11 in
#   fp16) plus a relative error of a few roundings on the update (~lr); a squared grad (Adam's v) doubles the
#   relative error of its rounded factors (measured: 2 ulps on v at step 1). So: rtol of four ulps per step,
#   atol of lr-sized updates off by a few roundings, norm rtol of two roundings of torch's low-precision norm
#   (its grads scaled in bf16, its result rounded to bf16). These catch lost or misapplied updates and wrong
#   state, not the last bits: fp64 and fp32 are the precise checks.
# ---------------------------------------------------------------------------------------------------------
TOLERANCES = {
    "float64": dict(rtol=1e-12, atol=1e-12, norm_rtol=1e-12),
    "float32": dict(rtol=1e-5, atol=1e-6, norm_rtol=1e-5),
    "bfloat16": dict(rtol=4 * 2**-8, atol=2**-6, norm_rtol=2 * 2**-8),
    "float16": dict(rtol=4 * 2**-11, atol=2**-8, norm_rtol=2 * 2**-11),
}

# The shapes params are drawn from: a small set, so compiled graphs (symbolic sizes) are shared across examples.
# (4, 3) appears plain and transposed (dense, non-contiguous); () is 0-d; (0,) and (0, 3) are empty.
SHAPES = ((), (0,), (1,), (5,), (4, 3), (2, 3, 2), (0, 3))
ZERO_STYLES = ("fused.zero_grad()", "fused.zero_grad(set_to_none=True)", "optimizer.zero_grad(set_to_none=True)",
               "optimizer.zero_grad(set_to_none=False)", "model.zero_grad()")
LAYOUTS = {"flat": dict(), "staged": dict(flat_params=False), "bucketed": dict(flat_params=False, pack_threshold=0)}


@dataclass
class Step:
    """One training step: ``events`` happen before its backward; ``zero`` is how grads are zeroed after it."""

    grad_seed: int = 0
    grad_magnitude: float = 1.0
    grad_scale: float | None = None  # a number, or ("tensor", x) for a 0-d tensor
    nonfinite: str | None = None  # "nan" or "inf" in one element of one grad
    inactive: tuple = ()  # indices of params left out of this step's loss
    events: tuple = ()
    zero: str = "fused.zero_grad()"


@dataclass
class Case:
    """One differential run; ``repr`` is runnable Python (see the module docstring)."""

    optimizer: str = "AdamW"
    dtype: str = "float32"
    params: tuple = ((4, 3),)  # shapes; a shape given as ("T", (a, b)) is a transposed (b, a) tensor
    group_of: tuple = (0,)  # param index -> group index
    groups: tuple = (dict(lr=1e-2),)  # hyperparameters of each group (the first is also the defaults)
    tensor_lr: bool = False
    scheduler: str | None = None
    max_grad_norm: float | None = 1.0
    norm_type: float | str = 2.0  # "inf" for inf
    layout: str = "flat"
    compile: bool = False
    init_seed: int = 0
    steps: tuple = field(default_factory=lambda: (Step(),))

    def repro(self) -> str:
        return f"from differential import *\nrun_case({self!r})"


# --- building both sides -----------------------------------------------------------------------------------

def _init_tensor(shape, dtype, gen):
    if isinstance(shape, tuple) and shape[:1] == ("T",):
        rows, cols = shape[1]
        return torch.randn(cols, rows, generator=gen, dtype=torch.float64).t().to(dtype)  # keeps the strides
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _group_options(options, tensor_lr):
    options = dict(options)
    if tensor_lr and "lr" in options:
        options["lr"] = torch.tensor(options["lr"], dtype=torch.float64)
    return options


class Holder(torch.nn.Module):
    """A module over the params, for ``model.zero_grad()``, ``model.state_dict()`` and param names."""

    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


@dataclass
class Side:
    model: Holder
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list  # in the order of case.params, then params added later


def _make_optimizer(case, params):
    cls = getattr(torch.optim, case.optimizer)
    groups = []
    for g, options in enumerate(case.groups):
        members = [p for p, gi in zip(params, case.group_of) if gi == g]
        if members:
            groups.append({"params": members, **_group_options(options, case.tensor_lr)})
    return cls(groups, **_group_options(case.groups[0], case.tensor_lr))


def _make_scheduler(case, optimizer):
    name = case.scheduler
    if name is None:
        return None
    if name == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    if name == "LambdaLR":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    if name == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(case.steps))
    if name == "OneCycleLR":  # also cycles betas (Adam) or momentum (SGD with momentum in every group)
        cycle = case.optimizer != "SGD" or all(g.get("momentum", case.groups[0].get("momentum", 0)) > 0
                                                for g in case.groups)
        max_lr = [float(group["lr"]) for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=len(case.steps) + 1,
                                                   cycle_momentum=cycle)
    raise ValueError(name)


def _make_side(case, dtype):
    gen = torch.Generator().manual_seed(case.init_seed)
    params = [torch.nn.Parameter(_init_tensor(shape, dtype, gen)) for shape in case.params]
    model = Holder(params)
    optimizer = _make_optimizer(case, params)
    return Side(model, optimizer, _make_scheduler(case, optimizer), params)


def _fused_step(case, optimizer, model):
    options = dict(max_grad_norm=case.max_grad_norm, norm_type=_norm_type(case), compile=case.compile,
                   compile_notice=False, bucket_size=4, model_parts=[model], **LAYOUTS[case.layout])
    if "pack_threshold" not in options:
        options["pack_threshold"] = 20  # as tests/conftest.py: small params packed, larger ones bucketed
    return FusedStep(optimizer, **options)


def _norm_type(case):
    return math.inf if case.norm_type == "inf" else float(case.norm_type)


# --- one step ------------------------------------------------------------------------------------------------

def _grads(case, step, params, dtype):
    gen = torch.Generator().manual_seed(step.grad_seed)
    grads = [(torch.randn(p.shape, generator=gen, dtype=torch.float64) * step.grad_magnitude).to(dtype)
             for p in params]
    if step.nonfinite is not None:
        for i, g in enumerate(grads):
            if g.numel() and i not in step.inactive:
                g.view(-1)[0] = float(step.nonfinite)
                break
    return grads


def _backward(params, grads, inactive):
    """loss = sum((p * G).sum()): autograd writes p.grad (or accumulates into it) with exactly G."""
    terms = [(p * g).sum() for i, (p, g) in enumerate(zip(params, grads)) if i not in inactive]
    if terms:
        torch.stack([t.double() for t in terms]).sum().backward()


def _scale_value(step):
    s = step.grad_scale
    if isinstance(s, tuple):
        return torch.tensor(s[1], dtype=torch.float64)
    return s


def eager_step(case, side, step):
    """The reference: grads scaled in place, clip_grad_norm_ (or the norm alone), then optimizer.step();
    a non-finite norm skips optimizer.step() (see the module docstring). Returns the norm."""
    grads = [p.grad for p in side.params if p.grad is not None]
    scale = _scale_value(step)
    if scale is not None:
        for g in grads:
            g.mul_(scale)
    # Empty grads contribute nothing to any norm, and torch's inf norm raises on an empty tensor (a max has no
    # identity): they are left out of the reference's norm.
    nonempty = [p for p in side.params if p.grad is not None and p.numel()]
    if case.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(nonempty, case.max_grad_norm, _norm_type(case))
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in nonempty], _norm_type(case))
    if torch.isfinite(norm):
        side.optimizer.step()
    return norm


def _zero(style, side, fused):
    if style == "fused.zero_grad()":
        fused.zero_grad()
    elif style == "fused.zero_grad(set_to_none=True)":
        fused.zero_grad(set_to_none=True)
    elif style == "optimizer.zero_grad(set_to_none=True)":
        side.optimizer.zero_grad(set_to_none=True)
    elif style == "optimizer.zero_grad(set_to_none=False)":
        side.optimizer.zero_grad(set_to_none=False)
    elif style == "model.zero_grad()":
        side.model.zero_grad()
    else:
        raise ValueError(style)


def _zero_reference(style, side):
    """The eager equivalent of each style: FusedStep's zero_grad() zeroes in place (set_to_none=False)."""
    side.optimizer.zero_grad(set_to_none=style not in ("fused.zero_grad()", "optimizer.zero_grad(set_to_none=False)"))


# --- comparing -----------------------------------------------------------------------------------------------

def _close(actual, expected, tol, applied, what, grad_atol=0.0):
    atol = tol["atol"] * max(applied, 1) + grad_atol
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"] * max(applied, 1), atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _compare(case, fused_side, ref_side, tol, applied, k, grad_atol):
    for i, (p, q) in enumerate(zip(fused_side.params, ref_side.params)):
        assert p.dtype == q.dtype and p.shape == q.shape, f"step {k}: param {i} {p.dtype}{tuple(p.shape)}"
        _close(p.detach(), q.detach(), tol, applied, f"step {k}: param {i}", grad_atol)
    ours, theirs = fused_side.optimizer.state, ref_side.optimizer.state
    for i, (p, q) in enumerate(zip(fused_side.params, ref_side.params)):
        if q not in theirs:
            # FusedStep may create state at a skipped step (a non-finite first step); it must be untouched.
            for name, value in ours.get(p, {}).items():
                if torch.is_tensor(value):
                    assert not value.any(), f"step {k}: param {i} state {name} without a reference step"
            continue
        assert p in ours, f"step {k}: param {i} has no state, the reference has {sorted(theirs[q])}"
        assert sorted(ours[p]) == sorted(theirs[q]), f"step {k}: param {i} state keys {sorted(ours[p])}"
        for name, value in theirs[q].items():
            mine = ours[p][name]
            if value is None or mine is None:
                assert value is None and mine is None, f"step {k}: param {i} state {name}"
                continue
            linear = name in ("exp_avg", "momentum_buffer")  # sums of grads of both signs: see grad_atol
            _close(torch.as_tensor(mine), torch.as_tensor(value), tol, applied, f"step {k}: param {i} state {name}",
                   grad_atol if linear else 0.0)


# --- events --------------------------------------------------------------------------------------------------

def _apply_event(event, case, dtype, sides, fused_state, aliases):
    kind = event[0]
    if kind == "add_param_group":  # ("add_param_group", shape, init_seed, options)
        _, shape, seed, options = event
        for side in sides:
            p = torch.nn.Parameter(_init_tensor(shape, dtype, torch.Generator().manual_seed(seed)))
            side.model.params.append(p)
            side.params.append(p)
            side.optimizer.add_param_group({"params": [p], **_group_options(options, case.tensor_lr)})
        fused_state["rebuilt"] = True
    elif kind == "load_state_dict":  # each optimizer loads a deep copy of its own state dict
        for side in sides:
            side.optimizer.load_state_dict(copy.deepcopy(side.optimizer.state_dict()))
    elif kind == "data_swap":  # ("data_swap", i): p.data replaced by a new tensor with other values
        i = event[1] % len(sides[0].params)
        for side in sides:
            p = side.params[i]
            p.data = p.data.clone() * 0.5
        aliases[:] = [(j, a, how) for j, a, how in aliases if j != i]  # an old alias does not follow, in torch
        fused_state["rebuilt"] = True
    elif kind == "alias":  # ("alias", i, "detach" | "state_dict")
        i, how = event[1] % len(sides[0].params), event[2]
        p = sides[0].params[i]
        alias = p.detach() if how == "detach" else sides[0].model.state_dict()[f"params.{i}"]
        aliases.append((i, alias, how))
    elif kind == "second_fused_step":  # a new FusedStep over the same optimizer; the old one stays alive
        fused_state["alive"].append(fused_state["fused"])
        fused_state["fused"] = _fused_step(case, sides[0].optimizer, sides[0].model)
        fused_state["rebuilt"] = True
    elif kind == "eager":  # the fused side steps with clip_grad_norm_ + optimizer.step() from now on
        fused_state["mode"] = "eager"
    elif kind == "fused":
        fused_state["mode"] = "fused"
    else:
        raise ValueError(event)


# --- the run -------------------------------------------------------------------------------------------------

def run_case(case: Case) -> None:
    """Run ``case`` on both sides and assert they agree after every step (AssertionError says where)."""
    dtype = getattr(torch, case.dtype)
    tol = TOLERANCES[case.dtype]
    fused_side, ref_side = _make_side(case, dtype), _make_side(case, dtype)
    fused_state = dict(fused=_fused_step(case, fused_side.optimizer, fused_side.model), alive=[], mode="fused",
                       rebuilt=True)
    aliases = []
    applied = 0
    largest_grad = 0.0
    with warnings.catch_warnings():
        # One-time warnings: grads copied after a rebuild, scheduler.step() after a skipped first step.
        warnings.simplefilter("ignore")
        for k, step in enumerate(case.steps):
            for event in step.events:
                _apply_event(event, case, dtype, (fused_side, ref_side), fused_state, aliases)
            grads = _grads(case, step, ref_side.params, dtype)
            _backward(fused_side.params, grads, step.inactive)
            _backward(ref_side.params, grads, step.inactive)
            fused = fused_state["fused"]
            if fused_state["mode"] == "fused":
                norm = fused.step(grad_scale=_scale_value(step))
                if not fused_state["rebuilt"]:
                    # Grads come from autograd into FusedStep's views (or are restored there by its hooks after
                    # zero_grad(set_to_none=True)): nothing to copy unless the plan changed since the last step.
                    assert fused.last_step_copied_grads == (), \
                        f"step {k}: copied grads {fused.last_step_copied_grads} with no plan change"
                fused_state["rebuilt"] = False
            else:
                norm = eager_step(case, fused_side, step)
            ref_norm = eager_step(case, ref_side, step)
            finite = bool(torch.isfinite(ref_norm))
            applied += finite
            # Momentum buffers and first moments sum grads of both signs: where they cancel, a result of ~1 carries
            # the rounding error of operands of ~|g| (in bf16, 0.17 on a buffer of 3 built from grads of ~90), so
            # those and the params get an absolute allowance of 4 roundings of the largest grad per applied step
            # (randn's tail is ~4 grad_magnitude): at most ~2e-12 in fp64 (grads of 90, 6 steps), far below fp32
            # precision.
            scale = _scale_value(step)
            largest_grad = max(largest_grad, 4 * step.grad_magnitude * abs(float(1.0 if scale is None else scale)))
            grad_atol = 4 * torch.finfo(dtype).eps * largest_grad * applied
            assert bool(torch.isfinite(norm)) == finite, f"step {k}: norm {norm.item()} vs reference {ref_norm.item()}"
            if finite:
                torch.testing.assert_close(norm.double(), ref_norm.double(), rtol=tol["norm_rtol"], atol=1e-30,
                                           msg=lambda m: f"step {k}: norm: {m}")
            for side in (fused_side, ref_side):
                if side.scheduler is not None:
                    side.scheduler.step()
            _compare(case, fused_side, ref_side, tol, applied, k, grad_atol)
            _zero(step.zero, fused_side, fused)
            _zero_reference(step.zero, ref_side)
    for i, alias, how in aliases:
        assert torch.equal(alias, fused_side.params[i].detach()), \
            f"alias of param {i} ({how}) no longer follows the param"
