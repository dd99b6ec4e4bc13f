"""A pytest plugin for the GPU acceptance run: picks the CUDA tests and records each outcome as it comes.

``python -m pytest -p compiled_step.cli.gpu_check.cuda_only --cuda-marked-in tests/test_x.py
--outcomes PATH ...``. In the files named with ``--cuda-marked-in``, only the tests with a skip mark
that says they need CUDA or GPUs run (its own, its parametrization's or its module's mark: this suite
writes them as "needs CUDA", "needs 2 GPUs"...); files not named run whole. ``--outcomes`` appends one
JSON line per finished test, so the counts survive a stage killed at its timeout.
"""

from __future__ import annotations

import json
import os
import re

import pytest

_NEEDS_CUDA = re.compile(r"\bneeds\b.*\b(cuda|gpus?)\b", re.IGNORECASE)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cuda-marked-in", action="append", default=[], metavar="FILE",
                     help="in FILE, run only the tests with a skip mark saying they need CUDA or GPUs")
    parser.addoption("--outcomes", default=None, metavar="PATH", help="append each test's outcome to PATH (JSONL)")


def is_cuda_marked(item: pytest.Item) -> bool:
    return any(_NEEDS_CUDA.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    filtered = {os.path.realpath(f) for f in config.getoption("cuda_marked_in")}
    if not filtered:
        return
    keep, drop = [], []
    for item in items:
        in_filtered = os.path.realpath(str(item.path)) in filtered
        (drop if in_filtered and not is_cuda_marked(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _OUTCOMES.get("path")
    if path is None:
        return
    # One line per test: its failure or skip in whichever phase, else its call's pass.
    if report.failed or report.skipped or report.when == "call":
        message = ""
        if report.failed:
            message = str(report.longrepr)[-800:]
        elif report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        with open(path, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                                "message": message}) + "\n")


_OUTCOMES: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("outcomes")
    if path:
        _OUTCOMES["path"] = path
