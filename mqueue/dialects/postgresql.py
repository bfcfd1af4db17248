"""PostgreSQL through psycopg 3.

The claim is the portable ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
SKIP LOCKED) RETURNING`` in one round trip.  TCP keepalives (for a reply
that never comes) and ``tcp_user_timeout`` (for data the server never
acknowledges) bound how long a half-open connection can hang a worker: about
30 s, where libpq would otherwise wait for the kernel's retransmissions (15
minutes and more).  A stall that the network itself keeps acknowledging
(e.g. a proxy that stops forwarding) is not detected.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (DDL, JSON, Integer, Text, bindparam, cast, event, exists, func, insert, literal, or_, select,
                        true, update)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ClauseElement

from ..schema import QUEUED, event_table
from ..wakeup import JOBS_CHANNEL
from .base import (CLAIM_COLUMNS, CLAIM_VALUES, EXPIRED_NOW, MAX_LEVELS, PRIORITY_LEVELS, SUCCESS_VALUES, Dialect,
                   batch_names, batch_params, chosen_for_claim, due_jobs, held_without_dependents,
                   insert_from_array, array_params, t)
from .driver import DriverStatement

#: ``admin.events(follow=True)`` listens here; a published event notifies it at its commit.
EVENTS_CHANNEL = "mqueue_events"
#: The trigger that sends it, in the event's own transaction (a copy is in migration 0004).
EVENT_NOTIFY_DDL = (
    "CREATE OR REPLACE FUNCTION mqueue_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
    f"BEGIN PERFORM pg_notify('{EVENTS_CHANNEL}', NEW.id::text); RETURN NULL; END $$",
    "CREATE TRIGGER mqueue_event_notify AFTER INSERT ON mqueue_event "
    "FOR EACH ROW WHEN (NEW.emitted = 1) EXECUTE FUNCTION mqueue_event_notify()",
)
for _ddl in EVENT_NOTIFY_DDL:
    event.listen(event_table, "after_create", DDL(_ddl.replace("%", "%%")).execute_if(dialect="postgresql"))

# SQLSTATE classes and codes that mean "try again".
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "25P03", "53300"}
#: "sorry, too many clients already" / "too many connections for role": a slot frees soon.
CONNECTION_LIMIT = "53300"
TRANSIENT_CLASSES = {"08"}  # connection exceptions
#: A lost race, retried at once: serialization failure, deadlock, lock not available.
CONFLICT_SQLSTATES = {"40001", "40P01", "55P03"}
MISSING_TABLE = "42P01"
#: invalid_authorization_specification, invalid_password.
ACCESS_DENIED_SQLSTATES = {"28000", "28P01"}
#: The server's FATAL messages for those, as psycopg reports them on connect (without a SQLSTATE).
ACCESS_DENIED_WORDS = ("password authentication failed", "authentication failed for user", "no pg_hba.conf entry",
                       'FATAL:  role "')  # ... does not exist, ... is not permitted to log in


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", error)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def _insert_notifying(insert_statement):
    """``insert_statement`` as a CTE whose SELECT returns the new id and notifies its queue's workers."""
    new = insert_statement.returning(t.c.id, t.c.queue).cte("mqueue_new_job")
    return select(new.c.id, func.pg_notify(JOBS_CHANNEL, new.c.queue))


#: ``insert_job``'s statement for each set of columns given plain values, built once (building
#: one per call cost a single enqueue about a tenth of its time).
_INSERT_NOTIFYING: dict[frozenset, Any] = {}


def _claim_alone():
    """``PostgreSQLDialect.claim``'s statement (params ``from_queue``, ``limit``, ``new_owner``, ``lease_seconds``).

    One row per claimed job, or one row of NULLs if none, each with
    ``levels`` (priority levels with a queued job), ``due_levels`` (those
    with a due job) and ``candidates`` (jobs chosen).  The jobs are chosen
    as ``claim_at_level`` chooses them, from the first level that has a due
    job (the level walk of ``PRIORITY_LEVELS``, which also leaves out a
    paused queue), and claimed only if none needs more than the claim.
    """
    levels = PRIORITY_LEVELS.cte("mqueue_due_levels")
    first_due = select(func.min(levels.c.level)).where(levels.c.due.is_not(None)).scalar_subquery()
    chosen = chosen_for_claim(due_jobs(t.c.id, t.c.tracked, EXPIRED_NOW.label("expired"), level=first_due))
    plain = ~exists().where(or_(chosen.c.tracked == 1, chosen.c.expired == 1))
    claimed = (update(t).where(t.c.id.in_(select(chosen.c.id)), t.c.state == QUEUED, plain)
               .values(**CLAIM_VALUES).returning(*CLAIM_COLUMNS).cte("mqueue_claimed"))
    # The claim's commit does not wait for its WAL to reach the disk: the task's own commit (or the
    # completion's) flushes the WAL up to itself, claim included.  A crash before that loses the
    # claim and whatever the run wrote, together: the job is queued again, as if never claimed.
    one = select(func.set_config("synchronous_commit", "off", True).label("one")).subquery("mqueue_one")
    counts = (select(func.count()).select_from(levels).scalar_subquery().label("levels"),
              select(func.count()).select_from(levels).where(levels.c.due.is_not(None))
              .scalar_subquery().label("due_levels"),
              select(func.count()).select_from(chosen).scalar_subquery().label("candidates"))
    # Not expired, as chosen (the RETURNING's own ``expired`` reads the clock again, a moment later).
    columns = [literal(0).label("expired") if column.name == "expired" else column for column in claimed.c]
    return select(*columns, *counts).select_from(one.outerjoin(claimed, true()))


CLAIM_ALONE = DriverStatement(_claim_alone(), ("from_queue", "limit", "new_owner", "lease_seconds"))


@functools.cache
def _complete_alone(size: int) -> DriverStatement:
    """``PostgreSQLDialect.complete_many``'s statement for a batch of ``size``: how many jobs it completed.

    The batch is ``:id_0``, ``:held_token_0`` ... one parameter per value, so
    the server plans each batch size once (a prepared statement's generic
    plan).  Given as two arrays, the statement was planned anew at every
    completion, its arrays' lengths unknown to a generic plan (measured:
    about 0.19 ms more per completion).  It locks the batch's rows still
    running under the caller's tokens and without dependents, by primary
    key in id order (as heartbeats lock them), and completes them only if
    that is all ``:wanted`` of them.
    """
    ours = (select(t.c.id).where(*held_without_dependents(size)).order_by(t.c.id).with_for_update()
            .cte("mqueue_ours").prefix_with("MATERIALIZED", dialect="postgresql"))
    every_one = select(func.count()).select_from(ours).scalar_subquery() == bindparam("wanted", type_=Integer)
    done = (update(t).where(t.c.id.in_(select(ours.c.id)), every_one).values(**SUCCESS_VALUES)
            .returning(t.c.id).cte("mqueue_done"))
    return DriverStatement(select(func.count()).select_from(done), [*batch_names(size), "wanted"])



#: ``psycopg.pq.TransactionStatus.IDLE``: no transaction open (libpq's PQTRANS_IDLE).
_IDLE = 0


@functools.cache
def _batch_insert(columns: tuple[str, ...]):
    """``insert_from_array`` over ``json_array_elements_text(:args_list) WITH ORDINALITY``, returning the ids."""
    unnested = func.json_array_elements_text(cast(bindparam("args_list", type_=Text), JSON)).table_valued(
        "args", with_ordinality="position").render_derived(name="mqueue_batch")
    return insert_from_array(columns, unnested, unnested.c.args, unnested.c.position).returning(t.c.id)


class PostgreSQLDialect(Dialect):
    name = "postgresql"
    default_port = 5432

    def engine_options(self, url) -> dict[str, Any]:
        options = super().engine_options(url)
        if url.drivername.endswith("psycopg"):
            options["connect_args"] = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                                       "keepalives_interval": 5, "keepalives_count": 3,
                                       "tcp_user_timeout": 30_000}
        return options

    def in_transaction(self, dbapi_connection) -> bool:
        """psycopg's transaction status, as the server reported it with its last reply (0: idle)."""
        info = getattr(dbapi_connection, "info", None)
        return info is None or info.transaction_status != _IDLE

    #: ``insert_job`` sends the new job's ``NOTIFY`` itself (``wakeup``).
    insert_notifies = True

    def insert_job(self, conn, values):
        """``INSERT ... RETURNING`` and ``pg_notify`` of the job's queue in one statement.

        The notification is delivered to listening workers when the
        transaction commits, and dropped if it rolls back (``wakeup``); in
        the same statement it costs no extra round trip.
        """
        if any(isinstance(value, ClauseElement) for value in values.values()):
            statement = _insert_notifying(insert(t).values(**values))
        else:
            statement = _INSERT_NOTIFYING.get(frozenset(values))
            if statement is None:
                statement = _INSERT_NOTIFYING.setdefault(frozenset(values), _insert_notifying(
                    insert(t).values({key: bindparam(key, type_=t.c[key].type) for key in values})))
        return int(conn.execute(statement, values).scalar_one())

    def claim(self, engine, queue, limit, owner, lease_seconds, skip=0):
        """The claim as one statement on its own (autocommit), the transactional walk only when needed.

        ``CLAIM_ALONE`` claims from the first priority level with a due job,
        in one round trip where ``claim_jobs`` in a transaction takes four
        (BEGIN, the level walk, the claim, COMMIT): an idle poll and a claim
        of a batch are one statement each.  It claims nothing if a job it
        chose needs more writes than the claim (a tracked job's ``popped``
        event, a job past its expiry): those are claimed by ``claim_jobs``,
        in one transaction with their writes.  It also says how many levels
        have a due job, so the walk runs only when the first level gave
        fewer jobs than asked and another one has some.
        """
        result = CLAIM_ALONE.run(engine, dict(from_queue=queue, limit=limit, new_owner=owner,
                                              lease_seconds=lease_seconds))
        summary = result[0]
        claimed = self._rows(row for row in result if row.id is not None)
        walk = (summary.levels >= MAX_LEVELS
                or (summary.candidates and not claimed)           # a job that needs more than the claim
                or (len(claimed) < limit and summary.due_levels > 1))
        if not walk:
            return claimed
        try:
            claimed += super().claim(engine, queue, limit - len(claimed), owner, lease_seconds)
        except DBAPIError:
            if not claimed:
                raise
            # The jobs claimed above are committed: run them; the next poll meets the error again.
        claimed.sort(key=lambda row: row.sort_key)
        return claimed

    def complete_many(self, engine, jobs, tracked=()):
        """``_complete_alone`` on its own (autocommit): one round trip where ``complete_jobs`` takes four.

        It completes every job of the batch or none: a job whose lease was
        lost, one that has dependents to release, or a tracked one (its
        ``succeeded`` event) sends the batch through ``complete_jobs``, in
        one transaction, which sorts them out.
        """
        if not tracked:
            statement = _complete_alone(len(jobs))
            if statement.run(engine, dict(batch_params(jobs), wanted=len(jobs)))[0][0] == len(jobs):
                return [], []
        with engine.begin() as conn:
            return self.complete_jobs(conn, jobs, tracked)

    def insert_jobs(self, conn, rows):
        """One ``INSERT ... SELECT ... FROM json_array_elements_text(:args) WITH ORDINALITY ... RETURNING id``.

        The rows of one ``enqueue_many`` differ only in ``args``: that column
        goes as one JSON array of strings (one C-speed ``json.dumps``; a
        text[] parameter costs psycopg a regex per element), the others as
        single parameters, so the driver sends one statement with a few
        parameters, not one per row.  The SELECT
        is ordered by the array position, and the sequence numbers rows in
        the order they are inserted, so the ids sorted are in input order.
        Rows that differ in more than ``args`` take the portable path.
        """
        if not rows:
            return []
        shared = self.shared_values(rows)
        if shared is None:
            return super().insert_jobs(conn, rows)
        ids = conn.execute(_batch_insert(tuple(shared)),
                           array_params(shared, (row["args"] for row in rows))).scalars().all()
        return sorted(int(job_id) for job_id in ids)

    def insert_if_key_free(self, conn, values):
        """``INSERT ... ON CONFLICT (unique_key) DO NOTHING RETURNING id``: takes no lock on the live job's row."""
        stmt = pg_insert(t).values(**values).on_conflict_do_nothing(index_elements=[t.c.unique_key])
        job_id = conn.execute(stmt.returning(t.c.id)).scalar()
        return None if job_id is None else int(job_id)

    def set_lock_wait(self, dbapi_connection, seconds: float) -> None:
        """``lock_timeout`` for the whole session (55P03 when exceeded: transient).

        No ``idle_in_transaction_session_timeout``: a task's own transaction
        may rightly sit idle (an HTTP call between two writes) for longer.
        """
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET lock_timeout = {int(seconds * 1000)}")
        cursor.close()
        dbapi_connection.commit()

    def is_transient(self, error: BaseException) -> bool:
        if super().is_transient(error):
            return True
        state = sqlstate(error)
        if state is None:
            # psycopg raises OperationalError without SQLSTATE when the socket dies.
            return isinstance(error, DBAPIError) and type(error.orig).__name__ == "OperationalError"
        return state in TRANSIENT_SQLSTATES or state[:2] in TRANSIENT_CLASSES

    def is_conflict(self, error: BaseException) -> bool:
        return isinstance(error, DBAPIError) and sqlstate(error) in CONFLICT_SQLSTATES

    def is_missing_table(self, error: BaseException) -> bool:
        return sqlstate(error) == MISSING_TABLE

    def is_connection_limit(self, error: BaseException) -> bool:
        return sqlstate(error) == CONNECTION_LIMIT or "too many clients" in str(getattr(error, "orig", error))

    def is_unreachable(self, error: BaseException) -> bool:
        return (isinstance(error, DBAPIError) and sqlstate(error) is None
                and type(error.orig).__name__ == "OperationalError")

    def is_access_denied(self, error: BaseException) -> bool:
        """28000/28P01, or (psycopg gives no SQLSTATE for a refused connection) the server's words for them."""
        if sqlstate(error) in ACCESS_DENIED_SQLSTATES:
            return True
        message = str(getattr(error, "orig", error))
        return isinstance(error, DBAPIError) and any(words in message for words in ACCESS_DENIED_WORDS)

    def upsert(self, conn, table, values, changes) -> None:
        """``INSERT ... ON CONFLICT (primary key) DO UPDATE``: one statement, row lock by primary key."""
        conn.execute(pg_insert(table).values(**values).on_conflict_do_update(
            index_elements=list(table.primary_key.columns), set_=changes))
