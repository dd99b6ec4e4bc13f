"""The GPU acceptance run's figures: ``gpu_acceptance.json`` (everything) and ``gpu_acceptance.md`` (a summary)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from compiled_step.cli.gpu_check.stages import TWO_DEVICE_TESTS, Stage


def _machine() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "gpus": gpus}


def new_report(has_gpu: bool, budget_s: float, notes: list[str]) -> dict:
    return {"gpu": has_gpu, "machine": _machine(), "budget_s": budget_s, "notes": notes, "stages": []}


def test_counts(path: Path) -> dict:
    """Counts and failing tests of a pytest stage's outcomes (``cuda_only.py``), and the two-device tests'."""
    outcomes: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if outcomes.get(record["test"], {}).get("outcome") != "failed":  # a failed teardown stays a failure
            outcomes[record["test"]] = record
    counts = {k: sum(r["outcome"] == k for r in outcomes.values()) for k in ("passed", "failed", "skipped")}
    failed = [{"test": t, "when": r["when"], "message": r["message"][-500:]}
              for t, r in outcomes.items() if r["outcome"] == "failed"]
    two_device = {t: r["outcome"] + (f": {r['message']}" if r["outcome"] == "skipped" else "")
                  for t, r in outcomes.items() if any(name in t for name in TWO_DEVICE_TESTS)}
    return {**counts, "failed_tests": failed, "two_device": two_device}


def _bench_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return [{"row": r.get("key"), "method": m.get("method"), "median_s": m.get("median_s"),
             "speedup_vs_b": m.get("speedup_vs_b"), "roofline_fraction": m.get("roofline_fraction")}
            for r in data.get("rows", []) for m in r.get("methods", [])]


def stage_entry(stage: Stage, status: str, rc: int | None, seconds: float, log: Path | None) -> dict:
    entry = {"name": stage.name, "what": stage.what, "command": " ".join(stage.argv), "env": stage.env,
             "timeout_s": stage.timeout_s, "status": status, "returncode": rc, "seconds": round(seconds, 1),
             "log": str(log) if log else None}
    try:
        if stage.outcomes is not None and stage.outcomes.exists():
            entry["tests"] = test_counts(stage.outcomes)
        elif stage.results is not None and stage.results.exists():
            entry["results"] = _bench_rows(stage.results) if stage.name == "bench" else json.loads(
                stage.results.read_text())
    except (OSError, ValueError, KeyError) as exc:  # a stage killed mid-write: say so, keep the rest
        entry["results_error"] = f"{type(exc).__name__}: {exc}"
    if log is not None and status != "passed" and log.exists():
        entry["log_tail"] = log.read_text(errors="replace")[-3000:]
    return entry


def one_line(entry: dict) -> str:
    if "tests" in entry:
        t = entry["tests"]
        return f"({t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped)"
    if isinstance(entry.get("results"), dict):
        checks = entry["results"].items()
        return "(" + ", ".join(f"{k}: {'ok' if v.get('passed') else 'FAILED'}" for k, v in checks) + ")"
    if isinstance(entry.get("results"), list):
        return f"({len(entry['results'])} bench rows)"
    return ""


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# GPU acceptance", "",
             f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, Python {m['python']}; "
             f"GPUs: {', '.join(m['gpus']) or 'none'}; budget {doc['budget_s']:.0f} s"
             + (f", took {doc['total_s']} s" if "total_s" in doc else ""), ""]
    if not doc["gpu"]:
        lines += ["No CUDA device: nothing was run. The stages it would run:", ""]
    lines += ["| stage | status | seconds | figures |", "|---|---|---|---|"]
    for s in doc["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {one_line(s)} |")
    for s in doc["stages"]:
        for f in s.get("tests", {}).get("failed_tests", []):
            lines.append(f"\n- {s['name']}: FAILED {f['test']} ({f['when']}): {f['message'][-300:]}")
        two = s.get("tests", {}).get("two_device")
        if two:
            lines.append(f"\n- {s['name']}, two-device aliasing: " + "; ".join(f"{k}: {v}" for k, v in two.items()))
    bench = next((s for s in doc["stages"] if s["name"] == "bench" and isinstance(s.get("results"), list)), None)
    if bench:
        lines += ["", "| bench row | method | median ms | vs B |", "|---|---|---|---|"]
        for r in bench["results"]:
            median = r["median_s"] * 1e3 if isinstance(r["median_s"], (int, float)) else r["median_s"]
            lines.append(f"| {r['row']} | {r['method']} | {median:.3f} | {r['speedup_vs_b']} |"
                         if isinstance(median, float) else f"| {r['row']} | {r['method']} | {median} | |")
    lines += ["", *[f"note: {n}" for n in doc["notes"]]]
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_acceptance.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "gpu_acceptance.md").write_text(_markdown(doc))
