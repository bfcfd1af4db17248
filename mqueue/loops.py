"""Background loops of one shape: start, stop, one step.

Each of the worker's duties (claiming, running jobs, heartbeats, rescue,
crons, timeouts, batched completions) is a ``Loop`` whose ``step`` does one
round and returns how many seconds to wait before the next.  An error in a
step is logged as one line and the step is retried with backoff: a loop never
dies of a database outage, and one duty's slow statement never delays
another's (heartbeats have a loop of their own, never behind a cron tick).

e.g.::

    beat = Loop("heartbeating", lambda: heartbeat_all() or 15.0)
    beat.start()          # in a thread of its own; Loop.run() uses the caller's
    ...
    beat.stop(); beat.join()
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .errors import first_line

log = logging.getLogger("mqueue.worker")

#: Backoff after a failed step: 0.25 s doubling up to this.
MAX_OUTAGE_BACKOFF_SECONDS = 5.0
#: Longest uninterrupted wait, so a stop or a recorded signal is seen soon.
WAIT_SLICE_SECONDS = 0.25
#: A database that is away, or a pool with no free connection for its timeout.
UNAVAILABLE = (DBAPIError, PoolTimeoutError)


def outage_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failed attempts in a row (0.25, 0.5, 1, ... 5)."""
    return min(0.25 * 2 ** (max(failures, 1) - 1), MAX_OUTAGE_BACKOFF_SECONDS)


class Loop:
    """Call ``step()`` until ``stop()``; sleep what it returns, or until ``wake`` is set.

    ``activity`` names the duty in log lines ("database unavailable while
    claiming").  ``wake`` may be an Event shared with others (the process-wide
    wake-up of ``wakeup.py``); ``interrupted`` is polled while sleeping so a
    signal recorded by a handler is acted on within a slice.
    """

    def __init__(self, activity: str, step: Callable[[], float], *, wake: threading.Event | None = None,
                 interrupted: Callable[[], bool] = lambda: False) -> None:
        self.activity = activity
        self._step = step
        self._wake = wake or threading.Event()
        self._interrupted = interrupted
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> "Loop":
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                delay = self._step()
                failures = 0
            except UNAVAILABLE as error:
                failures += 1
                delay = outage_delay(failures)
                log.warning("database unavailable while %s (attempt %d), retrying in %.2fs: %s",
                            self.activity, failures, delay, first_line(error))
            except Exception:  # never let a duty die silently
                failures += 1
                delay = outage_delay(failures)
                log.exception("%s failed (attempt %d), retrying in %.2fs", self.activity, failures, delay)
            if not self._stopping.is_set():
                self.sleep(delay)

    def sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``; return early when woken, stopped or interrupted."""
        if seconds <= 0:
            return
        remaining = seconds
        while remaining > 0 and not self._stopping.is_set() and not self._interrupted():
            slice_seconds = min(remaining, WAIT_SLICE_SECONDS)
            if self._wake.wait(slice_seconds):
                self._wake.clear()
                return
            remaining -= slice_seconds

    def stop(self) -> None:
        """Finish the current step, then end (``join`` waits for that)."""
        self._stopping.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
