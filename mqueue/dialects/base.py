"""Job-state transitions in portable SQLAlchemy Core; backends override what differs.

Every write on a claimed row carries ``AND token = :token AND state =
'running'`` (the fence): zero rows updated means the lease was lost and the
caller must roll back and touch nothing.  ``token`` goes up by one at every
claim, so a worker paused past its lease can never complete, fail, release
or heartbeat a job that has since been claimed again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
from typing import Any, Iterable, Sequence

from sqlalchemy import (Float, Integer, String, Text, and_, bindparam, case, cast, delete, event, exists, func,
                        insert, literal, or_, select, tuple_, update)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.exc import DBAPIError, IntegrityError

from .. import connections
from ..errors import InvalidStateError
from ..schema import (CANCELED, EXPIRED, FAILED, FINISHED, QUEUED, RUNNING, STATES, SUCCEEDED, WAITING,
                      cron_table, dependency_table, event_table, queue_table, task_table)
from .functions import due_now, seconds_since, utc_now
from .control import ControlStatements
from .driver import DriverStatement
from .history import HistoryStatements

t = task_table
d = dependency_table
DEFAULT_MAX_RETRIES = 10

#: Columns a worker needs to run a claimed job.  ``expired`` (1: its
#: ``expires_at`` has passed by the database's clock) is computed by the
#: claim itself, so a job that is not run costs the claim no extra read.
#: 1 if the job's ``expires_at`` has passed by the database's clock, else 0.
EXPIRED_NOW = case((t.c.expires_at <= utc_now(), 1), else_=0)
CLAIM_COLUMNS = (t.c.id, t.c.queue, t.c.name, t.c.args, t.c.retries, t.c.max_retries,
                 t.c.token, t.c.neg_priority, t.c.eta, t.c.tracked, t.c.has_dependents,
                 EXPIRED_NOW.label("expired"))


@dataclasses.dataclass(frozen=True)
class ClaimedRow:
    id: int
    queue: str
    name: str
    args: str
    retries: int
    max_retries: int | None
    token: int
    sort_key: tuple
    #: Emits an event at each change of state (its completion writes ``succeeded``).
    tracked: bool = False
    #: Other jobs depended on it when it was claimed: its completion releases them.
    has_dependents: bool = False
    #: Its ``expires_at`` had passed at the claim: it is marked ``expired`` instead of run.
    expired: bool = False


# Statements on the claim/complete hot path are built once, with bound
# parameters: building one costs 5-10x more CPU than running it (measured:
# ~200 us to build the claim vs ~20 us to execute it pre-built).
_FENCE = and_(t.c.id == bindparam("job_id"), t.c.token == bindparam("job_token"), t.c.state == RUNNING)
_LEASE = utc_now(bindparam("lease_seconds", type_=Float))
#: What success writes: the row stays as the job's record (``owner`` and
#: ``started_at`` name its last run) and frees its unique key.
SUCCESS_VALUES = dict(state=SUCCEEDED, finished_at=utc_now(), run_seconds=seconds_since(t.c.started_at),
                      unique_key=None, lease_expires_at=None)
#: The completion also names ``has_dependents`` as the claim read it: a job
#: that got a dependent while it ran does not match, and ``complete_job``
#: takes the path that releases dependents (so a job without any never
#: looks for them: no extra statement).
#: Sent to the driver's cursor (``driver.py``): it runs once for every job whose task wrote.
COMPLETE = DriverStatement(update(t).where(_FENCE, t.c.has_dependents == bindparam("seen_dependents", type_=Integer))
                           .values(**SUCCESS_VALUES), ("job_id", "job_token", "seen_dependents"))
#: One job row; its columns are the keys of the parameters it is executed with.
INSERT_JOB = insert(t)
#: Many completions: lock the rows (by primary key, in id order like
#: heartbeats, so the two never deadlock), then finish those still running
#: under the caller's token.
LOCK_JOBS = (select(t.c.id, t.c.token, t.c.state, t.c.has_dependents)
             .where(t.c.id.in_(bindparam("job_ids", expanding=True)))
             .order_by(t.c.id).with_for_update())
COMPLETE_MANY = update(t).where(t.c.id.in_(bindparam("job_ids", expanding=True))).values(**SUCCESS_VALUES)
#: (``complete_held``: the batched completion's one UPDATE; defined below.)
HEARTBEAT = update(t).where(_FENCE).values(lease_expires_at=_LEASE)
# The run-ending transitions below keep ``owner`` and ``started_at``: the
# event they write next reads the run's worker and start from the row.
RETRY = update(t).where(_FENCE).values(
    state=QUEUED, retries=t.c.retries + 1, eta=utc_now(bindparam("delay_seconds", type_=Float)),
    last_error=bindparam("error_text"), lease_expires_at=None)
#: A job that fails for good frees its unique key for new jobs and keeps it
#: in ``failed_unique_key`` for a later ``retry``.  The SET order is
#: explicit: MySQL assigns left to right, each seeing the previous ones.
_PARK_KEY = ((t.c.failed_unique_key, func.coalesce(t.c.unique_key, t.c.failed_unique_key)),
             (t.c.unique_key, None))
FAIL = update(t).where(_FENCE).ordered_values(
    *_PARK_KEY, (t.c.state, FAILED), (t.c.retries, t.c.retries + 1), (t.c.last_error, bindparam("error_text")),
    (t.c.lease_expires_at, None))
RELEASE = update(t).where(_FENCE).values(state=QUEUED, lease_expires_at=None)
#: The event of a run that just ended (``:event_kind``, ``:event_detail``) for
#: job ``:job_id``, with the run's worker and start read off its row.  Run
#: after the fenced UPDATE matched, in its transaction (the row is locked).
#: Published (``emitted``) if the job is tracked; ``RUN_EVENT_EMITTED`` always (``failed``).
RUN_EVENT, RUN_EVENT_EMITTED = (insert(event_table).from_select(
    ["job_id", "kind", "queue", "name", "worker", "started_at", "detail", "emitted"],
    select(t.c.id, cast(bindparam("event_kind"), String), t.c.queue, t.c.name, t.c.owner, t.c.started_at,
           cast(bindparam("event_detail"), Text), emitted).where(t.c.id == bindparam("job_id")))
    for emitted in (t.c.tracked, literal(1)))
#: Events of tracked jobs only (``put``, ``popped``, ``succeeded``, ``canceled``...), published:
#: ``:event_kind`` for the jobs ``:job_ids`` that are tracked, by the worker on their row.
TRACKED_EVENT = insert(event_table).from_select(
    ["job_id", "kind", "queue", "name", "worker", "detail", "emitted"],
    select(t.c.id, cast(bindparam("event_kind"), String), t.c.queue, t.c.name, t.c.owner,
           cast(bindparam("event_detail"), Text), literal(1))
    .where(t.c.id.in_(bindparam("job_ids", expanding=True)), t.c.tracked == 1))
#: An event written by hand (``moved``, ``priority``) for ``:job_id``: no worker, no run;
#: published if the job is tracked.
HAND_EVENT = insert(event_table).from_select(
    ["job_id", "kind", "queue", "name", "detail", "emitted"],
    select(t.c.id, cast(bindparam("event_kind"), String), t.c.queue, t.c.name,
           cast(bindparam("event_detail"), Text), t.c.tracked).where(t.c.id == bindparam("job_id")))
#: Dependents of the jobs ``:job_ids`` that just succeeded, with how many of
#: their dependencies are among them.  Index ``(depends_on, job_id)``; plain
#: read: no new row can appear meanwhile, since an enqueue that would add one
#: first locks the dependency's row, which the completion holds.
DEPENDENTS_DONE = (select(d.c.job_id, func.count().label("done")).where(d.c.depends_on.in_(
    bindparam("job_ids", expanding=True))).group_by(d.c.job_id).order_by(d.c.job_id))
#: ``:done`` dependencies of the waiting jobs ``:job_ids`` succeeded: those
#: with none left become ``queued``.  One UPDATE by primary key: its row locks
#: serialize two completions of the last dependencies on every backend, and
#: each reads the count the other left.  ``state`` is assigned first: MySQL
#: assigns left to right and the CASE must see ``pending_deps`` before the decrement.
RELEASE_DEPENDENTS = (
    update(t).where(t.c.id.in_(bindparam("job_ids", expanding=True)), t.c.state == WAITING)
    .ordered_values(
        (t.c.state, case((t.c.pending_deps <= bindparam("done", type_=Integer), QUEUED), else_=t.c.state)),
        (t.c.pending_deps, case((t.c.pending_deps > bindparam("done", type_=Integer),
                                 t.c.pending_deps - bindparam("done", type_=Integer)), else_=0))))
#: What a job that is never run writes when it expires (finished, unique key freed).
EXPIRY_VALUES = dict(state=EXPIRED, finished_at=utc_now(), unique_key=None, lease_expires_at=None)
#: Running jobs first, then queued ones in claim order, then waiting, failed, finished, then any other state.
_STATE_ORDER = case({RUNNING: 0, QUEUED: 1, WAITING: 2, FAILED: 3, SUCCEEDED: 4, CANCELED: 5, EXPIRED: 6},
                    value=t.c.state, else_=7)
#: A running job whose lease ran out, or that never had one (a row written by hand).
_EXPIRED = or_(t.c.lease_expires_at < utc_now(), t.c.lease_expires_at.is_(None))
#: What a claim writes on each row it takes; ``token + 1`` is the new fence.
#: ``runs`` counts claims; ``wait_seconds`` is set by the first claim only (eta to first start).
CLAIM_VALUES = dict(state=RUNNING, token=t.c.token + 1, owner=bindparam("new_owner"),
                    lease_expires_at=_LEASE, started_at=utc_now(), runs=t.c.runs + 1,
                    wait_seconds=func.coalesce(t.c.wait_seconds, seconds_since(t.c.eta)))


#: ``:from_queue`` is not paused (``mqueue pause``).  Part of the claim's
#: first read of the queue (its first priority level), evaluated once per
#: statement by primary key: a paused queue has no level, so nothing is
#: claimed from it, every worker knows of a pause at its next claim, and
#: the check costs no statement of its own.
NOT_PAUSED = ~exists().where(queue_table.c.name == bindparam("from_queue"), queue_table.c.paused == 1)


def due_jobs(*columns, at_level: bool = True, level=None):
    """``SELECT columns`` of due jobs of ``:from_queue`` in claim order, ``LIMIT :limit``.

    Follows the claim index ``(queue, state, neg_priority, eta, id)`` exactly,
    so no backend sorts (and InnoDB locks only the rows it returns).  With
    ``at_level`` only the priority level ``:level`` is read: the index range
    ``eta <= now`` inside one level ends at its first future row, where a
    scan over all levels would walk every future row of each level it passes.
    """
    where = [t.c.queue == bindparam("from_queue"), t.c.state == QUEUED]
    if at_level:
        where.append(t.c.neg_priority == (bindparam("level", type_=Integer) if level is None else level))
    return (select(*columns).where(*where, t.c.eta <= due_now())
            .order_by(t.c.neg_priority, t.c.eta, t.c.id)
            .limit(bindparam("limit", type_=Integer)))


def chosen_for_claim(candidates, skip_locked: bool = True):
    """``candidates`` (a ``due_jobs`` select) as the claim's CTE ``mqueue_claim``, locked with SKIP LOCKED.

    A materialized CTE runs once.  As a plain IN (subquery) PostgreSQL 15
    plans a nested-loop semi join that re-runs the LIMIT subquery for every
    outer row, SKIP LOCKED passing over the rows it just claimed: LIMIT 1
    claimed every due job of the queue (measured).
    """
    if skip_locked:
        candidates = candidates.with_for_update(skip_locked=True)
    return candidates.cte("mqueue_claim").prefix_with("MATERIALIZED", dialect="postgresql")


#: Engine execution option carrying a worker engine's lock-wait bound (seconds).
LOCK_WAIT_OPTION = "mqueue_lock_wait_seconds"


def lock_wait_seconds(lease_seconds: float) -> float:
    """A quarter of the lease, at least 1 s: a blocked statement gives up while the lease has time left."""
    return max(1.0, lease_seconds / 4)


#: At most this many priority levels are walked one by one; a queue with
#: more distinct priorities queued falls back to one scan over all levels
#: (each level costs an index descent per poll).
MAX_LEVELS = 500


def _priority_levels():
    """Every ``neg_priority`` with a queued job of ``:from_queue``, ascending, and whether it has a due job.

    A loose index scan over the claim index: each step seeks the next
    level (``neg_priority > previous ORDER BY neg_priority LIMIT 1``), and
    ``due`` (a job id or None) probes ``eta <= now`` inside the level.  Each
    is one index descent, so the cost is O(levels x log n) whatever the
    number of future-dated rows.  Plain reads, no locks.
    """
    queued = (t.c.queue == bindparam("from_queue"), t.c.state == QUEUED)
    first = (select(t.c.neg_priority).where(*queued, NOT_PAUSED).order_by(t.c.neg_priority).limit(1)
             .scalar_subquery())
    levels = select(first.label("level"), literal(1).label("depth")).cte("mqueue_levels", recursive=True)
    following = (select(t.c.neg_priority).where(*queued, t.c.neg_priority > levels.c.level)
                 .order_by(t.c.neg_priority).limit(1).scalar_subquery())
    levels = levels.union_all(select(following, levels.c.depth + 1)
                              .where(levels.c.level.is_not(None), levels.c.depth < MAX_LEVELS))
    # A correlated LIMIT 1, not EXISTS: PostgreSQL may turn an EXISTS into a
    # hashed subplan that reads every due row of every level once.
    due = (select(t.c.id).where(*queued, t.c.neg_priority == levels.c.level, t.c.eta <= due_now())
           .limit(1).scalar_subquery())
    return (select(levels.c.level, levels.c.depth, due.label("due"))
            .where(levels.c.level.is_not(None)).order_by(levels.c.level))


PRIORITY_LEVELS = _priority_levels()


def _time_key(value) -> dt.datetime:
    """A claimed row's eta for sorting; an unreadable one (None) sorts first, as the database ran it."""
    return value if isinstance(value, dt.datetime) else dt.datetime.min


def insert_from_array(columns: Sequence[str], source, args, position):
    """``INSERT INTO mqueue_task (columns..., args) SELECT :columns..., args FROM source ORDER BY position``.

    ``source`` is the backend's table function over one JSON array of the
    batch's ``args`` (parameter ``args_list``), ``args`` and ``position`` its
    columns; the other columns are one parameter each, named after the
    column.  Rows are inserted in array order, so their ids sorted are too.
    """
    chosen = select(*[bindparam(name, type_=t.c[name].type) for name in columns], args) \
        .select_from(source).order_by(position)
    return insert(t).from_select([*columns, "args"], chosen)


def array_params(shared: dict[str, Any], args: Iterable[str]) -> dict[str, Any]:
    """The parameters of an ``insert_from_array`` statement: ``shared`` plus ``args_list``, one JSON array."""
    return dict(shared, args_list=json.dumps(list(args), ensure_ascii=False))


def id_names(size: int) -> list[str]:
    """One parameter per id of ``size`` ids, ``id_0`` ...: a statement text fixed for each size."""
    return [f"id_{n}" for n in range(size)]


def id_params(ids: Sequence[int]) -> dict[str, int]:
    """``id_names``' values."""
    return {f"id_{n}": job_id for n, job_id in enumerate(ids)}


def batch_names(size: int) -> list[str]:
    """The parameters of a batch of ``size`` jobs: ``id_0`` ... then ``held_token_0`` ..."""
    return id_names(size) + [f"held_token_{n}" for n in range(size)]


def batch_params(jobs: Sequence[tuple[int, int]]) -> dict[str, int]:
    """``batch_names``' values for ``(id, token)`` pairs."""
    params = {}
    for n, (job_id, token) in enumerate(jobs):
        params[f"id_{n}"], params[f"held_token_{n}"] = job_id, token
    return params


def held_without_dependents(size: int) -> tuple:
    """The jobs of a batch (``batch_names``) still running under their tokens, without dependents.

    One parameter per value, not an expanding list: the statement's text
    is fixed for each batch size, so it can go to the driver directly and
    PostgreSQL plans it once.
    """
    ids = [bindparam(name, type_=t.c.id.type) for name in id_names(size)]
    pairs = [tuple_(job_id, bindparam(f"held_token_{n}", type_=t.c.token.type)) for n, job_id in enumerate(ids)]
    return (t.c.id.in_(ids), tuple_(t.c.id, t.c.token).in_(pairs), t.c.state == RUNNING, t.c.has_dependents == 0)


@functools.cache
def complete_held(size: int) -> DriverStatement:
    """Complete a batch of ``size`` held jobs (``held_without_dependents``): one UPDATE, its rowcount."""
    return DriverStatement(update(t).where(*held_without_dependents(size)).values(**SUCCESS_VALUES),
                           batch_names(size))


class Dialect(HistoryStatements, ControlStatements):
    """Portable defaults.  Subclasses: ``mysql.py``, ``postgresql.py``, ``sqlite.py``.

    Pruning, stats and settings statements live in ``history.py``; paused
    queues and the worker registry in ``control.py``.
    """

    name = "base"
    #: Whether ``SELECT ... FOR UPDATE SKIP LOCKED`` exists (else writes are serialized).
    skip_locked = True
    #: Whether the worker's producer completes the jobs whose task wrote nothing in its next
    #: claim's transaction (``claim_and_complete``) rather than leaving them to the completer.
    completes_with_claim = False
    #: The server's port when a URL names none.
    default_port: int | None = None

    # -- engine set-up ---------------------------------------------------
    def engine_options(self, url) -> dict[str, Any]:
        """Extra ``create_engine`` keyword arguments for this backend.

        No ``pool_pre_ping`` and no reset-on-return: ``connections.install``
        pings only connections that sat idle and rolls back only a
        connection returned with a transaction open (two round trips of a
        single enqueue's five on MariaDB otherwise).
        """
        return {"pool_reset_on_return": None}

    def worker_engine_options(self, concurrency: int, lease_seconds: float = 60.0) -> dict[str, Any]:
        """Engine options for a daemon's own engine.

        Two connections per executor thread (the task's session, and an
        outcome or heartbeat write beside it) plus one per service loop
        (producer, completer, heartbeat, rescuer, scheduler, pruner,
        watchdog).  No pre-ping and no reset-on-return: every worker
        transaction ends in COMMIT or ROLLBACK already, and a dead connection
        is a transient error the worker retries (measured: the ping and the
        reset ROLLBACK were 4 of 9 round trips per job on MariaDB).

        Lock waits on the worker's connections are bounded well below the
        lease (``lock_wait_seconds``): a worker blocked behind someone's
        long transaction gets a transient error and retries, instead of
        waiting until its own jobs' leases expire and they are re-run
        elsewhere.  ``configure_engine`` applies it on every new connection.
        """
        return {"pool_size": concurrency + 7, "max_overflow": concurrency, "pool_pre_ping": False,
                "pool_reset_on_return": None,
                "execution_options": {LOCK_WAIT_OPTION: lock_wait_seconds(lease_seconds)}}

    def in_transaction(self, dbapi_connection) -> bool:
        """Whether a transaction may be open on a driver connection, read without a round trip (True if unsure)."""
        return True

    def database_identity(self, url: URL) -> tuple | None:
        """What makes two URLs one database, so that ``db.session()`` of any handle joins the current one.

        Backend, host, port (the default filled in), database and user: not
        the driver, options or password.  None: never the same as another engine's.
        """
        return (self.name, (url.host or "").lower(), url.port or self.default_port, url.database, url.username)

    def missing_database_file(self, url: URL) -> str | None:
        """The path of a database file that connecting would create, empty; None for a server database."""
        return None

    def adopt_engine(self, engine: Engine) -> Engine:
        """An application's own engine, with the options mqueue needs (same pool).

        What is set here applies to mqueue's own sessions and the worker's
        transactions on it (an engine made by ``execution_options`` shares the
        pool, not its options or ``begin`` hooks); the application's
        sessions keep their own settings.
        """
        return engine

    def configure_engine(self, engine: Engine, own: bool = True) -> None:
        """Install connection hooks on an engine mqueue built (``own``) or adopted.

        An engine built from a URL gets the idle ping and the checkin reset
        of ``connections.install``, and a worker engine the lock-wait
        bound of ``worker_engine_options``.  An adopted engine is left as
        the application configured it.
        """
        if not own:
            return
        connections.install(engine, self.in_transaction)
        seconds = engine.get_execution_options().get(LOCK_WAIT_OPTION)
        if seconds is None:
            return

        @event.listens_for(engine, "connect")
        def _bound_lock_waits(dbapi_connection, _record):
            self.set_lock_wait(dbapi_connection, seconds)

    def set_lock_wait(self, dbapi_connection, seconds: float) -> None:
        """Bound how long one statement waits for a row lock on this connection.  Default: nothing."""

    def reader(self, engine: Engine) -> Engine:
        """The engine (same pool) for read-only queries such as ``mqueue list`` and ``stats``.

        Only SQLite differs: there every transaction takes the write lock
        (``BEGIN IMMEDIATE``), so a plain read would wait behind any running
        task that has written; its reader takes a snapshot instead.
        """
        return engine

    # -- clock -------------------------------------------------------------
    def db_now(self, conn: Connection):
        """The database's current UTC time (naive datetime)."""
        return conn.execute(select(utc_now())).scalar_one()

    # -- enqueue -----------------------------------------------------------
    #: Whether ``insert_job`` wakes listening workers itself, in its transaction (``wakeup``).
    insert_notifies = False

    def insert_job(self, conn, values: dict[str, Any]) -> int:
        """Insert one job row; return its id.  Takes no lock beyond the new row (and its index entries).

        Plain values go as parameters of one prebuilt statement (its compiled
        form is cached per set of columns); only a SQL expression (an eta
        of ``now + delay``) needs a statement of its own.
        """
        if any(isinstance(value, ClauseElement) for value in values.values()):
            result = conn.execute(insert(t).values(**values))
        else:
            result = conn.execute(INSERT_JOB, values)
        return int(result.inserted_primary_key[0])

    @staticmethod
    def shared_values(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        """The values every row has alike, ``args`` left out; None if the rows differ in more than ``args``.

        The rows of one ``enqueue_many`` come from one ``TaskCall``, so only
        ``args`` differs: a dialect then sends the others once and the
        ``args`` as one JSON array (``insert_jobs``), not one parameter per
        row and column.
        """
        first = rows[0]
        if "args" not in first or any(isinstance(value, ClauseElement) for value in first.values()):
            return None
        shared = {key: value for key, value in first.items() if key != "args"}
        for row in rows:
            if len(row) != len(first) or any(key not in row or row[key] != value for key, value in shared.items()):
                return None
        return shared

    def insert_jobs(self, conn, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert many rows in one statement batch; ids in input order.  Locks only the new rows."""
        if not rows:
            return []
        stmt = insert(t).returning(t.c.id, sort_by_parameter_order=True)
        return [int(row[0]) for row in conn.execute(stmt, list(rows))]

    def insert_unique(self, conn, values: dict[str, Any]) -> int:
        """Insert a job unless a live job holds ``unique_key``; return either id.

        The UNIQUE index on ``unique_key`` decides, never a prior SELECT (which
        races), and the live job's row is never locked: the enqueuing
        transaction may stay open for long (a script enqueuing many jobs),
        and a lock on the live job would stall its completion and its
        worker's heartbeats past the lease.  ``insert_if_key_free`` inserts
        or reports the duplicate; the existing id is then read with a plain
        read (READ COMMITTED sees the latest commit).  Only when that read
        finds nothing (a REPEATABLE READ snapshot older than the live job) a
        shared locking read looks at the latest version.  If the live job
        finished in between, try again.
        """
        return self.insert_unique_job(conn, values)[0]

    def insert_unique_job(self, conn, values: dict[str, Any]) -> tuple[int, bool]:
        """``insert_unique``, and whether the job is new (its tags and events are then written)."""
        key = values["unique_key"]
        by_key = select(t.c.id).where(t.c.unique_key == key)
        for _ in range(20):
            job_id = self.insert_if_key_free(conn, values)
            if job_id is not None:
                return job_id, True
            existing = conn.execute(by_key).scalar()
            if existing is None:
                existing = conn.execute(by_key.with_for_update(read=True)).scalar()
            if existing is not None:
                return int(existing), False
        raise RuntimeError(f"could not enqueue unique_key {key!r}: it keeps changing")

    def insert_if_key_free(self, conn, values: dict[str, Any]) -> int | None:
        """Insert a job with a ``unique_key``; None if a live job holds the key.

        Portable form: the INSERT in a savepoint, a duplicate caught as
        IntegrityError.  On InnoDB this leaves no lock on the live job's
        index entry once the savepoint is rolled back (measured on MariaDB
        10.11: its DELETE then runs at once; ``INSERT IGNORE`` instead keeps
        a shared lock that blocks the DELETE until the enqueuer commits).
        """
        try:
            with conn.begin_nested():
                return self.insert_job(conn, values)
        except IntegrityError:
            return None

    # -- worker transitions --------------------------------------------------
    def claim_jobs(self, conn, queue: str, limit: int, owner: str, lease_seconds: float,
                   skip: int = 0) -> list[ClaimedRow]:
        """Claim up to ``limit`` due jobs of ``queue``: highest priority, then oldest eta, then lowest id.

        ``skip``: start that many due jobs past the head of the first level
        (the worker's own window after it lost a claim race); only where row
        locks are local to one node of several (MySQL dialect, for Galera).
        Here workers never claim the same row, and it is ignored.

        First ``PRIORITY_LEVELS`` (a loose index scan, no locks) lists the
        priority levels that have a due job; an idle poll ends there.  Then
        each such level in turn is claimed with ``UPDATE ... WHERE id IN
        (SELECT ... WHERE neg_priority = :level AND eta <= now ORDER BY eta,
        id LIMIT n FOR UPDATE SKIP LOCKED) RETURNING``, whose index range on
        the claim index ``(queue, state, neg_priority, eta, id)`` stops at
        the level's first future row and locks only the rows it returns.

        Why: one scan over all levels ordered by ``(neg_priority, eta, id)``
        walks every future-dated row of each level it passes before it can
        say "nothing due".  Measured with ``scripts/bench.py scheduled``
        (100,000 jobs due tomorrow at two priority levels; median per idle
        poll / per one-job claim among 100 due jobs, each in its own
        transaction, on a shared 2-core machine under heavy load), one scan
        over all levels vs this walk: SQLite 47 / 15 ms vs 0.2 / 0.4 ms;
        MariaDB 10.11 88 / 51 ms vs 2.0 / 8.6 ms; PostgreSQL 15 17 / 12 ms
        vs 1.8 / 4.0 ms.  An index on ``(queue, state, eta)`` for an "is
        anything due" probe was the other option: it costs every insert and
        state change one more index entry and still leaves the claim
        walking the future rows of a level above the due ones.
        """
        claimed: list[ClaimedRow] = []
        levels = conn.execute(PRIORITY_LEVELS, dict(from_queue=queue)).all()
        if len(levels) >= MAX_LEVELS:  # more priorities than walked: one scan over all of them
            return self.claim_at_level(conn, queue, None, limit, owner, lease_seconds)
        for level, _depth, due in levels:
            if due is not None:
                claimed += self.claim_at_level(conn, queue, level, limit - len(claimed), owner, lease_seconds)
                if len(claimed) >= limit:
                    break
        claimed.sort(key=lambda row: row.sort_key)
        return claimed

    def claim(self, engine: Engine, queue: str, limit: int, owner: str, lease_seconds: float,
              skip: int = 0) -> list[ClaimedRow]:
        """``claim_jobs`` in a transaction of its own, committed when this returns (the worker's claim)."""
        with engine.begin() as conn:
            return self.claim_jobs(conn, queue, limit, owner, lease_seconds, skip=skip)

    def claim_and_complete(self, engine: Engine, queue: str, limit: int, owner: str, lease_seconds: float,
                           jobs: Sequence[tuple[int, int]], tracked: Sequence[int] = (),
                           skip: int = 0) -> tuple[list[ClaimedRow], list[int]]:
        """``complete_many`` of ``jobs`` and ``claim``, committed together: the claimed rows and the lost ids.

        Where ``completes_with_claim``, the worker's producer completes the
        jobs whose task returned without writing with its next claim: one
        transaction (one turn of SQLite's write lock) where they took two.
        The completion comes first, as ``complete_many`` would do it (one
        guarded UPDATE when every job is still held, untracked and without
        dependents, else ``complete_jobs``); a job of ``jobs`` is lost if
        its lease was lost before this completion.  Nothing of either is
        written if this raises.
        """
        with engine.begin() as conn:
            if tracked or complete_held(len(jobs)).run_in(conn, batch_params(jobs)) != len(jobs):
                # Those completed by the guarded UPDATE are succeeded under their tokens now ("done").
                lost, done = self.complete_jobs(conn, jobs, tracked)
                lost = sorted(set(lost) - set(done))
            else:
                lost = []
            return self.claim_jobs(conn, queue, limit, owner, lease_seconds, skip=skip), lost

    def claim_at_level(self, conn, queue: str, level: int | None, limit: int, owner: str,
                       lease_seconds: float) -> list[ClaimedRow]:
        """Claim up to ``limit`` due jobs of one priority level (``neg_priority``; None: every level)."""
        statement = self.claim_statement if level is not None else self.claim_any_level_statement
        params = dict(from_queue=queue, level=level, limit=limit, new_owner=owner, lease_seconds=lease_seconds)
        return self._popped(conn, self._rows(conn.execute(statement, params)))

    def _popped(self, conn, rows: list[ClaimedRow]) -> list[ClaimedRow]:
        """The claimed rows to run, with ``popped`` events of the tracked ones, in the claim's transaction.

        A row claimed past its ``expires_at`` is marked ``expired`` instead
        (``expire_claimed``) and returned with ``expired`` set, for the caller
        to skip: it was claimed (a claim that took only expired rows is not
        an empty queue).  Neither costs a statement when no row needs it.
        """
        if any(row.expired for row in rows):
            self.expire_claimed(conn, [row.id for row in rows if row.expired])
        tracked = [row.id for row in rows if row.tracked and not row.expired]
        if tracked:
            self.emit_tracked(conn, tracked, "popped")
        return rows

    def emit_tracked(self, conn, job_ids: Sequence[int], kind: str, detail: str | None = None) -> None:
        """Publish ``kind`` for those of ``job_ids`` that are tracked (rows this transaction changed)."""
        conn.execute(TRACKED_EVENT, dict(job_ids=list(job_ids), event_kind=kind, event_detail=detail))

    @functools.cached_property
    def claim_statement(self):
        return self._claim(due_jobs(t.c.id))

    @functools.cached_property
    def claim_any_level_statement(self):
        return self._claim(due_jobs(t.c.id, at_level=False))

    def _claim(self, candidates):
        chosen = chosen_for_claim(candidates, self.skip_locked)
        return (update(t).where(t.c.id.in_(select(chosen.c.id)), t.c.state == QUEUED)
                .values(**CLAIM_VALUES).returning(*CLAIM_COLUMNS))

    @staticmethod
    def _rows(result, token_offset: int = 0) -> list[ClaimedRow]:
        """Claimed rows in claim order.  Nothing here raises on a hand-written value (see ``read_time``)."""
        rows = [ClaimedRow(r.id, r.queue, r.name, r.args, r.retries, r.max_retries, r.token + token_offset,
                           (r.neg_priority, _time_key(r.eta), r.id), bool(r.tracked), bool(r.has_dependents),
                           bool(r.expired)) for r in result]
        rows.sort(key=lambda r: r.sort_key)
        return rows

    def heartbeat_jobs(self, conn, jobs: Iterable[tuple[int, int]], lease_seconds: float) -> list[int]:
        """Extend the leases of ``(id, token)`` pairs; return the ids whose lease was lost.

        One fenced UPDATE per job in one short transaction: a row lock each,
        by primary key, taken in id order (as ``complete_jobs`` does).
        """
        lost = []
        for job_id, token in sorted(jobs):
            result = conn.execute(HEARTBEAT, dict(job_id=job_id, job_token=token, lease_seconds=lease_seconds))
            if result.rowcount != 1:
                lost.append(job_id)
        return lost

    def complete_job(self, conn, job_id: int, token: int, tracked: bool = False,
                     has_dependents: bool = False) -> bool:
        """Mark a job ``succeeded`` inside the task's own transaction: one UPDATE, no event row.

        Fenced; row lock by primary key, held until the task's transaction
        commits (with the task's writes) or rolls back, so a rolled-back
        completion leaves no trace in the job's history and releases no
        dependent.  A tracked job also publishes ``succeeded`` (one more
        statement, tracked jobs only).  ``has_dependents`` is the value the
        claim read: if a dependent was enqueued since, the UPDATE does not
        match and is repeated expecting one (the lost-lease path costs that
        one more statement); a job with dependents then releases them
        (``release_dependents``).
        """
        params = dict(job_id=job_id, job_token=token, seen_dependents=int(has_dependents))
        done = COMPLETE.run_in(conn, params) == 1
        if not done and not has_dependents:
            has_dependents = done = COMPLETE.run_in(conn, dict(params, seen_dependents=1)) == 1
        if done and has_dependents:
            self.release_dependents(conn, [job_id])
        if done and tracked:
            self.emit_tracked(conn, [job_id], "succeeded")
        return done

    def complete_jobs(self, conn, jobs: Sequence[tuple[int, int]],
                      tracked: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """Mark many jobs ``(id, token)`` succeeded at once; return ``(lost, done)``.

        For jobs whose task wrote nothing, so there is no task transaction to
        join.  The fence is checked on rows locked by primary key (SQLite: the
        write lock), so nothing can change between the check and the update.
        ``lost``: ids not completed now (the lease was lost); ``done``: those
        of them already succeeded under the caller's token (after a COMMIT
        whose reply was lost, by this very worker).
        """
        wanted = dict(jobs)
        rows = conn.execute(LOCK_JOBS, dict(job_ids=list(wanted))).all()
        ours = [job_id for job_id, token, state, _ in rows if state == RUNNING and wanted[job_id] == token]
        if ours:
            conn.execute(COMPLETE_MANY, dict(job_ids=ours))
            releasing = [row.id for row in rows if row.id in set(ours) and row.has_dependents]
            if releasing:
                self.release_dependents(conn, releasing)
            published = sorted(set(ours) & set(tracked))
            if published:
                self.emit_tracked(conn, published, "succeeded")
        kept = set(ours)
        done = {job_id for job_id, token, state, _ in rows if state == SUCCEEDED and wanted[job_id] == token}
        lost = [job_id for job_id in wanted if job_id not in kept]
        return lost, [job_id for job_id in lost if job_id in done]

    def complete_many(self, engine: Engine, jobs: Sequence[tuple[int, int]],
                      tracked: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """``complete_jobs`` for the worker's batches, committed when this returns.

        First one guarded UPDATE (``complete_held``), committed only if it
        completed every job of the batch: all still held, untracked and
        without dependents, the common case (one statement where
        ``complete_jobs`` takes two).  Otherwise it is rolled back and
        ``complete_jobs`` sorts the batch out, in a transaction of its own.
        """
        with engine.connect() as conn:
            if not tracked:
                with conn.begin() as transaction:
                    if complete_held(len(jobs)).run_in(conn, batch_params(jobs)) == len(jobs):
                        return [], []
                    transaction.rollback()
            with conn.begin():
                return self.complete_jobs(conn, jobs, tracked)

    def retry_job(self, conn, job_id: int, token: int, delay_seconds: float, error: str) -> bool:
        """Back to ``queued`` with ``retries + 1`` and ``eta = now + delay``; a ``retried`` event with the error.

        Fenced; row lock by primary key, then one insert into ``mqueue_event``.
        """
        params = dict(job_id=job_id, job_token=token, delay_seconds=delay_seconds, error_text=error)
        return self._ended_run(conn, conn.execute(RETRY, params), job_id, "retried", error)

    def fail_job(self, conn, job_id: int, token: int, error: str) -> bool:
        """Mark ``failed`` for good, kept for inspection; a ``failed`` event with the error.

        Fenced; row lock by primary key, then one insert into ``mqueue_event``.
        Its unique key moves to ``failed_unique_key``: free for new jobs,
        restored by ``requeue_job`` (a retry by hand).
        """
        result = conn.execute(FAIL, dict(job_id=job_id, job_token=token, error_text=error))
        return self._ended_run(conn, result, job_id, "failed", error, RUN_EVENT_EMITTED)

    def release_job(self, conn, job_id: int, token: int) -> bool:
        """Hand an unfinished job back on shutdown: ``queued``, same eta and retries; a ``released`` event.

        Fenced; row lock by primary key, then one insert into ``mqueue_event``.
        """
        return self._ended_run(conn, conn.execute(RELEASE, dict(job_id=job_id, job_token=token)), job_id,
                               "released", None)

    @staticmethod
    def _ended_run(conn, result, job_id: int, kind: str, detail: str | None, statement=RUN_EVENT) -> bool:
        """Record the event of a fenced run-ending UPDATE that matched; False (nothing written) if it did not."""
        if result.rowcount != 1:
            return False
        conn.execute(statement, dict(job_id=job_id, event_kind=kind, event_detail=detail))
        return True

    def rescue_expired(self, conn, queues: Sequence[str]) -> int:
        """Re-queue running jobs whose lease expired (their worker died).

        A running row with no lease at all (written by hand) counts as
        expired: nothing would ever extend it.  The lost run counts as a
        failed attempt, so a job that kills its worker every time ends
        ``failed`` instead of looping forever.  Each rescued job gets a
        ``rescued`` event (``failed`` if that was its last run).  Uses the claim index prefix
        ``(queue, state)``; rows locked by a live transaction are skipped
        where the backend can (the UPDATE then locks the chosen rows by
        primary key and checks expiry again).
        """
        expired = (select(t.c.id).where(t.c.queue.in_(list(queues)), t.c.state == RUNNING, _EXPIRED)
                   .order_by(t.c.id))
        if self.skip_locked:
            expired = expired.with_for_update(skip_locked=True)
        ids = [row[0] for row in conn.execute(expired)]
        if not ids:
            return 0
        exhausted = t.c.retries + 1 > func.coalesce(t.c.max_retries, DEFAULT_MAX_RETRIES)
        result = conn.execute(update(t).where(t.c.id.in_(ids), t.c.state == RUNNING, _EXPIRED).ordered_values(
            (t.c.failed_unique_key, case((exhausted, func.coalesce(t.c.unique_key, t.c.failed_unique_key)),
                                         else_=t.c.failed_unique_key)),
            (t.c.unique_key, case((exhausted, None), else_=t.c.unique_key)),
            (t.c.state, case((exhausted, FAILED), else_=QUEUED)),
            (t.c.retries, t.c.retries + 1),
            (t.c.last_error, "lease expired: the worker running this job stopped heartbeating (killed or stalled)"),
            (t.c.lease_expires_at, None)))
        # Every chosen row was locked (or the write lock held), so each was updated.
        conn.execute(insert(event_table).from_select(
            ["job_id", "kind", "queue", "name", "worker", "started_at", "detail", "emitted"],
            select(t.c.id, case((t.c.state == FAILED, "failed"), else_="rescued"), t.c.queue, t.c.name,
                   t.c.owner, t.c.started_at, t.c.last_error,
                   case((or_(t.c.state == FAILED, t.c.tracked == 1), 1), else_=0))
            .where(t.c.id.in_(ids), t.c.state != RUNNING)))
        return result.rowcount

    def job_state(self, conn, job_id: int) -> tuple[str, int] | None:
        """``(state, token)`` of a job, or None if the row is gone.  Plain read by primary key."""
        row = conn.execute(select(t.c.state, t.c.token).where(t.c.id == job_id)).first()
        return (row.state, row.token) if row else None

    # -- by hand (admin.py, the CLI) -------------------------------------------
    # Each write names the state and token the job was just read in, so a
    # job a worker claimed in between is never touched: zero rows changed,
    # and the caller reads the job again to say why.

    def read_job(self, conn, job_id: int):
        """One row of ``mqueue_task`` by primary key, or None.  Plain read, no lock."""
        return conn.execute(select(t).where(t.c.id == job_id)).first()

    def list_jobs(self, conn, queue: str | None, state: str | None, limit: int) -> list:
        """Rows: running first, then queued in claim order, then waiting, failed, finished, any other state.

        Plain read, no lock.  With a queue (and state) it follows the claim
        index; without, it sorts what it reads (an operator's listing, bounded
        by ``limit``).  Finished jobs of one state come newest first
        (``finished_at`` index when no queue is given).
        """
        if state in FINISHED:
            order = (t.c.finished_at.desc(), t.c.id.desc())
        else:
            order = (_STATE_ORDER, t.c.neg_priority, t.c.eta, t.c.id)
        query = select(t).order_by(*order).limit(limit)
        if queue is not None:
            query = query.where(t.c.queue == queue)
        if state is not None:
            query = query.where(t.c.state == state)
        return conn.execute(query).all()

    def queue_stats(self, conn, now) -> list:
        """Per queue: due, scheduled, running, failed, waiting, finished and other-state counts, oldest due eta.

        One grouped scan of the table (no lock); ``now`` is the database
        time read once by the caller, so the counts agree with each other.
        A state mqueue does not know (a row written by hand) is counted as
        ``other`` so it is never invisible.
        """
        due = and_(t.c.state == QUEUED, t.c.eta <= now)
        later = and_(t.c.state == QUEUED, t.c.eta > now)

        def count(condition):
            return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

        return conn.execute(
            select(t.c.queue, count(due).label("queued"), count(later).label("scheduled"),
                   count(t.c.state == RUNNING).label("running"), count(t.c.state == FAILED).label("failed"),
                   *(count(t.c.state == state).label(state) for state in (WAITING,) + FINISHED),
                   count(or_(t.c.state.not_in(STATES), t.c.state.is_(None))).label("other"),
                   func.min(case((due, t.c.eta))).label("oldest_due"))
            .group_by(t.c.queue).order_by(t.c.queue)).all()

    def list_crons(self, conn) -> list:
        """Every row of ``mqueue_cron`` by queue, then name.  Plain read."""
        return conn.execute(select(cron_table).order_by(cron_table.c.queue, cron_table.c.name)).all()

    def cancel_job(self, conn, job_id: int, state: str, token: int) -> bool:
        """A job still in ``state`` with ``token`` becomes ``canceled`` (finished, kept in history).

        Its unique key is freed.  Row lock by primary key.
        """
        done = conn.execute(update(t).where(t.c.id == job_id, t.c.state == state, t.c.token == token).values(
            state=CANCELED, finished_at=utc_now(), unique_key=None, lease_expires_at=None)).rowcount == 1
        if done:
            self.emit_tracked(conn, [job_id], "canceled")
        return done

    def hasten_job(self, conn, job_id: int, token: int) -> bool:
        """A queued job waiting for a later eta becomes due now.  Row lock by primary key."""
        return conn.execute(update(t).where(t.c.id == job_id, t.c.state == QUEUED, t.c.token == token).values(
            eta=case((t.c.eta > utc_now(), utc_now()), else_=t.c.eta))).rowcount == 1

    def requeue_job(self, conn, job_id: int, state: str, token: int) -> bool:
        """Retry by hand: back to ``queued``, due now, ``retries`` 0, its unique key restored.

        For a failed job, a job in a state mqueue does not know, or a running
        row that never had a lease (all written by hand).  ``last_error``
        stays until the next run.  Row lock by primary key, then the UNIQUE
        index on ``unique_key`` (in a savepoint): if a live job took the key
        meanwhile, ``InvalidStateError`` names it and nothing changes.  A
        ``put`` event records the retry.
        """
        values = ((t.c.unique_key, func.coalesce(t.c.failed_unique_key, t.c.unique_key)),
                  (t.c.failed_unique_key, None), (t.c.state, QUEUED), (t.c.eta, utc_now()), (t.c.retries, 0),
                  (t.c.lease_expires_at, None))
        fenced = update(t).where(t.c.id == job_id, t.c.state == state, t.c.token == token).ordered_values(*values)
        try:
            with conn.begin_nested():
                updated = conn.execute(fenced).rowcount == 1
        except IntegrityError:
            key = conn.execute(select(t.c.failed_unique_key).where(t.c.id == job_id)).scalar()
            holder = conn.execute(select(t.c.id).where(t.c.unique_key == key)).scalar()
            raise InvalidStateError(
                f"job {job_id} cannot be retried: its unique_key {key!r} is held by live job {holder}; "
                f"retry it once job {holder} has finished, or cancel job {holder} first") from None
        if updated:
            self._put_by_hand(conn, [job_id])
        return updated

    def _put_by_hand(self, conn, job_ids: Sequence[int]) -> None:
        """``put`` events for jobs just queued again by hand (rows this transaction changed); a
        tracked job's is published."""
        conn.execute(insert(event_table).from_select(
            ["job_id", "kind", "queue", "name", "detail", "emitted"],
            select(t.c.id, literal("put"), t.c.queue, t.c.name, literal("retried by hand"), t.c.tracked)
            .where(t.c.id.in_(list(job_ids)))))

    def retry_failed(self, conn, queue: str | None, after: int = 0,
                     batch: int = 500) -> tuple[int, list[int], int | None]:
        """Retry one batch of failed jobs (of ``queue``, or all) with id above ``after``.

        Returns ``(count, ids left failed, last id looked at)``; the last id
        is None when no failed job is left to look at.  The batch is locked
        by primary key in id order; jobs without a unique key get one
        UPDATE and one event insert, jobs with one ``requeue_job`` each (one
        whose key a live job holds stays failed and is reported).
        """
        where = [t.c.state == FAILED, t.c.id > after] + ([t.c.queue == queue] if queue is not None else [])
        rows = conn.execute(select(t.c.id, t.c.token, t.c.failed_unique_key).where(*where).order_by(t.c.id)
                            .limit(batch).with_for_update()).all()
        if not rows:
            return 0, [], None
        plain = [row.id for row in rows if row.failed_unique_key is None]
        count = 0
        if plain:
            count += conn.execute(update(t).where(t.c.id.in_(plain), t.c.state == FAILED).values(
                state=QUEUED, eta=utc_now(), retries=0, lease_expires_at=None)).rowcount
            self._put_by_hand(conn, plain)
        held = []
        for row in rows:
            if row.failed_unique_key is not None:
                try:
                    count += self.requeue_job(conn, row.id, FAILED, row.token)
                except InvalidStateError:
                    held.append(row.id)
        return count, held, rows[-1].id

    def force_requeue_job(self, conn, job_id: int, token: int) -> bool:
        """Take a running job back from its worker by hand (``mqueue retry ID --force``): queued, due now.

        For a job whose worker was killed or frozen before its lease expired.
        The token goes up by one, so everything the old run still tries
        (completion, heartbeat, failure, hand-back) matches no row and its
        writes roll back: the fence makes this safe.  ``retries`` is kept
        (the interrupted run is not counted as a failure) and the unique key
        stays with the job.  Named on the state and token just read; row
        lock by primary key.  The history gets the run and a ``put`` by hand.
        """
        result = conn.execute(update(t).where(t.c.id == job_id, t.c.state == RUNNING, t.c.token == token).values(
            state=QUEUED, token=t.c.token + 1, eta=utc_now(), lease_expires_at=None))
        return self._ended_run(conn, result, job_id, "put", "forced back by hand (retry --force)")

    def cancel_failed(self, conn, queue: str | None, after: int = 0,
                      batch: int = 500) -> tuple[int, list[int], int | None]:
        """Cancel one batch of failed jobs (of ``queue``, or all) with id above ``after``.

        Returns ``(count, kept, last id looked at)``; the last id is None
        when no failed job is left to look at.  Rows are locked by primary
        key in id order (workers never touch failed rows), then one UPDATE
        and one event insert for the tracked ones.  A failed job that other
        jobs wait on is kept (``kept``): cancelling it would leave them
        waiting for ever; ``cancel ID --cascade`` decides that one by one.
        """
        where = [t.c.state == FAILED, t.c.id > after] + ([t.c.queue == queue] if queue is not None else [])
        rows = conn.execute(select(t.c.id, t.c.has_dependents).where(*where).order_by(t.c.id).limit(batch)
                            .with_for_update()).all()
        if not rows:
            return 0, [], None
        waited_on = {job_id for job_id, _state, _token in
                     self.waiting_dependents(conn, [row.id for row in rows if row.has_dependents], by_dependency=True)}
        ids = [row.id for row in rows if row.id not in waited_on]
        count = 0
        if ids:
            count = conn.execute(update(t).where(t.c.id.in_(ids), t.c.state == FAILED).values(
                state=CANCELED, finished_at=utc_now(), unique_key=None, failed_unique_key=None,
                lease_expires_at=None)).rowcount
            self.emit_tracked(conn, ids, "canceled")
        return count, sorted(waited_on), rows[-1].id

    # -- dependencies ----------------------------------------------------------------
    def lock_dependencies(self, conn, job_ids: Iterable[int]) -> list[int]:
        """Of the jobs a new job depends on, those not done yet (not ``succeeded``; unknown ids are done).

        Locks the existing rows by primary key in id order (``FOR UPDATE``;
        SQLite: the write lock) until the enqueue commits: a dependency that
        completes meanwhile waits, then finds the new dependent and
        releases it; one that completed first reads as done here.  A running
        dependency's heartbeats wait too, so enqueueing transactions must be
        short (a worker's lock wait is bounded below its lease: it retries).
        """
        rows = conn.execute(select(t.c.id, t.c.state).where(t.c.id.in_(sorted(set(job_ids))))
                            .order_by(t.c.id).with_for_update()).all()
        return [job_id for job_id, state in rows if state != SUCCEEDED]

    def add_dependencies(self, conn, job_id: int, depends_on: Sequence[int]) -> None:
        """Record that ``job_id`` waits for ``depends_on`` (rows locked by ``lock_dependencies``).

        One ``mqueue_dependency`` row each, and ``has_dependents`` set on
        each dependency so its completion releases the new job.
        """
        conn.execute(insert(d), [dict(job_id=job_id, depends_on=other) for other in depends_on])
        conn.execute(update(t).where(t.c.id.in_(list(depends_on)), t.c.has_dependents == 0).values(has_dependents=1))

    def release_dependents(self, conn, job_ids: Sequence[int]) -> int:
        """The jobs ``job_ids`` just succeeded (in this transaction): count them off their waiting
        dependents, which become ``queued`` when none is left.  How many dependents were updated.

        One read of ``mqueue_dependency`` (index ``(depends_on, job_id)``),
        then ``RELEASE_DEPENDENTS`` by primary key, in id order, once per
        distinct number of these jobs a dependent waits on (once, normally).
        A dependent no longer waiting (canceled, retried by hand) is left alone.
        """
        by_done: dict[int, list[int]] = {}
        for dependent, done in conn.execute(DEPENDENTS_DONE, dict(job_ids=list(job_ids))):
            by_done.setdefault(int(done), []).append(dependent)
        updated = 0
        for done, dependents in sorted(by_done.items()):
            updated += conn.execute(RELEASE_DEPENDENTS, dict(job_ids=dependents, done=done)).rowcount
        return updated

    def dependencies_of(self, conn, job_id: int) -> list[tuple[int, str | None]]:
        """``(id, state)`` of each job ``job_id`` depends on, by id; state None if it was pruned.  Plain read."""
        return [(int(other), state) for other, state in conn.execute(
            select(d.c.depends_on, t.c.state).select_from(d.outerjoin(t, t.c.id == d.c.depends_on))
            .where(d.c.job_id == job_id).order_by(d.c.depends_on))]

    def dependents_of(self, conn, job_id: int) -> list[int]:
        """Ids of the jobs that depend on ``job_id``, ascending.  Index ``(depends_on, job_id)``; plain read."""
        return [int(other) for other in conn.execute(
            select(d.c.job_id).where(d.c.depends_on == job_id).order_by(d.c.job_id)).scalars()]

    def waiting_dependents(self, conn, job_ids: Sequence[int],
                           by_dependency: bool = False) -> list[tuple[int, str, int]]:
        """``(id, state, token)`` of the ``waiting`` jobs that depend on any of ``job_ids``, by id.

        With ``by_dependency`` the first item is the dependency instead
        (which of ``job_ids`` is waited on).  Plain read.
        """
        if not job_ids:
            return []
        first = d.c.depends_on if by_dependency else t.c.id
        return [tuple(row) for row in conn.execute(
            select(first, t.c.state, t.c.token).select_from(d.join(t, t.c.id == d.c.job_id))
            .where(d.c.depends_on.in_(list(job_ids)), t.c.state == WAITING).order_by(first).distinct())]

    # -- expiry -------------------------------------------------------------------------
    def expire_claimed(self, conn, job_ids: Sequence[int]) -> None:
        """Jobs this claim took past their ``expires_at`` become ``expired`` instead of running.

        In the claim's transaction, on the rows it just locked (by primary
        key); the claim's run is not counted (``runs - 1``).  Tracked jobs
        publish ``expired``.
        """
        conn.execute(update(t).where(t.c.id.in_(list(job_ids)), t.c.state == RUNNING).values(
            runs=t.c.runs - 1, **EXPIRY_VALUES))
        self.emit_tracked(conn, job_ids, "expired")

    def expire_jobs(self, conn, queues: Sequence[str] | None, limit: int,
                    now: dt.datetime | None = None) -> int:
        """Up to ``limit`` queued or waiting jobs (of ``queues``, or all) past their ``expires_at``
        become ``expired``; how many.

        ``now`` (naive UTC) replaces the database's clock in the test of
        expiry (tests look ahead without waiting).  The jobs past their expiry
        are found by a plain read (no locks), then only they are locked, by
        primary key (SKIP LOCKED: rows a claim holds are left to it; SQLite:
        the write lock), and expired.  A locking read of the first step kept
        every queued row of the queues locked until this transaction ended on
        MariaDB (its plan reads the ``expires_at`` index filtered by the row
        ids of the claim index's ``(queue, state)`` range, and locks that
        range too, measured): claims in the meantime passed over them all.
        """
        moment = utc_now() if now is None else now
        past_expiry = (t.c.state.in_((QUEUED, WAITING)), t.c.expires_at <= moment)
        query = select(t.c.id).where(*past_expiry).limit(limit)
        if queues is not None:
            query = query.where(t.c.queue.in_(list(queues)))
        ids = list(conn.execute(query).scalars())
        if ids and self.skip_locked:
            ids = list(conn.execute(select(t.c.id).where(t.c.id.in_(ids), *past_expiry)
                                    .with_for_update(skip_locked=True)).scalars())
        if not ids:
            return 0
        count = conn.execute(update(t).where(t.c.id.in_(ids), *past_expiry).values(**EXPIRY_VALUES)).rowcount
        self.emit_tracked(conn, ids, "expired")
        return count

    # -- move and priority ------------------------------------------------------------------
    def move_job(self, conn, job_id: int, state: str, token: int, queue: str, detail: str) -> bool:
        """A job not running (waiting, queued, failed) still in ``state`` with ``token`` goes to
        ``queue``, keeping its state; a ``moved`` event (``detail``).  Row lock by primary key."""
        result = conn.execute(update(t).where(t.c.id == job_id, t.c.state == state, t.c.token == token)
                              .values(queue=queue))
        return self._hand_event(conn, result, job_id, "moved", detail)

    def move_running_job(self, conn, job_id: int, token: int, queue: str, detail: str) -> bool:
        """Take a running job from its worker into ``queue``: ``queued``, due now, a new token.

        The old run's completion, heartbeats and failure then match no row
        (the fence), so its writes roll back, and the job runs again in the
        new queue; ``retries`` is kept.  The run ends with a ``moved`` event.
        Named on the token just read; row lock by primary key.
        """
        result = conn.execute(update(t).where(t.c.id == job_id, t.c.state == RUNNING, t.c.token == token).values(
            queue=queue, state=QUEUED, token=t.c.token + 1, eta=utc_now(), lease_expires_at=None))
        return self._ended_run(conn, result, job_id, "moved", detail)

    def set_priority(self, conn, job_id: int, state: str, token: int, priority: int, detail: str) -> bool:
        """A job still in ``state`` with ``token`` gets ``priority``; a ``priority`` event (``detail``).

        Row lock by primary key; the claim index follows (``neg_priority`` is generated).
        """
        result = conn.execute(update(t).where(t.c.id == job_id, t.c.state == state, t.c.token == token)
                              .values(priority=priority))
        return self._hand_event(conn, result, job_id, "priority", detail)

    @staticmethod
    def _hand_event(conn, result, job_id: int, kind: str, detail: str) -> bool:
        """Record a change made by hand whose guarded UPDATE matched; False (nothing written) if it did not."""
        if result.rowcount != 1:
            return False
        conn.execute(HAND_EVENT, dict(job_id=job_id, event_kind=kind, event_detail=detail))
        return True

    # For tests: ``Worker.run_until_empty(with_scheduled=True)`` and ``mqueue.testing.perform_job``.

    def has_due_jobs(self, conn, queues: Sequence[str]) -> bool:
        """Whether a queue of ``queues`` not paused has a due queued job, by a plain read (no locks).

        A claim passes over rows another transaction holds (SKIP LOCKED):
        another worker's claim, a housekeeping scan, an application's own
        ``SELECT ... FOR UPDATE``.  Its empty answer is not an empty queue;
        this read, which waits for no lock and skips none, says whether one is.
        """
        paused = exists().where(queue_table.c.name == t.c.queue, queue_table.c.paused == 1)
        due = select(t.c.id).where(t.c.queue.in_(list(queues)), t.c.state == QUEUED, t.c.eta <= due_now(),
                                   ~paused).limit(1)
        return conn.execute(due).first() is not None

    def hasten_scheduled(self, conn, queues: Sequence[str]) -> int:
        """Make the queued jobs of ``queues`` with the earliest future eta due now; how many.

        Delayed jobs and jobs waiting out a retry's backoff alike.  One eta
        per call, so a drain runs scheduled jobs in the order of their etas.
        Reads follow the claim index prefix ``(queue, state)``; the UPDATE
        locks the rows it changes.
        """
        future = and_(t.c.queue.in_(list(queues)), t.c.state == QUEUED, t.c.eta > utc_now())
        earliest = conn.execute(select(func.min(t.c.eta)).where(future)).scalar()
        if earliest is None:
            return 0
        return conn.execute(update(t).where(future, t.c.eta <= earliest).values(eta=utc_now())).rowcount

    def claim_job(self, conn, job_id: int, owner: str, lease_seconds: float) -> ClaimedRow | None:
        """Claim one queued job chosen by id, due or not, as ``claim_jobs`` claims; None if it is not queued.

        A job past its ``expires_at`` comes back with ``expired`` set (it is now ``expired``, not to be run).

        Row lock by primary key.
        """
        params = dict(new_owner=owner, lease_seconds=lease_seconds)
        if conn.execute(update(t).where(t.c.id == job_id, t.c.state == QUEUED).values(**CLAIM_VALUES),
                        params).rowcount != 1:
            return None
        return self._popped(conn, self._rows([conn.execute(select(*CLAIM_COLUMNS).where(t.c.id == job_id)).one()]))[0]

    # -- crons -------------------------------------------------------------
    def advance_cron(self, conn, name: str, expected_next_slot, slot, next_slot) -> bool:
        """Compare-and-set: move a cron from ``expected_next_slot`` to ``next_slot``.

        Exactly one of any number of concurrent workers updates the row (the
        others wait on its row lock, then find ``next_slot`` changed and
        update nothing); the caller enqueues the slot's job in the same
        transaction, so the slot and its job commit together.
        """
        c = cron_table.c
        return conn.execute(update(cron_table).where(c.name == name, c.next_slot == expected_next_slot).values(
            last_slot=slot, next_slot=next_slot, updated_at=utc_now())).rowcount == 1

    def set_cron_job(self, conn, name: str, job_id: int | None) -> None:
        conn.execute(update(cron_table).where(cron_table.c.name == name).values(last_job_id=job_id))

    def cron_rows(self, conn) -> dict[str, Any]:
        """Every row of ``mqueue_cron`` by name."""
        return {row.name: row for row in conn.execute(select(cron_table))}

    def upsert_cron(self, conn, name: str, queue: str, schedule: str, tz: str, next_slot) -> bool:
        """Insert a cron row, or update its schedule if the code changed it (last run kept).

        True if this call wrote the row, False if it was already as wanted.

        The UPDATE only matches a row that still differs: when two workers
        deploy the same change at once, the later one waits for the
        earlier's row lock and then leaves the row alone, so it cannot move
        back a ``next_slot`` that the earlier one has already advanced.
        """
        c = cron_table.c
        differs = or_(c.queue != queue, c.schedule != schedule, c.tz != tz, c.next_slot.is_(None))
        updated = conn.execute(update(cron_table).where(c.name == name, differs).values(
            queue=queue, schedule=schedule, tz=tz, next_slot=next_slot, updated_at=utc_now())).rowcount
        if updated:
            return True
        try:
            with conn.begin_nested():
                conn.execute(insert(cron_table).values(name=name, queue=queue, schedule=schedule, tz=tz,
                                                       next_slot=next_slot))
            return True
        except IntegrityError:
            return False  # the row exists as wanted, or another worker inserted it at the same moment

    def delete_crons(self, conn, names: Sequence[str]) -> int:
        if not names:
            return 0
        return conn.execute(delete(cron_table).where(cron_table.c.name.in_(list(names)))).rowcount

    def job_is_live(self, conn, job_id: int | None) -> bool:
        """True while the job is queued or running (for ``skip_if_scheduled``)."""
        if job_id is None:
            return False
        return conn.execute(select(t.c.id).where(t.c.id == job_id, t.c.state.in_((QUEUED, RUNNING)))
                            ).first() is not None

    # -- errors --------------------------------------------------------------
    def is_transient(self, error: BaseException) -> bool:
        """Deadlock, lock timeout, busy, serialization failure or lost connection."""
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        return False

    def is_conflict(self, error: BaseException) -> bool:
        """A lost race with another transaction (deadlock, lock wait timeout, a Galera certification
        failure, a serialization failure): rolled back, and worth retrying at once; not an outage."""
        return False

    def is_missing_table(self, error: BaseException) -> bool:
        return False

    def is_connection_limit(self, error: BaseException) -> bool:
        """The server refused a new connection because it has too many (a slot frees soon)."""
        return False

    def is_unreachable(self, error: BaseException) -> bool:
        """The server could not be reached at all (refused, unknown host, timed out)."""
        return False

    def is_access_denied(self, error: BaseException) -> bool:
        """The server refused the login (user or password): waiting will not fix it."""
        return False
