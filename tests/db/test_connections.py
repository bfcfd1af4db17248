"""Connections of the engines mqueue builds, and what an application's own engine keeps.

A connection killed on the server (or closed under the pool) while idle is
replaced before the next session uses it: the idle ping of
``mqueue.connections``.  An engine handed to ``Database(engine)`` keeps the
application's settings and transactions; only mqueue's own sessions on it
get what mqueue needs.
"""

from __future__ import annotations

import time

from sqlalchemy import create_engine, event, select, text

import mqueue
from mqueue import connections
from mqueue.schema import SUCCEEDED, task_table as t

#: How each backend names the server side of a connection, and how another connection ends it.
CONNECTION_ID = {"mariadb": "SELECT CONNECTION_ID()", "postgresql": "SELECT pg_backend_pid()"}
KILL = {"mariadb": "KILL {}", "postgresql": "SELECT pg_terminate_backend({})"}


@mqueue.task(name="tconn.noop", queue="tconn")
def noop() -> None:
    pass


def _server_side(backend: str, session) -> object:
    """What names the session's connection: its server-side id, or SQLite's driver connection."""
    if backend == "sqlite":
        return session.connection().connection.dbapi_connection
    return session.execute(text(CONNECTION_ID[backend])).scalar_one()


def test_a_connection_killed_while_idle_is_replaced_before_the_next_session(backend, database_url):
    db = mqueue.Database(database_url)
    outsider = create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with db.session() as session:
            victim = _server_side(backend, session)
            session.execute(text("SELECT 1"))
        if backend == "sqlite":
            victim.close()   # the pool still holds it: the next checkout would get a dead connection
        else:
            with outsider.connect() as conn:
                conn.execute(text(KILL[backend].format(int(victim))))
        time.sleep(connections.IDLE_PING_SECONDS + 0.3)
        with db.session() as session:
            assert session.execute(text("SELECT 1")).scalar_one() == 1
            if backend != "sqlite":
                assert session.execute(text(CONNECTION_ID[backend])).scalar_one() != victim
            else:
                assert session.connection().connection.dbapi_connection is not victim
    finally:
        db.dispose()
        outsider.dispose()


def _app_setting(backend: str):
    """A per-connection setting an application chooses, how to read it, and mqueue's own value of it."""
    return {
        "sqlite": ("PRAGMA synchronous = OFF", "PRAGMA synchronous", 0),
        "mariadb": ("SET SESSION innodb_lock_wait_timeout = 7", "SELECT @@SESSION.innodb_lock_wait_timeout", 7),
        "postgresql": ("SET lock_timeout = '7s'", "SHOW lock_timeout", "7s"),
    }[backend]


def test_an_adopted_engine_keeps_the_applications_settings_and_transactions(backend, database_url):
    set_it, read_it, expected = _app_setting(backend)
    engine = create_engine(database_url)

    @event.listens_for(engine, "connect")
    def _app_choice(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute(set_it)
        cursor.close()
        if backend == "postgresql":
            dbapi_connection.commit()

    heard: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_a: heard.append(sql))
    with engine.connect() as conn:
        isolation_before = conn.get_isolation_level()
    db = mqueue.Database(engine)
    db.create_all()
    try:
        # The application's own transactions: its isolation, its BEGIN, its setting.
        heard.clear()
        with engine.begin() as conn:
            assert conn.execute(text(read_it)).scalar() == expected
            assert conn.get_isolation_level() == isolation_before
        assert not any("IMMEDIATE" in sql for sql in heard)
        # mqueue's sessions on it: the setting is still the application's.
        with db.session() as session:
            assert session.execute(text(read_it)).scalar() == expected
            noop.enqueue()
        worker = mqueue.Worker(db, queues=["tconn"], poll_interval=0.05)
        assert worker.run_until_empty(timeout=30).succeeded == 1
        with engine.connect() as conn:
            assert conn.execute(select(t.c.state).where(t.c.queue == "tconn")).scalar_one() == SUCCEEDED
            assert conn.execute(text(read_it)).scalar() == expected
        if backend == "sqlite":
            assert any(sql == "BEGIN IMMEDIATE" for sql in heard)   # mqueue's transactions only
    finally:
        db.dispose()


def test_an_engine_built_from_a_url_keeps_full_durability_on_sqlite(backend, database_url):
    """mqueue's own engines (the application's handle and a worker's) never lower SQLite's ``synchronous``."""
    db = mqueue.Database(database_url)
    worker = mqueue.Worker(db, queues=["tconn"])
    try:
        for engine in (db.engine, worker.db.engine):
            with engine.connect() as conn:
                if backend == "sqlite":
                    assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2   # FULL
                    assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                else:
                    assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        db.dispose()
        worker.db.dispose()
