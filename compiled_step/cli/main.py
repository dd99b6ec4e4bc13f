"""Command line: ``python -m compiled_step {demo,bench,graphs,gpu-check} [options]``.

Each subcommand lives in its own package and is imported only when asked for, so
``python -m compiled_step graphs`` does not pay for matplotlib and ``demo`` does not
pay for the benchmark's layouts. ``demo`` and ``bench`` draw plots and a progress bar with
matplotlib and tqdm, the ``cli`` extra (``pip install -e '.[cli]'``); without it they stop with a
one-line message (exit status 2). The core, ``import compiled_step``, needs torch alone.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "demo": ("compiled_step.cli.demo", "train the built-in model with FusedStep next to the eager reference"),
    "bench": ("compiled_step.cli.bench", "benchmark FusedStep against clip_grad_norm_ + torch.optim anchors"),
    "graphs": ("compiled_step.cli.graphs", "write the reference configurations' compiled graphs into graphs/"),
    "gpu-check": ("compiled_step.cli.gpu_check", "the GPU acceptance run: CUDA tests, sync-debug, offload, bench"),
}


def _usage() -> str:
    lines = ["usage: python -m compiled_step {" + ",".join(_COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in _COMMANDS.items()]
    lines.append("\nRun a subcommand with --help for its options. demo and bench need the cli extra: "
                 "pip install -e '.[cli]'.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)
