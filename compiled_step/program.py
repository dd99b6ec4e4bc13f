"""The prepared step: the list of calls one ``FusedStep.step()`` runs, built once per plan.

Every call's arguments are persistent tensors (``storage.py``), fixed when the program is built, so
running the program is a plain loop over the calls. The list is, in order:

1. Phase A: one compiled partial-norm call per sharding group (its flat grad buffer), and one per
   bucket of grads read where another framework keeps them (external grads, ``planning.py``); with
   ``param_norms``, the same calls write every param's partial too;
2. the collectives: one per process group (two for a norm order other than 1, 2 and inf), in place
   on the partials (and the per-param partials, stacked in the same tensor); with PP, the groups are
   combined and reduced over the pipeline axis;
3. the finish: one compiled call (total norm, clip coefficient, finite flag, skip counter, every
   tensor's scalars; the training-health options' state when any is on, ``norm/health.py``);
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

from compiled_step import buckets, collectives, compiling, matrices, storage
from compiled_step.norm import finish as finish_module
from compiled_step.norm import param_partials
from compiled_step.norm import partials as partials_module
from compiled_step.norm.kinds import NormKind, combine
from compiled_step.rules import state_kwargs
from compiled_step.rules.common import Rounding

COMPILED, EAGER, COLLECTIVE = "compiled", "eager", "collective"


@dataclass
class Call:
    """One call of the program: what it is, for observers, and how to run it."""

    label: str  # what it does, e.g. "Phase B flat update, group 0"
    runs_as: str  # how the call runs: COMPILED, EAGER or COLLECTIVE
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
        if self.runs_as == COMPILED and compiler.enabled:
            with compiling.compile_settings(compiler.combo_kernels), compiling.recording() as rec, \
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
        return [f"{i + 1:2d}. {c.runs_as:<10} {c.label}" for i, c in enumerate(self.calls)]


def _function_name(fn: Callable) -> str:
    module = fn.__module__.replace("compiled_step.", "")
    return f"{module}.{fn.__name__}"


def norm_calls(plan, groups: list[storage.GroupBuffers], buffers: storage.StepBuffers, rules: list, kind: NormKind,
               compiler: compiling.Compiler, fillers: buckets.Fillers, health=None) -> list[Call]:
    """The norm half: Phase A, the collectives and the finish. ``rules[g]``: group g's update rule;
    ``health``: the training-health options' input (``health.PlanHealth``), None when they are all off."""
    rows = health.rows if health is not None else None
    norm: list[Call] = []
    for g, gb in enumerate(groups):
        norm += _partials(plan, g, gb, buffers, kind, compiler, fillers, rows)
    norm += _collectives(plan, buffers, kind, rows)
    norm.append(_finish(plan, buffers, rules, kind, compiler, health))
    return norm


def build(store: storage.Storage, kind: NormKind, compiler: compiling.Compiler, fillers: buckets.Fillers, fp8=None,
          health=None, rounding: StochasticRounding | None = None) -> Program:
    """The program of one plan's ``store``. ``fp8``: the FP8 weights' calls (``Fp8Weights.calls``), appended to
    the update; ``health``: the training-health options' input to the norm half (``norm_calls``); ``rounding``:
    the stochastic rounding asked for (``FusedStepConfig.stochastic_rounding``), None for none."""
    plan, groups, buffers = store.plan, store.groups, store.buffers
    norm = norm_calls(plan, groups, buffers, store.group_rules, kind, compiler, fillers, health)
    update: list[Call] = []
    for g, gb in enumerate(groups):
        update += _updates(plan, g, gb, buffers, store.group_rules[g], store.group_variants[g], compiler, fillers,
                           rounding)
    for runs_as, label, fn, args in fp8 or ():
        update.append(Call(label, runs_as, fn, args))
    return Program(norm, update, compiler)


def _partials(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, kind: NormKind,
              compiler: compiling.Compiler, fillers: buckets.Fillers, rows=None) -> list[Call]:
    """Phase A of one group: its grad buffer in one call, then its external grads bucket by bucket. With
    ``rows`` (``param_norms``: ``health.ParamNormRows``), the same calls write every param's partial too."""
    if rows is not None:
        return _partials_by_param(plan, g, gb, buffers, kind, compiler, fillers, rows)
    if gb.group.grad_rows == 0:  # nothing in the grad buffer (e.g. an empty shard): its partial is zero,
        calls = [Call(f"zero the partial norm of group {g} (no local elements)", EAGER,  # every step, as the
                      buffers.partial_rows[g].zero_)]  # collectives reduce the row in place
    else:
        calls = [Call(
            f"Phase A partial norm, group {g}", COMPILED, compiler.get(partials_module.partial_of_buffer),
            (gb.grads, buffers.scales[g], buffers.order, buffers.partial_rows[g]),
            dict(kind=kind.kind, p=kind.p), _function_name(partials_module.partial_of_buffer),
            ("norm", kind.kind, gb.grads.dtype, plan.device.type))]
    if gb.group.external:
        fn = compiler.get(partials_module.add_partial_of_list)
        calls += [Call(f"Phase A partial norm, group {g}, external grads {b}", COMPILED, fn,
                       (grads, buffers.scales[g], buffers.order, buffers.partial_rows[g]),
                       dict(kind=kind.kind, p=kind.p), _function_name(partials_module.add_partial_of_list),
                       ("norm_external", kind.kind, gb.grads.dtype, plan.device.type))
                  for b, grads in enumerate(external_grad_buckets(gb, plan.bucket_size, fillers))]
    return calls


def _partials_by_param(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, kind: NormKind,
                       compiler: compiling.Compiler, fillers: buckets.Fillers, rows) -> list[Call]:
    """``_partials`` with ``param_norms``: the same one read of each group's grads also writes every
    param's partial (``norm/param_partials.py``)."""
    own_rows = rows.group_rows(plan, g)
    if gb.group.grad_rows == 0:  # nothing in the grad buffer: zero partials, every step (reduced in place)
        calls = [Call(f"zero the partial norms of group {g} (no local elements)", EAGER, _zero,
                      (buffers.partial_rows[g], own_rows))]
    else:
        fn = param_partials.partials_of_buffer_by_param
        calls = [Call(
            f"Phase A partial norms, group {g} and its {len(gb.group.params)} params", COMPILED, compiler.get(fn),
            (gb.grads, rows.part_rows[g], rows.part_param[g], buffers.scales[g], buffers.order,
             buffers.partial_rows[g], own_rows),
            dict(kind=kind.kind, p=kind.p), _function_name(fn),
            ("norm_by_param", kind.kind, gb.grads.dtype, plan.device.type))]
    if gb.group.external:
        fn = param_partials.add_partials_of_list_by_param
        calls += [Call(f"Phase A partial norms, group {g}, external grads {b}", COMPILED, compiler.get(fn),
                       (grads, buffers.scales[g], buffers.order, buffers.partial_rows[g],
                        rows.external_rows(plan, g, b)),
                       dict(kind=kind.kind, p=kind.p), _function_name(fn),
                       ("norm_external_by_param", kind.kind, gb.grads.dtype, plan.device.type))
                  for b, grads in enumerate(external_grad_buckets(gb, plan.bucket_size, fillers))]
    return calls


def _zero(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.zero_()


def rule_kwargs(rules: list, buffers: storage.StepBuffers) -> tuple[dict, tuple[str, ...]]:
    """A finish's rule arguments (the rule, or every distinct rule and each slot's) and the rules' names."""
    distinct = tuple(dict.fromkeys(rules))  # one rule: the graph of a one-optimizer step, unchanged
    if len(distinct) == 1:
        return dict(rule=distinct[0]), (distinct[0].NAME,)
    return dict(rule=distinct, slot_rule=buffers.slot_rule), tuple(r.NAME for r in distinct)


def _finish(plan, buffers: storage.StepBuffers, rules: list, kind: NormKind, compiler: compiling.Compiler,
            health=None) -> Call:
    rule_args, names = rule_kwargs(rules, buffers)
    kwargs = dict(kind=kind.kind, p=kind.p, **rule_args)
    label = "finish: total norm, clip coefficient, finite flag, per-tensor scalars"
    signature = ("finish", kind.kind, names, plan.device.type)
    if health is not None:  # the options' tensors; with every option off, the call of the default step
        kwargs["health"] = health.tensors
        options = tuple(name for name, value in health.tensors._asdict().items() if value is not None)
        label += f", training health ({', '.join(options)})"
        signature += options
    partials = buffers.pp_partial if plan.pp is not None else buffers.partials
    return Call(
        label, COMPILED, compiler.get(finish_module.finish),
        (partials, buffers.order, buffers.max_norm, buffers.hp, buffers.slot_group, buffers.counts, buffers.active,
         buffers.total, buffers.finite, buffers.skipped, buffers.table), kwargs,
        _function_name(finish_module.finish), signature)


def _updates(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, rule, var,
             compiler: compiling.Compiler, fillers: buckets.Fillers,
             rounding: StochasticRounding | None = None) -> list[Call]:
    """Phase B of one group: staged params in, the flat update or the matrix stacks, staged params
    out, then the buckets."""
    group = gb.group
    state_dtypes = tuple(gb.state_layout[k].dtype for k in gb.state_keys)
    dtypes = (group.key.dtype, group.key.grad_dtype, plan.device.type) + state_dtypes
    # The optimizer may ask for its bfloat16 params to round stochastically itself (torchao's bf16_stochastic_round).
    own = getattr(rule, "rounds_itself", lambda v: False)(var) and group.key.dtype == torch.bfloat16
    rounds = own or (rounding is not None and rounding.applies(group.key.dtype, state_dtypes))

    def with_rounding(kwargs: dict, call: int) -> dict:
        """The call's ``rounding`` argument, for the rules that take it: its own seed (``call``: its index in
        the group), or None where nothing of the group rounds stochastically."""
        if not rule.STOCHASTIC_ROUNDING:
            return kwargs
        return {**kwargs, "rounding": rounding.for_call(g, call, plan.device, own) if rounds else None}

    calls = []
    if gb.staged:
        calls.append(Call(f"copy {len(gb.staged)} staged params in, group {g}", EAGER, copy_staged_in, (gb,)))
    if group.exchange is not None:
        calls += _sharded_matrix_calls(plan, g, gb, buffers, rule, var, compiler, dtypes)
    elif group.stacks:
        fn = compiler.get(rule.update_matrices, static_widths=False)  # a graph for every shape, not one each
        group_bytes = matrices.group_param_bytes(group)
        call = 0  # the group's matrix calls in order: each its own rounding seed
        for k, stack in enumerate(group.stacks):
            shape, n = "x".join(map(str, stack.shape)), len(stack.members)
            chunks = matrices.call_chunks(n, rule.call_bytes(stack.shape, group.key.dtype), group_bytes)
            for first, count in chunks:
                which = f" ({first}..{first + count - 1} of {n})" if len(chunks) > 1 else ""
                state = {key: view.narrow(0, first, count) for key, view in gb.stack_state[k].items()}
                calls.append(Call(
                    f"Phase B matrix update, group {g}, {count} matrices {shape}{which}", COMPILED, fn,
                    _matrix_args(gb, g, k, buffers, first, count),
                    with_rounding(dict(counts=_stack_counts(gb, k, buffers, first, count), variant=var,
                                       **state_kwargs(rule, var, state)), call),
                    _function_name(rule.update_matrices), ("update_matrices", rule.NAME, var, rounds) + dtypes))
                call += 1
    elif group.flat_slots:
        calls.append(Call(
            f"Phase B flat update, group {g} ({len(group.flat)} params, {group.flat_rows} rows)", COMPILED,
            compiler.get(rule.update_flat), (gb.params, gb.grads[:group.flat_rows].detach()),
            with_rounding(_flat_kwargs(gb, buffers, rule, var), 0), _function_name(rule.update_flat),
            ("update_flat", rule.NAME, var, rounds) + dtypes))
    if gb.staged:
        calls.append(Call(f"copy {len(gb.staged)} staged params out, group {g}", EAGER, copy_staged_out, (gb,)))
    bucket_fn = compiler.get(rule.update_bucket) if group.bucket_count else None
    for b, (args, kwargs) in enumerate(_bucket_args(gb, rule, var, buffers, fillers)):
        calls.append(Call(
            f"Phase B bucket update, group {g}, bucket {b}", COMPILED, bucket_fn, args, with_rounding(kwargs, b + 1),
            _function_name(rule.update_bucket), ("update_bucket", rule.NAME, var, group.key.fp8, rounds) + dtypes))
    return calls


def _sharded_matrix_calls(plan, g: int, gb: storage.GroupBuffers, buffers: storage.StepBuffers, rule, var,
                          compiler: compiling.Compiler, dtypes: tuple) -> list[Call]:
    """Row-sharded matrices (see ``rules.muon``): each stack's rows into the outbox, the all-to-all, the
    owned matrices orthogonalized whole, the all-to-all back, each stack's rows of the result applied."""
    group, exchange = gb.group, gb.group.exchange
    prepare = compiler.get(rule.prepare_matrices, static_widths=False)
    orthogonalize = compiler.get(rule.orthogonalize, static_widths=False)
    apply = compiler.get(rule.apply_matrices, static_widths=False)
    shape = f"bf16{list(gb.outbox.shape)}"
    calls = []
    for k, stack in enumerate(group.stacks):
        slots = buffers.table[stack.first_slot:stack.first_slot + len(stack.members)].detach()
        calls.append(Call(f"Muon: rows of {len(stack.members)} matrices into the outbox, group {g}", COMPILED,
                          prepare, (gb.stack_grads[k], slots, gb.outboxes[k]),
                          state_kwargs(rule, var, gb.stack_state[k]),
                          _function_name(rule.prepare_matrices), ("prepare_matrices", rule.NAME) + dtypes))
    calls.append(Call(f"all_to_all over {exchange.label!r}: {shape} (matrices to their owners)", COLLECTIVE,
                      collectives.exchange, (exchange, gb.outbox, gb.inbox)))
    group_bytes = matrices.group_param_bytes(group)  # this rank's rows
    for k, stack in enumerate(group.stacks):
        whole = (stack.global_rows, stack.shape[1])
        chunks = matrices.call_chunks(stack.per_owner, rule.call_bytes(whole, group.key.dtype), group_bytes)
        for first, count in chunks:
            which = f" ({first}..{first + count - 1} of {stack.per_owner})" if len(chunks) > 1 else ""
            calls.append(Call(
                f"Muon: orthogonalize the owned {whole[0]}x{whole[1]} matrices{which}, group {g}", COMPILED,
                orthogonalize, (gb.inboxes[k].narrow(1, first, count), buffers.hp_rows[g]),
                dict(whole=rule.Whole(stack.global_rows), variant=var),
                _function_name(rule.orthogonalize), ("orthogonalize", rule.NAME, var, plan.device.type)))
    calls.append(Call(f"all_to_all over {exchange.label!r}: {shape} (their rows back)", COLLECTIVE,
                      collectives.exchange, (exchange, gb.inbox, gb.outbox)))
    for k, stack in enumerate(group.stacks):
        slots = buffers.table[stack.first_slot:stack.first_slot + len(stack.members)].detach()
        calls.append(Call(f"Muon: apply the rows of {len(stack.members)} matrices, group {g}", COMPILED, apply,
                          (gb.stack_params[k], buffers.hp_rows[g], slots, buffers.lr_ratios[g][k], gb.outboxes[k]),
                          {}, _function_name(rule.apply_matrices), ("apply_matrices", rule.NAME) + dtypes))
    return calls


# ---------------------------------------------------------------------- the calls' arguments


@dataclass(frozen=True)
class StochasticRounding:
    """What ``FusedStepConfig.stochastic_rounding`` asks for: which bfloat16 stores round stochastically, and the
    run's seed. Each update call gets its own ``rules.common.Rounding``, whose seed mixes the run's with the
    call's place in the program (the same on every rank of a replicated plan), so no two calls share a stream."""

    params: bool
    state: bool
    seed: int

    def applies(self, param_dtype: torch.dtype, state_dtypes: tuple) -> bool:
        """Whether a group of these dtypes has a bfloat16 store to round stochastically."""
        return (self.params and param_dtype == torch.bfloat16) or (self.state and torch.bfloat16 in state_dtypes)

    def for_call(self, group: int, call: int, device: torch.device, own: bool = False) -> Rounding:
        """Call ``call`` of group ``group``'s rounding; ``own``: its optimizer rounds its params itself."""
        mixed = (self.seed * 0x9E3779B1 + (group * 65536 + call) * 0x85EBCA77) & 0x7FFFFFFF
        return Rounding(torch.tensor([mixed], dtype=torch.int64).to(device), self.params or own, self.state)


def _flat_kwargs(gb: storage.GroupBuffers, buffers: storage.StepBuffers, rule, var) -> dict:
    group = gb.group
    rows = group.flat_rows
    slots = slice(group.first_slot, group.first_slot + group.flat_slots)
    state = {k: buf[:rows].detach() for k, buf in gb.state.items()}
    return dict(row_slot=gb.row_slot, table=buffers.table[slots].detach(), counts=buffers.counts[slots].detach(),
                **state_kwargs(rule, var, state))


def _matrix_args(gb: storage.GroupBuffers, g: int, k: int, buffers: storage.StepBuffers, first: int,
                 count: int) -> tuple:
    """The arguments of one call over matrices ``first .. first + count - 1`` of stack ``k``."""
    stack = gb.group.stacks[k]
    slots = slice(stack.first_slot + first, stack.first_slot + first + count)
    return (gb.stack_params[k].narrow(0, first, count), gb.stack_grads[k].narrow(0, first, count),
            buffers.hp_rows[g], buffers.table[slots].detach(), buffers.lr_ratios[g][k])


def _stack_counts(gb: storage.GroupBuffers, k: int, buffers: storage.StepBuffers, first: int,
                  count: int) -> torch.Tensor:
    """The counts of matrices ``first .. first + count - 1`` of stack ``k`` (Adafactor's steps; Muon keeps none)."""
    start = gb.group.stacks[k].first_slot + first
    return buffers.counts[start:start + count].detach()


def _bucket_args(gb: storage.GroupBuffers, rule, var, buffers: storage.StepBuffers,
                 fillers: buckets.Fillers) -> list[tuple[tuple, dict]]:
    """Prebuilt (args, kwargs) of every bucket call of the group: lists padded to ``bucket_size``."""
    group, size = gb.group, buffers.plan.bucket_size
    keys = rule.state_keys(var) if group.bucket_count else ()
    key = group.key
    dtypes = {"params": key.dtype, "grads": key.grad_dtype, "external_grads": key.grad_dtype,
              **{k: gb.state_layout[k].dtype for k in keys}}
    calls = []
    for b in range(group.bucket_count):
        members = [i for i in group.bucketed[b * size:(b + 1) * size] if i is not None]
        entries = [group.entries[i] for i in members]
        external = bool(entries) and entries[0].external  # a bucket is all external or none
        params = [storage.flat_alias(gb.locals[i]) for i in members]
        grads = [gb.external_flat[i] if external else storage.flat_slice(gb.grads, e.row, e.numel)
                 for i, e in zip(members, entries)]
        state = {k: [gb.state_slice(k, i) for i in members] for k in keys}
        if len(members) < size:
            filler = fillers.get(key.device, dtypes, size)
            params = buckets.padded(params, filler["params"], size)
            grads = buckets.padded(grads, filler["external_grads" if external else "grads"], size)
            state = {k: buckets.padded(v, filler[k], size) for k, v in state.items()}
        first = group.bucket_first_slot(b)
        slots = slice(first, first + size)
        amax = buffers.amax[slots].detach() if key.fp8 else None
        calls.append(((params, grads), dict(table=buffers.table[slots].detach(), counts=buffers.counts[slots].detach(),
                                            amax=amax, **state_kwargs(rule, var, state))))
    return calls


def external_grad_buckets(gb: storage.GroupBuffers, size: int, fillers: buckets.Fillers) -> list[list[torch.Tensor]]:
    """A group's external grads in lists of ``size`` (the last one padded), for Phase A."""
    grads = [gb.external_flat[i] for i in gb.group.external]
    filler = fillers.get(gb.group.key.device, {"external_grads": gb.group.key.grad_dtype}, size)
    return [buckets.padded(grads[r.start:r.stop], filler["external_grads"], size)
            for r in buckets.chunk(len(grads), size)]


def copy_staged_in(gb: storage.GroupBuffers) -> None:
    """Before the flat update: the staged params' current values into their rows of the param buffer."""
    torch._foreach_copy_([gb.param_views[i] for i in gb.staged], [gb.locals[i] for i in gb.staged])


def copy_staged_out(gb: storage.GroupBuffers) -> None:
    """After it: the updated rows back into the staged params."""
    torch._foreach_copy_([gb.locals[i] for i in gb.staged], [gb.param_views[i] for i in gb.staged])


OP_NAMES = {"sum": "SUM", "max": "MAX", "scaled": "MAX then SUM"}  # the collectives of a norm kind, for labels


def members_index(plan, reduction) -> torch.Tensor | None:
    """The rows of the partials a reduction reduces: None for all of them (no index_select needed)."""
    members = reduction.members
    return None if members == list(range(len(plan.groups))) else torch.tensor(members, device=plan.device)


def _collectives(plan, buffers: storage.StepBuffers, kind: NormKind, rows=None) -> list[Call]:
    """One collective per process group over its member groups' partials, in place; with PP, the groups
    combined and reduced over the pipeline axis. With ``rows`` (``param_norms``), each collective carries
    the member groups' per-param rows too, in the same stacked tensor, where it reduces over shards of
    those params (a mesh dim they are sharded over): no collective more. Over EP (different experts on
    different ranks) and PP (different stages' params) a param's partial is already whole."""
    calls = []
    op = OP_NAMES[kind.kind]
    for reduction in plan.reductions:
        members, index = reduction.members, members_index(plan, reduction)
        shape = f"f64[{len(members)}, {storage.PARTIAL_WIDTH}]"
        what = f"partial norms of groups {members}"
        args = (reduction, kind, buffers.partials, index, buffers.order)
        if rows is not None:
            param_rows = [r for m in members for r in rows.region(plan, m)] if reduction.over_shards else []
            param_index = torch.tensor(param_rows, dtype=torch.int64, device=plan.device) if param_rows else None
            shape = f"f64[{len(members)} + {len(param_rows)}, {storage.PARTIAL_WIDTH}]"
            what += f" and of {len(param_rows)} param rows"
            args += (rows.partials, param_index)
        calls.append(Call(f"all_reduce({op}) over {reduction.label!r}: {shape} ({what})", COLLECTIVE,
                          collectives.reduce_partials_over, args))
    if plan.pp is not None:
        calls.append(Call("combine the groups' partials", EAGER, _combine_into,
                          (kind, buffers.partials, buffers.pp_partial, buffers.order)))
        calls.append(Call(f"all_reduce({op}) over 'pp': f64[1, {storage.PARTIAL_WIDTH}] (combined partial norm)",
                          COLLECTIVE, collectives.reduce_partials_over,
                          (plan.pp, kind, buffers.pp_partial, None, buffers.order)))
    return calls


def _combine_into(kind: NormKind, partials: torch.Tensor, out: torch.Tensor, order: torch.Tensor) -> None:
    out.copy_(combine(kind.kind, partials, order if kind.kind == "scaled" else kind.p)[None])
