"""Start-up of a daemon: wait for a database that is not up yet, stop on a signal meanwhile.

A daemon is often started before its database (containers, systemd units
without ordering).  ``wait_for_database`` keeps trying with backoff and one
log line per attempt; missing tables are a mistake no waiting fixes and end
the start at once.  ``StartupSignals`` lets SIGTERM/SIGINT end that wait
with exit status 0, before the worker has installed its own handlers.

e.g.::

    with StartupSignals() as signals:
        if not wait_for_database(db, signals.stopped):
            return 0                  # stopped while waiting
        signals.interrupt_from_now()  # until the worker's own handlers are in
        worker.run()
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

from sqlalchemy.exc import DBAPIError

from .errors import DatabaseUnavailableError, first_line
from .session import Database

log = logging.getLogger("mqueue.startup")

#: First wait after a failed attempt; doubled after each one up to the maximum.
FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 10.0
#: How often a wait looks at ``should_stop``: a signal ends it this fast.
_STOP_CHECK_SECONDS = 0.05


def wait_for_database(db: Database, should_stop: Callable[[], bool], *,
                      first_delay: float = FIRST_DELAY_SECONDS, max_delay: float = MAX_DELAY_SECONDS) -> bool:
    """Return True once ``db.check_schema()`` passes; False if ``should_stop()`` turned true first.

    e.g.::

        if not wait_for_database(db, stop_requested.is_set):
            return  # asked to stop before the database came up

    Retried, with one warning per attempt naming the URL without its password:
    an unreachable server, a full server (connection limit) and other
    transient errors.  Raised at once: ``SchemaMissingError`` (run
    ``python -m mqueue migrate``) and any other database error (e.g. a wrong
    password), since waiting would not fix them.
    """
    attempt, delay = 0, first_delay
    while not should_stop():
        try:
            db.check_schema()
        except DatabaseUnavailableError as error:
            cause = str(error)  # already names the URL without its password
        except DBAPIError as error:
            if not (db.dialect.is_connection_limit(error) or db.dialect.is_transient(error)):
                raise
            cause = f"database {db.safe_url}: {first_line(error)}"
        else:
            if attempt:
                log.info("database %s is ready after %d failed attempt(s)", db.safe_url, attempt)
            return True
        attempt += 1
        log.warning("waiting for the database (attempt %d, next in %.1fs): %s", attempt, delay, cause)
        _sleep(delay, should_stop)
        delay = min(delay * 2, max_delay)
    return False


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not should_stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, _STOP_CHECK_SECONDS))


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived while starting, after the wait for the database.

    A ``BaseException`` so that no ``except Exception`` on the way swallows
    it; nothing has been claimed yet, so there is nothing to hand back.
    """


class StartupSignals:
    """Handle SIGTERM/SIGINT (and ignore SIGUSR2) until the worker installs its own handlers.

    While waiting, a signal is only recorded (``stopped()``), and the wait
    ends within ``_STOP_CHECK_SECONDS``.  After ``interrupt_from_now()`` a
    signal raises ``StopRequested`` instead: the worker is being built and
    would otherwise never hear of it (its handlers replace these, so once it
    serves it gets the signals itself).  Leaving the context puts the
    previous handlers back.  Outside the main thread it does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._interrupt = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StartupSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)
            # SIGUSR2 (stop claiming, see worker.py) would otherwise end a worker
            # that is still starting, e.g. when a supervisor passes it on early.
            self._previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def stopped(self) -> bool:
        return self.received is not None

    def interrupt_from_now(self) -> None:
        """A signal from now on raises ``StopRequested`` (at once if one came already)."""
        self._interrupt = True
        if self.received is not None:
            raise StopRequested(self.received)

    def _on_signal(self, signum: int, _frame) -> None:
        # Only record (and raise once): logging here could meet the main
        # thread inside a log call; the caller logs why it stops.
        if self.received is None:
            self.received = signum
            if self._interrupt:
                raise StopRequested(signum)
