"""A tqdm bar that also covers the long, silent first step.

The first call of a torch.compile'd step traces and compiles before it returns, which takes tens
of seconds on a small CPU and prints nothing. ``StepProgress.first_step()`` wraps that call with a
spinner and an elapsed-time counter driven by a background thread, so the user sees that work is
going on; later steps advance the bar and show the latest metrics.

The bar and the spinner redraw one line in place, which only makes sense on a terminal. When the
output is not one (stderr redirected to a file or a pipe, a CI log), ``StepProgress`` prints a few
plain lines instead: one when the first step starts, one when it is done, and the step count with
the metrics at each quarter of the run. tqdm is imported only for a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

__all__ = ["StepProgress"]

_SPINNER = "|/-\\"


def is_terminal(file: TextIO) -> bool:
    """Whether ``file`` is an interactive terminal (a redirected stream, a StringIO... is not)."""
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed or detached stream
        return False


class StepProgress:
    """Progress over `total` steps. Use as a context manager; ``enabled=False`` makes it silent.

    ``live`` chooses the tqdm bar and the spinner (True) or a few plain lines (False); the default,
    None, takes the bar only when ``file`` (default: ``sys.stderr``) is a terminal.

    Not thread-safe beyond its own spinner thread: call it from the training thread only.
    """

    def __init__(self, total: int, *, desc: str = "train", enabled: bool = True, file: TextIO | None = None,
                 live: bool | None = None) -> None:
        self._total = total
        self._desc = desc
        self._enabled = enabled
        self._file = file if file is not None else sys.stderr
        self._live = is_terminal(self._file) if live is None else live
        self._bar = None
        self._done = 0
        # Plain mode: a line at each quarter of the run (and at the last step), never one per step.
        self._every = max(1, -(-total // 4))

    @property
    def live(self) -> bool:
        """True when the bar and the spinner are drawn (a terminal), False for plain lines."""
        return self._live

    def __enter__(self) -> StepProgress:
        if self._enabled and self._live:
            from tqdm import tqdm  # lazy: importing this module must stay cheap

            # dynamic_ncols keeps the bar on one line when the terminal is narrow; the postfix
            # holds the metrics. mininterval bounds the redraw rate.
            self._bar = tqdm(total=self._total, desc=self._desc, file=self._file, dynamic_ncols=True,
                             mininterval=0.25, unit="step")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @contextlib.contextmanager
    def first_step(self, label: str = "compiling") -> Iterator[None]:
        """Show `label` with a spinner and elapsed seconds until the block exits.

        Not on a terminal: a line "`label`..." before the block and "`label`: done in N s" after it.
        The spinner runs in a daemon thread that only redraws the bar's description; the step
        itself runs in the caller's thread, so nothing about it changes.
        """
        if self._bar is None:
            if not self._enabled:
                yield
                return
            # Not a terminal: one line before, one after; no frames.
            start = time.perf_counter()
            self.write(f"{label}...")
            yield
            self.write(f"{label}: done in {time.perf_counter() - start:.1f}s")
            return
        bar, stop = self._bar, threading.Event()
        start = time.perf_counter()

        def spin() -> None:
            i = 0
            # Event.wait doubles as the sleep, so the thread exits as soon as the step is done.
            while not stop.wait(0.25):
                i += 1
                bar.set_description_str(
                    f"{label} {_SPINNER[i % len(_SPINNER)]} {time.perf_counter() - start:5.1f}s", refresh=True
                )

        bar.set_description_str(f"{label} {_SPINNER[0]}   0.0s", refresh=True)
        thread = threading.Thread(target=spin, name="compiled_step-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            bar.set_description_str(self._desc, refresh=False)
            self.write(f"{label}: done in {time.perf_counter() - start:.1f}s")

    def update(self, **metrics: float) -> None:
        """Advance by one step and show `metrics` (floats, formatted compactly)."""
        self._done += 1
        if self._bar is None:
            if self._enabled and (self._done % self._every == 0 or self._done == self._total):
                shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                self.write(f"{self._desc}: step {self._done}/{self._total}" + (f" ({shown})" if shown else ""))
            return
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plain print when the bar is off)."""
        if self._bar is not None:
            self._bar.write(message, file=self._file)
        elif self._enabled:
            print(message, file=self._file, flush=True)
