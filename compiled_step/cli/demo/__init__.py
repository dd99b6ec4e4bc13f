"""``python -m compiled_step demo``: train the built-in LM with FusedStep next to the eager reference.

Two copies of the same model start from the same weights and see the same batches. One steps with
the reference, ``clip_grad_norm_(params, max_norm, norm_type)`` then ``optimizer.step()``; the other
with ``FusedStep.step()``. The demo shows the progress, prints a summary (final losses, how far the
two trajectories drifted apart, the step-time ratio) and writes per-step metrics, a plot and the
compiled graphs into an output folder. The exit status is 0 when the two runs agree within the
stated tolerance and 1 when they do not, so the demo doubles as an end-to-end check.

The output folder (``runs/<name>/`` by default) must not hold a previous run: the demo refuses to
start (exit status 2) unless ``--overwrite`` is given, which replaces the demo's own files there.
``--device cuda`` runs both copies on the GPU and times each call between ``torch.cuda.synchronize()``
calls; the summary says which device ran and what was timed. matplotlib (the plot) and tqdm (the
progress bar on a terminal) come with the ``cli`` extra; without them the demo stops with one line
that says so (exit status 2).

Data parallel: ``torchrun --nproc_per_node N -m compiled_step demo --fsdp N`` shards both copies
with FSDP2 (gloo on CPU, NCCL on CUDA); each rank draws its own batches. ``--fsdp 1`` also works
without torchrun (a one-process group).
"""


# The package: config (the options, validated, and the result types), training (the two copies trained
# side by side), summary (agreement and timing, and their text), outputs (metrics.csv, summary.json,
# curves.png, the run's graphs, the output folder), command (the command line).

from __future__ import annotations

from compiled_step.cli.demo.command import main, parse_args
from compiled_step.cli.demo.config import GRAD_NORM_RTOL, LOSS_RTOL, DemoConfig, DemoOptionError, DemoResult
from compiled_step.cli.demo.training import run

__all__ = ["DemoConfig", "DemoOptionError", "DemoResult", "LOSS_RTOL", "GRAD_NORM_RTOL", "parse_args", "run", "main"]
