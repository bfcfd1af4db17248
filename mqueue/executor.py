"""Run one claimed job: fresh session, the task, then one fenced write.

The executor decides (pure ``retry.decide``), the dialect writes.  On
success the job row is deleted *inside the task's own transaction*, fenced
by the lease token, so the task's writes and the job's completion commit
together or not at all.  Nothing here raises into the worker loop: every
path ends in an ``outcome`` string.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy.exc import DBAPIError

from .dialects.base import ClaimedRow
from .encoding import decode_args
from .errors import Fail, JobTimeout, Retry, UnknownTaskError
from .jobs import Job, reset_current_job, set_current_job
from .registry import DEFAULT_MAX_RETRIES, get_task
from .retry import decide
from .session import Database, _current as _current_session

log = logging.getLogger("mqueue.executor")

SUCCEEDED, RETRIED, FAILED, LOST, RELEASED = "succeeded", "retried", "failed", "lost", "released"
#: The task returned without touching its session: the worker completes the
#: job in a batch with others (there is no task transaction to join).
DEFERRED = "deferred"
#: A task that hits a transient database error (deadlock, lock timeout,
#: disconnect) is run again in place this many times before the job is
#: handed back; such errors never count as a task failure.
TRANSIENT_RERUNS = 3
#: How long a fenced write keeps retrying through a database outage.
WRITE_RETRY_SECONDS = 120


@dataclass
class Running:
    """Book-keeping the worker keeps for one job it holds (claimed, maybe running)."""

    row: ClaimedRow
    timeout: float | None = None
    started: float | None = None          # monotonic time the task began
    thread_id: int | None = None
    timed_out: bool = False
    lost: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_task: bool = False
    finishing: bool = False               # the task returned or raised: its outcome is being written
    timeout_outcome: str | None = None    # what the watchdog recorded for a timed-out run
    timeout_recorded: threading.Event = field(default_factory=threading.Event)


def format_error(error: BaseException) -> str:
    """The error and its traceback as stored on the row (bounded in size)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text[-20000:]


class Executor:
    """Runs jobs for one worker; shared by its threads (it holds no per-job state)."""

    def __init__(self, db: Database, heartbeat: Callable[[Job], None], stopping: Callable[[], bool]) -> None:
        self.db = db
        self.dialect = db.dialect
        self._heartbeat = heartbeat
        self._stopping = stopping

    # -- entry point -------------------------------------------------------
    def execute(self, running: Running) -> str:
        row = running.row
        started = time.monotonic()
        outcome = self._execute(running)
        if outcome == DEFERRED:
            return outcome  # logged once its completion is written
        log.info("job=%s task=%s queue=%s duration=%.3fs outcome=%s", row.id, row.name, row.queue,
                 time.monotonic() - started, outcome)
        return outcome

    def _execute(self, running: Running) -> str:
        row = running.row
        try:
            task = get_task(row.name)
            named = decode_args(row.args)
            args, kwargs = task.call_arguments(named)
        except (UnknownTaskError, ValueError, TypeError) as error:
            message = f"{type(error).__name__}: {error}"
            running.finishing = True
            return self._write_failure(row, None, "fail", 0.0, message)
        running.timeout = task.timeout
        job = Job(id=row.id, name=row.name, queue=row.queue, args=named, retries=row.retries,
                  token=row.token, max_retries=row.max_retries, _heartbeat=self._heartbeat)
        for attempt in range(1, TRANSIENT_RERUNS + 1):
            outcome = self._run_once(running, task, job, args, kwargs)
            if outcome == "disconnected":
                break  # no point re-running against a database that is away: hand it back
            if outcome != "transient":
                return outcome
            if running.timed_out or running.lost:
                return LOST
            time.sleep(0.05 * attempt)
        return self._release(row)

    # -- one run ------------------------------------------------------------
    def _run_once(self, running: Running, task, job: Job, args, kwargs) -> str:
        row = running.row
        session = self.db.Session()
        session_token = _current_session.set(session)
        job_token = set_current_job(job)
        try:
            try:
                running.started = time.monotonic()
                self._call(running, task.fn, args, kwargs)
                if running.timed_out:
                    raise JobTimeout()
                if not (session.in_transaction() or session.new or session.dirty or session.deleted):
                    return DEFERRED  # nothing to commit with: the worker's completer batches it
                session.flush()  # the task's pending ORM writes, then the fenced DELETE on the same connection
                if not self.dialect.complete_job(session.connection(), row.id, row.token):
                    session.rollback()
                    log.warning("job=%s lease lost before completion: its writes were rolled back", row.id)
                    return LOST
            except BaseException as error:  # noqa: B902 - a task may raise anything
                session.rollback()
                if running.timed_out:
                    # the watchdog records the timeout; report what it wrote
                    running.timeout_recorded.wait()
                    return running.timeout_outcome or LOST
                if isinstance(error, DBAPIError) and self.dialect.is_transient(error):
                    if error.connection_invalidated or self.dialect.is_unreachable(error):
                        log.warning("job=%s database connection lost, handing the job back: %s", row.id,
                                    _first_line(error))
                        return "disconnected"
                    log.warning("job=%s transient database error, running it again: %s", row.id,
                                _first_line(error))
                    return "transient"
                if not isinstance(error, Exception):
                    raise
                return self._fail_run(row, task, error)
            return self._commit(session, row, task)
        finally:
            reset_current_job(job_token)
            _current_session.reset(session_token)
            session.close()

    def _call(self, running: Running, fn, args, kwargs) -> None:
        """Call the task where the timeout watchdog may interrupt it, and nowhere else."""
        with running.lock:
            running.thread_id = threading.get_ident()
            running.in_task = True
            running.finishing = False
        try:
            fn(*args, **kwargs)
        finally:
            with running.lock:
                running.in_task = False
                running.finishing = True
                # Drop an interrupt that arrived just as the task returned.  Only
                # if one was sent: on CPython 3.11 clearing with NULL leaves the
                # interpreter's async-exception flag set for good, and any
                # sys.setprofile/settrace user (cProfile, coverage, pdb) then
                # spins forever on the next job (scripts/bench.py profile).
                if running.timed_out:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(running.thread_id), None)

    def _commit(self, session, row: ClaimedRow, task) -> str:
        try:
            session.commit()
            return SUCCEEDED
        except DBAPIError as error:
            session.rollback()
            if not self.dialect.is_transient(error):
                # e.g. a deferred constraint the task's writes broke: a task failure
                return self._fail_run(row, task, error)
            # The COMMIT's outcome is unknown if the connection died: ask the database.
            state = self._retrying(lambda conn: self.dialect.job_state(conn, row.id), row.id)
            if state is None or state[1] != row.token or state[0] != "running":
                return SUCCEEDED if state is None else LOST
            log.warning("job=%s commit did not happen (%s); running it again", row.id, _first_line(error))
            return "transient"

    # -- failure paths --------------------------------------------------------
    def _fail_run(self, row: ClaimedRow, task, error: Exception) -> str:
        max_retries = row.max_retries if row.max_retries is not None else (
            task.max_retries if task is not None else DEFAULT_MAX_RETRIES)
        outcome = decide(error, row.retries, max_retries, task.backoff if task else None)
        if isinstance(error, Fail):
            message = f"Fail: {error}"
        elif isinstance(error, Retry):
            message = f"Retry: {error.reason}"
        else:
            message = format_error(error)
        return self._write_failure(row, task, outcome.action, outcome.delay_seconds, message)

    def _write_failure(self, row: ClaimedRow, task, action: str, delay: float, message: str) -> str:
        if action == "retry":
            ok = self._retrying(lambda c: self.dialect.retry_job(c, row.id, row.token, delay, message), row.id)
            result = RETRIED
        else:
            ok = self._retrying(lambda c: self.dialect.fail_job(c, row.id, row.token, message), row.id)
            result = FAILED
        if ok is None:
            return LOST  # gave up writing: the lease will expire and the job is rescued
        if not ok:
            log.warning("job=%s lease lost before its %s could be recorded", row.id, action)
            return LOST
        return result

    def record_timeout(self, running: Running) -> None:
        """Called by the watchdog: count a run that exceeded ``timeout=`` as failed."""
        row = running.row
        task = get_task(row.name)
        error = JobTimeout(f"task {row.name} exceeded its timeout of {task.timeout} s")
        max_retries = row.max_retries if row.max_retries is not None else task.max_retries
        outcome = decide(error, row.retries, max_retries, task.backoff)
        # Interrupt the task before writing: on SQLite a task holding the write
        # lock would otherwise block this write, then commit its late completion.
        with running.lock:
            if running.finishing:
                return  # it returned meanwhile: its own completion or failure write decides
            running.timed_out = True
            if running.in_task and running.thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(running.thread_id),
                                                           ctypes.py_object(JobTimeout))
        try:
            running.timeout_outcome = self._write_failure(row, task, outcome.action, outcome.delay_seconds,
                                                          f"JobTimeout: {error}")
        finally:
            running.timeout_recorded.set()

    def complete_deferred(self, batch: list[Running]) -> list[str]:
        """Complete jobs whose task returned ``DEFERRED``, all in one transaction; their outcomes.

        Logs each job's outcome line, as ``execute`` does for the others.
        """
        pairs = [(r.row.id, r.row.token) for r in batch]
        attempts = 0

        def write(conn) -> list[int]:
            nonlocal attempts
            attempts += 1
            lost, gone = self.dialect.complete_jobs(conn, pairs)
            # After a failed attempt whose COMMIT may have landed, a row that
            # is gone was completed by it (as ``_commit`` decides for one job).
            return lost if attempts == 1 else [job_id for job_id in lost if job_id not in gone]

        lost = self._retrying(write, *(job_id for job_id, _token in pairs))
        lost_ids = set(lost or ())
        outcomes = []
        now = time.monotonic()
        for running in batch:
            row = running.row
            if lost is None:
                outcome = LOST  # gave up writing: the lease will expire and the job is rescued
            elif row.id in lost_ids:
                log.warning("job=%s lease lost before completion", row.id)
                outcome = LOST
            else:
                outcome = SUCCEEDED
            log.info("job=%s task=%s queue=%s duration=%.3fs outcome=%s", row.id, row.name, row.queue,
                     now - (running.started or now), outcome)
            outcomes.append(outcome)
        return outcomes

    def _release(self, row: ClaimedRow) -> str:
        ok = self._retrying(lambda c: self.dialect.release_job(c, row.id, row.token), row.id)
        return RELEASED if ok else LOST

    def release(self, row: ClaimedRow) -> bool:
        """Hand a job back unrun (shutdown); fenced."""
        return bool(self._retrying(lambda c: self.dialect.release_job(c, row.id, row.token), row.id,
                                   give_up_seconds=5))

    def _retrying(self, write, *job_ids: int, give_up_seconds: float = WRITE_RETRY_SECONDS):
        """Run ``write(conn)`` in its own transaction, retrying transient errors.

        Returns the write's result, or None after ``give_up_seconds`` of
        failures (the lease then expires and another worker rescues the job).
        """
        deadline = time.monotonic() + give_up_seconds
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.db.engine.begin() as conn:
                    return write(conn)
            except DBAPIError as error:
                if not self.dialect.is_transient(error) or time.monotonic() > deadline:
                    log.error("%s could not record its outcome (attempt %d): %s", _jobs_label(job_ids),
                              attempt, _first_line(error))
                    return None
                log.warning("%s database error recording outcome (attempt %d), retrying in %.2fs: %s",
                            _jobs_label(job_ids), attempt, delay, _first_line(error))
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def _jobs_label(job_ids) -> str:
    """``job=5`` for one job, ``jobs=5..9(4)`` for a batch (log lines stay short)."""
    if len(job_ids) == 1:
        return f"job={job_ids[0]}"
    return f"jobs={job_ids[0]}..{job_ids[-1]}({len(job_ids)})"


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__
