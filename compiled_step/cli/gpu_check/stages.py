"""What the GPU acceptance run runs: its stages, each one subprocess with its own timeout."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Run whole: the CUDA layer's own test files.
WHOLE_FILES = ("tests/test_cuda.py", "tests/test_cuda_graphs.py", "tests/test_health_cuda.py")
# Of any other test file, the tests with a CUDA skip mark (``cuda_only.py`` picks them).
_CUDA_SKIP_MARK = re.compile(r"skipif\(\s*(not\s+torch\.cuda\.is_available\(\)|torch\.cuda\.device_count\(\)\s*<)")
TWO_DEVICE_TESTS = ("another_device", "off_the_current_device")  # test names of tests/test_cuda.py's 2-GPU tests


@dataclass
class Stage:
    name: str
    what: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    outcomes: Path | None = None  # pytest stages: one JSON line per finished test (``cuda_only.py``)
    results: Path | None = None  # check and bench stages: their JSON


def source_root() -> Path:
    """The tree ``compiled_step`` was imported from: the tests live beside it when run from a checkout."""
    return Path(__file__).resolve().parents[3]


def cuda_marked_files(root: Path) -> list[str]:
    """Test files, other than WHOLE_FILES, with a skip mark on a CUDA condition (relative to ``root``)."""
    found = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        rel = path.relative_to(root).as_posix()
        if rel not in WHOLE_FILES and _CUDA_SKIP_MARK.search(path.read_text(errors="replace")):
            found.append(rel)
    return found


def plan(out: Path, root: Path) -> tuple[list[Stage], list[str]]:
    """The stages in the order they run (most telling first), and notes on what is left out."""
    py = sys.executable
    notes: list[str] = []
    sanitizer = shutil.which("compute-sanitizer")
    offload_argv = [py, "-m", "compiled_step.cli.gpu_check.checks", "offload", "--json", str(out / "offload.json")]
    offload_env = {}
    if sanitizer:
        # Caching allocator off: every allocation is the driver's own, so memcheck sees a write past one.
        offload_argv = [sanitizer, "--tool", "memcheck", "--error-exitcode", "3"] + offload_argv + ["--no-compile"]
        offload_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    else:
        notes.append("compute-sanitizer not found: the offload check compares values and memory, without memcheck")
    stages = [
        Stage("sync-debug", "a steady-state step of AdamW, Adam, SGD and Muon+AdamW under set_sync_debug_mode('error')",
              [py, "-m", "compiled_step.cli.gpu_check.checks", "sync-debug", "--json", str(out / "sync_debug.json")],
              60, results=out / "sync_debug.json"),
        Stage("offload", "offload_optimizer_state vs no offload (tolerance 0), state freed between steps"
              + (", under compute-sanitizer memcheck" if sanitizer else ""),
              offload_argv, 60 if not sanitizer else 90, env=offload_env, results=out / "offload.json"),
    ]
    if (root / "tests").is_dir():
        marked = cuda_marked_files(root)
        # "" is the default (on where this torch has every combo setting: not on 2.11); "1" would raise there.
        for name, combo, timeout in (("cuda-tests", "", 150), ("cuda-tests-no-combo", "0", 120)):
            outcomes = out / f"{name}.jsonl"
            argv = [py, "-m", "pytest", "-q", "-p", "compiled_step.cli.gpu_check.cuda_only", "-p", "no:cacheprovider",
                    f"--outcomes={outcomes}", *WHOLE_FILES, *marked]
            for f in marked:
                argv += ["--cuda-marked-in", f]
            stages.append(Stage(name, f"the CUDA tests, combo kernels {'as by default' if combo == '' else 'off'}", argv,
                                timeout, env={"COMPILED_STEP_COMBO_KERNELS": combo}, outcomes=outcomes))
    else:
        notes.append(f"no tests/ under {root} (not a source checkout): the CUDA test stages are left out")
    stages.append(Stage("bench", "python -m compiled_step bench --device cuda --quick: every row, quick layouts",
                        [py, "-m", "compiled_step", "bench", "--device", "cuda", "--quick",
                         "--out", str(out / "bench")],
                        90, results=out / "bench" / "results.json"))
    return stages, notes


def child_env(stage: Stage, root: Path) -> dict[str, str]:
    """The stage's environment: this one, the source tree first on PYTHONPATH, and the stage's own settings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(stage.env)
    return env
