"""The committed goldens in ``graphs/``: the torch they are made with, whether they apply here, where they
live, and comparing freshly rendered files with them or writing them."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch

from compiled_step.cli import PACKAGE_PARENT

# The goldens in graphs/ are made with this torch; other versions lower differently.
GOLDEN_TORCH_VERSION = "2.13.0"

HEADER_MARK = "# compiled_step graph dump"

# The checkout this package lives in (for the default output folder).
_REPO_ROOT = PACKAGE_PARENT


def goldens_apply() -> tuple[bool, str]:
    """Whether the committed goldens can be compared here, and if not, why (a skip reason)."""
    version = torch.__version__.split("+")[0]
    if version != GOLDEN_TORCH_VERSION:
        return False, (
            f"graph goldens in graphs/ are tied to torch {GOLDEN_TORCH_VERSION}; this is torch {torch.__version__}, "
            "whose Dynamo/Inductor lower differently (regenerate with `python -m compiled_step graphs` to inspect)"
        )
    if not torch.distributed.is_available():
        return False, "graph goldens include distributed configurations; this torch has no torch.distributed"
    return True, ""


def default_out_dir() -> Path:
    """``graphs/`` of the source checkout this package lives in, else ``./graphs``."""
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "compiled_step").is_dir():
        return _REPO_ROOT / "graphs"
    return Path("graphs")


@dataclass
class Mismatch:
    file: str
    kind: str  # "changed", "missing" (no golden), "extra" (golden without a configuration)
    diff: str

    def __str__(self):
        return f"{self.file}: {self.kind}\n{self.diff}"


def _dump_files(directory: Path) -> dict[str, str]:
    files = {}
    if directory.is_dir():
        for path in sorted(directory.glob("*.txt")):
            text = path.read_text()
            if text.startswith(HEADER_MARK):
                files[path.name] = text
    return files


def compare(rendered: dict[str, str], directory: Path, *, complete: bool = True) -> list[Mismatch]:
    """Differences between freshly rendered files and ``directory`` (nothing is written).

    ``complete``: ``rendered`` holds every configuration, so a dump file without one is reported.
    """
    existing = _dump_files(Path(directory))
    mismatches = []
    for name, text in rendered.items():
        old = existing.get(name)
        if old is None:
            mismatches.append(Mismatch(name, "missing", f"(no {name} in {directory})"))
        elif old != text:
            diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                f"{directory}/{name} (committed)", f"{name} (this torch and code)"))
            mismatches.append(Mismatch(name, "changed", diff))
    if complete:
        for name in sorted(set(existing) - set(rendered)):
            mismatches.append(Mismatch(name, "extra", f"({name} matches no reference configuration)"))
    return mismatches


def write(rendered: dict[str, str], directory: Path, *, prune: bool = True) -> list[Path]:
    """Write the files; with ``prune``, remove dump files of configurations that no longer exist."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if prune:
        for name in set(_dump_files(directory)) - set(rendered):
            (directory / name).unlink()
    paths = []
    for name, text in rendered.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(path)
    return paths
