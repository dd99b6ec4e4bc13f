"""Optimizer state of small params stored end to end ("arenas"), still in torch's format.

``optimizer.state[p]["exp_avg"]`` and friends of a packed (small) param are views into one flat
tensor per state key, and ``state[p]["step"]`` is a 0-d view into one ``[S]`` float32 step vector.
They are ordinary tensors of the param's shape and dtype (DTensors for DTensor params), so
``optimizer.step()``, ``state_dict()`` and ``load_state_dict()`` work unchanged. A state tensor that
is not such a view (new state, a loaded checkpoint, a user's assignment) is adopted: its values are
copied into the arena and the state entry is replaced by the view. Nothing is lost.

Why: the packed update reads the arenas directly, so the state of a thousand biases costs one
compiled call and no gather/scatter, and their steps advance with one add.
"""

from __future__ import annotations

import torch

from compiled_step import planning


class PackedState:
    def __init__(self, params: list[torch.Tensor], locals_: list[torch.Tensor], keys: tuple[str, ...],
                 uses_step: bool, device: torch.device, dtype: torch.dtype):
        sizes = [t.numel() for t in locals_]
        self.offsets = []
        total = 0
        for n in sizes:
            self.offsets.append(total)
            total += n
        self.total = total
        self.keys = keys
        self.arenas = {key: torch.zeros(total, dtype=dtype, device=device) for key in keys}
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=device) if uses_step else None
        counts = torch.tensor(sizes, dtype=torch.int64)
        self.segment = torch.repeat_interleave(torch.arange(len(params), dtype=torch.int32), counts).to(device)
        self._views = {key: [self._state_view(p, arena, off, t) for p, off, t in zip(params, self.offsets, locals_)]
                       for key, arena in self.arenas.items()}
        self._step_views = [self.steps[i] for i in range(len(params))] if uses_step else None
        # Persistent packed copy of the params: per step one foreach copy in and one out, with
        # no per-step view creation (that alone cost a microsecond or two per param).
        self.param_buffer = torch.empty(total, dtype=dtype, device=device)
        self.param_views = [self.param_buffer[off: off + t.numel()].view(t.shape) for off, t in zip(self.offsets, locals_)]

    @staticmethod
    def _state_view(p, arena, offset, local):
        view = arena[offset: offset + local.numel()].view(local.shape)
        if planning._is_dtensor(p):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                      shape=p.size(), stride=p.stride())
        return view

    def adopt(self, params: list[torch.Tensor], optimizer_state, active: list[bool]) -> list[float]:
        """Make every state tensor of the packed params an arena view. Returns, per param, 1.0 where
        a state tensor was created here (torch's first step for SGD momentum), else 0.0.

        Params without a grad and without state are left without state, as torch.optim does.
        """
        first = []
        for i, p in enumerate(params):
            state = optimizer_state.get(p) if not active[i] else optimizer_state[p]
            created = 0.0
            if state is None:
                first.append(created)
                continue
            for key in self.keys:
                current = state.get(key)
                if current is None:
                    self.arenas[key][self.offsets[i]: self.offsets[i] + params_numel(self._views[key][i])].zero_()
                    state[key] = self._views[key][i]
                    created = 1.0
                elif current is not self._views[key][i]:
                    planning.local_tensor(self._views[key][i]).copy_(planning.local_tensor(current))
                    state[key] = self._views[key][i]
            if self.steps is not None:
                step = state.get("step")
                if step is None:
                    self.steps[i] = 0.0
                    state["step"] = self._step_views[i]
                elif step is not self._step_views[i]:
                    self.steps[i] = step.to(self.steps.device, torch.float32)
                    state["step"] = self._step_views[i]
            first.append(created)
        return first


def params_numel(t: torch.Tensor) -> int:
    return planning.local_tensor(t).numel()
