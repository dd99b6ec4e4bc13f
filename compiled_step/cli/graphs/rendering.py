"""The text of one graph file: the summary, the plan, where the collectives sit between the graphs, and
per graph its inputs, outputs, Inductor's scheduler nodes, the Dynamo FX graph and the post-grad ATen graph."""

from __future__ import annotations

from collections.abc import Sequence

from compiled_step.cli.graphs.capturing import Capture, capture_references
from compiled_step.cli.graphs.goldens import HEADER_MARK
from compiled_step.cli.graphs.normalize import normalize_graph_code
from compiled_step.cli.graphs.recording import CaptureSession, CompiledGraph, InputInfo


def phase(function: str) -> str:
    """Where a compiled function sits in the step: Phase A, finish or Phase B."""
    if function.startswith("norm.partials."):
        return "Phase A"
    if function.startswith("norm.finish."):
        return "finish"
    if function.startswith("rules."):
        return "Phase B"
    return "compiled"


def _per_phase(cap: Capture) -> dict[str, int]:
    per_phase: dict[str, int] = {}
    for g in cap.graphs:
        per_phase[phase(g.function)] = per_phase.get(phase(g.function), 0) + 1
    return per_phase


def _bpp_text(cap: Capture) -> str:
    bpp = cap.bytes_per_param
    if bpp is None:
        return cap.bytes_per_param_note or "n/a"
    return f"{bpp.value:.2f}"


def summary_numbers(cap: Capture) -> str:
    """The headline numbers of a capture in one line (pinned inline by the tests)."""
    bpp = cap.bytes_per_param
    return (
        f"graphs={len(cap.graphs)} ({', '.join(f'{k}: {v}' for k, v in _per_phase(cap).items())}) "
        f"recompiles_step2={cap.recompiles_step2} graph_breaks={len(cap.graph_breaks)} "
        f"kernels={[g.kernels for g in cap.graphs]} bytes_per_param={'n/a' if bpp is None else f'{bpp.value:.2f}'}"
    )


def schedule_lines(cap: Capture) -> list[str]:
    """Step 1's calls in order, numbered, consecutive identical calls folded: where the collectives sit."""
    rows: list[tuple[str, str]] = []
    for event in cap.events:
        if event.kind == "compiled":
            g = cap.graphs[event.graph]
            rows.append((phase(g.function), f"{event.text}  [graph {event.graph + 1}: {g.function}]"))
        elif event.kind == "break":
            rows.append(("ERROR", event.text))
        elif event.kind == "not run":
            rows.append(("compiled", f"{event.text}  (not run)"))
        else:
            rows.append((event.kind, event.text))
    lines, i = [], 0
    while i < len(rows):  # consecutive identical rows are folded
        j = i
        while j < len(rows) and rows[j] == rows[i]:
            j += 1
        where, what = rows[i]
        lines.append(f"{len(lines) + 1:2d}. {where:<10} {what}" + (f" (x{j - i})" if j - i > 1 else ""))
        i = j
    if not any(e.kind == "collective" for e in cap.events) and not cap.graph_breaks:
        lines.append("    (no collective: plan.reductions is empty and plan.pp is None)")
    return lines


def _concrete(info: InputInfo) -> str:
    if not info.symbolic or not info.sizes:
        return ""
    shapes = [" x ".join(str(s) for s in shape) or "scalar" for shape in info.sizes]
    if len(shapes) > 1:
        return f"  ({'each ' + shapes[0] if len(set(shapes)) == 1 else ', '.join(shapes)} at compile time)"
    return f"  ({shapes[0]} at compile time)"


def _inputs_lines(g: CompiledGraph) -> list[str]:
    width = max((len(i.name) for i in g.inputs), default=0)
    lines = []
    for info in g.inputs:
        count = f"{info.count} x " if info.count > 1 else ""
        access = "read, written in place" if info.written else "read"
        lines.append(f"  {info.name:<{width}}  {count}{info.dtype}{info.shape}  {access}{_concrete(info)}")
    return lines


def _nodes_line(g: CompiledGraph) -> str:
    groups: dict[tuple[int, int], int] = {}
    for node in g.nodes:
        groups[node] = groups.get(node, 0) + 1
    parts = [f"{n} x ({ops} op{'s' if ops != 1 else ''}, {b:,} B)" for (ops, b), n in groups.items()]
    return f"Inductor scheduler nodes: {len(g.nodes)}: " + ", ".join(parts)


def _per_element(num: int, den: int) -> str:
    return f"{num / den:.2f}" if den else "n/a"


def render(cap: Capture, *, keep_source: bool = False) -> str:
    """The text of one graph file."""
    out = [
        f"{HEADER_MARK}: {cap.name}",
        *cap.generated_by,
        "#",
        *[f"# {line}" for line in cap.header],
        "",
        "== Summary ==",
        f"graphs compiled: {len(cap.graphs)} (" + ", ".join(f"{k}: {v}" for k, v in _per_phase(cap).items()) + ")",
    ]
    if cap.recompiles_step2 is not None:
        out.append(f"graphs compiled by step 2 (lr halved, new grads): {cap.recompiles_step2}")
    out.append(f"graph breaks: {len(cap.graph_breaks)}" + (" (fullgraph=True)" if not cap.graph_breaks else ""))
    out += [f"  - {reason}" for reason in cap.graph_breaks]
    total_kernels = sum(g.kernels for g in cap.graphs)
    out.append(f"kernels (Inductor's generated_kernel_count): {total_kernels} = "
               + " + ".join(f"{g.kernels} (graph {i + 1})" for i, g in enumerate(cap.graphs)))
    out.append("bytes accessed (Inductor's num_bytes_accessed, at its size hints: a flat buffer's rows at ROWS_HINT):")
    for i, g in enumerate(cap.graphs):
        per = (f"for {g.elements:,} grad elements = {_per_element(g.bytes_accessed, g.elements)} B/element"
               if g.elements else "(no grad input)")
        out.append(f"  graph {i + 1} {phase(g.function)} {g.function}: {g.bytes_accessed:,} B {per}")
    bpp = cap.bytes_per_param
    if bpp is None:
        out.append(f"bytes per parameter: {_bpp_text(cap)}")
    else:
        out.append(f"bytes per parameter (graph {bpp.phase_a + 1} Phase A + graph {bpp.update + 1} {bpp.update_kind} "
                   f"of the large params, group {bpp.group}, over its {bpp.elements:,} grad elements): {bpp.value:.2f}")
    out += ["", "== Sharding groups and reductions (the plan) ==", *cap.plan_lines]
    out += ["", "== Where the collectives sit (step 1, fused.program.calls in the order it ran) ==",
            *schedule_lines(cap)]
    for i, g in enumerate(cap.graphs):
        labels = [e.text for e in cap.events if e.kind == "compiled" and e.graph == i]
        out += [
            "",
            f"== Graph {i + 1}: {phase(g.function)}, {g.function} ==",
            f"graph constants (the call's keyword arguments): {g.constants or 'none'}",
            f"calls in step 1: {len(labels)}" + (f" ({'; '.join(labels)})" if labels else ""),
            "inputs (n: a symbolic size per list element; sizes at compile time in parentheses):",
            *_inputs_lines(g),
            "outputs: " + (", ".join(g.outputs) if g.outputs else "none (results are written into the inputs in place)"),
            f"kernels: {g.kernels}; bytes accessed: {g.bytes_accessed:,}",
            _nodes_line(g),
            "",
            "-- Dynamo FX graph --",
            normalize_graph_code(g.dynamo_code, keep_source=keep_source).rstrip("\n"),
            "",
            "-- Post-grad ATen graph (Inductor) --",
            normalize_graph_code(g.post_grad_code, keep_source=keep_source).rstrip("\n"),
        ]
    return "\n".join(out) + "\n"


def render_references(names: Sequence[str] | None = None, sess: CaptureSession | None = None) -> dict[str, str]:
    """``{file name: text}`` for the reference configurations."""
    return {f"{name}.txt": render(cap) for name, cap in capture_references(names, sess).items()}
