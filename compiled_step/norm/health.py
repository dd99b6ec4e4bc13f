"""Training health: every option's device state, its checkpoint keys and its math, said once here.

The options (``param_norms``, ``skip_spike_sigma``, ``adaptive_clip``; ``config.py`` validates them) are
optional inputs of the one ``finish`` (``finish.py``): with every option off it gets no health input and its
graph is the default step's; with any on it gets the ``HealthTensors`` below and calls ``apply``. A new
option adds, in this module only: its tensors (a field of ``HealthTensors``, made by ``tensors_for``), their
checkpoint keys (``checkpoint_entries``) and its math (called from ``apply``). ``health.HealthState`` keeps
the tensors across plan rebuilds and checkpoints them from ``checkpoint_entries``, whatever the options.

The math is pure tensor code, compiled inside the finish. Every decision is a tensor (``torch.where``,
masks), every state tensor is ``[1]`` or ``[W]`` and written in place only where a step is applied, so a
skipped step leaves it bit-identical and nothing is read on the host. ``[1]`` tensors are read as ``t[0]``
before any arithmetic with a ``[W]`` one: under the step's compile settings (``backed_size_oblivious``) a
broadcast ``[1]`` would be indexed as if it had ``W`` elements.

**Per-param norms** (``param_norms``): Phase A writes each param's partial norm beside its group's
(``param_partials.py``), the collectives reduce both in the same call, and ``apply`` turns the reduced rows
into ``param_norms``, in the optimizer's param order (``health.ParamNormRows`` lays them out per plan).

**Spike window** (``skip_spike_sigma``), after OLMo-core's ``SkipStepOptimizer``: a ring of the last
``W`` values (total norms, or losses) of applied steps. A value is a spike when the ring is full and
``not (x - mean <= sigma * std)`` (unbiased std, as ``torch.std_mean``); NaN compares as a spike.

**ZClip** (``adaptive_clip="zclip"``), after bluorion-com/ZClip's ``ZClip`` in ``mode="zscore"``,
``clip_option="adaptive_scaling"``, ``clip_factor=1``: the first ``warmup`` norms are collected, then
the EMA's mean and variance start from their mean and population variance. After that, with
``z = (norm - mean) / (std + eps)``, a norm with ``z > z_thresh`` is clipped to
``mean + z_thresh * std / (z / z_thresh)``, and the EMA is updated with that threshold (else with the
norm): ``mean = a * mean + (1 - a) * x``, then ``var = a * var + (1 - a) * (x - mean)^2`` with the
new mean, as the reference does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step.norm.param_partials import norms_of_rows

# ZClip's ``eps`` (its default) and its clip coefficient's 1e-6: the same value as CLIP_EPS.
ZCLIP_EPS = 1e-6

# The options that read ``step(loss=...)``: a loss given without one of them is refused.
LOSS_OPTIONS = ("skip_spike_sigma",)


class Window(NamedTuple):
    """The last ``W`` values of applied steps, as a ring."""

    values: torch.Tensor  # [W] float64
    count: torch.Tensor  # [1] int64: values pushed so far (the next goes to count % W)


class ZClipState(NamedTuple):
    warmup: torch.Tensor  # [warmup] float64: the norms collected before the EMA starts
    count: torch.Tensor  # [1] int64: norms collected, up to ``warmup`` (the EMA runs once it is reached)
    mean: torch.Tensor  # [1] float64: the EMA of the norm
    var: torch.Tensor  # [1] float64: the EMA of its variance


class ParamNorms(NamedTuple):
    """One plan's per-param rows (``health.ParamNormRows``)."""

    partials: torch.Tensor  # [R, 2] float64: per-param partials, reduced by the collectives
    rows: torch.Tensor  # [N] int64: each param's row of them, in the optimizer's order
    out: torch.Tensor  # [N] float64: written with each param's pre-clip norm (``fused.param_norms``)


class HealthTensors(NamedTuple):
    """The finish's health input: FusedStep's health tensors (None: that option is off)."""

    hp: torch.Tensor  # [4] float64: skip_spike_sigma, zclip_alpha, zclip_z, 0
    clip_coef: torch.Tensor  # [1] float64: written with the clip coefficient the update applies
    spike_skipped: torch.Tensor | None  # [1] int64: steps skipped for a spike (skip_spike_sigma)
    norm_window: Window | None  # total norms of applied steps (skip_spike_sigma)
    loss_window: Window | None  # losses of applied steps given with step(loss=...) (skip_spike_sigma)
    loss: torch.Tensor | None  # [1] float64: this step's loss (an option of LOSS_OPTIONS)
    loss_given: torch.Tensor | None  # [1] bool: whether step() got a loss
    zclip: ZClipState | None  # adaptive_clip="zclip"
    param_norms: ParamNorms | None = None  # param_norms: per plan, so never in the persistent state


SIGMA, ALPHA, Z = 0, 1, 2  # columns of HealthTensors.hp


# ---------------------------------------------------------------------------- the options' state


def reads_loss(config) -> bool:
    """Whether an option reads ``step(loss=...)``."""
    return any(getattr(config, name) is not None for name in LOSS_OPTIONS)


def _window(size: int, device: torch.device) -> Window:
    return Window(torch.zeros(size, dtype=torch.float64, device=device),
                  torch.zeros(1, dtype=torch.int64, device=device))


def tensors_for(config, device: torch.device) -> HealthTensors:
    """The persistent health tensors of a ``FusedStepConfig``'s options, zeroed, on ``device``."""
    f64 = dict(dtype=torch.float64, device=device)
    spikes = config.skip_spike_sigma is not None
    loss = reads_loss(config)
    hp = [config.skip_spike_sigma or 0.0, config.zclip_alpha, config.zclip_z, 0.0]
    return HealthTensors(
        hp=torch.tensor(hp, dtype=torch.float64).to(device),
        clip_coef=torch.ones(1, **f64),
        spike_skipped=torch.zeros(1, dtype=torch.int64, device=device) if spikes else None,
        norm_window=_window(config.spike_window, device) if spikes else None,
        loss_window=_window(config.spike_window, device) if spikes else None,
        loss=torch.zeros(1, **f64) if loss else None,
        loss_given=torch.zeros(1, dtype=torch.bool, device=device) if loss else None,
        zclip=ZClipState(torch.zeros(config.zclip_warmup, **f64), torch.zeros(1, dtype=torch.int64, device=device),
                         torch.zeros(1, **f64), torch.zeros(1, **f64)) if config.adaptive_clip == "zclip" else None,
    )


class Entry(NamedTuple):
    """One tensor of ``fused.state_dict()``."""

    tensor: torch.Tensor  # the persistent tensor it saves and loads
    scalar: bool  # saved as a 0-d tensor (counters, statistics), else 1-D (windows)
    option: str  # the option that owns it (or sizes it): named when a loaded value does not fit


def checkpoint_entries(h: HealthTensors) -> dict[str, Entry]:
    """``fused.state_dict()`` key -> entry, for the options that keep state across steps."""
    entries: dict[str, Entry] = {}
    if h.norm_window is not None:
        entries.update(spike_skipped_steps=Entry(h.spike_skipped, True, "skip_spike_sigma"),
                       spike_norm_window=Entry(h.norm_window.values, False, "spike_window"),
                       spike_norm_count=Entry(h.norm_window.count, True, "skip_spike_sigma"),
                       spike_loss_window=Entry(h.loss_window.values, False, "spike_window"),
                       spike_loss_count=Entry(h.loss_window.count, True, "skip_spike_sigma"))
    if h.zclip is not None:
        entries.update(zclip_warmup_norms=Entry(h.zclip.warmup, False, "zclip_warmup"),
                       zclip_count=Entry(h.zclip.count, True, "adaptive_clip"),
                       zclip_mean=Entry(h.zclip.mean, True, "adaptive_clip"),
                       zclip_var=Entry(h.zclip.var, True, "adaptive_clip"))
    return entries


# ---------------------------------------------------------------------------- the math, inside the finish


def apply(
    h: HealthTensors,
    t: torch.Tensor,  # [] float64: the total norm
    ok: torch.Tensor,  # [] bool: it is finite
    coef: torch.Tensor,  # [] float64: the clip coefficient of max_grad_norm, min(1, max_norm / (t + eps))
    max_norm: torch.Tensor,  # [] float64: max_grad_norm, inf when not given
    kind: str,  # graph constant: NormKind.kind
    norm_order,  # the norm order (a tensor for the scaled kind)
) -> tuple[torch.Tensor, torch.Tensor]:  # ([] bool: the step is applied, [] float64: the clip coefficient)
    """Every option's part of the finish; writes the options' state in place.

    A step is applied when its total norm is finite and neither the norm nor the loss is a spike; only
    an applied step enters the windows and ZClip's statistics, and a skipped one leaves every param,
    state and step count bit-identical through the apply flags, as a non-finite norm does.
    """
    spike = torch.zeros_like(ok)
    if h.norm_window is not None:
        sigma = h.hp[SIGMA]
        spike = spike | is_spike(t, h.norm_window, sigma)
        spike = spike | (h.loss_given[0] & is_spike(h.loss[0], h.loss_window, sigma))
    applied = ok & ~spike
    if h.zclip is not None:
        coef, ema_value = zclip_coefficient(t, h.zclip, h.hp[Z], max_norm, coef)
        zclip_update(t, ema_value, h.zclip, h.hp[ALPHA], applied)
    if h.norm_window is not None:
        push(h.norm_window, t, applied)
        push(h.loss_window, h.loss[0], applied & h.loss_given[0])
        h.spike_skipped.copy_(h.spike_skipped + (ok & spike).to(h.spike_skipped.dtype))
    if h.param_norms is not None:
        pn = h.param_norms
        pn.out.copy_(norms_of_rows(kind, pn.partials[pn.rows], norm_order))
    h.clip_coef.copy_(coef.reshape(1))
    return applied, coef


def is_spike(
    x: torch.Tensor,  # [] float64: this step's value
    window: Window,
    sigma: torch.Tensor,  # [] float64
) -> torch.Tensor:  # [] bool
    full = window.count[0] >= window.values.shape[0]
    std, mean = torch.std_mean(window.values, correction=1)
    return full & ~((x - mean) <= sigma * std)


def push(
    window: Window,
    x: torch.Tensor,  # [] float64
    take: torch.Tensor,  # [] bool: the step is applied (and x is to be kept)
) -> None:
    size = window.values.shape[0]
    # count[0], never the [1] tensor itself: sizes are symbolic (backed_size_oblivious), and a [1]
    # tensor broadcast against [W] is compiled as if it had W elements.
    position = window.count[0] % size
    slot = torch.arange(size, device=x.device) == position
    window.values.copy_(torch.where(slot & take, x, window.values))
    window.count.copy_(window.count + take.to(window.count.dtype))


def zclip_coefficient(
    t: torch.Tensor,  # [] float64: the total norm
    state: ZClipState,
    z_thresh: torch.Tensor,  # [] float64
    max_norm: torch.Tensor,  # [] float64: max_grad_norm, inf when not given
    collecting: torch.Tensor,  # [] float64: the clip coefficient of max_grad_norm (ZCLIP_EPS is CLIP_EPS)
) -> tuple[torch.Tensor, torch.Tensor]:  # ([] clip coefficient, [] the norm the EMA takes)
    """ZClip's clip coefficient and the value its EMA is updated with."""
    started = state.count[0] >= state.warmup.shape[0]
    mean, var = state.mean[0], state.var[0]
    std = var.sqrt()
    z = (t - mean) / (std + ZCLIP_EPS)
    spike = z > z_thresh
    eta = z / z_thresh  # the reference's rescaling ratio: larger outliers are clipped harder
    clip_val = mean + (z_thresh * std) / eta
    effective = torch.minimum(torch.where(spike, clip_val, t), max_norm)
    adaptive = torch.where(t > effective, effective / (t + ZCLIP_EPS), torch.ones_like(t))
    # While collecting, the reference clips with torch's clip_grad_norm_(max_grad_norm) when given.
    return torch.where(started, adaptive, collecting), torch.where(spike, clip_val, t)


def zclip_update(
    t: torch.Tensor,  # [] float64: the total norm
    x: torch.Tensor,  # [] float64: the value the EMA takes (zclip_coefficient's second output)
    state: ZClipState,
    alpha: torch.Tensor,  # [] float64
    take: torch.Tensor,  # [] bool: the step is applied
) -> None:
    size = state.warmup.shape[0]
    count = state.count[0]
    started = count >= size
    collect = take & ~started
    slot = torch.arange(size, device=t.device) == count
    warmup = torch.where(slot & collect, t, state.warmup)
    new_count = count + collect.to(count.dtype)
    starts_now = collect & (new_count >= size)
    first_mean = warmup.mean()
    first_var = (warmup - first_mean).square().mean()
    ema_mean = alpha * state.mean[0] + (1 - alpha) * x
    ema_var = alpha * state.var[0] + (1 - alpha) * (x - ema_mean).square()
    run = take & started
    mean = torch.where(starts_now, first_mean, torch.where(run, ema_mean, state.mean[0]))
    var = torch.where(starts_now, first_var, torch.where(run, ema_var, state.var[0]))
    state.warmup.copy_(warmup)
    state.count.copy_(new_count.reshape(1))
    state.mean.copy_(mean.reshape(1))
    state.var.copy_(var.reshape(1))
