"""Job-state transitions in portable SQLAlchemy Core; backends override what differs.

Every write on a claimed row carries ``AND token = :token AND state =
'running'`` (the fence): zero rows updated means the lease was lost and the
caller must roll back and touch nothing.  ``token`` goes up by one at every
claim, so a worker paused past its lease can never complete, fail, release
or heartbeat a job that has since been claimed again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Sequence

from sqlalchemy import Float, Integer, and_, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..schema import FAILED, QUEUED, RUNNING, cron_table, task_table
from .functions import utc_now

t = task_table
DEFAULT_MAX_RETRIES = 10

#: Columns a worker needs to run a claimed job.
CLAIM_COLUMNS = (t.c.id, t.c.queue, t.c.name, t.c.args, t.c.retries, t.c.max_retries,
                 t.c.token, t.c.neg_priority, t.c.eta)


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


# Statements on the claim/complete hot path are built once, with bound
# parameters: building one costs 5-10x more CPU than running it (measured:
# ~200 us to build the claim vs ~20 us to execute it pre-built).
_FENCE = and_(t.c.id == bindparam("job_id"), t.c.token == bindparam("job_token"), t.c.state == RUNNING)
_LEASE = utc_now(bindparam("lease_seconds", type_=Float))
COMPLETE = delete(t).where(_FENCE)
#: Many completions: lock the rows (by primary key, in id order like
#: heartbeats, so the two never deadlock), then delete those still running
#: under the caller's token.
LOCK_JOBS = (select(t.c.id, t.c.token, t.c.state)
             .where(t.c.id.in_(bindparam("job_ids", expanding=True)))
             .order_by(t.c.id).with_for_update())
DELETE_MANY = delete(t).where(t.c.id.in_(bindparam("job_ids", expanding=True)))
HEARTBEAT = update(t).where(_FENCE).values(lease_expires_at=_LEASE)
RETRY = update(t).where(_FENCE).values(
    state=QUEUED, retries=t.c.retries + 1, eta=utc_now(bindparam("delay_seconds", type_=Float)),
    last_error=bindparam("error_text"), owner=None, lease_expires_at=None)
FAIL = update(t).where(_FENCE).values(
    state=FAILED, retries=t.c.retries + 1, last_error=bindparam("error_text"), unique_key=None,
    owner=None, lease_expires_at=None)
RELEASE = update(t).where(_FENCE).values(state=QUEUED, owner=None, lease_expires_at=None)
#: What a claim writes on each row it takes; ``token + 1`` is the new fence.
CLAIM_VALUES = dict(state=RUNNING, token=t.c.token + 1, owner=bindparam("new_owner"),
                    lease_expires_at=_LEASE, started_at=utc_now())


def due_jobs(*columns):
    """``SELECT columns`` of due jobs of ``:queue`` in claim order, ``LIMIT :limit``.

    Follows the claim index ``(queue, state, neg_priority, eta, id)`` exactly,
    so no backend sorts (and InnoDB locks only the rows it returns).
    """
    return (select(*columns)
            .where(t.c.queue == bindparam("from_queue"), t.c.state == QUEUED, t.c.eta <= utc_now())
            .order_by(t.c.neg_priority, t.c.eta, t.c.id)
            .limit(bindparam("limit", type_=Integer)))


class Dialect:
    """Portable defaults.  Subclasses: ``mysql.py``, ``postgresql.py``, ``sqlite.py``."""

    name = "base"
    #: Whether ``SELECT ... FOR UPDATE SKIP LOCKED`` exists (else writes are serialized).
    skip_locked = True
    #: The server's port when a URL names none.
    default_port: int | None = None

    # -- engine set-up ---------------------------------------------------
    def engine_options(self, url) -> dict[str, Any]:
        """Extra ``create_engine`` keyword arguments for this backend."""
        return {"pool_pre_ping": True}

    def worker_engine_options(self, concurrency: int, lease_seconds: float = 60.0) -> dict[str, Any]:
        """Engine options for a daemon's own engine.

        Two connections per executor thread (the task's session, and an
        outcome or heartbeat write beside it) plus one per service loop
        (producer, completer, heartbeat, rescuer, scheduler, watchdog).  No pre-ping and no reset-on-return: every worker
        transaction ends in COMMIT or ROLLBACK already, and a dead connection
        is a transient error the worker retries (measured: the ping and the
        reset ROLLBACK were 4 of 9 round trips per job on MariaDB).
        """
        return {"pool_size": concurrency + 6, "max_overflow": concurrency, "pool_pre_ping": False,
                "pool_reset_on_return": None}

    def database_identity(self, url: URL) -> tuple | None:
        """What makes two URLs one database, so that ``db.session()`` of any handle joins the current one.

        Backend, host, port (the default filled in), database and user: not
        the driver, options or password.  None: never the same as another engine's.
        """
        return (self.name, (url.host or "").lower(), url.port or self.default_port, url.database, url.username)

    def adopt_engine(self, engine: Engine) -> Engine:
        """An application's own engine, with the options mqueue needs (same pool)."""
        return engine

    def configure_engine(self, engine: Engine) -> None:
        """Install connection hooks (isolation, pragmas).  Default: nothing."""

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
    def insert_job(self, conn, values: dict[str, Any]) -> int:
        """Insert one job row; return its id.  Takes no lock beyond the new row."""
        result = conn.execute(insert(t).values(**values))
        return int(result.inserted_primary_key[0])

    def insert_jobs(self, conn, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert many rows in one statement batch; ids in input order."""
        if not rows:
            return []
        stmt = insert(t).returning(t.c.id, sort_by_parameter_order=True)
        return [int(row[0]) for row in conn.execute(stmt, list(rows))]

    def insert_unique(self, conn, values: dict[str, Any]) -> int:
        """Insert a job unless a live job holds ``unique_key``; return either id.

        The UNIQUE index on ``unique_key`` decides, never a prior SELECT (which
        races).  The insert runs in a savepoint so a duplicate leaves the
        caller's transaction usable; the existing row is then read with a
        locking read, which sees the latest committed version even under
        REPEATABLE READ.  If that job finished in between, try again.
        """
        for _ in range(20):
            try:
                with conn.begin_nested():
                    return self.insert_job(conn, values)
            except IntegrityError:
                existing = conn.execute(
                    select(t.c.id).where(t.c.unique_key == values["unique_key"]).with_for_update()
                ).scalar()
                if existing is not None:
                    return int(existing)
        raise RuntimeError(f"could not enqueue unique_key {values['unique_key']!r}: it keeps changing")

    # -- worker transitions --------------------------------------------------
    def claim_jobs(self, conn, queue: str, limit: int, owner: str, lease_seconds: float) -> list[ClaimedRow]:
        """Claim up to ``limit`` due jobs of ``queue`` in one round trip.

        ``UPDATE ... WHERE id IN (SELECT ... ORDER BY neg_priority, eta, id
        LIMIT n FOR UPDATE SKIP LOCKED) RETURNING``: the subquery walks the
        claim index ``(queue, state, neg_priority, eta, id)`` in order and
        locks only the rows it returns.
        """
        params = dict(from_queue=queue, limit=limit, new_owner=owner, lease_seconds=lease_seconds)
        return self._rows(conn.execute(self.claim_statement, params))

    @functools.cached_property
    def claim_statement(self):
        candidates = due_jobs(t.c.id)
        if self.skip_locked:
            candidates = candidates.with_for_update(skip_locked=True)
        # A materialized CTE runs once.  As a plain IN (subquery) PostgreSQL 15
        # plans a nested-loop semi join that re-runs the LIMIT subquery for
        # every outer row, SKIP LOCKED passing over the rows it just claimed:
        # LIMIT 1 claimed every due job of the queue (measured).
        chosen = candidates.cte("mqueue_claim").prefix_with("MATERIALIZED", dialect="postgresql")
        return (update(t).where(t.c.id.in_(select(chosen.c.id)), t.c.state == QUEUED)
                .values(**CLAIM_VALUES).returning(*CLAIM_COLUMNS))

    @staticmethod
    def _rows(result) -> list[ClaimedRow]:
        rows = [ClaimedRow(r.id, r.queue, r.name, r.args, r.retries, r.max_retries, r.token,
                           (r.neg_priority, r.eta, r.id)) for r in result]
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

    def complete_job(self, conn, job_id: int, token: int) -> bool:
        """Delete a finished job inside the task's own transaction (fenced, by primary key)."""
        return conn.execute(COMPLETE, dict(job_id=job_id, job_token=token)).rowcount == 1

    def complete_jobs(self, conn, jobs: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Delete many finished jobs ``(id, token)`` at once; return ``(lost, gone)``.

        For jobs whose task wrote nothing, so there is no task transaction to
        join.  The fence is checked on rows locked by primary key (SQLite: the
        write lock), so nothing can change between the check and the delete.
        ``lost``: ids not deleted (the lease was lost); ``gone``: those of
        them whose row no longer exists (completed already: after a COMMIT
        whose reply was lost, by this very worker).
        """
        wanted = dict(jobs)
        rows = conn.execute(LOCK_JOBS, dict(job_ids=list(wanted))).all()
        ours = [job_id for job_id, token, state in rows if state == RUNNING and wanted[job_id] == token]
        if ours:
            conn.execute(DELETE_MANY, dict(job_ids=ours))
        kept, present = set(ours), {row[0] for row in rows}
        lost = [job_id for job_id in wanted if job_id not in kept]
        return lost, [job_id for job_id in lost if job_id not in present]

    def retry_job(self, conn, job_id: int, token: int, delay_seconds: float, error: str) -> bool:
        """Back to ``queued`` with ``retries + 1`` and ``eta = now + delay`` (fenced)."""
        params = dict(job_id=job_id, job_token=token, delay_seconds=delay_seconds, error_text=error)
        return conn.execute(RETRY, params).rowcount == 1

    def fail_job(self, conn, job_id: int, token: int, error: str) -> bool:
        """Mark ``failed`` for good (kept for inspection; frees its unique_key)."""
        return conn.execute(FAIL, dict(job_id=job_id, job_token=token, error_text=error)).rowcount == 1

    def release_job(self, conn, job_id: int, token: int) -> bool:
        """Hand an unfinished job back on shutdown: ``queued``, same eta and retries (fenced)."""
        return conn.execute(RELEASE, dict(job_id=job_id, job_token=token)).rowcount == 1

    def rescue_expired(self, conn, queues: Sequence[str]) -> int:
        """Re-queue running jobs whose lease expired (their worker died).

        The lost run counts as a failed attempt, so a job that kills its
        worker every time ends ``failed`` instead of looping forever.  Uses
        the claim index prefix ``(queue, state)``; rows locked by a live
        transaction are skipped where the backend can.
        """
        expired = (select(t.c.id)
                   .where(t.c.queue.in_(list(queues)), t.c.state == RUNNING,
                          t.c.lease_expires_at < utc_now()))
        if self.skip_locked:
            expired = expired.with_for_update(skip_locked=True)
        ids = [row[0] for row in conn.execute(expired)]
        if not ids:
            return 0
        exhausted = t.c.retries + 1 > func.coalesce(t.c.max_retries, DEFAULT_MAX_RETRIES)
        result = conn.execute(update(t).where(t.c.id.in_(ids), t.c.state == RUNNING,
                                              t.c.lease_expires_at < utc_now()).values(
            state=case((exhausted, FAILED), else_=QUEUED),
            unique_key=case((exhausted, None), else_=t.c.unique_key),
            retries=t.c.retries + 1,
            last_error="lease expired: the worker running this job stopped heartbeating (killed or stalled)",
            owner=None, lease_expires_at=None))
        return result.rowcount

    def job_state(self, conn, job_id: int) -> tuple[str, int] | None:
        """``(state, token)`` of a job, or None if the row is gone."""
        row = conn.execute(select(t.c.state, t.c.token).where(t.c.id == job_id)).first()
        return (row.state, row.token) if row else None

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

    def is_missing_table(self, error: BaseException) -> bool:
        return False

    def is_connection_limit(self, error: BaseException) -> bool:
        """The server refused a new connection because it has too many (a slot frees soon)."""
        return False

    def is_unreachable(self, error: BaseException) -> bool:
        """The server could not be reached at all (refused, unknown host, timed out)."""
        return False
