"""The bench's outputs: the bench.md tables, results.csv and compile_times.csv records, results.json,
bench.png, and BENCHMARKS.md (whose method section is the bench package's docstring)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from compiled_step.cli.bench.compile_time import CompileResult
from compiled_step.cli.bench.goals import NO_VERDICT, Goal, best_round, ms_text
from compiled_step.cli.bench.methods import describe_method
from compiled_step.cli.bench.rows import TINY_ROWS, RowResult

OUTPUT_FILES = ("bench.md", "results.csv", "compile_times.csv", "results.json", "bench.png")


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def methods_legend(rows: list[RowResult], *, compiled: bool = True) -> list[str]:
    """``name: description`` for every method in ``rows``, in table order (anchors A-D, FusedStep)."""
    names = list(dict.fromkeys(m.method for r in rows for m in r.methods))
    return [f"{n}: {describe_method(n, compiled=compiled)}" for n in names]


def markdown_tables(rows: list[RowResult], compile_results: list[CompileResult], goals: list[Goal],
                    machine: dict, *, compiled: bool = True, quick: bool = False) -> str:
    out = []
    if quick:
        out.append("_--quick: tiny layouts and few rounds, to check the plumbing. The figures are reported "
                   "but not judged: at these sizes they swing from run to run, so no goal gets a met/gap "
                   "verdict._\n")
    out.append("| goal | target | measured | status |\n|---|---|---|---|")
    out += [f"| {g.name} | {g.target} | {g.measured} | **{g.status}** |" for g in goals]
    out.append("")
    out.append("Methods (every speedup is relative to anchor B):\n")
    out += [f"- **{line.split(': ', 1)[0]}**: {line.split(': ', 1)[1]}" for line in methods_legend(rows, compiled=compiled)]
    out.append("")
    cuda = any(m.kernel_launches is not None for r in rows for m in r.methods)
    for r in rows:
        threads = (f" {r.threads} thread (torch.set_num_threads({r.threads})): host work only."
                   if r.key in TINY_ROWS else f" {r.threads} threads.")
        out.append(
            f"**{r.key}**: {r.optimizer} {r.dtype}, {r.layout}, {r.n_params / 1e6:.2f} M params in "
            f"{r.n_tensors} tensors. Floor {_bpp(r.bytes_per_param)} B/param x {r.n_params / 1e6:.2f} M at "
            f"{r.bandwidth_gbps:.1f} GB/s (medians of per-round best triads: STREAM a = b + s*c "
            f"{r.stream_gbps:.1f}, in-place a += s*c {r.in_place_gbps:.1f}; best round {r.best_bandwidth_gbps:.1f}) "
            f"= {ms_text(r.floor_s)} ms. {len(r.methods[0].times_s)} rounds.{threads}\n")
        launches_head, launches_rule = (" kernel launches/step |", "---:|") if cuda else ("", "")
        out.append("| method | median ms | IQR ms | min ms | speedup vs B (t_B/t) | fraction of roofline | "
                   f"peak extra MiB | max abs diff vs B | ATen ops/step | compiled calls/step |{launches_head}\n"
                   f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|{launches_rule}")
        for m in r.methods:
            launches = ""
            if cuda:
                launches = " - |" if m.kernel_launches is None else (
                    f" {m.kernel_launches}" + (f" ({m.graph_launches} graph)" if m.graph_launches else "") + " |")
            out.append(
                f"| {m.method} | {ms_text(m.median_s)} | {ms_text(m.iqr_s)} | {ms_text(min(m.times_s))} | {m.speedup_vs_b:.2f}x | "
                f"{m.roofline_fraction:.2f} | {_mib(m.peak_extra_bytes)} | {m.max_abs_diff_vs_b:.1e} | "
                f"{_fmt_num(m.aten_ops)} | {_fmt_num(m.compiled_calls)} |{launches}")
        out += [f"\n_{n}_" for n in r.notes]
        out.append("")
    if compile_results:
        out.append("Compile time of the first `fused.step()` (fresh subprocess; cold: empty Inductor cache "
                   "dir; warm: the same dir again). AdamW fp32, tensors of varied sizes around 4096.\n")
        out.append("| tensors | cold s | warm s | graphs (cold) | graphs (warm) | graphs at 2nd step | "
                   "steady step ms | note |\n|---:|---:|---:|---:|---:|---:|---:|---|")
        for c in compile_results:
            note = c.error or ("" if c.compiled else "compile=False: plumbing only, not a compile time")
            out.append(
                f"| {c.n_tensors} | {_fmt_num(c.cold_s)} | {_fmt_num(c.warm_s)} | {_fmt_num(c.graphs_cold)} | "
                f"{_fmt_num(c.graphs_warm)} | {_fmt_num(c.second_step_graphs)} | {_fmt_num(c.steady_ms)} | {note} |")
        out.append("")
    return "\n".join(out)


def _bpp(x: float) -> str:
    """Floor bytes per param: an integer for one optimizer, a mean over the params for Muon + AdamW."""
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def _fmt_num(x) -> str:
    if x is None:
        return "-"
    return str(x) if isinstance(x, int) else f"{x:.2f}"


RESULT_FIELDS = [
    "device", "row", "optimizer", "dtype", "layout", "n_params", "n_tensors", "method", "median_ms", "iqr_ms",
    "min_ms", "rounds", "speedup_vs_b", "bytes_per_param", "bandwidth_gbps", "floor_ms", "roofline_fraction",
    "stream_triad_gbps", "in_place_triad_gbps", "best_bandwidth_gbps", "best_round_roofline_fraction",
    "best_round_speedup_vs_b",
    "peak_extra_bytes", "max_abs_diff_vs_b", "graphs_compiled", "graphs_during_timing", "threads",
    "aten_ops", "compiled_calls", "kernel_launches", "graph_launches",
]


def result_records(rows: list[RowResult], device: torch.device) -> list[dict]:
    recs = []
    for r in rows:
        for m in r.methods:
            recs.append(dict(
                device=str(device), row=r.key, optimizer=r.optimizer, dtype=r.dtype, layout=r.layout,
                n_params=r.n_params, n_tensors=r.n_tensors, method=m.method, median_ms=m.median_s * 1e3,
                iqr_ms=m.iqr_s * 1e3, min_ms=min(m.times_s) * 1e3, rounds=len(m.times_s),
                speedup_vs_b=m.speedup_vs_b, bytes_per_param=r.bytes_per_param,
                bandwidth_gbps=r.bandwidth_gbps, floor_ms=r.floor_s * 1e3,
                best_bandwidth_gbps=r.best_bandwidth_gbps, stream_triad_gbps=r.stream_gbps,
                in_place_triad_gbps=r.in_place_gbps,
                best_round_roofline_fraction=best_round(r, m)[0], best_round_speedup_vs_b=best_round(r, m)[1],
                roofline_fraction=m.roofline_fraction, peak_extra_bytes=m.peak_extra_bytes,
                max_abs_diff_vs_b=m.max_abs_diff_vs_b, graphs_compiled=m.graphs_compiled,
                graphs_during_timing=m.graphs_during_timing, threads=r.threads, aten_ops=m.aten_ops,
                compiled_calls=m.compiled_calls, kernel_launches=m.kernel_launches, graph_launches=m.graph_launches,
            ))
    return recs


def write_csv(path: Path, records: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for rec in records:
            w.writerow({k: ("" if rec.get(k) is None else rec[k]) for k in fields})


COMPILE_FIELDS = ["n_tensors", "compiled", "cold_s", "warm_s", "graphs_cold", "graphs_warm",
                  "second_step_graphs", "steady_ms", "error"]


def write_png(path: Path, rows: list[RowResult], compile_results: list[CompileResult], device_name: str,
              *, compiled: bool = True) -> list[str]:
    """Draw bench.png; returns the legend's lines (``name: description`` per method)."""
    import matplotlib  # noqa: PLC0415 -- lazy: only the bench needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    has_compile = any(c.cold_s is not None for c in compile_results)
    methods = list(dict.fromkeys(m.method for r in rows for m in r.methods))
    legend = methods_legend(rows, compiled=compiled)
    # The legend spells out every method (anchors A-D, FusedStep) below the panels, one per line.
    legend_in = 0.2 * len(legend) + 0.2
    height = 4.5 + legend_in
    fig, axes = plt.subplots(1, 3 if has_compile else 2, figsize=(16 if has_compile else 11, height))
    width = 0.8 / max(1, len(methods))
    for ax, attr, title in ((axes[0], "roofline_fraction", "fraction of bandwidth roofline (higher is better)"),
                            (axes[1], "speedup_vs_b", "speedup vs anchor B, t_B / t (higher is better)")):
        for j, name in enumerate(methods):
            xs, ys = [], []
            for i, r in enumerate(rows):
                m = r.method(name)
                if m is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(getattr(m, attr))
            ax.bar(xs, ys, width, label=name, color=f"C{j}")
        ax.set_xticks(range(len(rows)), [r.key for r in rows])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
    # Ratios: 2x and 0.5x are equally far from 1, and one slow anchor must not flatten every other bar.
    axes[1].set_yscale("log")
    fig.legend([Patch(color=f"C{j}") for j in range(len(methods))], legend, loc="lower left",
               bbox_to_anchor=(0.01, 0.0), ncol=1, fontsize=8, frameon=False)
    if has_compile:
        ax = axes[2]
        ok = [c for c in compile_results if c.cold_s is not None]
        ax.plot([c.n_tensors for c in ok], [c.cold_s for c in ok], "o-", label="cold")
        okw = [c for c in ok if c.warm_s is not None]
        ax.plot([c.n_tensors for c in okw], [c.warm_s for c in okw], "s-", label="warm")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)  # flat lines near the goal read as a trend without the zero
        ax.set_xlabel("parameter tensors")
        ax.set_ylabel("first fused.step() s")
        ax.set_title("FusedStep compile time", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"compiled_step bench on {device_name}", fontsize=11)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return legend


def benchmarks_md(command: str, machine: dict, tables: str, goals: list[Goal], started: str,
                  duration_s: float) -> str:
    gaps = [g for g in goals if g.status == "gap"]
    unjudged = any(g.status == NO_VERDICT for g in goals)
    lines = [
        "# Benchmarks",
        "",
        "Generated by the bench command below; do not edit by hand, rerun it. Numbers come from one process, "
        "with the methods interleaved round by round and the median reported; this machine is shared and "
        "noisy, so compare ratios measured side by side rather than absolute times across runs.",
        "",
        "```",
        command,
        "```",
        "",
        "## Machine",
        "",
        f"- device: `{machine['device']}` ({machine['device_name']})",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_cores']} cores available, "
        f"torch intra-op threads {machine['torch_threads']}",
        f"- torch {machine['torch']}, Python {machine['python']}, {machine['platform']}",
        f"- run started {started}, took {duration_s / 60:.1f} min; 1-minute load average "
        f"{fmt_load(machine.get('load_average_at_start'))} at the start and "
        f"{fmt_load(machine.get('load_average_at_end'))} at the end (anything well above 0 means other "
        "processes shared the cores while this ran)",
        f"- Inductor cache: {machine.get('inductor_cache', 'default')}",
        f"- compiled_step source: {machine.get('source', 'unknown')}",
        "",
        "## Results",
        "",
        tables,
        "## Gaps",
        "",
    ]
    if gaps:
        lines += [f"- **{g.name}**: measured {g.measured}, target {g.target}." for g in gaps]
    elif unjudged:
        lines.append("- not judged: a --quick run gives figures only.")
    else:
        lines.append("- none among the goals measured here.")
    lines += ["", "## Method", "", _method_text(), ""]
    return "\n".join(lines)


def fmt_load(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _method_text() -> str:
    # The bench package's docstring (compiled_step/cli/bench/__init__.py) is BENCHMARKS.md's method
    # section, so the two cannot drift apart.
    from compiled_step.cli import bench  # noqa: PLC0415 -- the package imports this module first

    doc = bench.__doc__ or ""
    body = doc.split("\n\n", 1)[1] if "\n\n" in doc else doc
    return body.strip()


def results_json(command: str, machine: dict, started: str, duration_s: float, rows: list[RowResult],
                 compile_results: list[CompileResult], goals: list[Goal], step_memory: list = ()) -> str:
    """results.json: the command, the machine, every row with its methods, compile times, the step-memory
    cases and goals."""
    return json.dumps({
        "command": command, "machine": machine, "started": started, "duration_s": duration_s,
        "rows": [{**{k: v for k, v in r.__dict__.items() if k != "methods"},
                  "methods": [{**m.__dict__, "median_s": m.median_s, "roofline_fraction": m.roofline_fraction}
                              for m in r.methods]} for r in rows],
        "compile": [c.__dict__ for c in compile_results],
        "step_memory": [r.__dict__ for r in step_memory],
        "goals": [g.__dict__ for g in goals],
    }, indent=1, default=str)


def write_outputs(out: Path, *, command: str, machine: dict, started: str, duration_s: float, tables: str,
                  rows: list[RowResult], compile_results: list[CompileResult], goals: list[Goal],
                  device: torch.device, compiled: bool, benchmarks_md_path: str | None,
                  step_memory: list = ()) -> None:
    """Write OUTPUT_FILES into ``out``, and BENCHMARKS.md to ``benchmarks_md_path`` when given."""
    (out / "bench.md").write_text(tables + "\n")
    write_csv(out / "results.csv", result_records(rows, device), RESULT_FIELDS)
    write_csv(out / "compile_times.csv", [c.__dict__ for c in compile_results], COMPILE_FIELDS)
    (out / "results.json").write_text(results_json(command, machine, started, duration_s, rows, compile_results,
                                                   goals, step_memory))
    write_png(out / "bench.png", rows, compile_results, machine["device_name"], compiled=compiled)
    if benchmarks_md_path:
        path = Path(benchmarks_md_path)
        kept = kept_section(path.read_text()) if path.exists() else ""  # the modes' own runs (SECTIONS)
        path.write_text(benchmarks_md(command, machine, tables, goals, started, duration_s) + kept)


# BENCHMARKS.md's sections written by the bench's own modes (``bench --low-precision`` and ``bench --cpu-adam`` with
# ``--write-benchmarks-md``): each a run of its own, kept when the main bench regenerates the file, and replaced by
# the next run of its mode.
SECTIONS = ("low-precision", "cpu-adam")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench --{name}: start -->", f"<!-- bench --{name}: end -->"


def kept_section(text: str) -> str:
    """Every mode's section of a BENCHMARKS.md text (with their markers), in ``SECTIONS`` order, or ""."""
    kept = ""
    for name in SECTIONS:
        start_marker, end_marker = _markers(name)
        start, end = text.find(start_marker), text.find(end_marker)
        if 0 <= start < end:
            kept += "\n" + text[start:end + len(end_marker)] + "\n"
    return kept


def with_section(text: str, section: str, name: str = "low-precision") -> str:
    """``text`` with mode ``name``'s section replaced by ``section`` (appended when it has none)."""
    start_marker, end_marker = _markers(name)
    block = f"{start_marker}\n{section.rstrip()}\n{end_marker}"
    start, end = text.find(start_marker), text.find(end_marker)
    if 0 <= start < end:
        return text[:start] + block + text[end + len(end_marker):]
    return text.rstrip() + "\n\n" + block + "\n"
