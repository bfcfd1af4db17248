"""What an operator does to jobs by hand: look, cancel, retry, count, enqueue.

The CLI (``python -m mqueue list/show/cancel/retry/stats/crons/enqueue``)
is a thin shell over these functions, and scripts can call them directly.
Every function takes a ``Database`` or a URL string; given a URL it opens
the database for the call and disposes of it afterwards.

e.g.::

    from mqueue import admin
    for job in admin.list_jobs("sqlite:///app.db", state="failed"):
        admin.retry_job("sqlite:///app.db", job.id)

Writes are safe against workers claiming at the same moment: each is one
transition of the dialect (``cancel_job``, ``requeue_job``, ``hasten_job``,
``move_job``, ``set_priority``) that names the state and token the job was
just read in; the bulk ones (``retry_failed``, ``cancel_failed``,
``expire_jobs``) lock a few hundred rows per transaction.  If a worker got
there first, zero rows change, and the job is read again to say what
happened instead of touching a running job.  This module holds no SQL.

Finished jobs (``succeeded``, ``canceled``, ``expired``) stay readable
until workers prune them (``jobs-history``, ``jobs-history-count``; see
``history.py``); ``get_job`` gives their history too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import numbers
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import events as _events, history, shared_settings, wakeup
from .events import Event
from .config import settings
from .dialects.functions import utc_now
from .encoding import decode_args, encode_args
from .errors import HasDependentsError, InvalidStateError, JobNotFoundError, headline
from .registry import check_job_ids, check_tags, get_task, insert_row, registered_tasks
from .history import DayStats, HistoryEntry
from .schema import CANCELED, EXPIRED, FAILED, FINISHED, QUEUED, RUNNING, STATES, SUCCEEDED, WAITING, read_time
from .session import Database, as_database

#: Attempts at a cancel/retry whose row keeps changing under it (a worker
#: claiming and handing it back); each attempt is one read and one write.
_WRITE_ATTEMPTS = 5
#: Jobs per transaction of the bulk actions (``retry_failed``, ``cancel_failed``,
#: ``expire_jobs``): short transactions, so workers never wait long on them.
BULK_BATCH = 300
#: A dependency in one of these states will never succeed by itself: its dependents stay waiting.
_BLOCKING = (FAILED, CANCELED, EXPIRED)


def _iso(value: dt.datetime | None) -> str | None:
    """A naive UTC time from the database as ISO 8601 with an explicit UTC offset."""
    return None if value is None else value.replace(tzinfo=dt.timezone.utc).isoformat()


# -- result types -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class JobInfo:
    """One job as an operator sees it.  Times are naive UTC.

    ``raw_args`` is the stored JSON text; ``decoded_args()`` gives the named
    arguments the task will be called with (ValueError if they cannot be
    decoded, as the worker would find too).  ``owner`` is the worker of the
    last run (it stays after the run ends); ``runs`` counts claims.
    ``history`` is filled by ``get_job`` only (``list_jobs`` leaves it empty),
    and so are the dependencies: ``depends_on`` (ids of the jobs it waits
    for, with their states in ``dependency_states``; None: pruned),
    ``dependents`` (ids of the jobs that wait for it) and ``blocked_by``
    (dependencies that failed for good, were canceled or expired: the job
    waits until one is retried by hand).  ``expires_at``: not started by
    then, the job is never run.
    """

    id: int
    queue: str
    name: str
    state: str
    priority: int
    eta: dt.datetime
    retries: int
    max_retries: int | None
    raw_args: str
    unique_key: str | None
    owner: str | None
    token: int
    started_at: dt.datetime | None
    lease_expires_at: dt.datetime | None
    created_at: dt.datetime
    last_error: str | None
    finished_at: dt.datetime | None = None
    runs: int = 0
    wait_seconds: float | None = None
    run_seconds: float | None = None
    tracked: bool = False
    tags: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()
    expires_at: dt.datetime | None = None
    pending_deps: int = 0
    depends_on: tuple[int, ...] = ()
    dependency_states: tuple[str | None, ...] = ()
    dependents: tuple[int, ...] = ()
    blocked_by: tuple[int, ...] = ()

    @classmethod
    def from_row(cls, row, events=None, tags: tuple[str, ...] = (),
                 dependencies: "Iterable[tuple[int, str | None]]" = (), dependents: Iterable[int] = ()) -> "JobInfo":
        """A failed job shows the unique key that ``retry`` will restore."""
        values = {field.name: getattr(row, field.name) for field in dataclasses.fields(cls)
                  if field.name not in _NOT_COLUMNS}
        entries = tuple(history.job_history(row, events)) if events is not None else ()
        dependencies = tuple(dependencies)
        blocked = tuple(job_id for job_id, state in dependencies if state in _BLOCKING) if row.state == WAITING else ()
        return cls(**values, raw_args=row.args, unique_key=row.unique_key or row.failed_unique_key,
                   tracked=bool(row.tracked), tags=tags, history=entries,
                   depends_on=tuple(job_id for job_id, _ in dependencies),
                   dependency_states=tuple(state for _, state in dependencies),
                   dependents=tuple(dependents), blocked_by=blocked)

    @property
    def finished(self) -> bool:
        """Succeeded, canceled or expired: never run again."""
        return self.state in FINISHED

    @property
    def errors(self) -> list[HistoryEntry]:
        """Every failed run's history entry (``retried``, ``rescued``, ``failed``) with its error, oldest first."""
        return [entry for entry in self.history if entry.detail and entry.kind in ("retried", "rescued", "failed")]

    @property
    def leaseless(self) -> bool:
        """A running row with no lease (written by hand): no worker holds it, rescue takes it."""
        return self.state == RUNNING and self.lease_expires_at is None

    def decoded_args(self) -> dict[str, Any]:
        return decode_args(self.raw_args)

    @property
    def error_summary(self) -> str | None:
        """The last non-blank line of the stored traceback (the exception itself)."""
        return headline(self.last_error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: ISO times; ``args`` is the stored JSON object (what ``enqueue`` takes)."""
        out = dataclasses.asdict(self)
        for key in ("eta", "started_at", "lease_expires_at", "created_at", "finished_at", "expires_at"):
            out[key] = _iso(out[key])
        for key in ("depends_on", "dependency_states", "dependents", "blocked_by"):
            out[key] = list(out[key])
        out["history"] = [entry.to_dict() for entry in self.history]
        out["tags"] = list(self.tags)
        raw = out.pop("raw_args")
        try:
            out["args"] = json.loads(raw)
        except (TypeError, ValueError):
            out["args"] = raw  # not JSON: shown as stored, the worker will fail it
        return out


#: JobInfo fields that are not read off the job's row as they are.
_NOT_COLUMNS = frozenset({"raw_args", "unique_key", "history", "tags", "tracked", "depends_on",
                          "dependency_states", "dependents", "blocked_by"})


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """Counts for one queue.  ``queued`` is due now; ``scheduled`` waits for a future eta.

    ``oldest_due_seconds`` is how long the oldest due job has been waiting
    past its eta, by the database's clock (None when nothing is due).
    """

    queue: str
    queued: int
    scheduled: int
    running: int
    failed: int
    oldest_due_seconds: float | None
    #: Jobs in a state mqueue does not know (rows written by hand): ``list`` shows them, ``retry`` queues them.
    other: int = 0
    waiting: int = 0
    succeeded: int = 0
    canceled: int = 0
    expired: int = 0
    #: Workers claim nothing from it (``pause_queue``); its running jobs finish.
    paused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CronInfo:
    """One row of ``mqueue_cron``: the last slot enqueued and the next one due (naive UTC)."""

    name: str
    queue: str
    schedule: str
    tz: str
    last_run: dt.datetime | None
    next_run: dt.datetime | None
    last_job_id: int | None
    updated_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("last_run", "next_run", "updated_at"):
            out[key] = _iso(out[key])
        return out


# -- plumbing ---------------------------------------------------------------------

@contextlib.contextmanager
def _opened(database: "Database | str") -> Iterator[Database]:
    """``database`` as a Database (opened and disposed here if given as a URL).

    A driver error that means "tables missing" or "server unreachable" comes
    out as mqueue's one-line error.
    """
    db = as_database(database)
    try:
        yield db
    except DBAPIError as error:
        translated = db.translate(error)
        if translated is error:
            raise
        raise translated from None
    finally:
        if db is not database:
            db.dispose()


def _reading(db: Database) -> "contextlib.AbstractContextManager[Connection]":
    """One read-only transaction: a consistent view that never waits for a writer."""
    return db.dialect.reader(db.engine).begin()


def _writing(db: Database) -> "contextlib.AbstractContextManager[Session]":
    """A ``db.session()``: commits on success, and an enqueue inside it joins it."""
    return db.session()


def _check_id(job_id: Any) -> int:
    if not isinstance(job_id, int) or isinstance(job_id, bool):
        raise TypeError(f"job id must be an integer, got {job_id!r}")
    return job_id


def _read(db: Database, conn: Session | Connection, job_id: int) -> JobInfo | None:
    row = db.dialect.read_job(conn, job_id)
    return JobInfo.from_row(row, tags=db.dialect.tags_of(conn, [job_id]).get(job_id, ())) if row is not None else None


def _not_found(job_id: int) -> JobNotFoundError:
    return JobNotFoundError(f"no job {job_id} (never existed, or finished and pruned after jobs-history)")


def _checked(job: JobInfo | None, job_id: int, action: str) -> JobInfo:
    """The job if it exists, is not finished and is not running; else the error that says why not."""
    job = _not_finished(job, job_id, action)
    if job.state == RUNNING and not job.leaseless:
        force = (f" (or, if its worker is dead, force it back: mqueue retry {job.id} --force)"
                 if action == "retried" else "")
        raise InvalidStateError(
            f"job {job.id} is running on worker {job.owner or '?'} and cannot be {action} safely; "
            f"wait for it to finish or for its lease to expire{force}")
    return job


def _check_not_running(db: Database, job_id: int, action: str) -> None:
    """Refuse a missing or running job from a snapshot, before waiting for any lock.

    On SQLite a write transaction waits for a running task's own
    transaction to end; this answers "it is running" at once instead.
    """
    with _reading(db) as conn:
        _checked(_read(db, conn, job_id), job_id, action)


# -- reading ----------------------------------------------------------------------

def list_jobs(database: "Database | str", queue: str | None = None, state: str | None = None,
              limit: int = 50, tag: str | None = None) -> list[JobInfo]:
    """Jobs, optionally of one queue and/or state, at most ``limit``.

    Order: running jobs first, then queued ones in the order workers claim
    them (highest priority, then oldest eta, then lowest id), then waiting,
    failed and finished ones.  Finished jobs of one state
    (``state="succeeded"``) come newest first.  With ``tag``: the jobs with
    that tag, newest first (as ``jobs_tagged``).
    """
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r}; choose from {', '.join(STATES)}")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if tag is not None:
        check_tags([tag])
    with _opened(database) as db, _reading(db) as conn:
        if tag is not None:
            rows = db.dialect.jobs_tagged(conn, tag, limit, queue, state)
        else:
            rows = db.dialect.list_jobs(conn, queue, state, limit)
        tags = db.dialect.tags_of(conn, [row.id for row in rows])
        return [JobInfo.from_row(row, tags=tags.get(row.id, ())) for row in rows]


def jobs_tagged(database: "Database | str", tag: str, limit: int = 50) -> list[JobInfo]:
    """Live and finished jobs with ``tag``, newest first, at most ``limit`` (through the tag index)."""
    return list_jobs(database, tag=tag, limit=limit)


def get_job(database: "Database | str", job_id: int) -> JobInfo:
    """One job by id, live or finished, with its ``history`` (and so ``errors``).

    ``JobNotFoundError`` if there is no such job (never existed, or pruned).
    """
    _check_id(job_id)
    with _opened(database) as db, _reading(db) as conn:
        row = db.dialect.read_job(conn, job_id)
        if row is None:
            raise _not_found(job_id)
        return JobInfo.from_row(row, db.dialect.job_events(conn, job_id),
                                db.dialect.tags_of(conn, [job_id]).get(job_id, ()),
                                db.dialect.dependencies_of(conn, job_id), db.dialect.dependents_of(conn, job_id))


def stats(database: "Database | str", queues: Iterable[str] = ()) -> list[QueueStats]:
    """Per queue, sorted by name: due, scheduled, running and failed counts, and the oldest due age.

    "Due" is judged by the database's clock, read once, so the counts and the
    age agree with each other and with what workers would claim.  Known
    queues with no jobs are listed too, with zero counts: ``queues`` (e.g.
    those of the registered tasks), the queues of the crons in ``mqueue_cron``
    and paused queues.  ``paused`` marks the queues workers claim nothing from.
    """
    with _opened(database) as db, _reading(db) as conn:
        now = db.dialect.db_now(conn)
        rows = db.dialect.queue_stats(conn, now)
        paused = db.dialect.paused_queues(conn)
        known = set(queues) | {cron.queue for cron in db.dialect.list_crons(conn)} | paused
    stats = []
    for row in rows:
        oldest = read_time(row.oldest_due)
        stats.append(QueueStats(row.queue, int(row.queued), int(row.scheduled), int(row.running), int(row.failed),
                                None if oldest is None else max(0.0, (now - oldest).total_seconds()),
                                int(row.other), int(row.waiting), int(row.succeeded), int(row.canceled),
                                int(row.expired), paused=row.queue in paused))
    idle = known - {queue.queue for queue in stats}
    if idle:
        stats = sorted(stats + [QueueStats(queue, 0, 0, 0, 0, None, paused=queue in paused) for queue in idle],
                       key=lambda q: q.queue)
    return stats


def queue_stats(database: "Database | str", queue: str, day: "dt.date | str | None" = None) -> DayStats:
    """qless's stats of ``queue`` for one UTC ``day`` (default: today by the database's clock).

    ``wait`` (eta to first start) and ``run`` (last run's start to finish) of
    the jobs that succeeded that day: count, mean, sample std (seconds) and a
    histogram over ``history.BUCKETS``; counts of jobs ``failed`` for good,
    runs ``retried`` (lost leases included) and jobs ``expired``.  Exact
    whether or not the day's jobs have been pruned.
    """
    _check_queue(queue)
    if isinstance(day, str):
        try:
            day = dt.date.fromisoformat(day)
        except ValueError:
            raise ValueError(f"day must be YYYY-MM-DD, got {day!r}") from None
    elif day is not None and (not isinstance(day, dt.date) or isinstance(day, dt.datetime)):
        raise ValueError(f"day must be a date or YYYY-MM-DD, got {day!r}")
    with _opened(database) as db, _reading(db) as conn:
        if day is None:
            day = db.dialect.db_now(conn).date()
        return history.read_day_stats(db.dialect, conn, queue, day)


def get_config(database: "Database | str") -> dict[str, float]:
    """Every shared setting (``mqueue config``): stored values over defaults, and each ``heartbeat:QUEUE`` set."""
    with _opened(database) as db, _reading(db) as conn:
        return shared_settings.read(db.dialect, conn)


def set_config(database: "Database | str", key: str, value: "float | str | None") -> float | None:
    """Set a shared setting for every worker (None: back to its default); returns the value now in force.

    e.g.::

        admin.set_config(db, "heartbeat", 120)          # the lease of workers started without --lease
        admin.set_config(db, "heartbeat:reports", 900)  # one queue's lease, over heartbeat

    Unknown keys and bad values raise ``ValueError``.  Workers pick a change
    up within a minute, without a restart.  Removing ``heartbeat:QUEUE``
    returns None: that queue follows ``heartbeat`` again.
    """
    key_info = shared_settings.key_for(key)  # raises: unknown setting, naming the known ones
    parsed = shared_settings.parse(key, key_info.default if value is None else value)
    with _opened(database) as db, _writing(db) as session:
        db.dialect.write_setting(session.connection(), key, None if value is None else str(parsed))
    if value is None and key not in shared_settings.KEYS:
        return None
    return parsed


def list_crons(database: "Database | str") -> list[CronInfo]:
    """Every cron the workers have registered in ``mqueue_cron``, by queue then name.

    The table is kept in step with the code by the workers serving each
    cron's queue, so a cron appears here once such a worker has started.
    """
    with _opened(database) as db, _reading(db) as conn:
        rows = db.dialect.list_crons(conn)
    return [CronInfo(row.name, row.queue, row.schedule, row.tz, row.last_slot, row.next_slot,
                     row.last_job_id, row.updated_at) for row in rows]


# -- writing ----------------------------------------------------------------------

def cancel_job(database: "Database | str", job_id: int, cascade: bool = False) -> JobInfo:
    """Cancel a queued, waiting or failed job: it becomes ``canceled`` (finished, kept in history
    until pruned); return it as it was.

    A running job raises ``InvalidStateError``: its task may already have
    written, and only its worker can roll that back; so does a finished one.
    A job that other jobs wait for (``depends_on``) raises
    ``HasDependentsError`` naming them, unless ``cascade=True``: then they
    are canceled too, and the jobs waiting for them, each with its
    ``canceled`` event, in the same transaction.  Each UPDATE names the
    state and token just read, so a job claimed in between is never touched.
    """
    _check_id(job_id)
    with _opened(database) as db:
        _check_not_running(db, job_id, "cancelled")
        with _writing(db) as session:
            for _ in range(_WRITE_ATTEMPTS):
                job = _checked(_read(db, session, job_id), job_id, "cancelled")
                if db.dialect.cancel_job(session, job_id, job.state, job.token):
                    # Read after the job's row is locked: a dependent enqueued meanwhile is seen.
                    _cancel_dependents(db, session, job_id, cascade)
                    return job
    raise InvalidStateError(f"job {job_id} kept changing while being cancelled; try again")


def _cancel_dependents(db: Database, session: Session, job_id: int, cascade: bool) -> list[int]:
    """The waiting jobs that depend on ``job_id`` (transitively) are canceled if ``cascade``; else
    ``HasDependentsError`` (the caller's transaction rolls back).  Their ids."""
    canceled: list[int] = []
    frontier = [job_id]
    while frontier:
        waiting = db.dialect.waiting_dependents(session, frontier)
        if waiting and not cascade:
            shown = ", ".join(str(row[0]) for row in waiting[:10]) + (", ..." if len(waiting) > 10 else "")
            raise HasDependentsError(
                f"job {job_id} has {len(waiting)} waiting dependent(s) ({shown}); cancel them too with "
                f"cascade=True (mqueue cancel {job_id} --cascade), or cancel them first")
        frontier = [dependent for dependent, state, token in waiting
                    if db.dialect.cancel_job(session, dependent, state, token)]
        canceled += frontier
    return canceled


def move_job(database: "Database | str", job_id: int, queue: str) -> JobInfo:
    """Move a job to another queue; return it as it is now.

    e.g.::

        admin.move_job(db, 42, "slow")

    A waiting, queued or failed job keeps its state.  A running job is taken
    from its worker: its lease is voided (a new token), so its completion is
    refused and its writes roll back, and it is queued, due now, in
    ``queue``, where it runs again.  A finished job raises
    ``InvalidStateError``.  The history gets a ``moved`` entry (from and
    to); a tracked job publishes it.  Moving a job to its own queue changes nothing.
    """
    _check_id(job_id)
    _check_queue(queue)

    def move(db: Database, session: Session, job: JobInfo) -> bool | None:
        if job.queue == queue:
            return None
        detail = f"from {job.queue} to {queue}"
        if job.state == RUNNING:
            moved = db.dialect.move_running_job(session, job_id, job.token, queue, detail)
        else:
            moved = db.dialect.move_job(session, job_id, job.state, job.token, queue, detail)
        if moved:
            wakeup.notify_after_commit(session, queue)
        return moved

    return _change_job(database, job_id, "moved", move)


def set_priority(database: "Database | str", job_id: int, priority: int) -> JobInfo:
    """Give a job a new priority (higher runs first); return it as it is now.

    e.g.::

        admin.set_priority(db, 42, 10)

    For a waiting, queued, failed (for its next run) or running job (for a
    later run); a finished one raises ``InvalidStateError``.  The history
    gets a ``priority`` entry (from and to); a tracked job publishes it.
    """
    _check_id(job_id)
    _check_priority(priority)

    def reprioritize(db: Database, session: Session, job: JobInfo) -> bool | None:
        if job.priority == priority:
            return None
        return db.dialect.set_priority(session, job_id, job.state, job.token, priority,
                                       f"from {job.priority} to {priority}")

    return _change_job(database, job_id, "given a new priority", reprioritize)


def _change_job(database: "Database | str", job_id: int, action: str,
                change: "Callable[[Database, Session, JobInfo], bool | None]") -> JobInfo:
    """Read a live job and let ``change`` make its state- and token-guarded write; the job as it is then.

    ``change`` returns True once written, False when its guard missed (a
    worker changed the job meanwhile: read it again and retry), or None
    when there is nothing to change.  A finished job raises ``InvalidStateError``.
    """
    with _opened(database) as db, _writing(db) as session:
        for _ in range(_WRITE_ATTEMPTS):
            job = _not_finished(_read(db, session, job_id), job_id, action)
            done = change(db, session, job)
            if done is None:
                return job
            if done:
                return _read(db, session, job_id)
    raise InvalidStateError(f"job {job_id} kept changing while being {action}; try again")


def _not_finished(job: JobInfo | None, job_id: int, action: str) -> JobInfo:
    if job is None:
        raise _not_found(job_id)
    if job.finished:
        raise InvalidStateError(f"job {job.id} has already finished ({job.state}) and cannot be {action}; "
                                f"a finished job never runs again: enqueue a new one")
    return job


def retry_job(database: "Database | str", job_id: int, force: bool = False) -> JobInfo:
    """Make a job run as soon as a worker is free; return it as it is now.

    A failed job goes back to ``queued`` with ``retries`` reset to 0 (so it
    gets its full retry budget again), ``eta`` now and its ``unique_key``
    back; ``last_error`` is kept until the next run.  If a live job took
    that key meanwhile, ``InvalidStateError`` names it and nothing changes.
    A queued job that waits for a later eta is made due now.  A running or
    finished job raises ``InvalidStateError``, and so does a ``waiting``
    one (its dependencies run first); a running row without a
    lease, or a row in a state mqueue does not know (both written by hand),
    is queued like a failed one.  The history gets a ``put`` entry.

    ``force=True`` also takes a running job back from its worker (one killed
    or frozen before its lease expired): it is queued, due now, under a new
    lease token, so that run's completion, heartbeats and failure are refused
    and its writes roll back.  ``retries`` is kept.  On SQLite this waits
    while the running task holds the write lock.
    """
    _check_id(job_id)
    with _opened(database) as db:
        if not force:
            _check_not_running(db, job_id, "retried")
        with _writing(db) as session:
            for _ in range(_WRITE_ATTEMPTS):
                job = _read(db, session, job_id)
                if force and job is not None and job.state == RUNNING and not job.leaseless:
                    if db.dialect.force_requeue_job(session, job_id, job.token):
                        wakeup.notify_after_commit(session, job.queue)
                        return _read(db, session, job_id)
                    continue
                job = _checked(job, job_id, "retried")
                if job.state == WAITING:
                    # Queuing it would run it before what it depends on: the dependencies go first.
                    waiting_on = ", ".join(f"{other} {state or 'pruned'}" for other, state
                                           in db.dialect.dependencies_of(session, job_id)
                                           if state != SUCCEEDED) or "none left"
                    raise InvalidStateError(f"job {job_id} is waiting for its dependencies ({waiting_on}) and "
                                            f"cannot be retried; retry or finish those, or cancel it")
                if job.state == QUEUED:
                    updated = db.dialect.hasten_job(session, job_id, job.token)
                else:
                    updated = db.dialect.requeue_job(session, job_id, job.state, job.token)
                if updated:
                    wakeup.notify_after_commit(session, job.queue)
                    return _read(db, session, job_id)
    raise InvalidStateError(f"job {job_id} kept changing while being retried; try again")


def tag_job(database: "Database | str", job_id: int, *tags: str) -> list[str]:
    """Add tags to a job, live or finished; return its tags, sorted.

    Tags are strings of 1 to 100 characters, at most 50 per job
    (``ValueError``, nothing changed); adding one it has changes nothing.
    """
    _check_id(job_id)
    wanted = check_tags(tags)
    with _opened(database) as db, _writing(db) as session:
        conn = session.connection()
        if db.dialect.read_job(conn, job_id) is None:
            raise _not_found(job_id)
        have = db.dialect.tags_of(conn, [job_id]).get(job_id, ())
        check_tags(set(wanted) - set(have), already=len(have))
        db.dialect.add_tags(conn, [(job_id, tag) for tag in wanted])
        return sorted(set(have) | set(wanted))


def untag_job(database: "Database | str", job_id: int, *tags: str) -> list[str]:
    """Remove tags from a job (ones it does not have are ignored); return its tags, sorted."""
    _check_id(job_id)
    unwanted = check_tags(tags) if tags else ()
    with _opened(database) as db, _writing(db) as session:
        conn = session.connection()
        if db.dialect.read_job(conn, job_id) is None:
            raise _not_found(job_id)
        db.dialect.remove_tags(conn, job_id, unwanted)
        return list(db.dialect.tags_of(conn, [job_id]).get(job_id, ()))


def track_job(database: "Database | str", job_id: int, tracked: bool = True) -> JobInfo:
    """Track a job: from now on it publishes an event at every change of state (``events``)."""
    _check_id(job_id)
    with _opened(database) as db, _writing(db) as session:
        if not db.dialect.set_tracked(session.connection(), job_id, tracked):
            raise _not_found(job_id)
        return _read(db, session, job_id)


def untrack_job(database: "Database | str", job_id: int) -> JobInfo:
    """Stop tracking a job (a job that fails for good still publishes ``failed``)."""
    return track_job(database, job_id, tracked=False)


def events(database: "Database | str", follow: bool = False, since: int | None = None,
           kind: "str | list[str] | None" = None, job_id: int | None = None,
           poll_interval: float = 0.5) -> Iterator[Event]:
    """Published events, oldest first: every change of state of a tracked job (``put``, ``popped``,
    ``succeeded``, ``retried``, ``failed``, ``canceled``, ``expired``, ``moved``, ``stalled``,
    ``released``) and ``failed`` of every job.

    Each has ``id, at, kind, job_id, queue, name, worker, detail``.  Only
    events with an id above ``since``; of ``kind`` (one or a list) and of
    ``job_id`` if given.  With ``follow`` the generator keeps waiting for
    new events (polling every ``poll_interval`` seconds; on PostgreSQL a
    commit also wakes it at once) until the caller stops iterating.  An
    event exists if and only if the change it reports committed.
    """
    if job_id is not None:
        _check_id(job_id)
    _events.check_kinds([kind] if isinstance(kind, str) else list(kind or ()))  # ValueError now, not at next()
    return _events.events(database, follow=follow, since=since, kind=kind, job_id=job_id,
                          poll_interval=poll_interval)


def retry_failed(database: "Database | str", queue: str | None = None) -> int:
    """Put every failed job of ``queue`` (every queue if None) back to ``queued``, due now.

    Same reset as ``retry_job``; returns how many jobs were retried.  A job
    whose unique key a live job holds meanwhile stays failed (``retry ID``
    says which job holds it).  Works through the failed jobs in id order,
    ``BULK_BATCH`` per transaction: workers start on the first batches while
    later ones are still being retried.
    """
    count = 0
    with _opened(database) as db:
        after: int | None = 0
        while after is not None:
            with _writing(db) as session:
                done, _held, after = db.dialect.retry_failed(session, queue, after, BULK_BATCH)
                if done:
                    for name in ([queue] if queue is not None else []):
                        wakeup.notify_after_commit(session, name)
            count += done
    return count


def cancel_failed(database: "Database | str", queue: str | None = None) -> int:
    """Cancel every failed job of ``queue`` (every queue if None); return how many.

    e.g.::

        admin.cancel_failed(db, queue="mail")

    Failed jobs become ``canceled`` (finished, kept in history until
    pruned), ``BULK_BATCH`` per transaction in id order.  A failed job that
    other jobs wait for stays failed (``cancel ID --cascade`` decides).
    """
    count = 0
    with _opened(database) as db:
        after: int | None = 0
        while after is not None:
            with _writing(db) as session:
                done, _kept, after = db.dialect.cancel_failed(session, queue, after, BULK_BATCH)
            count += done
    return count


def expire_jobs(database: "Database | str", queue: str | None = None, now: dt.datetime | None = None) -> int:
    """Mark every queued or waiting job (of ``queue``, or all) past its ``expires_at`` ``expired``;
    return how many.

    Workers do this on their own in small batches; a job past its expiry
    that a worker claims is expired instead of run.  ``now`` (naive UTC)
    replaces the database's clock, so a script or test can look ahead.
    """
    count = 0
    with _opened(database) as db:
        while True:
            with _writing(db) as session:
                done = db.dialect.expire_jobs(session, [queue] if queue is not None else None, BULK_BATCH, now)
            count += done
            if done < BULK_BATCH:
                return count


def enqueue_by_name(database: "Database | str", name: str, kwargs: dict[str, Any],
                    delay: float | dt.timedelta | None = None, priority: int | None = None,
                    queue: str | None = None, require_registered: bool = False,
                    depends_on: "Iterable[int] | None" = None) -> int:
    """Insert a job for the task called ``name`` with named arguments ``kwargs``; return its id.

    If the task is registered in this process (e.g. after
    ``registry.discover("tasks")``) this is ``task.options(...).enqueue(**kwargs)``:
    the arguments are checked against its signature and its default queue
    and priority apply.  Otherwise the row is inserted as given, into
    ``queue`` or the default queue; with ``require_registered=True`` an
    unknown name raises ``UnknownTaskError`` (with a suggestion) instead.
    ``delay`` counts from the database's clock.  ``depends_on``: ids of
    jobs that must succeed first (the job is ``waiting`` until then).
    """
    if not isinstance(kwargs, dict):
        raise TypeError(f"arguments must be a JSON object of named arguments, got {json_kind(kwargs)}")
    if not isinstance(name, str) or not 0 < len(name) <= 255:
        raise ValueError(f"task name must be a string of 1 to 255 characters, got {name!r}")
    options = {key: value for key, value in (("delay", delay), ("priority", priority), ("queue", queue),
                                             ("depends_on", depends_on)) if value is not None}
    if name in registered_tasks() or require_registered:
        task = get_task(name)  # UnknownTaskError with a "did you mean" if absent
        with _opened(database) as db, _writing(db):
            return task.options(**options).enqueue(**kwargs)
    bad = [key for key in kwargs if not isinstance(key, str)]
    if bad:
        raise TypeError(f"argument names must be strings, got {bad[0]!r}")
    values: dict[str, Any] = {"name": name, "args": encode_args(kwargs, name),
                              "queue": _check_queue(queue if queue is not None else settings.queue)}
    if priority is not None:
        values["priority"] = _check_priority(priority)
    if delay is not None:
        values["eta"] = utc_now(_check_delay(delay))
    if depends_on:
        values["depends_on"] = check_job_ids(depends_on)
    with _opened(database) as db, _writing(db) as session:
        job_id = insert_row(session, values)
        wakeup.notify_after_commit(session, values["queue"])
    return job_id


def json_kind(value: Any) -> str:
    """What a decoded JSON value is, for messages: "an array", "a string", ..."""
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in kinds:
        return kinds[type(value)]
    return "a number" if isinstance(value, numbers.Number) else type(value).__name__


def _check_queue(queue: Any) -> str:
    if not isinstance(queue, str) or not 0 < len(queue) <= 100:
        raise ValueError(f"queue must be a string of 1 to 100 characters, got {queue!r}")
    return queue


def _check_priority(priority: Any) -> int:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    return priority


def _check_delay(delay: Any) -> float:
    seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else delay
    if not isinstance(seconds, numbers.Real) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
        raise ValueError(f"delay must be seconds >= 0 or a timedelta, got {delay!r}")
    return float(seconds)


# -- worker control ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """One live worker, as it last wrote its row of ``mqueue_worker`` (times naive UTC).

    ``name`` is its worker id (``host:pid:n``, the ``owner`` of the jobs it
    claims); ``running`` the ids of the jobs it ran at ``last_seen``;
    ``claiming`` False while claiming is stopped by SIGUSR2.
    """

    name: str
    host: str
    pid: int
    queues: tuple[str, ...]
    started_at: dt.datetime | None
    last_seen: dt.datetime | None
    lease_seconds: float
    running: tuple[int, ...]
    claiming: bool

    @classmethod
    def from_row(cls, row) -> "WorkerInfo":
        return cls(row.name, row.host, int(row.pid), tuple(_json_list(row.queues, str)), read_time(row.started_at),
                   read_time(row.last_seen), float(row.lease_seconds), tuple(_json_list(row.running, int)),
                   bool(row.claiming))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(started_at=_iso(self.started_at), last_seen=_iso(self.last_seen), queues=list(self.queues),
                   running=list(self.running))
        return out


def _json_list(text: Any, kind: type) -> list:
    """A JSON list of ``kind`` from a registry row; anything else (written by hand) is empty."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return []
    return [item for item in value if isinstance(item, kind) and not isinstance(item, bool)] \
        if isinstance(value, list) else []


def _queue_names(queues: Iterable[str]) -> list[str]:
    names = [_check_queue(queue) for queue in queues]
    if not names:
        raise ValueError("name at least one queue")
    return names


def pause_queue(database: "Database | str", *queues: str) -> None:
    """Stop every worker on every host from claiming jobs of ``queues`` (running jobs finish).

    e.g.::

        admin.pause_queue(db, "mail", "reports")

    Workers read the paused set once per poll interval, so claiming stops
    within one; the pause is stored, so it outlives restarts until ``resume_queue``.
    """
    names = _queue_names(queues)
    with _opened(database) as db, _writing(db) as session:
        db.dialect.set_paused(session.connection(), names, True)


def resume_queue(database: "Database | str", *queues: str) -> None:
    """Let workers claim jobs of ``queues`` again (within one poll interval)."""
    names = _queue_names(queues)
    with _opened(database) as db, _writing(db) as session:
        db.dialect.set_paused(session.connection(), names, False)


def paused_queues(database: "Database | str") -> set[str]:
    """The names of the paused queues."""
    with _opened(database) as db, _reading(db) as conn:
        return db.dialect.paused_queues(conn)


def list_workers(database: "Database | str") -> list[WorkerInfo]:
    """Live workers by host and pid: those that wrote their row within 3 of their leases.

    A worker writes its row on every heartbeat and deletes it when it stops
    cleanly; the row of a killed one is ignored here after 3 leases, and
    deleted by the next worker's heartbeat.
    """
    with _opened(database) as db, _reading(db) as conn:
        return [WorkerInfo.from_row(row) for row in db.dialect.live_workers(conn)]


# -- the dashboard's reads and group actions ----------------------------------------

#: At most this many failed jobs are read to group them by error (oldest first).
FAILED_GROUP_SCAN = 10_000


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Jobs that succeeded per minute over the last ``len(minutes)`` minutes (oldest first), per queue.

    ``minutes`` are the starts of the minutes (naive UTC, by the database's
    clock); ``per_queue[queue][i]`` counts that queue's successes in minute
    ``i``.  Jobs pruned meanwhile (``jobs-history-count``) are not counted.
    """

    minutes: tuple[dt.datetime, ...]
    per_queue: dict[str, tuple[int, ...]]

    def total(self) -> tuple[int, ...]:
        """Every queue's counts added up, minute by minute."""
        return tuple(sum(counts) for counts in zip(*self.per_queue.values())) or (0,) * len(self.minutes)


@dataclasses.dataclass(frozen=True)
class FailedGroup:
    """Failed jobs that failed with the same kind of error.

    ``error`` is the exception's type as its stored last line names it
    (``RuntimeError`` of ``RuntimeError: disk full``), or that whole line
    when it names no type; ``example`` is the last line of the newest one.
    """

    error: str
    queue: str
    job_ids: tuple[int, ...]
    example: str
    names: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.job_ids)


def error_type(stored_error: str | None) -> str:
    """What groups failed jobs: the exception type of the error's last line (``RuntimeError``), else
    that line, else ``(no error)``."""
    line = headline(stored_error)
    if line is None:
        return "(no error)"
    kind, colon, _ = line.partition(":")
    return kind if colon and kind and " " not in kind.strip() else line


def throughput(database: "Database | str", minutes: int = 60) -> Throughput:
    """Per queue, how many jobs succeeded in each of the last ``minutes`` minutes (the dashboard's sparkline)."""
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 1 <= minutes <= 24 * 60:
        raise ValueError(f"minutes must be an integer from 1 to 1440, got {minutes!r}")
    with _opened(database) as db, _reading(db) as conn:
        now = db.dialect.db_now(conn)
        first = now.replace(second=0, microsecond=0) - dt.timedelta(minutes=minutes - 1)
        rows = db.dialect.succeeded_per_minute(conn, first)
    starts = tuple(first + dt.timedelta(minutes=i) for i in range(minutes))
    index = {start.strftime("%Y-%m-%d %H:%M"): i for i, start in enumerate(starts)}
    counts: dict[str, list[int]] = {}
    for queue, minute, jobs in rows:
        slot = index.get(str(minute))
        if slot is not None:
            counts.setdefault(queue, [0] * minutes)[slot] += int(jobs)
    return Throughput(starts, {queue: tuple(values) for queue, values in sorted(counts.items())})


def tracked_jobs(database: "Database | str", limit: int = 50) -> list[JobInfo]:
    """Tracked jobs (``track_job``), newest first, at most ``limit``."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    with _opened(database) as db, _reading(db) as conn:
        rows = db.dialect.tracked_jobs(conn, limit)
        tags = db.dialect.tags_of(conn, [row.id for row in rows])
        return [JobInfo.from_row(row, tags=tags.get(row.id, ())) for row in rows]


def failed_groups(database: "Database | str", queue: str | None = None) -> list[FailedGroup]:
    """Failed jobs grouped by queue and ``error_type``, largest group first.

    Reads at most ``FAILED_GROUP_SCAN`` failed jobs, oldest first; retrying
    or cancelling a group brings the next ones in.
    """
    if queue is not None:
        _check_queue(queue)
    with _opened(database) as db, _reading(db) as conn:
        rows = db.dialect.failed_errors(conn, queue, FAILED_GROUP_SCAN)
    groups: dict[tuple[str, str], list] = {}
    for row in rows:
        groups.setdefault((row.queue, error_type(row.last_error)), []).append(row)
    found = [FailedGroup(error, group_queue, tuple(row.id for row in members),
                         headline(members[-1].last_error) or "", tuple(sorted({row.name for row in members})))
             for (group_queue, error), members in groups.items()]
    return sorted(found, key=lambda group: (-group.count, group.queue, group.error))


def _failed_group_ids(database: "Database | str", queue: str, error: str) -> list[int]:
    for group in failed_groups(database, queue):
        if group.error == error:
            return list(group.job_ids)
    return []


def retry_failed_group(database: "Database | str", queue: str, error: str) -> int:
    """Retry every failed job of ``queue`` whose error is of type ``error`` (see ``failed_groups``); how many.

    Each job is one ``retry_job``: a job that changed meanwhile (retried,
    cancelled) or whose unique key a live job holds is left as it is.
    """
    with _opened(database) as db:
        done = 0
        for job_id in _failed_group_ids(db, queue, error):
            try:
                retry_job(db, job_id)
                done += 1
            except (InvalidStateError, JobNotFoundError):
                pass
        return done


def cancel_failed_group(database: "Database | str", queue: str, error: str) -> int:
    """Cancel every failed job of ``queue`` whose error is of type ``error``; how many.

    Each job is one ``cancel_job``; one that changed meanwhile, or that
    other jobs depend on, is left as it is.
    """
    with _opened(database) as db:
        done = 0
        for job_id in _failed_group_ids(db, queue, error):
            try:
                cancel_job(db, job_id)
                done += 1
            except (InvalidStateError, JobNotFoundError):
                pass
        return done
