"""Headline A/B of two git revisions of compiled_step in ONE process, steps interleaved, allocation order both ways.

    python scripts/ab_in_process.py REV_A REV_B [--threads 1,2] [--rounds 25]

Each revision's ``compiled_step/`` is exported (``git archive``) into a temporary folder as a package of its own name
(``cs_<rev>``), so both FusedSteps step copies of the bench's headline layout (``cli.layouts.gpt_layout``, AdamW
fp32) in the same process, with the reference grads copied back and a 64 MiB scratch buffer written before every
timed step, as the bench does. Why both allocation orders: on the development VMs the FusedStep whose flat buffers
are allocated first steps ~5% slower at 1 thread whatever its code (measured with four revisions: the time follows
the allocation order, not the revision), so one order alone reads as a regression or a speed-up that is not there.
Each order runs in a fresh process; the script prints each order's medians and their mean per revision.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time, statistics, torch
sys.path[:0] = {paths!r}
import importlib
from compiled_step.cli import layouts as L
from compiled_step.cli.bench import methods as M
packages = {{name: importlib.import_module(name) for name in {names!r}}}
lay = L.gpt_layout(); ref = L.make_grads(lay)
def build(fs_class):
    params = L.make_params(lay)
    for p, g in zip(params, ref): p.grad = g.clone()
    return params, fs_class(M.make_optimizers("adamw", lay, params)[0], max_grad_norm=1.0, compile_notice=False)
steppers = {{name: build(pkg.FusedStep) for name, pkg in packages.items()}}
for name in {names!r}: steppers[name][1].step()  # the flat buffers are allocated in this order
flush = torch.empty(64 << 20, dtype=torch.uint8)
for threads in {threads!r}:
    torch.set_num_threads(threads)
    times = {{name: [] for name in steppers}}
    for r in range({rounds}):
        for name in ({names!r} if r % 2 else {names!r}[::-1]):
            params, fused = steppers[name]
            with torch.no_grad(): torch._foreach_copy_([p.grad for p in params], ref)
            flush.add_(1)
            t = time.perf_counter(); fused.step(); times[name].append(time.perf_counter() - t)
    print("RESULT", threads, " ".join(f"{{n}}={{statistics.median(v[3:]) * 1e3:.3f}}" for n, v in times.items()), flush=True)
"""


def export(rev: str, into: pathlib.Path) -> str:
    """``compiled_step/`` at ``rev`` as the package ``cs_<rev>`` under ``into``; returns its name."""
    name = "cs_" + re.sub(r"\W", "_", rev)
    folder = into / name
    folder.mkdir()
    archive = subprocess.run(["git", "archive", rev, "compiled_step"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder), "--strip-components=1"], input=archive, check=True)
    for path in folder.rglob("*.py"):
        path.write_text(re.sub(r"\bcompiled_step\b", name, path.read_text()))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        a, b = export(args.rev_a, pathlib.Path(tmp)), export(args.rev_b, pathlib.Path(tmp))
        per_rev: dict[tuple[int, str], list[float]] = {}
        for order in ([a, b], [b, a]):
            code = CHILD.format(paths=[tmp], names=order, threads=threads, rounds=args.rounds)
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
            for line in out.splitlines():
                if line.startswith("RESULT"):
                    _, t, *pairs = line.split()
                    print(f"allocated {order[0]} first, {t} thread(s): {' '.join(pairs)} ms")
                    for pair in pairs:
                        name, ms = pair.split("=")
                        per_rev.setdefault((int(t), name), []).append(float(ms))
        for t in threads:
            ma, mb = statistics.mean(per_rev[(t, a)]), statistics.mean(per_rev[(t, b)])
            print(f"{t} thread(s), mean of both orders: {a} {ma:.3f} ms, {b} {mb:.3f} ms, {b}/{a} = {mb / ma:.3f}")


if __name__ == "__main__":
    main()
