"""The command line, ``python -m compiled_step {demo,bench,graphs}``, and its fixtures.

Apart from the core: ``import compiled_step`` never imports this package, and nothing here reaches
into FusedStep's private attributes or patches the core's modules; the commands use FusedStep's
public API (``step``, ``zero_grad``, ``plan``, ``program``, ``config``, ``rule``, ``backend=``) only.

* ``main``: picks the subcommand and imports only its package.
* ``demo/``: trains the built-in LM with FusedStep next to the eager reference.
* ``bench/``: FusedStep against the ``clip_grad_norm_`` + ``torch.optim`` anchors.
* ``graphs/``: the reference configurations' compiled graphs, as the reviewed text in ``graphs/``.
* ``models``, ``layouts``: the demo's model and data, the bench's parameter layouts.
* ``progress``, ``extras``: the progress bar, and the check for the ``cli`` extra (matplotlib, tqdm).
"""

from __future__ import annotations

from pathlib import Path

# The folder that holds the compiled_step package: the root of the checkout in a source tree.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
