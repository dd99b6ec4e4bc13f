"""The core depends on torch alone; the command line's tqdm and matplotlib come with the ``cli`` extra.

Each check runs in a fresh interpreter, so modules imported by other tests cannot hide an import.
"Not installed" is simulated with ``sys.modules[name] = None``: then ``import name`` raises
ModuleNotFoundError and ``importlib.util.find_spec(name)`` returns None, exactly as for a package
that is absent. (A scratch venv with ``pip install torch==2.13.0 -e .`` shows the same; it is too
slow for a unit test.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import compiled_step

REPO_ROOT = Path(compiled_step.__file__).resolve().parent.parent
CLI_EXTRA_MODULES = ("tqdm", "matplotlib")


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


# Blocks the cli extra's modules and records every attempt to import them with the importing file,
# so an ImportError caught inside compiled_step would still be seen. (torch.hub tries tqdm at
# `import torch` and falls back when it is missing: that attempt is torch's, not ours.)
_BLOCK = f"""
import sys, traceback
BLOCKED = {set(CLI_EXTRA_MODULES)!r}

class _Blocker:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            # The importing file: the innermost frame outside importlib (the last frame is this one).
            files = [f.filename for f in traceback.extract_stack()[:-1]]
            importer = next(f for f in reversed(files) if not f.startswith("<frozen"))
            _Blocker.attempts.append([name, importer])
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
"""


def test_import_compiled_step_loads_neither_tqdm_nor_matplotlib():
    # The CLI modules are imported too: only running demo/bench may need the extra, not importing them.
    code = _BLOCK + """
import json
import compiled_step
import compiled_step.cli.demo, compiled_step.cli.bench, compiled_step.cli.graphs, compiled_step.cli.progress
import compiled_step.__main__
from compiled_step import FusedStep
ours = [(name, f) for name, f in _Blocker.attempts if "/compiled_step/" in f]
print(json.dumps({"ours": ours, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ours"] == [], report  # no compiled_step module even tried
    assert report["loaded"] == []


def test_import_compiled_step_does_not_load_matplotlib_when_installed():
    # Unblocked, as a user with the extra has it. (tqdm is not checked here: torch.hub imports it at
    # `import torch` whenever it is installed; the blocked test above covers compiled_step's part.)
    proc = _python("import sys, compiled_step; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _run_cli_without_extra(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = ("import runpy, sys\n"
            + "".join(f"sys.modules[{m!r}] = None\n" for m in CLI_EXTRA_MODULES)
            + "sys.argv = ['python -m compiled_step', *sys.argv[1:]]\n"
            + "runpy.run_module('compiled_step', run_name='__main__', alter_sys=True)\n")
    return _python(code, *args, cwd=cwd)


def test_demo_without_the_cli_extra_is_one_clear_line(tmp_path):
    proc = _run_cli_without_extra(["demo", "--model", "tiny", "--steps", "2", "--no-compile"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback
    assert "demo needs matplotlib" in lines[0] and "'cli' extra" in lines[0] and "pip install -e '.[cli]'" in lines[0]
    assert proc.stdout == ""  # stopped before training
    assert not (tmp_path / "runs").exists()


def test_bench_without_the_cli_extra_is_one_clear_line(tmp_path):
    proc = _run_cli_without_extra(["bench", "--quick", "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "bench needs matplotlib" in lines[0] and "'cli' extra" in lines[0]
    assert proc.stdout == ""


def test_help_works_without_the_cli_extra(tmp_path):
    for args in (["demo", "--help"], ["bench", "--help"], []):
        proc = _run_cli_without_extra(args, tmp_path)
        assert proc.returncode in (0, 2) and "usage:" in proc.stdout, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
