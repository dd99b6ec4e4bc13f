"""Training health on the device: the spike windows and ZClip's state, as pure tensor math.

Compiled inside the health finish (``finish.finish_with_health``). Every decision is a tensor
(``torch.where``, masks), every state tensor is ``[1]`` or ``[W]`` and written in place only where a
step is applied, so a skipped step leaves it bit-identical and nothing is read on the host. ``[1]``
tensors are read as ``t[0]`` before any arithmetic with a ``[W]`` one: under the step's compile
settings (``backed_size_oblivious``) a broadcast ``[1]`` would be indexed as if it had ``W`` elements.

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

# ZClip's ``eps`` (its default) and its clip coefficient's 1e-6: the same value as CLIP_EPS.
ZCLIP_EPS = 1e-6


class Window(NamedTuple):
    """The last ``W`` values of applied steps, as a ring."""

    values: torch.Tensor  # [W] float64
    count: torch.Tensor  # [1] int64: values pushed so far (the next goes to count % W)


class ZClipState(NamedTuple):
    warmup: torch.Tensor  # [warmup] float64: the norms collected before the EMA starts
    count: torch.Tensor  # [1] int64: norms collected, up to ``warmup`` (the EMA runs once it is reached)
    mean: torch.Tensor  # [1] float64: the EMA of the norm
    var: torch.Tensor  # [1] float64: the EMA of its variance


class HealthTensors(NamedTuple):
    """FusedStep's persistent health tensors, as the health finish reads and writes them (None: option off)."""

    hp: torch.Tensor  # [4] float64: skip_spike_sigma, zclip_alpha, zclip_z, 0
    clip_coef: torch.Tensor  # [1] float64: written with the clip coefficient the update applies
    spike_skipped: torch.Tensor | None  # [1] int64: steps skipped for a spike (skip_spike_sigma)
    norm_window: Window | None  # total norms of applied steps (skip_spike_sigma)
    loss_window: Window | None  # losses of applied steps given with step(loss=...) (skip_spike_sigma)
    loss: torch.Tensor | None  # [1] float64: this step's loss (skip_spike_sigma)
    loss_given: torch.Tensor | None  # [1] bool: whether step() got a loss
    zclip: ZClipState | None  # adaptive_clip="zclip"


SIGMA, ALPHA, Z = 0, 1, 2  # columns of HealthTensors.hp


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
    collecting = (max_norm / (t + ZCLIP_EPS)).clamp(max=1.0)
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
