"""A run's graphs (``python -m compiled_step demo`` writes them): the capture re-run on synthetic tensors
that select the run's graphs, next to the run's own plan and program, plus Inductor's generated code."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from compiled_step.cli.graphs.capturing import capture, plan_lines
from compiled_step.cli.graphs.goldens import HEADER_MARK
from compiled_step.cli.graphs.normalize import normalize_text
from compiled_step.cli.graphs.recording import CaptureSession
from compiled_step.cli.graphs.references import Reference, Setup, plain_layout
from compiled_step.cli.graphs.rendering import render


def _synthetic_setup(sel: dict) -> Setup:
    """Plain 1-D tensors that select the graphs of one selection of a run's groups, at the sizes of the
    run's first flat region and first bucket of that selection, and the header lines saying so (plain
    matrices for a matrix rule's selection: ``_synthetic_matrices``)."""
    if sel["stacks"]:
        return _synthetic_matrices(sel)
    dtype, grad_dtype, device, fp8 = sel["dtype"], sel["grad_dtype"], sel["device"], sel["fp8"]
    flat = sel["flat"][1] if sel["flat"] else []
    bucket = sel["bucket"][1] if sel["bucket"] else []
    notes = []
    if fp8:  # FP8 weights are bucketed whatever their size (empty ones staged), as in the run
        kwargs: dict[str, Any] = {}
    elif not bucket:  # plain tensors, aliased as in the run
        kwargs = dict(flat_params=True)
    else:  # not aliased: staged up to pack_threshold, bucketed above it
        threshold = max(flat, default=0)
        if any(n <= threshold for n in bucket):
            notes.append(f"bucket sizes raised to at least {threshold + 1:,} elements so that the flat region's "
                         f"params ({threshold:,} elements at most) and the bucket's separate by pack_threshold")
            bucket = [max(n, threshold + 1) for n in bucket]
        kwargs = dict(flat_params=False, pack_threshold=threshold)
    setup = plain_layout(dtype, device, [(n,) for n in flat + bucket], grad_dtype=grad_dtype)
    if fp8:
        kwargs["fp8_weights"] = list(setup.params)
    setup.fused_kwargs = kwargs
    where = []
    if sel["flat"]:
        where.append(f"the flat region of the run's group {sel['flat'][0]} ({len(flat)} params)")
    if sel["bucket"]:
        where.append(f"the first bucket of the run's group {sel['bucket'][0]} ({len(bucket)} params)")
    setup.notes = [
        f"synthetic plain 1-D tensors of the sizes of {' and '.join(where)}, selecting the graphs of the run's groups "
        f"{sel['groups']} (hyperparameters of param group {sel['param_groups'][0]}); "
        + ("FP8 weights (fp8_weights=)" if fp8 else ", ".join(f"{k}={v}" for k, v in kwargs.items())),
        *notes,
        "the run's collectives are those of its plan and program, below (this capture runs in one process and "
        "issues none)",
    ]
    return setup


def _synthetic_matrices(sel: dict) -> Setup:
    """Plain matrices of the shapes and counts of the stacks of the selection's first matrix group
    (whole matrices: a row-sharded group's global shapes), aliased as in an unsharded run."""
    g, stacks = sel["stacks"]
    shapes = [shape for shape, count in stacks for _ in range(count)]
    setup = plain_layout(sel["dtype"], sel["device"], shapes, grad_dtype=sel["grad_dtype"])
    setup.fused_kwargs = dict(flat_params=True)
    described = ", ".join(f"{count} x {'x'.join(map(str, shape))}" for shape, count in stacks)
    setup.notes = [
        f"synthetic plain matrices of the shapes of the stacks of the run's group {g} ({described}), selecting the "
        f"graphs of the run's groups {sel['groups']} (hyperparameters of param group {sel['param_groups'][0]})",
        *(["the run's matrices are row-sharded: its program (above) runs prepare_matrices, orthogonalize and "
           "apply_matrices around two all_to_all; this one-process capture shows update_matrices of the whole "
           "matrices instead, the same Newton-Schulz on the same shapes"] if sel["sharded"] else []),
        "the run's collectives are those of its plan and program, below (this capture runs in one process and "
        "issues none)",
    ]
    return setup


def dump_run_graphs(out_dir, fused) -> list[Path]:
    """Write the graphs of an existing FusedStep's configuration into ``out_dir/graphs/``.

    The run's compiled graphs are not recorded while it trains (it uses the ordinary Inductor
    backend), so this re-runs the capture on synthetic tensors that select the same graphs: per
    distinct (update variant, dtype, grad dtype, device, FP8) of the run's sharding groups, the run's
    optimizer class and hyperparameters, bucket size, norm type and clipping, with tensors of the
    sizes of the first flat region and the first bucket of such a group, so the flat update and the
    bucket update compile at the run's sizes. The run's own plan and program (its sharding groups
    and the collectives between the graphs) are written next to them. Nothing of the run changes:
    its params, grads and state are not touched. Also writes Inductor's generated code
    (``*.output_code.py``), which depends on the machine.

    Uses FusedStep's public API only (``plan``, ``program``, ``config``, ``optimizers``, ``rules``).
    With several optimizers, each selection is captured with the optimizer its param groups belong to;
    a matrix rule's (Muon's) on plain matrices of its stacks' shapes.
    Returns the paths written. With ``compile=False`` the run compiled nothing: the file says so.
    """
    out = Path(out_dir) / "graphs"
    out.mkdir(parents=True, exist_ok=True)
    plan, program, cfg = fused.plan, fused.program, fused.config
    run_lines = ["(the run's plan)", *(plan_lines(plan) if plan is not None else ["none: the run never stepped"])]
    if program is not None:
        run_lines += ["(the run's program: fused.program.describe())", *program.describe()]
    if not cfg.compile or plan is None:
        return [_write_nothing_compiled(out, compiled=cfg.compile, run_lines=run_lines)]
    paths = []
    run_session = CaptureSession()  # never the reference session: these graphs compile at the run's sizes
    for sel in _selections(fused).values():
        paths += _capture_selection(out, fused, sel, run_session, run_lines)
    return paths


def _write_nothing_compiled(out: Path, *, compiled: bool, run_lines: list[str]) -> Path:
    """run.txt for a run that compiled no graph: compile=False, or it never stepped."""
    why = ("This run used FusedStep(compile=False): the same functions ran eagerly, no graph was compiled."
           if not compiled else "This run never stepped: no graph was compiled.")
    path = out / "run.txt"
    path.write_text("\n".join([
        f"{HEADER_MARK}: run",
        f"# {why}",
        "",
        "== Sharding groups and reductions (the run's plan) ==",
        *run_lines,
    ]) + "\n")
    return path


def _selections(fused) -> dict[tuple, dict]:
    """The run's groups by graph selection, (optimizer class, update variant, dtype, grad dtype, device,
    FP8): each with its optimizer and param group, the run's group indices, and the sizes of its first
    flat region and first bucket (or its first matrix group's stacks)."""
    plan = fused.plan
    param_groups = [pg for optimizer in fused.optimizers for pg in optimizer.param_groups]
    owners = [optimizer for optimizer in fused.optimizers for _ in optimizer.param_groups]
    selections: dict[tuple, dict] = {}
    for g, group in enumerate(plan.groups):
        key = group.key
        pg, rule, optimizer = param_groups[key.param_group], fused.rules[key.param_group], owners[key.param_group]
        sel = selections.setdefault(
            (type(optimizer), rule.variant(optimizer, pg), key.dtype, key.grad_dtype, str(key.device), key.fp8),
            dict(optimizer=optimizer, pg=pg, variant=rule.variant(optimizer, pg), dtype=key.dtype, grad_dtype=key.grad_dtype,
                 device=key.device, fp8=key.fp8, param_groups=[], groups=[], flat=None, bucket=None, stacks=None,
                 sharded=False))
        sel["param_groups"].append(key.param_group)
        sel["groups"].append(g)
        if sel["stacks"] is None and group.stacks:
            sel["stacks"] = (g, [(s.whole_shape, len(s.members)) for s in group.stacks])
            sel["sharded"] = group.exchange is not None
        if sel["flat"] is None and group.flat:
            sel["flat"] = (g, [group.entries[i].numel for i in group.flat])
        if sel["bucket"] is None and group.bucketed:
            sel["bucket"] = (g, [group.entries[i].numel for i in group.bucketed[:plan.bucket_size]])
    return selections


_WRITTEN_BY = ("# Written by compiled_step.cli.graphs.dump_run_graphs(out_dir, fused) for one run (not a golden: "
               "source lines are kept as comments).")


def _capture_selection(out: Path, fused, sel: dict, run_session: CaptureSession, run_lines: list[str]) -> list[Path]:
    """Capture one selection's graphs on synthetic tensors; write its file and each graph's generated code."""
    optimizer, cfg = sel["optimizer"], fused.config
    accepted = set(inspect.signature(type(optimizer)).parameters) - {"params", "foreach", "fused"}
    hyper = tuple((k, v) for k, v in sorted(sel["pg"].items()) if k in accepted)
    dtype_name = str(sel["dtype"]).replace("torch.", "")
    variant = sel["variant"]
    flags = [name for name, on in zip(getattr(variant, "_fields", ()), variant) if on is True]
    grads = str(sel["grad_dtype"]).replace("torch.", "")
    name = "-".join(["run", type(optimizer).__name__.lower(), dtype_name,
                     *([f"grads_{grads}"] if sel["grad_dtype"] != sel["dtype"] else []), *flags,
                     *(["fp8"] if sel["fp8"] else [])])
    ref = Reference(name, f"this run's {type(optimizer).__name__} graphs ({dtype_name})", type(optimizer), hyper,
                    dtype=sel["dtype"], max_grad_norm=cfg.max_grad_norm, norm_type=cfg.norm_type, family=name)
    rules = tuple(dict.fromkeys(fused.rules))
    extra = ([f"the run's finish fills the scalars of every rule ({', '.join(r.NAME for r in rules)}) in one graph; "
              f"this capture's finish has this selection's rule only"] if len(rules) > 1 else [])
    cap = capture(ref, run_session, bucket_size=cfg.bucket_size, setup=_synthetic_setup(sel), extra_header=extra,
                  generated_by=[_WRITTEN_BY])
    cap.plan_lines = [*run_lines, "(this capture's plan)", *cap.plan_lines]
    path = out / f"{name}.txt"
    path.write_text(render(cap, keep_source=True))
    paths = [path]
    for i, g in enumerate(cap.graphs):
        code_path = out / f"{name}.graph{i + 1}.output_code.py"
        code_path.write_text(normalize_text(g.output_code))
        paths.append(code_path)
    return paths
