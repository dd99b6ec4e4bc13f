"""``python -m compiled_step {demo,bench,graphs,gpu-check} [options]``: the command line lives in ``compiled_step.cli``."""

from __future__ import annotations

import sys

from compiled_step.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
