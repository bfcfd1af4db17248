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

from typing import Any

from sqlalchemy import DDL, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError

from ..schema import event_table
from .base import Dialect, t

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
MISSING_TABLE = "42P01"
#: invalid_authorization_specification, invalid_password.
ACCESS_DENIED_SQLSTATES = {"28000", "28P01"}
#: The server's FATAL messages for those, as psycopg reports them on connect (without a SQLSTATE).
ACCESS_DENIED_WORDS = ("password authentication failed", "authentication failed for user", "no pg_hba.conf entry",
                       'FATAL:  role "')  # ... does not exist, ... is not permitted to log in


def sqlstate(error: BaseException) -> str | None:
    orig = getattr(error, "orig", error)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


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
