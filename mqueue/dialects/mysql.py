"""MySQL 8 / MariaDB 10.6+ through PyMySQL.

* No ``UPDATE ... RETURNING``: the claim is ``SELECT ... FOR UPDATE SKIP
  LOCKED`` then ``UPDATE ... WHERE id IN`` in one transaction.  The tokens
  are the values read plus one, which the row locks make exact.
* Every connection runs at READ COMMITTED: under REPEATABLE READ the claim
  takes next-key locks that deadlock with inserts, and MariaDB 11.8's
  snapshot isolation turns a heartbeat into ERROR 1020 on completion.
* ``read_timeout``/``write_timeout`` bound every socket wait, so a half-open
  network cannot hang a worker thread forever.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Integer, bindparam, func, literal_column, null, select, text, union_all, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..schema import QUEUED
from .base import (CLAIM_COLUMNS, CLAIM_VALUES, MAX_LEVELS, NOT_PAUSED, ClaimedRow, Dialect, due_jobs, id_names,
                   id_params, insert_from_array, array_params, t)
from .driver import DriverStatement

#: The claim's ``SELECT ... FOR UPDATE SKIP LOCKED`` of one priority level
#: (params ``from_queue``, ``level``, ``limit``); tests EXPLAIN it.
CLAIM_SELECT = due_jobs(*CLAIM_COLUMNS).with_for_update(skip_locked=True)
#: The same, sent to PyMySQL's cursor (``driver.py``), as are the level probes and the claim's UPDATE.
_CLAIM_SELECT = DriverStatement(CLAIM_SELECT, ("from_queue", "level", "limit"))
#: The ids of the worker's own window of one level's due jobs (param ``skip``: rows passed over),
#: a plain read: no lock on the rows passed over (see ``claim_window``).
WINDOW_IDS = due_jobs(t.c.id).offset(bindparam("skip", type_=Integer))
#: Those of ``:ids`` still queued, locked by primary key (SKIP LOCKED).
CLAIM_BY_ID = (select(*CLAIM_COLUMNS).where(t.c.id.in_(bindparam("ids", expanding=True)), t.c.state == QUEUED)
               .order_by(t.c.id).with_for_update(skip_locked=True))
CLAIM_SELECT_ANY_LEVEL = due_jobs(*CLAIM_COLUMNS, at_level=False).with_for_update(skip_locked=True)
_QUEUED_IN = (t.c.queue == bindparam("from_queue"), t.c.state == QUEUED)
#: The first and last priority levels with a queued job (None, None: none, or paused): two index
#: dives ("Select tables optimized away").  When they are equal, a claim that the first level
#: cannot fill needs no probe for a next one.
LEVEL_RANGE = select(func.min(t.c.neg_priority).label("first_level"),
                     func.max(t.c.neg_priority).label("last_level")).where(*_QUEUED_IN, NOT_PAUSED)
#: The next priority level with a queued job after ``:after`` (none while paused).
NEXT_LEVEL = (select(t.c.neg_priority)
              .where(*_QUEUED_IN, NOT_PAUSED, t.c.neg_priority > bindparam("after", type_=Integer))
              .order_by(t.c.neg_priority).limit(1))
_LEVEL_RANGE = DriverStatement(LEVEL_RANGE, ("from_queue",))
#: The claim's first statement: ``LEVEL_RANGE`` as one row (its ``id`` NULL) and, in the same
#: round trip, ``CLAIM_SELECT`` of the first level (found by a scalar subquery, another two index
#: dives: EXPLAIN "Select tables optimized away", so the locking read is still one range of the
#: claim index).  A claim that the first level fills is then this SELECT, the UPDATE and COMMIT;
#: an idle poll is still one statement.
HEAD_CLAIM = union_all(
    LEVEL_RANGE.add_columns(*(null().label(column.name) for column in CLAIM_COLUMNS)),
    due_jobs(null().label("first_level"), null().label("last_level"), *CLAIM_COLUMNS,
             level=select(func.min(t.c.neg_priority)).where(*_QUEUED_IN, NOT_PAUSED).scalar_subquery())
    .with_for_update(skip_locked=True))
_HEAD_CLAIM = DriverStatement(HEAD_CLAIM, ("from_queue", "limit"))
_NEXT_LEVEL = DriverStatement(NEXT_LEVEL, ("from_queue", "after"))
CLAIM_UPDATE = update(t).where(t.c.id.in_(bindparam("ids", expanding=True))).values(**CLAIM_VALUES)


@functools.cache
def _claim_update(size: int) -> DriverStatement:
    """``CLAIM_UPDATE`` of ``size`` ids (``:id_0`` ...), so that its text is fixed for the driver."""
    ids = id_names(size)
    statement = update(t).where(t.c.id.in_([bindparam(name, type_=t.c.id.type) for name in ids]))
    return DriverStatement(statement.values(**CLAIM_VALUES), [*ids, "new_owner", "lease_seconds"])


#: The most ``args`` text one INSERT of ``insert_jobs`` carries (characters; UTF-8 and JSON
#: escaping may make it a few times that in bytes, still far below the 16 MiB ``max_allowed_packet``
#: MariaDB has by default, and below the 4 MiB of older servers).
BATCH_ARGS_CHARS = 512 * 1024


@functools.cache
def _batch_insert(columns: tuple[str, ...]):
    """``insert_from_array`` over ``JSON_TABLE(:args_list)``, returning the ids."""
    batch = text("JSON_TABLE(:args_list, '$[*]' COLUMNS (n FOR ORDINALITY, args LONGTEXT PATH '$')) "
                 "AS mqueue_batch")
    return insert_from_array(columns, batch, literal_column("mqueue_batch.args"),
                             literal_column("mqueue_batch.n")).returning(t.c.id)


def _chunks_of_args(rows):
    """The rows' ``args`` in lists of at most ``BATCH_ARGS_CHARS`` characters (at least one each)."""
    chunk: list[str] = []
    size = 0
    for row in rows:
        if chunk and size + len(row["args"]) > BATCH_ARGS_CHARS:
            yield chunk
            chunk, size = [], 0
        chunk.append(row["args"])
        size += len(row["args"])
    if chunk:
        yield chunk


def _first(rows):
    """The first column of the first row, or None: a scalar query's value."""
    return rows[0][0] if rows else None

# Errors that say "try again", not "this task is broken".
TRANSIENT_CODES = {
    1205,  # lock wait timeout (rolls back the statement only: caller rolls back all)
    1213,  # deadlock (whole transaction rolled back)
    1020,  # record changed since last read (MariaDB snapshot isolation)
    1053,  # server shutdown in progress (SQLAlchemy does not count it as a disconnect)
    1927,  # connection was killed
    2003, 2006, 2013, 2055,  # cannot connect / server gone / lost connection
    4031,  # MySQL 8: disconnected by the server because of inactivity
    1040, 1203,  # too many connections (server-wide, per user): a slot frees soon
    1226,  # the user's own MAX_USER_CONNECTIONS reached (measured on MariaDB 10.11)
    1047,  # Galera: "WSREP has not yet prepared node for application use" (joining, donor, non-primary)
    1180,  # Galera: replication failed during COMMIT (node left the primary component); rolled back
    1305,  # savepoint gone: the transaction was rolled back under it (a lost race, see CONFLICT_CODES)
}
#: A lost race with another transaction, not an outage: deadlock (also Galera's certification
#: failure and brute-force abort) and lock wait timeout.  The transaction is gone; retry at once.
#: 1305 "SAVEPOINT ... does not exist": the server rolled the whole transaction back under a
#: savepoint (Galera aborts a local transaction that conflicts with a replicated one; measured on
#: a unique-key enqueue racing one on another node), so rolling back to it fails.
CONFLICT_CODES = {1213, 1205, 1305}
CONNECTION_LIMIT_CODES = {1040, 1203, 1226}
UNREACHABLE_CODES = {2003, 2005, 2006, 2013}
#: Access denied: for a user (wrong password), to a database, or without a password (socket auth).
ACCESS_DENIED_CODES = {1044, 1045, 1698}
MISSING_TABLE = 1146


def error_code(error: BaseException) -> int | None:
    orig = getattr(error, "orig", error)
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


#: The server status flag "a transaction is open" (MySQL protocol; PyMySQL keeps the last one).
SERVER_STATUS_IN_TRANS = 1


class MySQLDialect(Dialect):
    name = "mysql"
    default_port = 3306

    def engine_options(self, url) -> dict[str, Any]:
        options = super().engine_options(url)
        options["isolation_level"] = "READ COMMITTED"
        if url.drivername.endswith("pymysql"):
            connect_args = {"connect_timeout": 10, "read_timeout": 120, "write_timeout": 120}
            if "charset" not in url.query:
                connect_args["charset"] = "utf8mb4"
            options["connect_args"] = connect_args
        return options

    def adopt_engine(self, engine):
        """READ COMMITTED for mqueue's sessions on an application's engine (its own sessions keep theirs)."""
        return engine.execution_options(isolation_level="READ COMMITTED")

    def in_transaction(self, dbapi_connection) -> bool:
        """PyMySQL's copy of the server status flags of the last reply (``SERVER_STATUS_IN_TRANS``)."""
        status = getattr(dbapi_connection, "server_status", None)
        return status is None or bool(status & SERVER_STATUS_IN_TRANS)

    def claim_jobs(self, conn, queue: str, limit: int, owner: str, lease_seconds: float,
                   skip: int = 0) -> list[ClaimedRow]:
        """Walk the priority levels one statement at a time, claiming in each (see ``Dialect.claim_jobs``).

        The portable recursive CTE does not work here: MariaDB 10.11 runs
        its correlated probes as ``ref`` lookups on ``(queue, state)`` and
        reads every row of the queue (measured: 50,000 handler reads with
        20,000 scheduled jobs).  With constants, the level probes are one or
        two index descents each, and the claim's SELECT an index range that
        ends at the level's first future row.  ``HEAD_CLAIM`` reads the first
        and last levels and locks the first level's due jobs in one
        statement: an idle poll, or a claim that the first level fills or
        that takes the last jobs of the only level, is that statement (and
        the UPDATE); each further level costs a ``NEXT_LEVEL`` probe and its
        locking read, a few handler reads each, however many jobs wait.

        ``skip`` (a worker that lost a claim race on Galera) reads the level
        range alone first: the head's locking read would lock the very rows
        its window is there to leave to the other node.
        """
        if skip:
            level, _last = _LEVEL_RANGE.run_in(conn, dict(from_queue=queue))[0]
            if level is not None:
                claimed = self.claim_window(conn, queue, level, limit, owner, lease_seconds, skip)
                if claimed:
                    return claimed
            # An empty window (the level has fewer due jobs): the head, as usual.
        rows = _HEAD_CLAIM.run_in(conn, dict(from_queue=queue, limit=limit))
        [(level, last_level)] = [(row.first_level, row.last_level) for row in rows if row.id is None]
        claimed = self._claim_locked(conn, [row for row in rows if row.id is not None], owner, lease_seconds)
        for _ in range(MAX_LEVELS - 1):
            if level is None or level == last_level or len(claimed) >= limit:
                break
            level = _first(_NEXT_LEVEL.run_in(conn, dict(from_queue=queue, after=level)))
            if level is not None:
                claimed += self.claim_at_level(conn, queue, level, limit - len(claimed), owner, lease_seconds)
        else:
            if level is not None and level != last_level and len(claimed) < limit:  # more levels than walked
                claimed += self.claim_at_level(conn, queue, None, limit - len(claimed), owner, lease_seconds)
        claimed.sort(key=lambda row: row.sort_key)
        return claimed

    def claim_window(self, conn, queue: str, level: int, limit: int, owner: str, lease_seconds: float,
                     skip: int) -> list[ClaimedRow]:
        """Claim up to ``limit`` due jobs of one level from ``skip`` jobs past its head.

        For a worker that lost a claim race on a Galera cluster: the window's
        ids are found by a plain read (no locks), then only they are locked,
        by primary key with SKIP LOCKED, and claimed.  Locking the rows passed
        over (``OFFSET`` in a locking read) makes every replicated claim of
        those rows abort this transaction (measured on three nodes, 3,000
        jobs: 45-67 claim conflicts per 1,000 jobs that way, 3-14 this way).
        """
        ids = conn.execute(WINDOW_IDS, dict(from_queue=queue, level=level, limit=limit, skip=skip)).scalars().all()
        if not ids:
            return []
        rows = conn.execute(CLAIM_BY_ID, dict(ids=list(ids))).all()
        if not rows:
            return []
        conn.execute(CLAIM_UPDATE, dict(ids=[r.id for r in rows], new_owner=owner, lease_seconds=lease_seconds))
        return self._popped(conn, self._rows(rows, token_offset=1))

    def claim_at_level(self, conn, queue: str, level: int | None, limit: int, owner: str,
                       lease_seconds: float) -> list[ClaimedRow]:
        """SELECT ... FOR UPDATE SKIP LOCKED over the claim index, then UPDATE by primary key.

        The ORDER BY matches ``ix_mqueue_task_queue_state_neg_priority_eta_id``
        exactly, so InnoDB reads rows in index order and locks only the
        ``limit`` rows it returns (a filesort would lock every candidate).
        """
        params = dict(from_queue=queue, level=level, limit=limit)
        if level is not None:
            rows = _CLAIM_SELECT.run_in(conn, params)
        else:
            rows = conn.execute(CLAIM_SELECT_ANY_LEVEL, params).all()
        return self._claim_locked(conn, rows, owner, lease_seconds)

    def _claim_locked(self, conn, rows, owner: str, lease_seconds: float) -> list[ClaimedRow]:
        """Claim ``rows`` read (and locked) by a claim's SELECT: UPDATE by primary key."""
        if not rows:
            return []
        claim = id_params([row.id for row in rows])
        _claim_update(len(rows)).run_in(conn, dict(claim, new_owner=owner, lease_seconds=lease_seconds))
        return self._popped(conn, self._rows(rows, token_offset=1))

    def set_lock_wait(self, dbapi_connection, seconds: float) -> None:
        """``innodb_lock_wait_timeout`` for the session (whole seconds, at least 1; 1205 when exceeded)."""
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION innodb_lock_wait_timeout = {max(1, int(seconds))}")
        cursor.close()

    def insert_jobs(self, conn, rows):
        """MariaDB: ``INSERT ... SELECT ... FROM JSON_TABLE(:args) ... RETURNING id`` per 512 KiB of ``args``.

        As on PostgreSQL, the rows of one ``enqueue_many`` differ only in
        ``args``: they go as one JSON array of strings (one C-speed
        ``json.dumps`` and one escaped string for PyMySQL, not five escaped
        parameters per row), the other columns once.  The SELECT is ordered
        by the array position, and InnoDB numbers rows in the order they are
        inserted, so the ids sorted are in input order.  Each statement
        carries at most ``BATCH_ARGS_CHARS`` of ``args``, well under
        ``max_allowed_packet``.  Rows that differ in more take SQLAlchemy's
        multi-row INSERT ... RETURNING.  MySQL 8 has no RETURNING, so there
        each row is inserted on its own (ids from LAST_INSERT_ID).
        """
        # The session's connection, not its engine: an engine that has not connected yet has not
        # read the server's version, and says "no RETURNING" even on MariaDB.
        connection = conn.connection() if isinstance(conn, Session) else conn
        if not connection.dialect.insert_returning:
            return [self.insert_job(conn, row) for row in rows]
        shared = self.shared_values(rows) if rows else None
        if shared is None:
            return super().insert_jobs(conn, rows)
        statement = _batch_insert(tuple(shared))
        ids: list[int] = []
        for chunk in _chunks_of_args(rows):
            ids += (int(row[0]) for row in conn.execute(statement, array_params(shared, chunk)))
        return sorted(ids)

    def is_transient(self, error: BaseException) -> bool:
        return super().is_transient(error) or error_code(error) in TRANSIENT_CODES

    def is_conflict(self, error: BaseException) -> bool:
        return isinstance(error, DBAPIError) and error_code(error) in CONFLICT_CODES

    def is_missing_table(self, error: BaseException) -> bool:
        return error_code(error) == MISSING_TABLE

    def is_connection_limit(self, error: BaseException) -> bool:
        return error_code(error) in CONNECTION_LIMIT_CODES

    def is_unreachable(self, error: BaseException) -> bool:
        return isinstance(error, DBAPIError) and error_code(error) in UNREACHABLE_CODES

    def is_access_denied(self, error: BaseException) -> bool:
        return isinstance(error, DBAPIError) and error_code(error) in ACCESS_DENIED_CODES

    def upsert(self, conn, table, values, changes) -> None:
        """``INSERT ... ON DUPLICATE KEY UPDATE``: one statement, row lock by primary key."""
        conn.execute(mysql_insert(table).values(**values).on_duplicate_key_update(**changes))
