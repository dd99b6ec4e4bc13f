"""What machine ran the bench: device and CPU names, cores, last-level cache, load, the source revision."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from compiled_step.cli import PACKAGE_PARENT
from compiled_step.cli.devices import cpu_model, device_name


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


def _source_revision() -> str:
    """The git commit of the compiled_step being measured, and whether its files had local changes."""
    root = PACKAGE_PARENT
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compiled_step"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"
    return head.stdout.strip() + (" with uncommitted changes in compiled_step/" if dirty else "")


def machine_info(device: torch.device) -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "source": _source_revision(),
        "last_level_cache_bytes": _last_level_cache_bytes(device),
    }
    return info


def wait_idle(max_s: float, log: Callable[[str], None], threshold: float = 0.7) -> None:
    """Wait up to ``max_s`` seconds for the 1-minute load average to drop below ``threshold``."""
    if not hasattr(os, "getloadavg"):
        return
    deadline = time.monotonic() + max_s
    load = os.getloadavg()[0]
    while load >= threshold and time.monotonic() < deadline:
        log(f"waiting for the machine to go idle: 1-min load average {load:.2f} >= {threshold}")
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
        load = os.getloadavg()[0]
    if load >= threshold:
        log(f"still busy after {max_s:.0f}s (load {load:.2f}); measuring anyway, the load is recorded")
