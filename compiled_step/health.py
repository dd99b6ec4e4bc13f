"""Training health: the persistent device state and the per-param norm layout (no math here).

* ``HealthState``: FusedStep's health tensors (the spike windows, ZClip's statistics, the spike
  counter, the clip coefficient, this step's loss). Made once on the params' device, kept across plan
  rebuilds (moved if the device changes), in ``fused.state_dict()``. The compiled math that reads and
  writes them is ``norm/health.py``.
* ``ParamNormRows``: per plan, where each param's partial norm lives, and the parts Phase A cuts each
  grad buffer into. Phase A writes one row per param (``norm/param_partials.py``); the collectives
  reduce them with the groups' partials; the health finish turns them into ``param_norms``, in the
  optimizer's param order.
"""

from __future__ import annotations

import numbers

import torch

from compiled_step.norm.health import HealthTensors, Window, ZClipState
from compiled_step.norm.param_partials import PART_ROWS
from compiled_step.planning import Plan, rows_for
from compiled_step.storage import LEAD, PARTIAL_WIDTH


def _window(size: int, device: torch.device) -> Window:
    return Window(torch.zeros(size, dtype=torch.float64, device=device),
                  torch.zeros(1, dtype=torch.int64, device=device))


class HealthState:
    """FusedStep's persistent health tensors for one config (see the module docstring)."""

    def __init__(self, config, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        spikes = config.skip_spike_sigma is not None
        zclip = config.adaptive_clip == "zclip"
        hp = [config.skip_spike_sigma or 0.0, config.zclip_alpha, config.zclip_z, 0.0]
        self.window_size = config.spike_window
        self.tensors = HealthTensors(
            hp=torch.tensor(hp, dtype=torch.float64).to(device),
            clip_coef=torch.ones(1, **f64),
            spike_skipped=torch.zeros(1, dtype=torch.int64, device=device) if spikes else None,
            norm_window=_window(config.spike_window, device) if spikes else None,
            loss_window=_window(config.spike_window, device) if spikes else None,
            loss=torch.zeros(1, **f64) if spikes else None,
            loss_given=torch.zeros(1, dtype=torch.bool, device=device) if spikes else None,
            zclip=ZClipState(torch.zeros(config.zclip_warmup, **f64), torch.zeros(1, dtype=torch.int64, device=device),
                             torch.zeros(1, **f64), torch.zeros(1, **f64)) if zclip else None,
        )
        self._loss_was_given = False

    @property
    def device(self) -> torch.device:
        return self.tensors.hp.device

    def moved_to(self, device: torch.device, config) -> "HealthState":
        """The same state on ``device`` (a new object; values copied)."""
        moved = HealthState(config, device)
        moved.load_state_dict(self.state_dict())
        return moved

    # ---------------------------------------------------------------- per step (bind)

    def set_loss(self, loss: float | torch.Tensor | None) -> None:
        """Write this step's loss (or its absence) into the device tensors, without reading the device.

        Runs before the step's calls (and outside any CUDA graph): a device-to-device copy of a loss
        tensor, or one small host-to-device copy of a number.
        """
        t = self.tensors
        if loss is None:
            if self._loss_was_given:
                t.loss_given.fill_(False)
                self._loss_was_given = False
            return
        if isinstance(loss, torch.Tensor):
            t.loss.copy_(loss.detach().reshape(1), non_blocking=True)
        else:
            t.loss.fill_(float(loss))
        if not self._loss_was_given:
            t.loss_given.fill_(True)
            self._loss_was_given = True

    # ---------------------------------------------------------------- checkpoints

    def _entries(self) -> dict[str, tuple[torch.Tensor, bool]]:
        """state_dict key -> (the persistent tensor it saves, whether it is saved as a 0-d scalar)."""
        t = self.tensors
        entries: dict[str, tuple[torch.Tensor, bool]] = {}
        if t.norm_window is not None:
            entries.update(spike_skipped_steps=(t.spike_skipped, True),
                           spike_norm_window=(t.norm_window.values, False),
                           spike_norm_count=(t.norm_window.count, True),
                           spike_loss_window=(t.loss_window.values, False),
                           spike_loss_count=(t.loss_window.count, True))
        if t.zclip is not None:
            entries.update(zclip_warmup_norms=(t.zclip.warmup, False), zclip_count=(t.zclip.count, True),
                           zclip_mean=(t.zclip.mean, True), zclip_var=(t.zclip.var, True))
        return entries

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies: 0-d tensors for counters and statistics, 1-D for the windows."""
        return {k: v[0].clone() if scalar else v.clone() for k, (v, scalar) in self._entries().items()}

    def check_state_dict(self, state_dict: dict) -> dict[str, torch.Tensor]:
        """The values to load, validated (``KeyError``/``TypeError``/``ValueError``); changes nothing."""
        entries = self._entries()
        missing = sorted(set(entries) - set(state_dict))
        if missing:
            raise KeyError(f"FusedStep state_dict lacks {missing}, the state of its training-health options "
                           "(skip_spike_sigma, adaptive_clip): was it saved with other options?")
        values = {}
        for key, (dst, _) in entries.items():
            value = state_dict[key]
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and dst.numel() == 1:
                value = torch.tensor([value])
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"FusedStep state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
            if value.numel() != dst.numel():
                raise ValueError(f"FusedStep state_dict[{key!r}] has {value.numel()} elements, this FusedStep's "
                                 f"has {dst.numel()} (spike_window or zclip_warmup differ from the saved run's)")
            values[key] = value.detach().reshape(dst.shape).to(dst.dtype)
        return values

    def load_state_dict(self, state_dict: dict) -> None:
        values = self.check_state_dict(state_dict)
        for key, (dst, _) in self._entries().items():
            dst.copy_(values[key])


class ParamNormRows:
    """Per plan: the rows of the per-param partials, the parts Phase A reduces each group's grad buffer in
    (``norm/param_partials.py``), and ``param_norms`` (``[N]`` float64, the optimizer's order).

    Group g's rows start at ``starts[g]``: one per param of the group, in the group's param order (a
    param whose grad is external keeps a zero row there), then ``bucket_size`` per bucket of external
    grads, written by that bucket's Phase A call.
    """

    def __init__(self, plan: Plan, param_lists: list[list[torch.Tensor]]):
        device = plan.device
        self.starts: list[int] = []
        # Per group, the parts Phase A cuts its grad buffer into: the first grad row of each, one [k_i] int32
        # table per size of PART_ROWS, and the param index of each, [sum k_i] int64 (the sizes in order);
        # None where the group has no grad rows.
        self.part_rows: list[list[torch.Tensor] | None] = []
        self.part_param: list[torch.Tensor | None] = []
        row_of: dict[int, int] = {}
        start = 0
        for group in plan.groups:
            self.starts.append(start)
            for i in range(len(group.params)):
                row_of[id(group.params[i])] = start + i
            for k, i in enumerate(group.external):
                row_of[id(group.params[i])] = start + len(group.params) + k
            part_rows, part_param = _parts(group) if group.grad_rows else (None, None)
            self.part_rows.append(None if part_rows is None else [t.to(device) for t in part_rows])
            self.part_param.append(None if part_param is None else part_param.to(device))
            external_rows = -(-len(group.external) // plan.bucket_size) * plan.bucket_size
            start += len(group.params) + external_rows
        # LEAD rows into its storage, as storage's buffers: no group's rows start at offset 0 or 1, which
        # Dynamo would specialise (another graph for the first group).
        self.partials = torch.zeros(LEAD + start, PARTIAL_WIDTH, dtype=torch.float64, device=device)[LEAD:].detach()
        order = [p for params in param_lists for p in params]
        self.norm_rows = torch.tensor([row_of[id(p)] for p in order], dtype=torch.int64).to(device)
        self.norms = torch.zeros(len(order), dtype=torch.float64, device=device)
        self.order_ids = [id(p) for p in order]

    def group_rows(self, plan: Plan, g: int) -> torch.Tensor:
        """Group g's rows of ``partials`` for its params in the grad buffer: ``[len(params), 2]``."""
        start = self.starts[g]
        return self.partials[start:start + len(plan.groups[g].params)].detach()

    def external_rows(self, plan: Plan, g: int, b: int) -> torch.Tensor:
        """The rows of group g's external bucket b: ``[bucket_size, 2]``."""
        start = self.starts[g] + len(plan.groups[g].params) + b * plan.bucket_size
        return self.partials[start:start + plan.bucket_size].detach()

    def region(self, plan: Plan, g: int) -> range:
        """Every row of group g."""
        end = self.starts[g + 1] if g + 1 < len(self.starts) else self.partials.shape[0]
        return range(self.starts[g], end)


def _parts(group) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A group's grad rows cut into parts within one param, of each size of ``PART_ROWS``, largest first:
    the first row of each part, ``[k_i]`` int32 per size, and the param of each, ``[sum k_i]`` int64."""
    tables: list[list[tuple[int, int]]] = [[] for _ in PART_ROWS]  # per size: (first row, param) of each part
    covered = 0
    for i, e in enumerate(group.entries):
        if e.external:
            continue
        rows, done = rows_for(e.numel), 0
        for table, size in zip(tables, PART_ROWS):
            end = rows - (rows - done) % size  # where this size's last whole part ends
            table += [(e.row + r, i) for r in range(done, end, size)]
            done = end
        covered += done
    if covered != group.grad_rows:  # planning's layout: every grad row is a param's
        raise RuntimeError(f"parts of params cover {covered} rows of a group's {group.grad_rows} grad rows")
    firsts = [torch.tensor([first for first, _ in table], dtype=torch.int32) for table in tables]
    return firsts, torch.tensor([i for table in tables for _, i in table], dtype=torch.int64)


def names_in_order(plan: Plan, param_lists: list[list[torch.Tensor]]) -> list[str]:
    """Every param's name (``model_parts``' names, else ``param_groups[i][j]``), in the optimizer's order."""
    named = {id(p): name for group in plan.groups for p, name in zip(group.params, group.names)}
    return [named.get(id(p), f"param_groups[{i}][{j}]") for i, params in enumerate(param_lists)
            for j, p in enumerate(params)]

