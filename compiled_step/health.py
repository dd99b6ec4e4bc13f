"""Training health at run time: FusedStep's health state, its per-plan layout, and what its attributes read.

The options, their tensors, checkpoint keys and math are ``norm/health.py``'s; this module holds them
for FusedStep:

* ``TrainingHealth``: FusedStep's part for its training-health options (one object, made with the
  config): the persistent ``HealthState``, the current plan's ``ParamNormRows``, the finish's health input
  for a new plan (``for_plan``), ``step(loss=...)``, the checkpoint, and the values of FusedStep's
  health attributes (``param_norms``, ``spike_skipped_steps``, ``clip_coef``).
* ``HealthState``: the options' persistent device tensors (``norm.health.tensors_for``). Made once on the
  params' device, kept across plan rebuilds (moved if the device changes), in ``fused.state_dict()``.
* ``ParamNormRows``: per plan, where each param's partial norm lives, and the parts Phase A cuts each
  grad buffer into. Phase A writes one row per param (``norm/param_partials.py``); the collectives
  reduce them with the groups' partials; the finish turns them into ``param_norms``, in the
  optimizer's param order.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from compiled_step.norm import health as health_math
from compiled_step.norm.health import HealthTensors, ParamNorms
from compiled_step.norm.param_partials import PART_ROWS
from compiled_step.planning import Plan, rows_for
from compiled_step.storage import LEAD, PARTIAL_WIDTH


class PlanHealth(NamedTuple):
    """What the norm half of one plan's program reads for the training-health options (``program.norm_calls``)."""

    tensors: HealthTensors  # the finish's ``health`` input
    rows: "ParamNormRows | None"  # param_norms: Phase A and the collectives write and reduce the per-param rows


class TrainingHealth:
    """FusedStep's training-health options at run time (see the module docstring)."""

    def __init__(self, config):
        self._config = config
        self.state: HealthState | None = None  # made by the first plan (or a checkpoint load)
        self.rows: ParamNormRows | None = None  # the current plan's, with param_norms
        self._names: list[str] | None = None

    def for_plan(self, plan: Plan, param_lists: list[list[torch.Tensor]]) -> PlanHealth | None:
        """The health input of a new plan's program; None when every option is off."""
        if not self._config.health:
            return None
        state = self._state_on(plan.device)
        self.rows = ParamNormRows(plan, param_lists) if self._config.param_norms else None
        self._names = names_in_order(plan, param_lists) if self.rows is not None else None
        tensors = state.tensors
        if self.rows is not None:
            tensors = tensors._replace(param_norms=ParamNorms(self.rows.partials, self.rows.norm_rows, self.rows.norms))
        return PlanHealth(tensors, self.rows)

    def _state_on(self, device: torch.device) -> "HealthState":
        """The persistent state on ``device``: made once, moved if the device changes."""
        if self.state is None:
            self.state = HealthState(self._config, device)
        elif self.state.device != device:
            self.state = self.state.moved_to(device, self._config)
        return self.state

    # ---------------------------------------------------------------- step(loss=...)

    def check_loss(self, loss) -> float | torch.Tensor | None:
        """``step(loss=...)`` validated before anything changes."""
        if loss is None:
            return None
        if not health_math.reads_loss(self._config):
            raise ValueError(f"step(loss=...) is read by {' and '.join(health_math.LOSS_OPTIONS)} only: pass it to "
                             "FusedStep")
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1 or not loss.is_floating_point():
                raise ValueError(f"loss must be a one-element floating-point tensor, got {loss.dtype} of shape "
                                 f"{tuple(loss.shape)}")
            return loss
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise TypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")
        return float(loss)

    def bind_loss(self, loss: float | torch.Tensor | None) -> None:
        """Write this step's loss (``check_loss``'s) into the device state, where an option reads it."""
        if self.state is not None and self.state.tensors.loss is not None:
            self.state.set_loss(loss)

    # ---------------------------------------------------------------- FusedStep's attributes

    @property
    def param_norms(self) -> torch.Tensor | None:
        return self.rows.norms if self.rows is not None else None

    def param_norms_by_name(self) -> dict[str, float]:
        if not self._config.param_norms:
            raise RuntimeError("param_norms_by_name() needs FusedStep(..., param_norms=True)")
        if self.rows is None:
            return {}
        return dict(zip(self._names, self.rows.norms.tolist()))

    @property
    def spike_skipped_steps(self) -> torch.Tensor | None:
        spiked = self.state.tensors.spike_skipped if self.state is not None else None
        return spiked[0] if spiked is not None else None

    @property
    def clip_coef(self) -> torch.Tensor | None:
        return self.state.tensors.clip_coef[0] if self.state is not None else None

    # ---------------------------------------------------------------- checkpoints

    def _state_or_blank(self) -> "HealthState | None":
        """The state, or a zeroed one on the CPU before the first step; None when every option is off."""
        if not self._config.health:
            return None
        return self.state or HealthState(self._config, torch.device("cpu"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self._state_or_blank()
        return state.state_dict() if state is not None else {}

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ``KeyError``/``TypeError``/``ValueError`` for a bad state dict, before anything changes."""
        state = self._state_or_blank()
        if state is not None:
            state.check_state_dict(state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        state = self._state_or_blank()
        if state is None or not state.entries():
            return
        self.state = state  # a blank one is kept: the first plan moves it to the params' device
        state.load_state_dict(state_dict)


class HealthState:
    """FusedStep's persistent health tensors for one config (see the module docstring)."""

    def __init__(self, config, device: torch.device):
        self.tensors = health_math.tensors_for(config, device)
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

    def entries(self) -> dict[str, health_math.Entry]:
        return health_math.checkpoint_entries(self.tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies: 0-d tensors for counters and statistics, 1-D for the windows."""
        return {k: e.tensor[0].clone() if e.scalar else e.tensor.clone() for k, e in self.entries().items()}

    def check_state_dict(self, state_dict: dict) -> dict[str, torch.Tensor]:
        """The values to load, validated (``KeyError``/``TypeError``/``ValueError``); changes nothing."""
        entries = self.entries()
        missing = sorted(set(entries) - set(state_dict))
        if missing:
            options = ", ".join(dict.fromkeys(entries[k].option for k in missing))
            raise KeyError(f"FusedStep state_dict lacks {missing}, the state of its training-health options "
                           f"({options}): was it saved with other options?")
        values = {}
        for key, entry in entries.items():
            dst, value = entry.tensor, state_dict[key]
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and dst.numel() == 1:
                value = torch.tensor([value])
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"FusedStep state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
            if value.numel() != dst.numel():
                raise ValueError(f"FusedStep state_dict[{key!r}] has {value.numel()} elements, this FusedStep's "
                                 f"has {dst.numel()} ({entry.option} differs from the saved run's)")
            values[key] = value.detach().reshape(dst.shape).to(dst.dtype)
        return values

    def load_state_dict(self, state_dict: dict) -> None:
        values = self.check_state_dict(state_dict)
        for key, entry in self.entries().items():
            entry.tensor.copy_(values[key])


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
    the first row of each part, ``[k_i]`` int32 per size, and the param of each, ``[sum k_i]`` int64.

    A param owns the rows from its first to the next param's first (the last one: to ``grad_rows``): its own
    ``rows_for(numel)``, and in a matrix group the padding rows its stack keeps after each matrix
    (``planning._lay_out_stacks``), whose grads are zeros and add nothing to its norm."""
    tables: list[list[tuple[int, int]]] = [[] for _ in PART_ROWS]  # per size: (first row, param) of each part
    covered = 0
    # params with elements, by first row (an empty local shard takes no row, and may share its first row with
    # the next param)
    owned = sorted((e.row, i) for i, e in enumerate(group.entries) if not e.external and e.numel)
    ends = {i: nxt for (_, i), (nxt, _) in zip(owned, owned[1:])}
    for i, e in enumerate(group.entries):
        if e.external:
            continue
        rows, done = (ends.get(i, group.grad_rows) - e.row if e.numel else 0), 0
        if rows < rows_for(e.numel):  # planning's layout: a param's rows never overlap the next one's
            raise RuntimeError(f"param {i} of a group has {rows} grad rows for {e.numel} elements")
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

