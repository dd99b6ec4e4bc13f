"""``python -m compiled_step graphs``: capture the reference configurations and write their files into
``graphs/`` (or ``--out``), or with ``--check`` compare with them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from compiled_step.cli.graphs.capturing import capture_references
from compiled_step.cli.graphs.goldens import compare, default_out_dir, goldens_apply, write
from compiled_step.cli.graphs.references import REFERENCES
from compiled_step.cli.graphs.rendering import render


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m compiled_step graphs",
        description="Write the compiled graphs of FusedStep's reference configurations (one file each) "
        "into graphs/ or --out DIR. Deterministic: the same command twice gives identical files.",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the checkout's graphs/)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=[r.name for r in REFERENCES],
                   help="only these configurations (default: all)")
    p.add_argument("--check", action="store_true",
                   help="compare with the folder instead of writing; exit 1 and print the diff on a difference")
    p.add_argument("--list", action="store_true", help="list the reference configurations and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for ref in REFERENCES:
            print(f"{ref.name:<22} {ref.title}")
        return 0
    out = args.out if args.out is not None else default_out_dir()
    ok, reason = goldens_apply()
    if not ok:
        print(f"note: {reason}", file=sys.stderr)
    start = time.perf_counter()
    print(f"capturing {len(args.only or REFERENCES)} reference configuration(s) (each new graph compiles cold, "
          "a few seconds on a small CPU) ...", file=sys.stderr, flush=True)
    captures = capture_references(args.only)
    rendered = {f"{name}.txt": render(cap) for name, cap in captures.items()}
    broken = [name for name, cap in captures.items() if cap.graph_breaks]
    if args.check:
        mismatches = compare(rendered, out, complete=args.only is None)
        for m in mismatches:
            print(m)
        print(f"{len(mismatches)} difference(s) against {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        return 1 if mismatches or broken else 0
    paths = write(rendered, out, prune=args.only is None)
    for path in paths:
        print(path)
    print(f"wrote {len(paths)} file(s) into {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if broken:
        print(f"graph breaks in {broken}: see the files' summaries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
