"""The prepared step: the list of calls one ``FusedStep.step()`` runs, built once per plan.

Every call's arguments are persistent tensors (``storage.py``), fixed when the program is built, so
running the program is a plain loop over the calls. The list is, in order:

1. Phase A: one compiled partial-norm call per sharding group (its flat grad buffer), and one per
   bucket of grads read where another framework keeps them (external grads, ``planning.py``);
2. the collectives: one per process group (two for a norm order other than 1, 2 and inf), in place
   on the partials; with PP, the groups are combined and reduced over the pipeline axis;
3. the finish: one compiled call (total norm, clip coefficient, finite flag, skip counter, every
   tensor's scalars);
4. Phase B: per group, the staged params copied in, one compiled flat update, copied out, and one
   compiled call per bucket of the bucketed params;
5. FP8 weights: their amax gathered, one MAX all-reduce per process group, the scales.

The first run goes through ``torch.compile`` (compiling, or picking cached graphs) and records each
compiled call (see ``compiling.py``); later runs replay the recorded calls. On CUDA the same list is
what a CUDA graph captures (``cuda_graphs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from compiled_step import buckets, compiling, storage
from compiled_step.norm import finish as finish_module
from compiled_step.norm import partials as partials_module
from compiled_step.norm.kinds import NormKind, combine

COMPILED, EAGER, COLLECTIVE = "compiled", "eager", "collective"


@dataclass
class Call:
    """One call of the program: what it is, for observers, and how to run it."""

    label: str  # what it does, e.g. "Phase B flat update, group 0"
    kind: str  # COMPILED, EAGER or COLLECTIVE
    fn: Callable  # for COMPILED calls, the compiled wrapper (or the plain function with compile=False)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    function: str = ""  # the pure function a COMPILED call runs, e.g. "rules.adam.update_flat"
    signature: tuple = ()  # what selects its graph (for the first-compile notice)
    _replay: Callable | None = None
    _replay_args: list | None = None

    @property
    def recorded(self) -> bool:
        return self._replay is not None

    @property
    def compiled(self) -> Callable | None:
        """The callable the backend returned for this call's graph, once the call ran (else None).

        Later runs call it directly with the recorded arguments; an observer (the graph dumps) can
        recognise which graph a call runs by it.
        """
        return self._replay

    def run(self, compiler: compiling.Compiler) -> None:
        if self._replay is not None:
            self._replay(*self._replay_args)
            return
        if self.kind == COMPILED and compiler.enabled:
            with compiling.compile_settings(), compiling.recording() as rec, \
                    compiler.first_call(self.signature, self.label):
                self.fn(*self.args, **self.kwargs)
            if rec.compiled is not None:
                self._replay, self._replay_args = rec.compiled, rec.args
            return
        self.fn(*self.args, **self.kwargs)


@dataclass
class Program:
    """The step as two lists of calls: the norm (up to the finish), then the update."""

    norm: list[Call]
    update: list[Call]
    compiler: compiling.Compiler

    @property
    def calls(self) -> list[Call]:
        return self.norm + self.update

    def run_norm(self) -> None:
        for call in self.norm:
            call.run(self.compiler)

    def run_update(self) -> None:
        for call in self.update:
            call.run(self.compiler)

    def describe(self) -> list[str]:
        return [f"{i + 1:2d}. {c.kind:<10} {c.label}" for i, c in enumerate(self.calls)]


def _function_name(fn: Callable) -> str:
    module = fn.__module__.replace("compiled_step.", "")
    return f"{module}.{fn.__name__}"


def norm_calls(plan, groups: list[storage.GroupBuffers], buffers: storage.StepBuffers, rule, kind: NormKind,
               compiler: compiling.Compiler, fillers: buckets.Fillers) -> list[Call]:
    """The norm half: Phase A, the collectives and the finish."""
    norm: list[Call] = []
    partial_fn = compiler.get(partials_module.partial_of_buffer)
    for g, gb in enumerate(groups):
        if gb.group.grad_rows == 0:  # nothing in the grad buffer (e.g. an empty shard): its partial is zero,
            norm.append(Call(f"zero the partial norm of group {g} (no local elements)", EAGER,  # every step,
                             buffers.partial_rows[g].zero_))  # as the collectives reduce the row in place
        else:
            dtype = gb.grads.dtype
            norm.append(Call(
                f"Phase A partial norm, group {g}", COMPILED, partial_fn,
                (gb.grads, buffers.scales[g], buffers.order, buffers.partial_rows[g]),
                dict(kind=kind.kind, p=kind.p), _function_name(partials_module.partial_of_buffer),
                ("norm", kind.kind, dtype, plan.device.type)))
        norm += _external_partials(plan, g, gb, buffers, kind, compiler, fillers)
    norm += _collectives(plan, buffers, kind)
    finish_fn = compiler.get(finish_module.finish)
    partials = buffers.pp_partial if plan.pp is not None else buffers.partials
    norm.append(Call(
        "finish: total norm, clip coefficient, finite flag, per-tensor scalars", COMPILED, finish_fn,
        (partials, buffers.order, buffers.max_norm, buffers.hp, buffers.slot_group, buffers.counts, buffers.active,
         buffers.total, buffers.finite, buffers.skipped, buffers.table),
        dict(kind=kind.kind, p=kind.p, rule=rule),
        _function_name(finish_module.finish), ("finish", kind.kind, rule.NAME, plan.device.type)))
    return norm


def build(plan, groups: list[storage.GroupBuffers], buffers: storage.StepBuffers, rule, variants: list,
          kind: NormKind, compiler: compiling.Compiler, fillers: buckets.Fillers, fp8=None,
          norm: list[Call] | None = None) -> Program:
    """The program of one plan. ``variants[g]`` is group g's rule variant; ``fp8`` the FP8 weights'
    calls (``Fp8Weights.calls``), appended to the update; ``norm`` the norm half when the
    training-health options build it (``health_program.norm_calls``), else ``norm_calls``'s."""
    if norm is None:
        norm = norm_calls(plan, groups, buffers, rule, kind, compiler, fillers)
    update: list[Call] = []
    flat_fn, bucket_fn = compiler.get(rule.update_flat), compiler.get(rule.update_bucket)
    for g, gb in enumerate(groups):
        group, var = gb.group, variants[g]
        dtypes = (group.key.dtype, group.key.grad_dtype, plan.device.type)
        if gb.staged:
            update.append(Call(f"copy {len(gb.staged)} staged params in, group {g}", EAGER,
                               storage.copy_staged_in, (gb,)))
        if group.flat_slots:
            update.append(Call(
                f"Phase B flat update, group {g} ({len(group.flat)} params, {group.flat_rows} rows)", COMPILED,
                flat_fn, gb.flat_args(rule, var, buffers), {}, _function_name(rule.update_flat),
                ("update_flat", rule.NAME, var) + dtypes))
        if gb.staged:
            update.append(Call(f"copy {len(gb.staged)} staged params out, group {g}", EAGER,
                               storage.copy_staged_out, (gb,)))
        for b, args in enumerate(gb.bucket_args(rule, var, buffers, fillers)):
            update.append(Call(
                f"Phase B bucket update, group {g}, bucket {b}", COMPILED, bucket_fn, args, {},
                _function_name(rule.update_bucket), ("update_bucket", rule.NAME, var, group.key.fp8) + dtypes))
    for kind_, label, fn, args in fp8 or ():
        update.append(Call(label, kind_, fn, args))
    return Program(norm, update, compiler)


def _external_partials(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, kind: NormKind,
                       compiler: compiling.Compiler, fillers: buckets.Fillers) -> list[Call]:
    """Phase A over a group's external grads: one call per bucket, combined into the group's partial."""
    if not gb.group.external:
        return []
    fn = compiler.get(partials_module.add_partial_of_list)
    return [Call(f"Phase A partial norm, group {g}, external grads {b}", COMPILED, fn,
                 (grads, buffers.scales[g], buffers.order, buffers.partial_rows[g]), dict(kind=kind.kind, p=kind.p),
                 _function_name(partials_module.add_partial_of_list),
                 ("norm_external", kind.kind, gb.grads.dtype, plan.device.type))
            for b, grads in enumerate(gb.external_grad_buckets(plan.bucket_size, fillers))]


def _collectives(plan, buffers: storage.StepBuffers, kind: NormKind) -> list[Call]:
    calls = []
    n_groups = len(plan.groups)
    op = {"sum": "SUM", "max": "MAX", "scaled": "MAX then SUM"}[kind.kind]
    for reduction in plan.reductions:
        members = reduction.members
        index = None if members == list(range(n_groups)) else torch.tensor(members, device=plan.device)
        shape = f"f64[{len(members)}, {storage.PARTIAL_WIDTH}]"
        calls.append(Call(
            f"all_reduce({op}) over {reduction.label!r}: {shape} (partial norms of groups {members})", COLLECTIVE,
            storage.reduce_partials_over, (reduction, kind, buffers.partials, index, buffers.order)))
    if plan.pp is not None:
        calls.append(Call("combine the groups' partials", EAGER, _combine_into,
                          (kind, buffers.partials, buffers.pp_partial, buffers.order)))
        calls.append(Call(f"all_reduce({op}) over 'pp': f64[1, {storage.PARTIAL_WIDTH}] (combined partial norm)",
                          COLLECTIVE, storage.reduce_partials_over,
                          (plan.pp, kind, buffers.pp_partial, None, buffers.order)))
    return calls


def _combine_into(kind: NormKind, partials: torch.Tensor, out: torch.Tensor, order: torch.Tensor) -> None:
    out.copy_(combine(kind.kind, partials, order if kind.kind == "scaled" else kind.p)[None])
