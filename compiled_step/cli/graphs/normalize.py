"""Machine- and edit-independent text: no colours, addresses, temporary paths, kernel hashes or checkout
paths, and graph code without (or with shortened) source comments."""

from __future__ import annotations

import os
import re

from compiled_step.cli import PACKAGE_PARENT

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


_FILE_COMMENT = re.compile(r"# File: (?P<path>\S+?):\d+ in (?P<fn>[^,]+), code: (?P<code>.*)")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_TMP_PATH = re.compile(r"/tmp/[^\s'\"]*")
_HASHED_KERNEL = re.compile(r"\b((?:cpp|triton)_\w+?)_[0-9a-f]{16,}\b")
_EVAL_KEY = re.compile(r"<eval_with_key>\.\d+")


def _relative_source(path: str) -> str:
    marker = "compiled_step/"
    return path[path.rindex(marker):] if marker in path else os.path.basename(path)


def normalize_text(text: str) -> str:
    text = strip_ansi(text)
    text = _ADDRESS.sub("0x...", text)
    text = _TMP_PATH.sub("<tmp>", text)
    text = _HASHED_KERNEL.sub(r"\1_<hash>", text)
    text = _EVAL_KEY.sub("<eval_with_key>", text)
    return _REPO_ROOT_RE.sub("", text)


# The checkout this package lives in: stripped from paths.
_REPO_ROOT_RE = re.compile(re.escape(str(PACKAGE_PARENT) + os.sep))


def normalize_graph_code(code: str, *, keep_source: bool = False) -> str:
    """A graph's code without machine- or edit-specific text.

    ``keep_source=False`` (the goldens) strips every comment, as ``normalize_gm`` does, so editing a
    rule's source without changing its graph leaves the files alone. ``keep_source=True`` keeps each
    op's source line, without path prefix or line number (for run dumps meant to be read).
    """
    from torch._dynamo.testing import normalize_gm

    code = strip_ansi(code)
    start = code.find("class ")
    code = code[start:] if start >= 0 else code
    if keep_source:
        code = _FILE_COMMENT.sub(lambda m: f"# {_relative_source(m['path'])} in {m['fn']}: {m['code']}", code)
        code = "\n".join(line.rstrip() for line in code.splitlines())
        code = re.sub(r"\n{3,}", "\n\n", code)
    else:
        code = normalize_gm(code)
    return normalize_text(code).strip("\n") + "\n"
