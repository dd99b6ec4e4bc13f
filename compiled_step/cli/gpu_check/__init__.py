"""``python -m compiled_step gpu-check [--out DIR] [--budget SECONDS]``: the GPU acceptance run.

One command for a machine with a CUDA GPU, run from the source tree (``PYTHONPATH=.``). Each stage is
a subprocess with its own timeout (a hang costs that stage only) inside a total time budget (default
340 s, ``command.DEFAULT_BUDGET_S``, for one H100/H200):

1. ``sync-debug``: a steady-state step of every rule (AdamW, Adam, SGD, Muon with AdamW) under
   ``torch.cuda.set_sync_debug_mode("error")`` (``checks.py``);
2. ``offload``: ``offload_optimizer_state`` steps against the same steps without offload (tolerance 0),
   the state storages freed between steps and device memory back to params + grads; under
   ``compute-sanitizer --tool memcheck`` (caching allocator off) where that tool is installed;
3. ``cuda-tests`` and ``cuda-tests-no-combo``: the CUDA tests (tests/test_cuda.py,
   tests/test_cuda_graphs.py, tests/test_health_cuda.py whole; of every other test file, the tests
   with a CUDA/GPU skip mark, picked by ``cuda_only.py``), with combo kernels on and then off
   (``COMPILED_STEP_COMBO_KERNELS=0``). Two-device aliasing is among them; with one GPU it is skipped
   and the report says so;
4. ``bench``: ``python -m compiled_step bench --device cuda --quick``; its rows go into the report.

Figures (pass/fail counts, failing test names, bench rows, timings, the machine) go to
``DIR/gpu_acceptance.json`` and ``DIR/gpu_acceptance.md``; each stage's output to ``DIR/logs/``.
Without a CUDA device it says so, lists the stages it would run and exits 0.
"""

from compiled_step.cli.gpu_check.command import main

__all__ = ["main"]
