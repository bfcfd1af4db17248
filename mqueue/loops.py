"""Background loops of one shape: start, stop, one step.

Each of the worker's duties (claiming, running jobs, heartbeats, rescue,
crons, timeouts, batched completions) is a ``Loop`` whose ``step`` does one
round and returns how many seconds to wait before the next.  An error in a
step is retried with backoff: a loop never dies of a database outage, and
one duty's slow statement never delays another's (heartbeats have a loop of
their own, never behind a cron tick).  The loops of one worker share an
``OutageLog``: during an outage the worker logs one line per backoff step,
not one per loop and step (measured for issue 11: an idle worker with a cron
logged 30 lines in a 30 s outage from its three querying loops; now 10).

e.g.::

    beat = Loop("heartbeating", lambda: heartbeat_all() or 15.0)
    beat.start()          # in a thread of its own; Loop.run() uses the caller's
    ...
    beat.stop(); beat.join()
"""

from __future__ import annotations

import logging
import random
import threading
import time
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
#: After a lost race (``conflict``) a step is tried again within this many seconds (random):
#: at once, but not in lockstep with the winner.
CONFLICT_JITTER_SECONDS = 0.02


def jitter() -> float:
    """Seconds to wait before retrying a lost race: a few milliseconds, never the same for two workers."""
    return random.uniform(0.0, CONFLICT_JITTER_SECONDS)


def outage_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failed attempts in a row (0.25, 0.5, 1, ... 5)."""
    return min(0.25 * 2 ** (max(failures, 1) - 1), MAX_OUTAGE_BACKOFF_SECONDS)


class OutageLog:
    """One warning per backoff step for all the loops that share it, while the database is away.

    Every loop backs off on its own, on the same schedule (``outage_delay``),
    so the first loop to reach attempt N logs it and the others stay quiet
    about N; the first success after that logs that the database is back,
    and the other loops still backing off retry at once rather than sleep
    out their backoff (up to 5 s: a worker whose heartbeat saw the database
    return would otherwise claim nothing for that long).
    ``describe(error)`` may word an error better than "database unavailable"
    (e.g. "table mqueue_task missing ...; run: python -m mqueue migrate").

    e.g.::

        outages = OutageLog(describe=lambda error: None)
        claims = Loop("claiming", claim, outages=outages)
        rescues = Loop("rescuing expired jobs", rescue, outages=outages)
    """

    def __init__(self, describe: Callable[[BaseException], str | None] = lambda error: None) -> None:
        self._describe = describe
        self._lock = threading.Lock()
        self._logged = 0                    # the highest attempt logged in this outage
        self._since: float | None = None    # monotonic time of its first failure
        self._backing_off: set[Loop] = set()

    def failed(self, loop: "Loop", attempt: int, delay: float, error: BaseException) -> None:
        activity = loop.activity
        with self._lock:
            self._backing_off.add(loop)
            if attempt <= self._logged:
                return
            self._logged = attempt
            if self._since is None:
                self._since = time.monotonic()
        try:
            problem = self._describe(error)
        except Exception:  # noqa: BLE001 - wording must never hide the outage itself
            problem = None
        if problem:
            log.warning("%s (attempt %d while %s, retrying in %.2fs)", problem, attempt, activity, delay)
        else:
            log.warning("database unavailable while %s (attempt %d), retrying in %.2fs: %s",
                        activity, attempt, delay, first_line(error))

    def recovered(self, loop: "Loop") -> None:
        """``loop`` succeeded after failing: log the end of the outage once, cut the others' backoff."""
        with self._lock:
            self._backing_off.discard(loop)
            others, self._backing_off = self._backing_off, set()
            since, self._since, self._logged = self._since, None, 0
        if since is not None:
            log.info("database available again (%s) after %.1fs", loop.activity, time.monotonic() - since)
        for other in others:
            other.retry_now()


class Loop:
    """Call ``step()`` until ``stop()``; sleep what it returns, or until ``wake`` is set.

    ``activity`` names the duty in log lines ("database unavailable while
    claiming").  ``wake`` may be an Event shared with others (the process-wide
    wake-up of ``wakeup.py``); ``interrupted`` is polled while sleeping so a
    signal recorded by a handler is acted on within a slice.  ``outages``
    is shared by the loops of one worker (a loop alone has its own).
    ``conflict(error)`` says an error is a lost race with another worker
    (e.g. Galera's certification failure, error 1213): the step is retried
    after a few milliseconds, counted in ``conflicts`` and logged at debug
    level only, never backed off as an outage.
    """

    def __init__(self, activity: str, step: Callable[[], float], *, wake: threading.Event | None = None,
                 interrupted: Callable[[], bool] = lambda: False, outages: OutageLog | None = None,
                 conflict: Callable[[BaseException], bool] = lambda error: False) -> None:
        self.activity = activity
        self._conflict = conflict
        #: Lost races this loop retried (for the worker's summary).
        self.conflicts = 0
        self._step = step
        self._wake = wake or threading.Event()
        self._interrupted = interrupted
        self._outages = outages or OutageLog()
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
                if failures and not self._stopping.is_set():  # a step that stops may not have queried
                    self._outages.recovered(self)
                failures = 0
            except UNAVAILABLE as error:
                if self._conflict(error):
                    self.conflicts += 1
                    delay = jitter()
                    log.debug("lost a race with another worker while %s, retrying: %s", self.activity,
                              first_line(error))
                    self.sleep(delay)
                    continue
                failures += 1
                delay = outage_delay(failures)
                self._outages.failed(self, failures, delay, error)
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

    def retry_now(self) -> None:
        """End the current wait (another loop found the database back): the next step runs at once."""
        self._wake.set()

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
