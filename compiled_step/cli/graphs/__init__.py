"""``python -m compiled_step graphs``: what Dynamo and Inductor made of FusedStep, as reviewable text.

For each reference configuration (``REFERENCES``) this package runs two real ``FusedStep.step()``
calls on CPU with a *recording backend* and writes one text file into ``graphs/``.

What a step runs (``fused.program``, see ``program.py``): per sharding group, the grads, params and
optimizer state live in flat buffers of 256-element rows, and one step is

1. **Phase A**: one compiled ``norm.partials.partial_of_buffer`` call per sharding group, over the
   group's whole flat grad buffer (the group's grad scale folded in);
2. the collectives (eager, in place on the partial norms), one per process group, then ``'pp'``;
3. the **finish**: one compiled ``norm.finish.finish`` call (total norm, clip coefficient, finite
   flag, skip counter, and every tensor's row of the per-tensor scalar table);
4. **Phase B**: per group, one compiled ``rules.<rule>.update_flat`` call over the flat region
   (params aliased into the flat buffer, and small params the step may not move, staged: copied in
   and out by eager calls around it), and one compiled ``rules.<rule>.update_bucket`` call per
   bucket of ``bucket_size`` large params that stay where they are (FSDP2 shards, FP8 weights); a
   Muon group instead has one compiled ``rules.muon.update_matrices`` call per *stack* of same-shape
   matrices (row-sharded ones: prepare, all_to_all, orthogonalize, all_to_all, apply);
5. with FP8 weights, one eager call: the amax reduction and the scales.

With several optimizers (``FusedStep([muon, adamw])``) the groups of all of them share Phase A and
the collectives, and the one finish fills every slot's scalars by its optimizer's rule (its graph
constant ``rule`` names them all).

Each file holds:

* a summary: graphs compiled, graphs compiled by a second step with the lr halved (0), graph
  breaks, Inductor's kernel count (``torch._inductor.metrics.generated_kernel_count``) and bytes
  accessed (``num_bytes_accessed``, which Inductor only computes when its ``inductor_metrics`` log
  is on) per graph, and **bytes per parameter** (below);
* the plan (``fused.plan``): the sharding groups, where their params live (aliased, staged,
  bucketed), the reductions;
* where the collectives sit between the graphs: every call of ``fused.program.calls`` in the order
  step 1 ran them, compiled calls mapped to their graph by ``call.compiled`` (the callable the
  recording backend returned, which carries the graph's index), eager calls and collectives by
  their labels;
* per graph: its inputs (with their sizes at compile time), outputs, Inductor's scheduler nodes,
  the Dynamo FX graph normalised (comments with file paths and line numbers stripped, as
  ``torch._dynamo.testing.normalize_gm`` does) and the post-grad ATen graph Inductor lowered (the
  ``TORCH_LOGS=post_grad_graphs`` text).

**Bytes per parameter** = the bytes accessed per grad element by the Phase A graph + by the update
graph that updates the configuration's large params (the flat update for plain tensors, which are
all aliased into the flat buffer; the bucket update for DTensor and FP8 layouts), each at the sizes
Inductor compiled it for, padding included. A flat buffer's row count compiles with a fixed size
hint (``compiling.ROWS_HINT``, whatever size comes first), and ``num_bytes_accessed`` is counted at
the hints, so Phase A and the flat update are counted at ``ROWS_HINT`` rows and a bucket update at
its first call's sizes (checked). fp32 AdamW's floor is 32: read p, g, m, v and write p, m, v once
(28), plus one more read of g for the norm (4). What lies above it: the flat update's row index and
per-tensor table reads; for DTensor layouts, Phase A also reads the grads of the group's staged
small params, which the bucket update does not process.

How the capture works (the torch 2.13 APIs used are private, hence the pinned version), through
public seams of FusedStep only (``backend=``, ``fused.program``, ``fused.plan``):

* ``FusedStep(..., backend=recorder)``: the recorder is a ``torch.compile`` backend that keeps the
  ``GraphModule`` Dynamo hands over, then compiles it with Inductor's ``compile_fx`` while the
  ``post_grad_graphs`` and ``inductor_metrics`` artifact logs are routed to it, and with the FX graph
  and AOTAutograd caches off (a cache hit skips lowering, so neither log would fire). It returns a
  callable that carries the graph's index, which FusedStep exposes as ``call.compiled``.
* Graphs are shared between configurations of one *family* (``Reference.family``): they use one
  recorder, so Dynamo reuses its cache entries and a graph compiles once per family. A graph's byte
  counts are those of the call that compiled it, so configurations of a family have the same
  buffer sizes, and the capture checks that every graph's first call in a configuration has the
  tensor sizes it was compiled at (it raises otherwise): each file is the same whether it is
  captured alone (``--only``) or with the others.
* Distributed configurations run in a one-process gloo world (``HashStore``, rank 0 of 1) with
  real ``DeviceMesh``es of size 1 and real DTensor params, so the plan, its reductions and their
  labels are the ones a sharded run has; every collective is a real ``all_reduce`` over a group of
  one rank.

Reference sizes: every configuration has 4 "large" params of 128 x 256 = 32768 elements and 3 small
ones of 256, 256 and 128 elements. Plain tensors are all aliased into one flat buffer of 515 rows
(one flat update). DTensor params are not moved: the 4 large shards (above the default
``pack_threshold``) are bucketed, ``bucket_size=4`` (the test suite's bucket, so compile time stays
small; FusedStep's default is 16) making exactly one full bucket, and the 3 small ones are staged.
``muon_adamw`` (a family of its own) has other sizes: Muon on 6 hidden matrices, 2 each of 64 x 64,
64 x 128 and 128 x 64 (3 stacks; the tall one is a second ``update_matrices`` graph, since tall
matrices are transposed), AdamW on a 256 x 64 embedding-like matrix, a bias and 3 norm weights.

Output is deterministic: no addresses, timestamps, hashes, cache paths or line numbers; running the
command twice gives identical files. Nothing in the files depends on the CPU (they came out identical
with 1 and 2 threads): Inductor's generated C++ does (vector ISA, thread count) and is left out.
``tests/test_graphs.py`` regenerates every file and compares (``EXPECTTEST_ACCEPT=1`` rewrites them),
so any change to a graph shows up as a reviewed diff.

``dump_run_graphs(out_dir, fused)`` writes the same kind of file for an existing FusedStep (the
demo calls it), by re-running the capture on synthetic tensors that select the run's graphs (its
optimizer hyperparameters, dtypes, device, bucket size, norm type, and the sizes of its flat
regions and first bucket), next to the run's own plan and program, plus Inductor's generated code
(which depends on the CPU's vector ISA and thread count, so it is never part of the goldens).
"""

# The package, in the order of the data: references (the configurations and the one-rank world they run
# in), recording (the torch.compile backend that records each graph), capturing (two steps of a
# configuration, collected), normalize (machine-independent text), rendering (the file's text), goldens
# (compare with and write graphs/), run_dump (a run's graphs, for the demo), command (the command line).

from __future__ import annotations

from compiled_step.cli.graphs.capturing import Capture, capture, capture_references
from compiled_step.cli.graphs.command import main
from compiled_step.cli.graphs.goldens import (
    GOLDEN_TORCH_VERSION,
    Mismatch,
    compare,
    default_out_dir,
    goldens_apply,
    write,
)
from compiled_step.cli.graphs.references import REFERENCES, Reference, Setup, plain_layout, single_rank_world
from compiled_step.cli.graphs.rendering import render, render_references, summary_numbers
from compiled_step.cli.graphs.run_dump import dump_run_graphs

__all__ = [
    "GOLDEN_TORCH_VERSION",
    "REFERENCES",
    "Reference",
    "Setup",
    "Capture",
    "Mismatch",
    "capture",
    "capture_references",
    "plain_layout",
    "render",
    "render_references",
    "compare",
    "write",
    "summary_numbers",
    "goldens_apply",
    "default_out_dir",
    "dump_run_graphs",
    "single_rank_world",
    "main",
]
