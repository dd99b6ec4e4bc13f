"""The norm stage shared by ``FusedStep`` and the seed's functional API.

collect (validate grads, nothing changes) -> Phase A (compiled partial norms per sharding group)
-> ``collectives.reduce_partials`` -> ``norms.finish`` (total, clip coefficient, finite flag).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compiled_step import collectives, kernels, norms, planning


class GroupWork(NamedTuple):
    """One sharding group's tensors for this step.

    Large tensors go through fixed-length buckets, one list slot each (only those with a grad).
    Small tensors are packed end to end into one flat grad (zeros where a param has no grad), so a
    model with a thousand biases and norms makes one compiled call for them, not a thousand slots.
    """

    group: planning.ShardingGroup
    params: list[torch.Tensor]  # large params with a grad (DTensor or plain), in plan order
    flat_params: list[torch.Tensor]  # their local shards as detached 1-D aliases, non-empty ones only
    flat_grads: list[torch.Tensor]  # matching local grads, in the param's memory order
    nonempty: list[int]  # indices into ``params`` of the tensors in flat_params
    small_local: list[torch.Tensor]  # local shards of every small param of the group, plan order
    small_grads: list[torch.Tensor | None]  # their local grads (None: no grad this step)
    packed_grad: torch.Tensor | None  # the small grads packed end to end; None if none has a grad


def check_grad(p: torch.Tensor, g: torch.Tensor, where: str) -> None:
    if g.is_sparse:
        raise TypeError(f"{where}: sparse grads are not supported; FusedStep needs dense grads")
    if g.shape != p.shape:
        raise ValueError(f"{where}: grad shape {tuple(g.shape)} differs from param shape {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{where}: grad is on {g.device} but the param is on {p.device}")
    if g.is_complex() or not g.is_floating_point():
        raise TypeError(f"{where}: grads must be real floating point, got {g.dtype}")


class GradNorm:
    """Computes the global grad norm of a plan's params, compiled per bucket, without host syncs."""

    def __init__(self, kind: kernels.NormKind, bucket_size: int, compiler: kernels.Compiler):
        self.kind = kind
        self.bucket_size = bucket_size
        self.compiler = compiler
        self._dummies: dict[tuple, tuple] = {}
        self._grad_packs: dict[tuple, tuple] = {}  # (id(group), grad dtype) -> (group, buffer, views)
        self._norm_order: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ collect

    def collect(self, plan: planning.Plan) -> list[GroupWork]:
        """Validate every grad first (raising changes nothing), then gather this step's tensors."""
        for group in plan.groups:
            for name, p in zip(group.names, group.params):
                if p.grad is not None:
                    check_grad(p, p.grad, name)
        work = []
        for group in plan.groups:
            params, flat_params, flat_grads, nonempty = [], [], [], []
            for i in group.large:
                p = group.params[i]
                g = self._grad(p)
                if g is None:
                    continue
                local_p, local_g = planning.local_tensor(p), planning.local_tensor(g)
                if local_p.numel() > 0:
                    nonempty.append(len(params))
                    flat_params.append(flat(local_p))
                    flat_grads.append(flat_like(local_g, local_p))
                params.append(p)
            small_local, small_grads = [], []
            for i in group.small:
                p = group.params[i]
                g = self._grad(p)
                small_local.append(planning.local_tensor(p))
                small_grads.append(None if g is None else planning.local_tensor(g))
            packed = self._pack_grads(group, small_local, small_grads)
            work.append(GroupWork(group, params, flat_params, flat_grads, nonempty, small_local, small_grads, packed))
        return work

    def _pack_grads(self, group, small_local, small_grads) -> torch.Tensor | None:
        """The small grads copied end to end into a persistent buffer (zeros where a param has no
        grad); None when none has a grad. One foreach copy per step, no per-step views."""
        active = [g for g in small_grads if g is not None]
        if not active:
            return None
        key = (id(group), active[0].dtype)
        entry = self._grad_packs.get(key)
        if entry is None or entry[0] is not group:
            total = sum(t.numel() for t in small_local)
            buffer = torch.empty(total, dtype=active[0].dtype, device=active[0].device)
            views, offset = [], 0
            for t in small_local:
                views.append(buffer[offset: offset + t.numel()].view(t.shape))
                offset += t.numel()
            entry = self._grad_packs[key] = (group, buffer, views)
        _, buffer, views = entry
        if len(active) == len(small_grads):
            torch._foreach_copy_(views, small_grads)
        else:
            torch._foreach_copy_([v for v, g in zip(views, small_grads) if g is not None], active)
            torch._foreach_zero_([v for v, g in zip(views, small_grads) if g is None])
        return buffer

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor | None:
        g = p.grad
        if g is not None and planning._is_dtensor(g):
            g = collectives.match_grad_placement(p, g)
            if g is not p.grad:
                p.grad = g
        return g

    # ------------------------------------------------------------------ buckets

    def buckets(self, n: int) -> list[range]:
        return planning.chunk(n, self.bucket_size)

    def pad(self, items: list, fillers: list) -> list:
        missing = self.bucket_size - len(items)
        return items if missing == 0 else list(items) + list(fillers[:missing])

    def dummies_for(self, like_p: torch.Tensor, like_g: torch.Tensor, n_state: int):
        """One-element scratch tensors that pad the last bucket to ``bucket_size``, so every call
        has the same list length and hits the same graph. Their grads are zero (they add nothing to
        the norm); whatever an update writes into them is never read. Each slot gets its own
        tensors: Dynamo guards on which inputs alias, so reusing one tensor would recompile."""
        key = (like_p.device, like_p.dtype, like_g.dtype, n_state)
        dummies = self._dummies.get(key)
        if dummies is None:
            def make(dtype):
                return [torch.zeros(1, dtype=dtype, device=like_p.device) for _ in range(self.bucket_size)]

            states = list(zip(*[make(like_p.dtype) for _ in range(n_state)])) or [()] * self.bucket_size
            dummies = (make(like_p.dtype), make(like_g.dtype), states)
            self._dummies[key] = dummies
        return dummies

    # ------------------------------------------------------------------ Phase A and the total

    def partials(self, plan: planning.Plan, work: list[GroupWork], scales: list) -> list[torch.Tensor]:
        """Partial norms per sharding group, float64 ``[w]`` on the norm device, each group's scale applied."""
        kind, compiler = self.kind, self.compiler
        device = plan.norm_device
        if kind.kind == "sum":
            fn, extra = compiler.get(kernels.partial_norm_sum), (kind.p,)
        elif kind.kind == "max":
            fn, extra = compiler.get(kernels.partial_norm_max), ()
        else:
            fn, extra = compiler.get(kernels.partial_norm_scaled), None
        out = []
        for w, scale in zip(work, scales):
            bucket_partials = []
            # The packed small grads ride in the same bucket graph as one more (long) tensor.
            slots = w.flat_grads + ([w.packed_grad] if w.packed_grad is not None and w.packed_grad.numel() else [])
            for bucket in self.buckets(len(slots)):
                grads = [slots[i] for i in bucket]
                grads = self.pad(grads, self.dummies_for(grads[0], grads[0], 0)[1])
                args = extra if extra is not None else (self._order_on(grads[0].device),)
                signature = ("norm", kind.kind, grads[0].dtype, grads[0].device.type)
                with compiler.first_call(signature, f"Phase A norm graph ({kind.kind}, {grads[0].dtype})"):
                    bucket_partials.append(fn(grads, *args).to(device))
            if bucket_partials:
                partial = norms.combine(kind, torch.stack(bucket_partials))
            else:  # no grads (or only empty shards) here: contributes zero, still joins the collectives
                partial = torch.zeros(kind.partial_width, dtype=torch.float64, device=device)
            out.append(norms.apply_scale(kind, partial, scale))
        return out

    def _order_on(self, device: torch.device) -> torch.Tensor:
        order = self._norm_order.get(device)
        if order is None:
            order = self._norm_order[device] = torch.tensor(self.kind.p, dtype=torch.float64, device=device)
        return order

    def total(self, plan, work, scales, max_norm: float | None) -> norms.NormResult:
        partials = self.partials(plan, work, scales)
        return norms.finish(self.kind, collectives.reduce_partials(self.kind, partials, plan), max_norm)


def group_scales(plan: planning.Plan, base: torch.Tensor | None, expert: torch.Tensor | None) -> list:
    """Each group's float64 0-d scale on the norm device (``None`` = 1): experts get ``expert``."""
    return [expert if g.key.is_expert else base for g in plan.groups]


# ---------------------------------------------------------------------- flattening


def flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of all elements of a dense tensor, in memory order.

    ``detach()`` makes the alias a non-view without ``requires_grad``: Dynamo guards on the
    ``_base`` of view inputs (its sizes and strides) and on ``requires_grad``, so passing
    ``p.view(-1)`` would recompile for every distinct param shape and layout."""
    if t.is_contiguous():
        return t.view(-1).detach()
    if _is_dense_positive(t):
        # e.g. channels_last or transposed weights: dense in memory, just permuted.
        return t.as_strided((t.numel(),), (1,), t.storage_offset()).detach()
    raise ValueError(
        f"FusedStep needs params and optimizer state stored densely (no gaps or overlaps); got a tensor "
        f"of shape {tuple(t.shape)} and stride {t.stride()}"
    )


def _is_dense_positive(t: torch.Tensor) -> bool:
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


_warned_stride_copy = False


def flat_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The grad flattened in the param's memory order, so element i of both belongs together."""
    if g.stride() == p.stride() or g.numel() <= 1:
        return flat(g)
    global _warned_stride_copy
    if not _warned_stride_copy:
        import warnings

        warnings.warn(
            f"a grad's strides {g.stride()} differ from its param's {p.stride()}; compiled_step copies such grads "
            "into the param's layout each step (an extra read and write).",
            stacklevel=4,
        )
        _warned_stride_copy = True
    return flat(torch.empty_like(p).copy_(g))
