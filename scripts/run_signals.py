"""How a training run stops: signals recorded while it runs and acted on at its safe points,
and a reader that went away (`| head`), which stops it the same way.

    with deferred_signals() as received:   # SIGINT/SIGTERM only record themselves in here
        ...                                # the run checks "signal" in received at safe points
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path


class Interrupted(Exception):
    """A signal (or a closed stdout) stopped the run before its first step."""

    def __init__(self, signum: int, run_dir: Path | None):
        where = f" (run directory {run_dir})" if run_dir is not None else ""
        super().__init__(f"{stopped_by(signum)} before the first step: nothing was trained or saved{where}")
        self.signum = signum


def stopped_by(signum: int) -> str:
    return "stdout closed" if signum == signal.SIGPIPE else f"{signal.Signals(signum).name} received"


_signals: dict | None = None  # the record of the outermost `deferred_signals`


@contextlib.contextmanager
def deferred_signals():
    """While inside, SIGINT and SIGTERM only record themselves (the first one, under
    "signal" in the dict yielded): the run stops at its next safe point. Nested uses share
    the outermost record (cli's, which covers main's). An ignored signal stays ignored;
    off the main thread (where Python cannot set handlers) the signals keep theirs."""
    global _signals
    if _signals is not None:
        yield _signals
        return
    received: dict = {}
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, lambda signum, _: received.setdefault("signal", signum))
    _signals = received
    try:
        yield received
    finally:
        _signals = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def say(text: str, received: dict) -> None:
    """`text` on stdout. A reader that went away (`| head`) stops the run as a signal would;
    stdout then points at /dev/null, so nothing more is written to the closed pipe."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        received.setdefault("signal", signal.SIGPIPE)
