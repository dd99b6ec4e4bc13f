"""FusedStep's training-health API (``param_norms``, ``skip_spike_sigma``, ``adaptive_clip``), mixed into
``FusedStep``: the public attributes, and the hooks its build, step and checkpoints call.

The state lives in ``health.HealthState`` (persistent, across plan rebuilds) and, per plan, in
``health.ParamNormRows``; the math in ``norm/health.py`` and ``norm/param_partials.py``.
"""

from __future__ import annotations

import numbers

import torch

from compiled_step import health_program
from compiled_step.health import HealthState, ParamNormRows, names_in_order


class TrainingHealthAPI:
    """The training-health attributes of ``FusedStep`` (see the README's "Training health")."""

    _health: HealthState | None = None
    _param_norm_rows: ParamNormRows | None = None
    _param_names: list[str] | None = None

    @property
    def param_norms(self) -> torch.Tensor | None:
        """float64 ``[N]`` on the params' device (``param_norms=True``): the pre-clip norm (of ``norm_type``)
        of each param's scaled grad at the last step, in the order of the optimizer's ``param_groups``.

        Global for sharded params. Updated in place by every step (clone it to keep it); a new tensor
        after the params change. None before the first step or with ``param_norms=False``.
        """
        return self._param_norm_rows.norms if self._param_norm_rows is not None else None

    def param_norms_by_name(self) -> dict[str, float]:
        """``{name: norm}`` of the last step, for logging; names from ``model_parts`` (else
        ``param_groups[i][j]``). **Reads the device**: one copy of ``param_norms`` to the host (a sync
        on an accelerator), so call it when you log, not every step."""
        if not self.config.param_norms:
            raise RuntimeError("param_norms_by_name() needs FusedStep(..., param_norms=True)")
        if self._param_norm_rows is None:
            return {}
        return dict(zip(self._param_names, self._param_norm_rows.norms.tolist()))

    @property
    def spike_skipped_steps(self) -> torch.Tensor | None:
        """int64 0-d tensor (``skip_spike_sigma``): steps skipped for a norm or loss spike, apart from
        ``skipped_steps`` (non-finite norms). Updated in place."""
        state = self._health
        return state.tensors.spike_skipped[0] if state is not None and state.tensors.spike_skipped is not None \
            else None

    @property
    def clip_coef(self) -> torch.Tensor | None:
        """float64 0-d tensor: the clip coefficient the last step's update applied to the scaled grads
        (1 when not clipped; ZClip's with ``adaptive_clip``). Written by the step when any
        training-health option is on, else None. Updated in place."""
        return self._health.tensors.clip_coef[0] if self._health is not None else None

    # ------------------------------------------------------------------ hooks for FusedStep

    def _health_on(self, device: torch.device) -> HealthState:
        """The persistent health state on ``device``: made once, moved if the device changes."""
        if self._health is None:
            self._health = HealthState(self.config, device)
        elif self._health.device != device:
            self._health = self._health.moved_to(device, self.config)
        return self._health

    def _health_norm_calls(self, plan, groups, buffers, param_lists, group_rules, kind, compiler, fillers) -> list:
        """The norm half of a new plan's program (``health_program``), and the plan's per-param rows."""
        state = self._health_on(plan.device)
        rows = ParamNormRows(plan, param_lists) if self.config.param_norms else None
        self._param_norm_rows = rows
        self._param_names = names_in_order(plan, param_lists) if rows is not None else None
        return health_program.norm_calls(plan, groups, buffers, group_rules, kind, compiler, fillers, state, rows)

    def _check_loss(self, loss) -> float | torch.Tensor | None:
        """``step(loss=...)`` validated before anything changes."""
        if loss is None:
            return None
        if self.config.skip_spike_sigma is None:
            raise ValueError("step(loss=...) is read by the spike check only: pass skip_spike_sigma to FusedStep")
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1 or not loss.is_floating_point():
                raise ValueError(f"loss must be a one-element floating-point tensor, got {loss.dtype} of shape "
                                 f"{tuple(loss.shape)}")
            return loss
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise TypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")
        return float(loss)

    def _bind_loss(self, loss) -> None:
        if self._health is not None and self._health.tensors.loss is not None:
            self._health.set_loss(loss)

    @property
    def _has_health_state(self) -> bool:
        return self.config.skip_spike_sigma is not None or self.config.adaptive_clip is not None

    def _health_state_dict(self) -> dict[str, torch.Tensor]:
        if not self._has_health_state:
            return {}
        return (self._health or HealthState(self.config, torch.device("cpu"))).state_dict()

    def _check_health_state_dict(self, state_dict: dict) -> None:
        """Raise ``KeyError``/``TypeError``/``ValueError`` for a bad state dict, before anything changes."""
        if self._has_health_state:
            (self._health or HealthState(self.config, torch.device("cpu"))).check_state_dict(state_dict)

    def _load_health_state_dict(self, state_dict: dict) -> None:
        if self._has_health_state:
            self._health_on(self._health.device if self._health is not None else torch.device("cpu"))
            self._health.load_state_dict(state_dict)
