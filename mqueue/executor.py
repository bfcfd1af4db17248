"""Run one claimed job: fresh session, the task, then one fenced write.

Decide, then write (Oban's executor): every run ends in an ``Outcome``;
after a failed run the pure ``retry.decide`` gives a ``Decision`` and the
dialect writes it, fenced by the lease token.  On success the job row
becomes ``succeeded`` *inside the task's own transaction*, so the task's
writes and the job's completion commit together or not at all.  Nothing here raises into
the worker loop.

When the database is away longer than the job's lease, the run's outcome
is unknown to this worker: it stops trying to write once the lease has
surely expired (a later write would race the rescue), counts the run
``LOST`` (not done), and the job is rescued by whichever worker finds the
expired lease once the database is back.  A COMMIT whose reply was lost
counts as done only if the row is found gone while the lease still held,
when no other worker could have taken the job.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import inspect
import logging
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from .dialects.base import ClaimedRow
from .encoding import decode_args
from .errors import Fail, JobTimeout, LeaseLostError, Retry, UnknownTaskError, first_line
from .jobs import Job, reset_current_job, set_current_job
from .middleware import run_wrapped
from .registry import DEFAULT_MAX_RETRIES, get_task
from .retry import Decision, decide
from .schema import SUCCEEDED as SUCCEEDED_STATE
from .session import Database, _current as _current_session
from .shell import CommandFailed, HandBack, ShellCommand

log = logging.getLogger("mqueue.executor")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one run of a job ended, as the worker counts it (compare with ``==``)."""

    name: str

    def __str__(self) -> str:
        return self.name


SUCCEEDED = Outcome("succeeded")
RETRIED = Outcome("retried")
FAILED = Outcome("failed")
#: Not done: the lease was lost, or the outcome could not be written while
#: the lease held.  The job is rescued (and run again) after its lease expires.
LOST = Outcome("lost")
#: Handed back unrun or uncharged (shutdown, or no database connection to run it with).
RELEASED = Outcome("released")
#: The task returned without touching its session: the worker completes the
#: job in a batch with others (there is no task transaction to join).
DEFERRED = Outcome("deferred")

#: A run that meets a transient database error (deadlock, lock timeout,
#: disconnect, no connection to be had) is run again in place, up to this
#: many runs per claim; after that the job is retried with backoff and the
#: run counted (issue 10: released without backoff, it looped forever).
TRANSIENT_RUNS = 3
#: How long an outcome write keeps retrying when the worker does not know its lease.
WRITE_RETRY_SECONDS = 120
#: Stored errors are cut to this many UTF-8 bytes: MySQL's TEXT holds 65,535,
#: and a write that does not fit fails in strict mode (the outcome was lost
#: and the job re-run ``max_retries + 1`` times).
MAX_ERROR_BYTES = 16_000
#: Of which the exception's own message (the end of the stored text) keeps at most this many.
MAX_MESSAGE_BYTES = 4_000
#: SQLAlchemy's last line of every error; ``mqueue list`` shows a stored error's last line.
_BACKGROUND = "(Background on this error at:"
#: Set by the engine's ``handle_error`` hook on an error raised while opening a connection.
_CONNECT_FAILED = "mqueue_connect_failed"

_HELD, _IN_TASK, _FINISHING, _TIMED_OUT = "held", "in task", "finishing", "timed out"


class Running:
    """What the worker keeps for one job it holds (claimed, maybe running).

    One lifecycle state, ``held -> in task -> finishing`` (again ``in task``
    for a run repeated in place) or ``in task -> timed out``, changed under a
    lock: the watchdog decides a timeout while the task may be returning.
    ``lost`` is set apart by the worker's heartbeat, whatever the state.
    """

    def __init__(self, row: ClaimedRow) -> None:
        self.row = row
        self.timeout: float | None = None
        self.started: float | None = None    # monotonic time the task (last) began
        #: Monotonic time at or before the lease was last extended (claim or heartbeat):
        #: the lease surely holds until ``renewed + lease``.
        self.renewed = time.monotonic()
        #: The lease this job was claimed with (its queue's), extended by each heartbeat.
        self.lease_seconds: float | None = None
        self._state = _HELD
        self._lost = False
        self._lock = threading.Lock()
        self._thread_id: int | None = None
        self._cancel: Callable[[], None] | None = None   # wakes an async task's event loop
        self._timeout_outcome: Outcome | None = None
        self._timeout_recorded = threading.Event()
        #: Why the last run failed (retried or failed), for its outcome's log line.
        self.error: BaseException | None = None
        #: What the task returned (``mqueue.testing.perform_job`` hands it back).
        self.value: Any = None
        #: A claim's transaction tried to complete this deferred job and failed: its COMMIT may have landed.
        self.completion_tried = False

    def __repr__(self) -> str:
        return f"<Running job={self.row.id} {self._state}{' lost' if self._lost else ''}>"

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def timed_out(self) -> bool:
        return self._state == _TIMED_OUT

    @property
    def finishing(self) -> bool:
        """The task returned or raised: its outcome is being written."""
        return self._state == _FINISHING

    def mark_lost(self) -> None:
        """The worker's heartbeat found the lease gone (another worker may own the job)."""
        self._lost = True

    def mark_renewed(self, at: float) -> None:
        """A heartbeat that began at monotonic time ``at`` extended this job's lease."""
        self.renewed = max(self.renewed, at)

    def run_seconds(self) -> float:
        """How long the task has been running (0 if it never started)."""
        return 0.0 if self.started is None else time.monotonic() - self.started

    def _finish(self) -> None:
        with self._lock:
            if self._state != _TIMED_OUT:
                self._state = _FINISHING


@dataclasses.dataclass(frozen=True)
class _Again:
    """A run to repeat in place; ``charged`` False: it never got a connection to run with."""

    error: BaseException
    charged: bool = True


#: ``_retrying``'s answer when it stopped trying: the outcome is unknown.
_GAVE_UP = object()


def _note_connect_failure(context) -> None:
    """``handle_error`` hook on the worker's engine: mark errors raised while opening a connection."""
    if context.connection is None and context.sqlalchemy_exception is not None:
        setattr(context.sqlalchemy_exception, _CONNECT_FAILED, True)


def _could_not_connect(error: BaseException) -> bool:
    """The job's database gave no connection: a server limit, refused, or an exhausted pool."""
    return isinstance(error, PoolTimeoutError) or getattr(error, _CONNECT_FAILED, False)


class Executor:
    """Runs jobs for one worker; shared by its threads (per-job state lives in ``Running``).

    ``lease_seconds`` (the worker's lease) bounds how long outcome writes
    retry: never past the lease, whose expiry is tracked by
    ``Running.renewed``.  With ``command`` (``--exec``) every row runs that
    shell command in place of its registered task (``shell.py``).
    """

    def __init__(self, db: Database, heartbeat: Callable[[Job], None], stopping: Callable[[], bool],
                 lease_seconds: float | None = None, command: ShellCommand | None = None) -> None:
        self.db = db
        self.command = command
        self.dialect = db.dialect
        self.lease_seconds = lease_seconds
        self._heartbeat = heartbeat
        self._stopping = stopping
        if not event.contains(db.engine, "handle_error", _note_connect_failure):
            event.listen(db.engine, "handle_error", _note_connect_failure)

    # -- entry point -------------------------------------------------------
    def execute(self, running: Running) -> Outcome:
        started = time.monotonic()
        outcome = self._execute(running)
        if outcome != DEFERRED:  # a deferred job is logged once its completion is written
            log_outcome(running.row, time.monotonic() - started, outcome, running.error)
        return outcome

    def _execute(self, running: Running) -> Outcome:
        row = running.row
        try:
            task = get_task(row.name) if self.command is None else self.command.task_for(running)
        except UnknownTaskError as error:
            # A rolling deploy may bring the task soon: a failed run, retried with backoff.
            running._finish()
            return self._fail_run(running, None, error)
        try:
            named = decode_args(row.args)
            args, kwargs = task.call_arguments(named)
        except Exception as error:  # anything a malformed row raises: it fails at once, clearly
            running._finish()
            running.error = error
            return self._write_failure(running, Decision("fail"), _clip_head(f"{type(error).__name__}: {error}"))
        running.timeout = task.timeout
        job = Job(id=row.id, name=row.name, queue=row.queue, args=named, retries=row.retries,
                  token=row.token, max_retries=row.max_retries, _heartbeat=self._job_heartbeat)
        for attempt in range(1, TRANSIENT_RUNS + 1):
            result = self._run_once(running, task, job, args, kwargs)
            if not isinstance(result, _Again):
                return result
            if running.lost:
                return LOST
            if self._stopping():
                return self._release(running)  # shutting down: handed back, as unstarted jobs are
            if attempt < TRANSIENT_RUNS:
                time.sleep(0.05 * attempt)
        if not result.charged:
            return self._release(running)  # it never ran for want of a connection: not a failed run
        return self._fail_run(running, task, result.error)

    # -- one run ------------------------------------------------------------
    def _run_once(self, running: Running, task, job: Job, args, kwargs) -> Outcome | _Again:
        row = running.row
        session = self.db.Session()
        session_token = _current_session.set(session)
        job_token = set_current_job(job)
        try:
            try:
                running.started = time.monotonic()
                self._call(running, task.fn, args, kwargs, job, getattr(task, "middleware", ()))
                if running.timed_out:
                    raise JobTimeout()
                if not (session.in_transaction() or session.new or session.dirty or session.deleted):
                    return DEFERRED  # nothing to commit with: the worker's completer batches it
                session.flush()  # the task's pending ORM writes, then the fenced completion on the same connection
                if not self.dialect.complete_job(session.connection(), row.id, row.token, row.tracked,
                                                 row.has_dependents):
                    _rollback(session)
                    log.warning("job=%s lease lost before completion: its writes were rolled back", row.id)
                    return LOST
            except BaseException as error:  # noqa: B902 - a task may raise anything
                if running.timed_out:
                    # The interruption may have landed between a statement and its
                    # reply: that connection must never go back to the pool.
                    session.invalidate()
                    running._timeout_recorded.wait()  # the watchdog records the timeout
                    return running._timeout_outcome or LOST
                _rollback(session)
                if not isinstance(error, Exception):
                    raise
                if isinstance(error, HandBack):
                    log.warning("job=%s %s: handing it back", row.id, error)
                    return self._release(running)
                if _could_not_connect(error):
                    log.warning("job=%s no database connection for the task, trying again: %s", row.id,
                                first_line(error))
                    return _Again(error, charged=False)
                if isinstance(error, DBAPIError) and self.dialect.is_transient(error):
                    log.warning("job=%s transient database error, running it again: %s", row.id,
                                first_line(error))
                    return _Again(error)
                return self._fail_run(running, task, error)
            return self._commit(running, session, task)
        finally:
            reset_current_job(job_token)
            _current_session.reset(session_token)
            session.close()

    def _call(self, running: Running, fn, args, kwargs, job: Job | None = None,
              middleware: Sequence[Callable] = ()) -> None:
        """Call the task, inside its middleware, where the timeout watchdog may interrupt it, and nowhere else.

        An ``async def`` task (or one that returns a coroutine) runs to
        completion on a fresh event loop in this thread; its context, so the
        job's session and ``current_job()``, is this thread's.  Middleware
        (``middleware.py``) wraps the whole run, the event loop included.
        """
        def run():
            result = fn(*args, **kwargs)
            if inspect.iscoroutine(result):
                result = asyncio.run(_cancellable(running, result))
            return result

        with running._lock:
            running._thread_id = threading.get_ident()
            running._state = _IN_TASK
        try:
            running.value = run() if job is None else run_wrapped(job, run, middleware)
        finally:
            with running._lock:
                running._cancel = None
                if running._state == _TIMED_OUT:
                    # Drop an interrupt that arrived just as the task returned.  Only
                    # if one was sent: on CPython 3.11 clearing with NULL leaves the
                    # interpreter's async-exception flag set for good, and any
                    # sys.setprofile/settrace user (cProfile, coverage, pdb) then
                    # spins forever on the next job (scripts/bench.py profile).
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(running._thread_id), None)
                else:
                    running._state = _FINISHING

    def _commit(self, running: Running, session, task) -> Outcome | _Again:
        row = running.row
        try:
            session.commit()
            return SUCCEEDED
        except DBAPIError as error:
            _rollback(session)
            if not self.dialect.is_transient(error):
                return self._fail_run(running, task, error)  # e.g. a deferred constraint the task broke
            # The COMMIT's outcome is unknown if the connection died: ask the database.
            state = self._retrying(lambda conn: self.dialect.job_state(conn, row.id), running)
            if state is _GAVE_UP:
                return LOST
            if state == (SUCCEEDED_STATE, row.token):
                return SUCCEEDED  # our COMMIT did it; only its reply was lost
            if state is None:
                if time.monotonic() < self._lease_deadline(running):
                    return SUCCEEDED  # pruned while our lease held: our COMMIT did it
                log.warning("job=%s commit outcome unknown (the row is gone and the lease had expired)", row.id)
                return LOST
            if state != ("running", row.token):
                return LOST
            log.warning("job=%s commit did not happen (%s); running it again", row.id, first_line(error))
            return _Again(error)

    def _job_heartbeat(self, job: Job) -> None:
        """``current_job().heartbeat()``.

        Where writers are serialized (SQLite) a task whose session is in a
        transaction holds the only write lock, so a heartbeat in a
        transaction of its own would wait for the task: a deadlock.  There
        the lease is extended through the task's own connection (it commits
        with the task).  Elsewhere it is a short transaction of its own,
        which must not lock the job's row inside the task's transaction
        (the worker's batched heartbeat would wait for the task).
        """
        session = _current_session.get()
        if (not self.dialect.skip_locked and self.lease_seconds is not None and session is not None
                and session.in_transaction() and session.get_bind() is self.db.engine):
            if self.dialect.heartbeat_jobs(session.connection(), [(job.id, job.token)], self.lease_seconds):
                raise LeaseLostError(f"job {job.id} is no longer owned by this worker")
            return
        self._heartbeat(job)

    # -- failure paths --------------------------------------------------------
    def _fail_run(self, running: Running, task, error: BaseException) -> Outcome:
        row = running.row
        running.error = error
        max_retries = row.max_retries if row.max_retries is not None else (
            task.max_retries if task is not None else DEFAULT_MAX_RETRIES)
        decision = decide(error, row.retries, max_retries, task.backoff if task else None)
        return self._write_failure(running, decision, error_text(error))

    def _write_failure(self, running: Running, decision: Decision, message: str) -> Outcome:
        row = running.row
        if decision.action == "retry":
            result = self._retrying(lambda c: self.dialect.retry_job(
                c, row.id, row.token, decision.delay_seconds, message), running)
            outcome = RETRIED
        else:
            result = self._retrying(lambda c: self.dialect.fail_job(c, row.id, row.token, message), running)
            outcome = FAILED
        if result is _GAVE_UP:
            return LOST
        if not result:
            log.warning("job=%s lease lost before its %s could be recorded", row.id, decision.action)
            return LOST
        return outcome

    def record_timeout(self, running: Running) -> None:
        """Called by the watchdog: count a run that exceeded ``timeout=`` as failed."""
        row = running.row
        task = get_task(row.name)
        error = JobTimeout(f"task {row.name} exceeded its timeout of {task.timeout:g} s")
        running.error = error
        max_retries = row.max_retries if row.max_retries is not None else task.max_retries
        decision = decide(error, row.retries, max_retries, task.backoff)
        # Interrupt the task before writing: on SQLite a task holding the write
        # lock would otherwise block this write, then commit its late completion.
        with running._lock:
            if running._state != _IN_TASK:
                return  # it returned meanwhile: its own completion or failure write decides
            running._state = _TIMED_OUT
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(running._thread_id),
                                                       ctypes.py_object(JobTimeout))
            if running._cancel is not None:
                try:
                    running._cancel()  # an event loop waiting in select() runs no bytecode to interrupt
                except RuntimeError:
                    pass  # the loop closed as the coroutine returned: the interruption lands anyway
        try:
            running._timeout_outcome = self._write_failure(running, decision, f"JobTimeout: {error}")
        finally:
            running._timeout_recorded.set()

    def complete_deferred(self, batch: list[Running]) -> list[Outcome]:
        """Complete jobs whose task returned ``DEFERRED``, all in one transaction; their outcomes.

        Logs each job's outcome line, as ``execute`` does for the others.
        """
        pairs = [(r.row.id, r.row.token) for r in batch]
        # A batch whose completion with a claim failed (``claim_and_complete``) may have been
        # completed by that claim's COMMIT: as after a failed attempt here.
        attempts = 1 if any(r.completion_tried for r in batch) else 0

        def write(engine) -> list[int]:
            nonlocal attempts
            attempts += 1
            lost, gone = self.dialect.complete_many(engine, pairs, [r.row.id for r in batch if r.row.tracked])
            # After a failed attempt whose COMMIT may have landed, a row that
            # is gone was completed by it (as ``_commit`` decides for one job):
            # every attempt starts while all the leases hold.
            return lost if attempts == 1 else [job_id for job_id in lost if job_id not in gone]

        return self.settle_deferred(batch, self._retrying(write, *batch, own_transaction=True))

    def settle_deferred(self, batch: list[Running], lost) -> list[Outcome]:
        """The outcomes of a completed batch of deferred jobs (``lost``: ids not completed, or
        ``_GAVE_UP``), each logged."""
        outcomes = []
        now = time.monotonic()
        for running in batch:
            row = running.row
            if lost is _GAVE_UP:
                outcome = LOST
            elif row.id in lost:
                log.warning("job=%s lease lost before completion", row.id)
                outcome = LOST
            else:
                outcome = SUCCEEDED
            log_outcome(row, now - (running.started or now), outcome)
            outcomes.append(outcome)
        return outcomes

    def _release(self, running: Running) -> Outcome:
        row = running.row
        result = self._retrying(lambda c: self.dialect.release_job(c, row.id, row.token), running)
        return RELEASED if result is True else LOST

    def release(self, row: ClaimedRow) -> bool:
        """Hand a job back unrun (shutdown); fenced."""
        result = self._retrying(lambda c: self.dialect.release_job(c, row.id, row.token),
                                job_ids=[row.id], deadline=time.monotonic() + 5)
        return result is True

    def _lease_deadline(self, running: Running) -> float:
        """Monotonic time until which the job's lease surely holds."""
        lease = running.lease_seconds or self.lease_seconds
        if lease is None:
            return max(running.renewed, time.monotonic()) + WRITE_RETRY_SECONDS
        return running.renewed + lease

    def _retrying(self, write, *held: Running, job_ids: Sequence[int] = (), deadline: float | None = None,
                  own_transaction: bool = False):
        """Run ``write(conn)`` in its own transaction, retrying transient errors.

        ``own_transaction``: ``write(engine)`` opens and commits its own transaction(s).

        Returns the write's result, or ``_GAVE_UP`` once the next attempt
        would start after the leases of ``held`` surely expired (or after
        ``deadline``), or at once on an error that is not transient.  The
        outcome is then unknown: the job is rescued after its lease expires.
        """
        if held:
            job_ids = [r.row.id for r in held]
            deadline = min(self._lease_deadline(r) for r in held)
        label = _jobs_label(job_ids)
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                if own_transaction:
                    return write(self.db.engine)
                with self.db.engine.begin() as conn:
                    return write(conn)
            except (DBAPIError, PoolTimeoutError) as error:
                transient = isinstance(error, PoolTimeoutError) or self.dialect.is_transient(error)
                if not transient or time.monotonic() + delay > deadline or any(r.lost for r in held):
                    log.error("%s could not record its outcome (attempt %d), leaving it to the lease: %s",
                              label, attempt, first_line(error))
                    return _GAVE_UP
                log.warning("%s database error recording outcome (attempt %d), retrying in %.2fs: %s",
                            label, attempt, delay, first_line(error))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


async def _cancellable(running: Running, coroutine) -> Any:
    """Await an async task's coroutine, cancellable from the watchdog's thread."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    with running._lock:
        running._cancel = lambda: loop.call_soon_threadsafe(task.cancel)
    return await coroutine


def _rollback(session) -> None:
    """Roll back; a connection that cannot even do that is thrown away, never pooled."""
    try:
        session.rollback()
    except DBAPIError:
        session.invalidate()


#: The error on an outcome's log line is cut to this many characters.
MAX_LOGGED_ERROR = 500


def log_outcome(row: ClaimedRow, duration: float, outcome: Outcome,
                error: BaseException | None = None) -> None:
    """One line per job outcome, fixed keys; a failed or retried run ends with ``error=`` and its first line.

    The traceback follows at debug level (``--log-level debug``); the row
    keeps it too (``mqueue show ID``).  A run that failed for good is a
    warning, every other outcome is info.
    """
    if error is None or outcome not in (RETRIED, FAILED):
        log.info("job=%s task=%s queue=%s duration=%.3fs outcome=%s", row.id, row.name, row.queue, duration,
                 outcome)
        return
    level = logging.WARNING if outcome == FAILED else logging.INFO
    log.log(level, "job=%s task=%s queue=%s duration=%.3fs outcome=%s error=%s", row.id, row.name, row.queue,
            duration, outcome, error_line(error))
    if log.isEnabledFor(logging.DEBUG):
        log.debug("job=%s traceback of the %s run:\n%s", row.id, outcome, _valid_utf8(format_error(error)).rstrip())


def error_line(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for a log line."""
    text = _valid_utf8(f"{type(error).__name__}: {first_line(error)}")
    return text if len(text) <= MAX_LOGGED_ERROR else text[:MAX_LOGGED_ERROR - 3] + "..."


def _jobs_label(job_ids: Sequence[int]) -> str:
    """``job=5`` for one job, ``jobs=5..9(4)`` for a batch (log lines stay short)."""
    if len(job_ids) == 1:
        return f"job={job_ids[0]}"
    return f"jobs={job_ids[0]}..{job_ids[-1]}({len(job_ids)})"


# -- the error stored on the row ---------------------------------------------------


def error_text(error: BaseException) -> str:
    """What a failed run stores: a message for mqueue's own signals, else the traceback."""
    if isinstance(error, Fail):
        return _clip_head(f"Fail: {error}")
    if isinstance(error, Retry):
        return _clip_head(f"Retry: {error.reason}")
    if isinstance(error, UnknownTaskError):
        return _clip_head(f"UnknownTaskError: {error}")
    if isinstance(error, CommandFailed):
        return _clip_head(error.stored_error())  # the command's stderr tail, its status last
    return format_error(error)


def format_error(error: BaseException) -> str:
    """The error and its traceback as stored on the row, at most ``MAX_ERROR_BYTES`` of UTF-8.

    The last line is the error's own message (``mqueue list`` shows it):
    SQLAlchemy's "Background on this error" link is dropped and, for its
    errors, the SQL and parameters lines go above the driver's message.
    When too long, the end of the traceback and the start of the message's
    first line are kept.
    """
    exception = traceback.TracebackException.from_exception(error)
    message = "".join(_drop_background(list(exception.format_exception_only())))
    frames = "".join(_drop_background(list(exception.format())))
    if frames.endswith(message):
        frames = frames[:len(frames) - len(message)]
    lines = message.splitlines() or [type(error).__name__]
    headline, details = lines[0], lines[1:]
    lines = details + [headline]   # the headline last, whatever follows it (SQL, notes, more lines)
    frames = _valid_utf8(frames)
    headline = _valid_utf8(headline)
    text = _valid_utf8(frames + "\n".join(lines) + "\n")
    if len(text.encode("utf-8")) <= MAX_ERROR_BYTES:
        return text
    headline = _clip_head(headline, MAX_MESSAGE_BYTES)
    if len(lines) > 1:
        headline += f" [... {len(lines) - 1:,} more lines of message cut]"
    headline += "\n"
    return _clip_tail(frames, MAX_ERROR_BYTES - len(headline.encode("utf-8"))) + headline


def _drop_background(chunks: list[str]) -> list[str]:
    """Every chunk without SQLAlchemy's "(Background on this error at: ...)" lines."""
    out = []
    for chunk in chunks:
        if _BACKGROUND in chunk:
            chunk = "".join(line for line in chunk.splitlines(keepends=True) if not line.startswith(_BACKGROUND))
        if chunk:
            out.append(chunk)
    return out


def _valid_utf8(text: str) -> str:
    """``text`` with lone surrogates (an undecodable file name, say) escaped: storable everywhere."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clip_head(text: str, limit: int = MAX_ERROR_BYTES) -> str:
    """The start of ``text`` in at most ``limit`` UTF-8 bytes (never half a character)."""
    text = _valid_utf8(text)
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = f" [... {len(data):,} bytes, cut]"
    return data[:limit - len(marker.encode("utf-8"))].decode("utf-8", "ignore") + marker


def _clip_tail(text: str, limit: int) -> str:
    """The end of ``text`` in at most ``limit`` UTF-8 bytes, from a line start."""
    text = _valid_utf8(text)
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    marker = f"[... {len(data):,} bytes of traceback, the start cut]\n"
    tail = data[len(data) - (limit - len(marker.encode("utf-8"))):].decode("utf-8", "ignore")
    newline = tail.find("\n")
    return marker + (tail[newline + 1:] if 0 <= newline < len(tail) - 1 else tail)
