"""``python -m compiled_step bench``: FusedStep against the anchors, the bandwidth roofline, compile time.

What is measured, and how:

* **Step time.** Every method gets its own copy of the same initial params and the same optimizer
  hyperparameters. Reference grads are generated once per row (seeded N(0, 1), so finite, and their
  total 2-norm is about sqrt(n_params), far above ``max_grad_norm``, so clipping is always active).
  Before *every* timed step, for every method, the reference grads are copied back into ``.grad`` (the
  anchors clip grads in place, FusedStep does not; restoring for all keeps the treatment identical) and
  a scratch buffer twice the last-level cache is written, so no method starts with a warm cache. Only
  the step itself is timed (``synchronize`` around it on CUDA only). Methods run interleaved, one step
  each per round (A, B, C, D, fused, A, B, ...), so drift in machine load hits all of them alike; the
  reported time is the median over rounds. Every method runs the same number of steps, so afterwards
  all params should agree with anchor B's: the largest difference is reported as a sanity check.
* **Roofline.** In every round two triads on arrays far larger than the cache are timed best-of-3:
  STREAM's ``a = b + s*c`` (``torch.add(b, c, alpha=s, out=a)``) and the in-place ``a = a + s*c``
  (``a.add_(c, alpha=s)``), each counted at 12 B/element. The bandwidth is the higher of their medians
  over rounds. Why both: on a CPU the STREAM triad's store to ``a`` first reads ``a``'s cache line
  (write-allocate), so it understates the bandwidth that in-place updates such as an optimizer's get
  (on this machine the in-place triad measures far higher), and a roofline built on it alone let
  anchor B appear to run above 1.0. The floor for a step is ``n_params * B/param / bandwidth`` where
  B/param is the minimal traffic: each of p, g and the optimizer state read once and p and the state
  written once, plus one extra read of g for the norm (32 B/param for fp32 AdamW, 24 for fp32 SGD with
  momentum, 16 for bf16 AdamW whose state is bf16 as in torch.optim). Fraction of roofline =
  floor time / method time.
* **Compile time.** For each tensor count N, a fresh subprocess (fresh Dynamo) with a fresh, empty
  ``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR``) times the first ``fused.step()``: cold. A
  second fresh subprocess reusing that cache directory times it again: warm.
* **Per-step overhead** is FusedStep's median step time on the many-small layout (1024 tensors of a
  few hundred elements), minus that layout's roofline floor.
* **Tiny tensors, host work only.** Rows ``tiny100`` and ``tiny1000``: AdamW on 100 and on 1000 tensors
  of about 16 elements, run with ``torch.set_num_threads(1)`` (restored afterwards). Their memory
  traffic is negligible, so the step time is the host's work: Python, dispatch, guards, launches. The
  figure is the ratio t_B / t_FusedStep.
* **Ops and kernel launches per step.** One more steady-state step per method, under
  ``torch.profiler``: the number of ATen ops the profiler records (every ``aten::`` event, nested ones
  included: the eager dispatcher work of the step), and on CUDA the number of kernel launches
  (``cudaLaunchKernel``/``cuLaunchKernel`` events and their ``Ex`` variants) plus CUDA-graph launches
  (``cudaGraphLaunch``), which are also shown on their own. For FusedStep also its **compiled calls per
  step**: the calls of compiled graphs in its program (``fused.program``; each runs once per step). On the
  CPU that is what there is to count instead of launches: each call runs one Inductor-generated C++
  function, whose loops run one after the other in the same call (no launch per loop or per tensor).
  On CUDA each call launches its graph's Triton kernels (one launch per kernel, or one per captured
  CUDA graph when the step is replayed).
* **FSDP2 row** (``fsdp2``): the GPT layout's params as ``fully_shard`` DTensors (one FSDP unit per
  block and the root), in the bench's own process on a gloo process group of world size 1 (so each
  shard is the whole tensor and no timing includes a real collective). FusedStep cannot move FSDP2's
  params into its flat buffer: params of at most ``pack_threshold`` elements are staged through it, the
  rest are updated in buckets of ``bucket_size``, as on N ranks. The row shows what each method issues
  for sharded params; anchor C is compared on the plain GPT row only.
* **Muon + AdamW row** (``muon_adamw``): the headline GPT layout with ``torch.optim.Muon`` on its hidden
  matrices (attention and MLP projections: 4 shapes) and ``torch.optim.AdamW`` on the rest (embeddings,
  biases, norms). A and B clip over all params, then run ``Muon.step()`` and ``AdamW(foreach=True)`` or
  ``AdamW(fused=True)``; D is NeMo Automodel's path over both optimizers' groups; FusedStep is
  ``FusedStep([muon, adamw])``: one norm, one step, one batched Newton-Schulz call per matrix shape. C
  and ``fused+norms`` are not run on it. Every method does the same Newton-Schulz matmul FLOPs, so torch's
  Newton-Schulz alone on the same matrices is timed in every round beside the methods (a row note gives
  its median, its share of B's step, and FusedStep's step against it). The row's floor is memory
  traffic only (Muon keeps one state tensor: 24 B/param in fp32; AdamW 32), so its fraction of
  roofline is not a goal; its goal is FusedStep's speedup over B. The distance to B's params is
  bounded by Muon's bfloat16 Newton-Schulz (about ``steps * lr * ratio * 2**-7``, see
  ``tests/test_muon.py``), not by fp32 rounding.
* **Small FusedStep first** (``small_first``): the headline row again, in the same process, after a small
  FusedStep (the ``--quick`` GPT layout, about 0.1 M params) was built and stepped first in the row's
  Inductor cache, which it leaves warm; then B and FusedStep are built and timed as on the headline row.
  The compiled step's parallelism must not depend on which size compiled first
  (``compiling.ROWS_HINT``). The goal compares FusedStep's time relative to B's (``t_fused / t_B``,
  medians) on this row with the headline row's: B runs interleaved in both and does the same work, so
  the ratio is free of the machine's drift between the two rows; the raw medians are shown beside it.
* **Peak memory.** One extra step per method, after timing. On CPU every c10 allocator event is recorded
  with ``torch.profiler(profile_memory=True)`` and the peak of the running sum of allocations minus
  frees is the step's peak extra memory (RSS is too coarse and noisy for this). The profiler does not
  see frees of blocks allocated before it started, so this is an upper bound. On CUDA it is
  ``max_memory_allocated()`` minus ``memory_allocated()`` before the step.
* **Extra memory at the first step, after a resume and at a rebuild** (``step_memory.py``): in a fresh
  subprocess per case, on ``--step-memory-size`` matrices (8 x 2048x2048 fp32 by default, P = 128 MiB) and
  8 vectors, compiled beforehand on small params going through the same case: peak resident memory during
  the step (``VmHWM`` after writing ``5`` to ``/proc/self/clear_refs``; glibc's mmap threshold fixed, so
  freed blocks leave RSS) minus RSS before it; on CUDA the allocator's peak. Eager torch (``clip_grad_norm_``
  + AdamW, or Muon + AdamW) and FusedStep go through the same cases: a new optimizer's first step; the
  first step after ``load_state_dict`` of a checkpoint (dropped after loading); the step after an
  ``add_param_group`` (FusedStep rebuilds its plan). Goal: FusedStep within eager's first step + 10% of P.
* **Inductor cache.** By default each row compiles into its own fresh, empty Inductor cache: with
  dynamic shapes the C++ backend picks serial or OpenMP-parallel loops from the size hints of the
  first compile, and a cached graph compiled earlier for tiny tensors would run serially here.
* **Profiler noise.** torch's profiler (kineto) prints ``USDT: ... profiler_start`` and
  ``profiler_stop`` on stderr for every session it starts. While the bench profiles, native stderr
  is captured and replayed without those two lines; everything else (errors included) is kept.
* **What ``param_norms=True`` costs.** Method ``fused+norms`` is FusedStep with ``param_norms=True`` (each
  param's grad norm, computed by the Phase A call that reads the grads), timed interleaved with
  ``fused``; the goal is the ratio of their medians on the headline layout.
* **``--quick``** runs tiny layouts for a few rounds to check the plumbing. Its figures are reported,
  but no goal gets a met/gap verdict: at those sizes and round counts the ratios swing from run to run.

Anchors: (A) ``clip_grad_norm_(foreach=True)`` + ``optimizer(foreach=True)``; (B) the same clip +
``optimizer(fused=True)``; (C) eager ``clip_grad_norm_`` + a ``torch.compile``d ``optimizer.step()``
with a tensor lr (PyTorch's compiled-optimizer recipe); (D) NeMo Automodel's eager path: ``g.div_(s)`` on
every grad, a norm per param group, clip, ``optimizer.step()`` (foreach).
"""

# The package: methods (anchors A-D and FusedStep), machine (what ran), measure (timing, roofline, profiler
# counts), rows (one layout x optimizer x dtype, methods interleaved), compile_time (fresh subprocesses),
# goals (met / gap), report (bench.md, CSV, JSON, PNG, BENCHMARKS.md), options and command (the command line).
# This docstring, after its first paragraph, is BENCHMARKS.md's method section (report._method_text).

from __future__ import annotations

from compiled_step.cli.bench.command import main

__all__ = ["main"]
