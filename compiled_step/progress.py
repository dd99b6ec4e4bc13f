"""A tqdm bar that also covers the long, silent first step.

The first call of a torch.compile'd step traces and compiles before it returns, which takes tens
of seconds on a small CPU and prints nothing. ``StepProgress.first_step()`` wraps that call with a
spinner and an elapsed-time counter driven by a background thread, so the user sees that work is
going on; later steps advance the bar and show the latest metrics.
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


class StepProgress:
    """Progress over `total` steps. Use as a context manager; ``enabled=False`` makes it silent.

    Not thread-safe beyond its own spinner thread: call it from the training thread only.
    """

    def __init__(self, total: int, *, desc: str = "train", enabled: bool = True, file: TextIO | None = None) -> None:
        self._total = total
        self._desc = desc
        self._enabled = enabled
        self._file = file if file is not None else sys.stderr
        self._bar = None

    def __enter__(self) -> StepProgress:
        if self._enabled:
            from tqdm import tqdm  # lazy: importing this module must stay cheap

            # dynamic_ncols keeps the bar on one line when the terminal is narrow; the postfix
            # holds the metrics. mininterval bounds the redraw rate in logs that are not a TTY.
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

        The spinner runs in a daemon thread that only redraws the bar's description; the step
        itself runs in the caller's thread, so nothing about it changes.
        """
        if self._bar is None:
            yield
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
        if self._bar is None:
            return
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (plain print when the bar is off)."""
        if self._bar is not None:
            self._bar.write(message, file=self._file)
        elif self._enabled:
            print(message, file=self._file)
