"""A daemon started before its database: it waits, one line per attempt, and stops on a signal.

Servers are made unreachable with ``proxy.Proxy`` in refuse mode (nothing
listens on its port) and reachable again with ``passthrough()``; on SQLite
a file in a directory that does not exist yet stands for a database that is
not there.  Missing tables are not waited for: the start ends at once with
one line (issue 10, items 10 and 11).
"""

from __future__ import annotations

import re
import signal
import threading

import pytest
from daemons import Daemon, Daemons, effects, enqueue, jobs_left, prepare_database
from helpers import free_port, server_user, wait_for
from proxy import Proxy
from sqlalchemy.engine import make_url

import mqueue
from mqueue import cli
from mqueue.session import safe_url
from mqueue.startup import wait_for_database

ATTEMPT = re.compile(r" WARNING mqueue\.startup: waiting for the database \(attempt (\d+), next in [\d.]+s\): ")


def attempts(daemon: Daemon) -> list[str]:
    return [line for line in daemon.stderr().splitlines() if ATTEMPT.search(line)]


@pytest.fixture
def bare_daemons(tasks, database_url):
    """Daemons on ``database_url`` with no mqueue tables in it (yet)."""
    started = Daemons(tasks, database_url)
    yield started
    started.close()


def unreachable_url(backend: str, database_url: str, tmp_path) -> str:
    """A URL of ``backend`` whose database cannot be reached at all."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'not-yet' / 'queue.db'}"
    return make_url(database_url).set(port=free_port()).render_as_string(hide_password=False)


@pytest.mark.backends("mariadb", "postgresql")
@pytest.mark.parametrize("processes", [1, 2])
def test_a_daemon_waits_for_its_database_then_serves(processes, database_url, db, tasks, daemons):
    server = make_url(database_url)
    with Proxy((server.host, server.port)) as proxy:
        proxy.refuse()
        url = make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
        daemon = daemons.start(url=url, processes=processes, lease=2)
        wait_for(lambda: len(attempts(daemon)) >= 3, timeout=10, message=daemon.stderr)
        assert daemon.alive()
        assert [int(ATTEMPT.search(line).group(1)) for line in attempts(daemon)][:3] == [1, 2, 3]
        assert all(safe_url(url) in line for line in attempts(daemon)), attempts(daemon)
        assert daemon.children() == []  # a supervisor starts no worker before the database is there

        proxy.passthrough()
        (job_id,) = enqueue(db, "proc.effect", [{"n": 1}])
        wait_for(lambda: jobs_left(db) == 0, timeout=20, message=daemon.stderr)
        assert [row.job_id for row in effects(db)] == [job_id]
        assert f"database {safe_url(url)} is ready after" in daemon.stderr()

        daemon.send(signal.SIGTERM)
        assert daemon.wait(20) == 0
    assert "Traceback" not in daemon.stderr()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("processes", [1, 2])
def test_a_signal_while_waiting_for_the_database_exits_0(signum, processes, backend, database_url, tasks,
                                                         bare_daemons, tmp_path):
    daemon = bare_daemons.start(url=unreachable_url(backend, database_url, tmp_path), processes=processes)
    wait_for(lambda: attempts(daemon), timeout=10, message=daemon.stderr)
    daemon.send(signum)
    assert daemon.wait(5) == 0
    assert f"received {signal.Signals(signum).name} while waiting for the database: exiting" in daemon.stderr()
    assert "Traceback" not in daemon.stderr()


@pytest.mark.parametrize("processes", [1, 2])
def test_missing_tables_end_the_start_at_once_with_one_line(processes, backend, database_url, tasks,
                                                            bare_daemons):
    daemon = bare_daemons.start(processes=processes)
    assert daemon.wait(15) == cli.EXIT_DATABASE
    assert daemon.stderr().splitlines() == [
        f"mqueue: error: table mqueue_task missing in {safe_url(database_url)}; run: python -m mqueue migrate"]
    assert attempts(daemon) == []


# -- wait_for_database itself ------------------------------------------------------


def test_wait_for_database_returns_at_once_when_the_tables_are_there(database_url):
    db = prepare_database(database_url)
    try:
        assert wait_for_database(db, lambda: False) is True
    finally:
        db.dispose()


def test_wait_for_database_raises_missing_tables_at_once(database_url):
    db = mqueue.Database(database_url)
    try:
        with pytest.raises(mqueue.SchemaMissingError, match="run: python -m mqueue migrate"):
            wait_for_database(db, lambda: False)
    finally:
        db.dispose()


def test_wait_for_database_stops_when_asked(backend, database_url, tmp_path, caplog):
    db = mqueue.Database(unreachable_url(backend, database_url, tmp_path))
    calls = []
    try:
        assert wait_for_database(db, lambda: calls.append(1) or len(calls) > 3, first_delay=0.01) is False
    finally:
        db.dispose()
    lines = [r.getMessage() for r in caplog.records if r.name == "mqueue.startup"]
    assert len(lines) >= 1 and all(f"cannot reach database {db.safe_url}" in line for line in lines), lines


@pytest.mark.backends("mariadb", "postgresql")
def test_wait_for_database_waits_out_a_full_server(backend, database_url, caplog):
    """A per-user connection limit stands for a full server (MariaDB 1203, PostgreSQL 53300)."""
    with server_user(backend, database_url, connection_limit=1) as url:
        prepare_database(database_url).dispose()
        db = mqueue.Database(url, poolclass=_null_pool())
        holder = mqueue.Database(url, poolclass=_null_pool())
        held = holder.engine.connect()  # the only connection the user may have
        done = threading.Event()
        result = []
        thread = threading.Thread(target=lambda: (result.append(wait_for_database(db, done.is_set,
                                                                                   first_delay=0.05)),
                                                  done.set()))
        thread.start()
        try:
            wait_for(lambda: len(startup_lines(caplog)) >= 2, timeout=10,
                     message=lambda: f"{startup_lines(caplog)}")
            assert not result
            held.close()
            thread.join(10)
            assert result == [True]
        finally:
            done.set()
            thread.join(10)
            held.close()
            db.dispose()
            holder.dispose()
    lines = startup_lines(caplog)
    assert all(safe_url(url) in line and make_url(url).password not in line for line in lines), lines


def startup_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mqueue.startup" and r.levelname == "WARNING"]


def _null_pool():
    from sqlalchemy.pool import NullPool
    return NullPool
