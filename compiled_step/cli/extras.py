"""The command line's optional dependencies (the ``cli`` extra), checked before a command starts.

The core (``import compiled_step``, ``FusedStep``) needs torch alone. ``python -m compiled_step demo``
and ``bench`` also draw plots (matplotlib) and a progress bar (tqdm); those come with the ``cli``
extra, ``pip install -e '.[cli]'``. A command checks for them up front, so a missing extra is one
clear line (exit status 2) instead of a traceback after minutes of training or benchmarking.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["CLI_EXTRA", "MissingExtraError", "missing_modules", "require_cli_extra"]

CLI_EXTRA = "cli"
_INSTALL_HINT = "pip install -e '.[cli]' in the source tree (or pip install 'compiled_step[cli]')"


class MissingExtraError(Exception):
    """A module of the ``cli`` extra is not installed. The message is one line that says what to install."""


def missing_modules(names: Iterable[str]) -> list[str]:
    """The top-level modules in ``names`` that cannot be imported here (looked up, not imported)."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def require_cli_extra(command: str, modules: Iterable[str]) -> None:
    """Raise MissingExtraError naming the extra when any of ``modules`` is not installed.

    ``command`` names what needs them in the message, e.g. "the demo".
    """
    missing = missing_modules(modules)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(
            f"{command} needs {' and '.join(missing)}, which {verb} not installed; "
            f"install the {CLI_EXTRA!r} extra: {_INSTALL_HINT}"
        )
