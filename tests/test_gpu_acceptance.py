"""``python -m compiled_step gpu-check``, the GPU acceptance run, on a machine without a GPU: it says so, lists
what it would run, writes the report and exits 0 within a minute. Its pieces that run anywhere (a stage
killed at its timeout with its children, the per-test outcome counts) are checked here too; the run itself
needs a CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compiled_step.cli.gpu_check import report, stages
from compiled_step.cli.gpu_check.command import run_stage

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_lists_the_stages_and_exits_0(tmp_path):
    args = [sys.executable, "-m", "compiled_step", "gpu-check", "--out", str(tmp_path)]
    if torch.cuda.is_available():
        args.append("--list")  # with a GPU the run itself would start
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert seconds < 60, seconds
    said = done.stdout
    assert ("no CUDA device: nothing run." in said) != torch.cuda.is_available()
    for name in ("sync-debug", "offload", "cuda-tests", "cuda-tests-no-combo", "bench"):
        assert f"  {name} " in said
    for f in stages.WHOLE_FILES + ("tests/integrations/test_fused_optimizer.py", "tests/test_compile_settings.py"):
        assert f in said
    assert "COMPILED_STEP_COMBO_KERNELS=0" in said and "bench --device cuda" in said
    doc = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert doc["gpu"] is torch.cuda.is_available()
    assert [s["status"] for s in doc["stages"]] == ["not run"] * 5
    assert "| cuda-tests-no-combo | not run |" in (tmp_path / "gpu_acceptance.md").read_text()


def test_a_stage_past_its_timeout_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child_still_ran"
    # The stage's child starts a grandchild that would write the marker after 3 s: killing the group stops both.
    grandchild = tmp_path / "grandchild.py"
    grandchild.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w').close()\n")
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(grandchild)!r}]); time.sleep(60)"
    stage = stages.Stage("hang", "sleeps", [sys.executable, "-c", code], timeout_s=1)
    status, rc, seconds = run_stage(stage, 1.0, tmp_path / "hang.log", ROOT)
    assert status == "timeout" and rc is None and seconds < 15
    time.sleep(4)
    assert not marker.exists()


def test_outcome_counts_keep_a_failed_teardown_and_name_the_two_device_tests(tmp_path):
    lines = [
        {"test": "t.py::a", "when": "call", "outcome": "passed", "message": ""},
        {"test": "t.py::a", "when": "teardown", "outcome": "failed", "message": "boom"},
        {"test": "t.py::b", "when": "call", "outcome": "passed", "message": ""},
        {"test": "t.py::test_params_on_another_device_x", "when": "setup", "outcome": "skipped",
         "message": "needs 2 GPUs"},
    ]
    path = tmp_path / "o.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    counts = report.test_counts(path)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failed_tests"][0]["test"] == "t.py::a" and counts["failed_tests"][0]["when"] == "teardown"
    assert counts["two_device"] == {"t.py::test_params_on_another_device_x": "skipped: needs 2 GPUs"}


@pytest.mark.parametrize("reason, picked", [("needs CUDA", True), ("needs 2 GPUs (NCCL)", True),
                                            ("checks the message when CUDA is absent", False),
                                            ("torchao is not installed", False)])
def test_cuda_tests_are_picked_by_their_skip_reason(reason, picked):
    from compiled_step.cli.gpu_check import cuda_only

    class _Item:
        def iter_markers(self, name):
            assert name == "skipif"
            return [pytest.mark.skipif(False, reason=reason).mark]

    assert cuda_only.is_cuda_marked(_Item()) is picked
