"""Statements sent straight to the driver's cursor: the worker's hottest ones.

A worker sends a claim for every batch it runs, a completion for every
job, and (MariaDB) the claim's level probe, locking read and UPDATE.
Through ``Connection.execute`` each costs SQLAlchemy's per-execution work
(bind parameters processed one by one, a result with its metadata and
``Row`` objects), which for PostgreSQL's one-statement claim came to more
CPU than the driver's own.  Measured on this 2-core machine, interleaved
in one process: a PostgreSQL claim of 4 jobs cost 320-420 us of the
worker's CPU through SQLAlchemy and 190-230 us this way, a MariaDB one
930-1,130 us and 650-890 us (PyMySQL's own parsing is most of the rest), a
fenced completion 193 us and 148 us (PostgreSQL), 137 us and 95 us
(MariaDB).  A worker is one process whose Python runs one thread at a
time, so that CPU is what bounds its drain.

What ``Connection.execute`` gives is kept: the statement is compiled once
per SQLAlchemy dialect by SQLAlchemy itself; the connection is the
caller's or comes from the engine's pool (checkout hooks, reset on
return); ``before_cursor_execute``/``after_cursor_execute`` listeners still
hear the statement (for tracing; their return values cannot rewrite it); a
driver error is raised as SQLAlchemy's ``DBAPIError`` (with ``.orig``), and
a lost connection is invalidated so the pool replaces it.  Not kept: the
engine's ``echo`` log does not show them.  Other drivers
(and SQLite's) run the same statements through ``Connection.execute``.
"""

from __future__ import annotations

import collections
import weakref
from typing import Any, Callable, Mapping, Sequence

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError


#: Drivers whose cursor is used directly (measured and tested with them); with any other the
#: statement goes through ``Connection.execute``.
DIRECT_DRIVERS = frozenset({"psycopg", "pymysql"})
#: The driver whose connections ``run`` switches to autocommit by an attribute (PyMySQL's
#: ``autocommit()`` costs a round trip each way).
AUTOCOMMIT_DRIVER = "psycopg"


class _Compiled:
    """One statement compiled for one SQLAlchemy dialect: the SQL text and its fixed parameters."""

    def __init__(self, statement, dialect, names: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect)
        if compiled.positional:
            raise ValueError(f"{dialect.name}: a named paramstyle is needed to send statements directly")
        self.sql = compiled.string
        given = set(names)
        values = compiled.construct_params(dict.fromkeys(names))
        self.processors: dict[str, Callable[[Any], Any]] = {}
        self.constants: dict[str, Any] = {}
        for key, value in values.items():
            process = compiled.binds[key].type.bind_processor(dialect)
            if key in given:
                if process is not None:
                    self.processors[key] = process
            else:
                self.constants[key] = value if process is None else process(value)
        self.row_class: type | None = None

    def values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(self.constants)
        for key, value in params.items():
            process = self.processors.get(key)
            values[key] = value if process is None else process(value)
        return values


class DriverStatement:
    """A Core statement sent to the driver's cursor of a connection (``DIRECT_DRIVERS``).

    ``names``: the statement's bound parameters given at each call (the
    others are the literal values compiled into it).  A statement that
    returns rows gives them as named tuples (attribute access like
    SQLAlchemy's rows); one that does not gives its rowcount.

    ``run`` sends it on a pooled connection of its own in autocommit (for
    statements complete on their own: committed when it returns); the
    connection is switched by psycopg's own attribute and back before it
    returns to the pool (SQLAlchemy's ``isolation_level`` option did the
    same at twice the CPU of the statement itself).  ``run_in`` sends it
    in the transaction of a ``Connection`` (a session's, a worker's).
    """

    def __init__(self, statement, names: Sequence[str]) -> None:
        self.statement = statement
        self.names = tuple(names)
        self.returns_rows = bool(statement.exported_columns)
        self._by_dialect: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def compiled(self, dialect) -> _Compiled:
        found = self._by_dialect.get(dialect)
        if found is None:
            found = self._by_dialect.setdefault(dialect, _Compiled(self.statement, dialect, self.names))
        return found

    def run(self, engine: Engine, params: Mapping[str, Any]):
        if engine.dialect.driver != AUTOCOMMIT_DRIVER:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                return self._through_sqlalchemy(conn, params)
        with engine.connect() as conn:
            dbapi_connection = conn.connection.dbapi_connection
            try:
                dbapi_connection.autocommit = True
            except BaseException:
                conn.invalidate()
                raise
            try:
                return self._send(conn, params)
            finally:
                # Never back to the pool in autocommit.  After an error too: a failed
                # statement leaves no transaction open, so it can be switched back.
                if not conn.invalidated:
                    try:
                        dbapi_connection.autocommit = False
                    except BaseException:
                        conn.invalidate()
                        raise

    def run_in(self, conn, params: Mapping[str, Any]):
        """In the transaction of ``conn``: a ``Connection``, or a ``Session`` (its connection)."""
        if not isinstance(conn, Connection):
            conn = conn.connection()
        if conn.dialect.driver not in DIRECT_DRIVERS:
            return self._through_sqlalchemy(conn, params)
        return self._send(conn, params)

    def _through_sqlalchemy(self, conn: Connection, params: Mapping[str, Any]):
        result = conn.execute(self.statement, params)
        return result.all() if self.returns_rows else result.rowcount

    def _send(self, conn: Connection, params: Mapping[str, Any]):
        """Execute on ``conn``'s driver connection as ``Connection.execute`` would: events, errors, invalidation."""
        dialect = conn.dialect
        compiled = self.compiled(dialect)
        sql, values = compiled.sql, compiled.values(params)
        dbapi_connection = conn.connection.dbapi_connection
        cursor = None
        try:
            cursor = dbapi_connection.cursor()
            conn.dispatch.before_cursor_execute(conn, cursor, sql, values, None, False)
            cursor.execute(sql, values)
            result = cursor.fetchall() if self.returns_rows else cursor.rowcount
            conn.dispatch.after_cursor_execute(conn, cursor, sql, values, None, False)
            if self.returns_rows and compiled.row_class is None:  # psycopg builds ``description`` at each read
                compiled.row_class = collections.namedtuple(
                    "DriverRow", [column[0] for column in cursor.description], rename=True)
            cursor.close()
        except dialect.loaded_dbapi.Error as error:
            invalidated = dialect.is_disconnect(error, dbapi_connection, cursor)
            if invalidated:
                conn.invalidate(error)
            raise DBAPIError.instance(sql, values, error, dialect.loaded_dbapi.Error,
                                      connection_invalidated=invalidated, dialect=dialect) from error
        except BaseException:
            conn.invalidate()  # interrupted (e.g. KeyboardInterrupt): the state is unknown
            raise
        if not self.returns_rows:
            return result
        make = compiled.row_class._make
        return [make(row) for row in result]
