"""Connection hygiene for the engines mqueue builds: ping what sat idle, reset only what needs it.

SQLAlchemy's ``pool_pre_ping`` sends a ping at every checkout, and its
default reset-on-return sends a ROLLBACK at every checkin: with BEGIN,
INSERT and COMMIT, a single enqueue in its own ``db.session()`` cost five
round trips on MariaDB where three do the work.  Instead:

* a connection is pinged at checkout only when it sat in the pool for more
  than ``IDLE_PING_SECONDS``: a server restart, a failover, an idle
  timeout or a killed session leaves stale connections behind, and those are
  found by their idleness; a connection checked in a moment ago is as
  fresh as a ping would show.  A dead one is replaced before use, as
  pre-ping does;
* a connection checked in is rolled back only if the driver reports a
  transaction still open (PyMySQL's server status, psycopg's transaction
  status and sqlite3's ``in_transaction`` are read locally, without a
  round trip).

Engines the application hands to ``mqueue.Database(engine)`` are left as
they are: these hooks go only on engines built from a URL.
"""

from __future__ import annotations

import time
from typing import Callable

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine

#: A connection idle in the pool for longer than this is pinged before use.
IDLE_PING_SECONDS = 2.0
_LAST_USED = "mqueue_last_used"


def install(engine: Engine, in_transaction: Callable[[object], bool],
            clock: Callable[[], float] = time.monotonic) -> None:
    """Ping connections idle past ``IDLE_PING_SECONDS`` at checkout; roll back at checkin only if needed.

    ``in_transaction(dbapi_connection)`` says whether a transaction may be
    open on the connection (True when unsure).  Nothing is installed for a
    pool that pings every checkout already (``pool_pre_ping=True`` given).
    """
    pool = engine.pool
    ping_each_checkout = getattr(pool, "_pre_ping", False)

    @event.listens_for(engine, "connect")
    def _fresh(_dbapi_connection, record) -> None:
        record.info[_LAST_USED] = clock()

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection, record) -> None:
        if record is not None:
            record.info[_LAST_USED] = clock()

    if not ping_each_checkout:
        @event.listens_for(engine, "checkout")
        def _ping_if_idle(dbapi_connection, record, _proxy) -> None:
            last_used = record.info.get(_LAST_USED)
            if last_used is None or clock() - last_used <= IDLE_PING_SECONDS:
                return
            dialect = engine.dialect
            try:
                dialect.do_ping(dbapi_connection)
            except dialect.loaded_dbapi.Error as error:
                if dialect.is_disconnect(error, dbapi_connection, None):
                    # The pool replaces this connection and checks out again.
                    raise exc.DisconnectionError(f"stale connection: {error}") from error
                raise
            record.info[_LAST_USED] = clock()

    @event.listens_for(engine, "reset")
    def _reset(dbapi_connection, _record, reset_state) -> None:
        if reset_state.terminate_only or reset_state.transaction_was_reset:
            return
        if in_transaction(dbapi_connection):
            dbapi_connection.rollback()
