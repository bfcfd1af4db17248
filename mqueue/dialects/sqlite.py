"""SQLite (3.35+ for RETURNING) in WAL mode.

SQLite has one writer at a time and no row locks.  A deferred transaction
that read and then writes after another connection committed fails with
"database is locked" whatever the busy timeout, so every transaction opened
through mqueue starts with ``BEGIN IMMEDIATE``: it takes the write lock at
its first statement, waits for it up to the busy timeout, and never fails
halfway.  The claim is one ``UPDATE ... WHERE id IN (SELECT ... LIMIT n)
RETURNING``, serialized by that lock.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from typing import Any

from sqlalchemy import DDL, Text, bindparam, event, func, insert, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DBAPIError

from ..schema import task_table
from .base import Dialect, array_params, insert_from_array

#: Longer than any heartbeat interval: a task holding the write lock must
#: delay, not fail, other workers' heartbeats.
BUSY_TIMEOUT_SECONDS = 60
READ_ONLY_OPTION = "mqueue_read_only"
#: Marks mqueue's view of an application's engine (``adopt_engine``).
ADOPTED_OPTION = "mqueue_adopted"


def _begin_immediate(conn) -> None:
    """Open mqueue's transactions with ``BEGIN IMMEDIATE``; a reader (``reader``) takes a WAL snapshot.

    ``BEGIN IMMEDIATE`` takes the write lock at once, waiting up to the busy
    timeout, so a transaction never fails halfway.  A read-only connection
    sends a plain ``BEGIN``, so ``mqueue list`` never waits for a task.
    Nothing is sent when the driver has a transaction open already (an
    application's own ``begin`` hook ran first).
    """
    if conn.connection.dbapi_connection.in_transaction:
        return
    read_only = conn.get_execution_options().get(READ_ONLY_OPTION)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


#: What SQLAlchemy writes for a datetime: the one text layout SQLite compares correctly.
CANONICAL_TIME = ("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] "
                  "[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]")


READ_ETA = ("(CASE WHEN typeof(NEW.eta) IN ('integer', 'real') "
            "THEN strftime('%Y-%m-%d %H:%M:%f', NEW.eta, 'unixepoch') "
            "ELSE strftime('%Y-%m-%d %H:%M:%f', NEW.eta) END || '000')")


def _normalize_eta(event_clause: str, name: str) -> str:
    """A trigger that rewrites a hand-written ``eta`` into the canonical layout.

    SQLite stores what an INSERT gives: epoch seconds sort before every text
    (due at once, however far in the future), and ISO text with ``T`` sorts
    after a space (due up to a day late).  SQLite's own date functions read
    epoch seconds, ``T``, ``Z`` and offsets (converted to UTC); a value they
    cannot read fails the job at once, with an error on the row that says
    so: it never blocks the queue, and ``retry`` after a fix runs it.
    """
    return f"""CREATE TRIGGER IF NOT EXISTS {name} {event_clause} ON mqueue_task
WHEN NOT (typeof(NEW.eta) = 'text' AND NEW.eta GLOB '{CANONICAL_TIME}')
BEGIN
    UPDATE mqueue_task SET
        eta = COALESCE({READ_ETA}, NEW.eta),
        state = CASE WHEN {READ_ETA} IS NULL THEN 'failed' ELSE state END,
        last_error = CASE WHEN {READ_ETA} IS NULL
            THEN 'eta ' || quote(NEW.eta) || ' is not a time; write UTC as YYYY-MM-DD HH:MM:SS, '
                 || 'ISO 8601 or epoch seconds, then retry the job'
            ELSE last_error END
    WHERE id = NEW.id;
END"""


#: Installed with the table (``create_all``) and by migration 0002 (a frozen copy).
NORMALIZE_ETA_TRIGGERS = (_normalize_eta("AFTER INSERT", "mqueue_task_eta_on_insert"),
                          _normalize_eta("AFTER UPDATE OF eta", "mqueue_task_eta_on_update"))
for _trigger in NORMALIZE_ETA_TRIGGERS:
    event.listen(task_table, "after_create", DDL(_trigger.replace("%", "%%")).execute_if(dialect="sqlite"))


#: JSON functions are part of every SQLite from 3.38 (before, a compile-time option).
JSON_BUILT_IN = sqlite3.sqlite_version_info >= (3, 38)


@functools.cache
def _batch_insert(columns: tuple[str, ...]):
    """``insert_from_array`` over ``json_each(:args_list)`` (its ``key`` is the array position)."""
    elements = func.json_each(bindparam("args_list", type_=Text)).table_valued("key", "value", name="mqueue_batch")
    return insert_from_array(columns, elements, elements.c.value, elements.c.key)


class SQLiteDialect(Dialect):
    name = "sqlite"
    skip_locked = False
    #: One writer at a time: a claim and a completion each waited for the write lock (measured,
    #: in-process drain of 10,000 no-op jobs at 4 threads: 1,650 jobs/s apart, 2,000-2,200 together).
    completes_with_claim = True

    def engine_options(self, url) -> dict[str, Any]:
        return {"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False}}

    def worker_engine_options(self, concurrency: int, lease_seconds: float = 60.0) -> dict[str, Any]:
        """The servers' pool size (SQLite's default 5 + 10 is too small past 4 threads); no lock-wait bound."""
        options = super().worker_engine_options(concurrency, lease_seconds)
        return {key: options[key] for key in ("pool_size", "max_overflow")}

    def database_identity(self, url: URL) -> tuple | None:
        """The database file's absolute path (as the driver resolves it now); None in memory.

        An in-memory database belongs to one connection pool: only its own engine joins it.
        """
        path = url.database or ""
        if url.query.get("mode") == "memory":
            return None
        if path.startswith("file:"):  # ``?uri=true``: a SQLite URI
            path, _, options = path[len("file:"):].partition("?")
            if "mode=memory" in options.split("&"):
                return None
        if path in ("", ":memory:"):
            return None
        return (self.name, os.path.realpath(path))

    def missing_database_file(self, url: URL) -> str | None:
        """The file's path if it does not exist but its directory does (SQLite would create it, empty).

        A directory that is missing too makes connecting fail ("unable to open
        database file"), which is reported as an unreachable database instead.
        """
        identity = self.database_identity(url)
        if identity is None:
            return None
        path = identity[1]
        return path if not os.path.exists(path) and os.path.isdir(os.path.dirname(path)) else None

    def configure_engine(self, engine: Engine, own: bool = True) -> None:
        """An engine built from a URL: WAL, mqueue's busy timeout, and ``BEGIN IMMEDIATE`` for every transaction.

        Durability stays SQLite's default (``synchronous=FULL``: a commit
        survives a power cut); an application that wants ``NORMAL`` sets it
        on an engine of its own and hands that to ``Database(engine)``.  An
        adopted engine (``own=False``) keeps its pragmas and its own
        transactions; ``adopt_engine`` gives mqueue's transactions on it
        ``BEGIN IMMEDIATE``.
        """
        super().configure_engine(engine, own)
        if not own:
            event.listen(engine, "begin", _begin_immediate)
            return

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            # Let SQLAlchemy's begin event emit BEGIN instead of pysqlite.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
            cursor.close()

        event.listen(engine, "begin", _begin_immediate)

    def adopt_engine(self, engine: Engine) -> Engine:
        """The application's engine under an option that only mqueue's transactions carry (same pool).

        Its ``begin`` hook (``configure_engine(own=False)``) applies to
        connections of this engine only: the application's sessions on its
        own engine keep deferred transactions and whatever pragmas it set.
        """
        return engine.execution_options(**{ADOPTED_OPTION: True})

    def in_transaction(self, dbapi_connection) -> bool:
        return bool(getattr(dbapi_connection, "in_transaction", True))

    def reader(self, engine: Engine) -> Engine:
        return engine.execution_options(**{READ_ONLY_OPTION: True})

    def insert_jobs(self, conn, rows):
        """One ``INSERT ... SELECT ... FROM json_each(:args)`` (as on the servers), ids from ``last_insert_rowid()``.

        Rows that differ in more than ``args`` go as one executemany, as do all
        rows on an SQLite older than 3.38 (JSON functions optional there).

        Consecutive by construction: the transaction holds the only write
        lock (BEGIN IMMEDIATE) and ``AUTOINCREMENT`` numbers new rows one
        after another.  RETURNING with guaranteed order would run one
        statement per row (measured: 15x instead of 20x+ over single enqueues).
        """
        if not rows:
            return []
        shared = self.shared_values(rows) if JSON_BUILT_IN else None
        if shared is None:
            conn.execute(insert(task_table), list(rows))
        else:
            conn.execute(_batch_insert(tuple(shared)), array_params(shared, (row["args"] for row in rows)))
        last = conn.execute(text("SELECT last_insert_rowid()")).scalar_one()
        return list(range(last - len(rows) + 1, last + 1))

    def insert_if_key_free(self, conn, values):
        """``INSERT ... ON CONFLICT (unique_key) DO NOTHING RETURNING id`` (no savepoint needed)."""
        stmt = sqlite_insert(task_table).values(**values).on_conflict_do_nothing(
            index_elements=[task_table.c.unique_key])
        job_id = conn.execute(stmt.returning(task_table.c.id)).scalar()
        return None if job_id is None else int(job_id)

    def checkpoint(self, conn) -> None:
        """Fold the WAL back into the database file so it does not grow forever."""
        conn.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))

    def is_transient(self, error: BaseException) -> bool:
        if super().is_transient(error):
            return True
        message = str(getattr(error, "orig", error)).lower()
        return isinstance(error, DBAPIError) and ("locked" in message or "busy" in message)

    def is_missing_table(self, error: BaseException) -> bool:
        return "no such table" in str(getattr(error, "orig", error)).lower()

    def is_unreachable(self, error: BaseException) -> bool:
        return "unable to open database" in str(getattr(error, "orig", error)).lower()

    def upsert(self, conn, table, values, changes) -> None:
        """``INSERT ... ON CONFLICT (primary key) DO UPDATE`` (SQLite 3.24+), under the write lock."""
        conn.execute(sqlite_insert(table).values(**values).on_conflict_do_update(
            index_elements=list(table.primary_key.columns), set_=changes))
