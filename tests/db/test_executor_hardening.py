"""How one job runs and how its outcome is written, at the edges (issue 10), on every backend.

Tasks write one row into ``effect`` through the job's own session, so a
duplicate run shows up as a second row; ``seen`` records every run start.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import sqlite3
import time
from contextlib import contextmanager

import pytest
from helpers import free_port
from sqlalchemy import (BigInteger, Column, Integer, MetaData, String, Table, create_engine, event, func,
                        insert, select, text)
from sqlalchemy.engine import make_url

import mqueue
from mqueue.encoding import MAX_ARGS_BYTES
from mqueue.executor import MAX_ERROR_BYTES
from mqueue.schema import task_table

effect_metadata = MetaData()
effect = Table(
    "hx_effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("note", String(100), nullable=True),
)

seen: list = []
#: The engine a task queries to meet a transient error of the backend (see ``transient_engine``).
flaky: dict = {}
#: DBAPI connections the pool invalidated (engine "invalidate" event).
invalidated: list = []


def write_effect(note: str | None = None) -> None:
    job = mqueue.current_job()
    mqueue.current_session().execute(insert(effect).values(job_id=job.id, note=note))


@mqueue.task(name="hx.echo", queue="hx")
def echo(data=None) -> None:
    seen.append("echo")
    write_effect()


# -- async tasks -----------------------------------------------------------------


@mqueue.task(name="hx.async_write", queue="hx")
async def async_write(n: int) -> None:
    await asyncio.sleep(0.01)
    seen.append(("async", mqueue.current_job().args["n"]))
    write_effect(str(n))


@mqueue.task(name="hx.async_slow", queue="hx", timeout=0.3, max_retries=0)
async def async_slow() -> None:
    write_effect("before sleeping")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise
    seen.append("not cancelled")


def test_async_task_runs_to_completion_with_the_jobs_session(db):
    with db.session():
        job_id = async_write.enqueue(7)
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.failed) == (1, 0)
    assert seen == [("async", 7)]
    assert effect_notes(db, job_id) == ["7"]
    assert (job_row(db, job_id).state, job_row(db, job_id).runs) == ("succeeded", 1)


def test_async_task_timeout_cancels_the_coroutine(db):
    with db.session():
        job_id = async_slow.enqueue()
    started = time.monotonic()
    result = worker(db).run_until_empty(timeout=30)
    assert result.failed == 1, result
    assert seen == ["cancelled"]
    assert time.monotonic() - started < 15
    row = job_row(db, job_id)
    assert row.state == "failed" and "timeout" in row.last_error.lower()
    assert effect_notes(db, job_id) == []


# -- transient errors raised by the task itself ----------------------------------------


@mqueue.task(name="hx.flaky", queue="hx", max_retries=2, backoff=0)
def flaky_task() -> None:
    seen.append(mqueue.current_job().retries)
    write_effect("before the error")
    with flaky["engine"].connect() as conn:
        conn.exec_driver_sql(flaky["statement"])


@pytest.fixture
def transient_engine(backend, tmp_path):
    """An engine whose every use fails with a real transient error of ``backend``.

    Servers: nothing listens on its port (connection refused).  SQLite: another
    connection holds the write lock of its file and it does not wait ("database is locked").
    """
    holder = None
    if backend == "sqlite":
        path = tmp_path / "other.db"
        holder = sqlite3.connect(str(path), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
        flaky.update(engine=engine, statement="BEGIN IMMEDIATE")
    else:
        driver = "mysql+pymysql" if backend == "mariadb" else "postgresql+psycopg"
        engine = create_engine(f"{driver}://nobody@127.0.0.1:{free_port()}/nothing")
        flaky.update(engine=engine, statement="SELECT 1")
    yield engine
    engine.dispose()
    if holder is not None:
        holder.close()


def test_a_transient_error_of_the_task_reruns_in_place_then_retries_and_max_retries_ends_it(db, transient_engine):
    with db.session():
        job_id = flaky_task.enqueue()
    result = worker(db).run_until_empty(timeout=60)
    # Three runs in place per claim, then a counted retry with backoff: 3 claims for max_retries=2.
    assert (result.succeeded, result.retried, result.failed) == (0, 2, 1), result
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    row = job_row(db, job_id)
    assert (row.state, row.retries) == ("failed", 3)
    assert "OperationalError" in row.last_error
    assert effect_notes(db, job_id) == []


@mqueue.task(name="hx.heartbeat_in_transaction", queue="hx")
def heartbeat_in_transaction() -> None:
    write_effect("before")  # the task's transaction now holds SQLite's write lock
    mqueue.current_job().heartbeat()
    seen.append("heartbeat")
    write_effect("after")


def test_heartbeat_inside_a_task_that_holds_the_write_lock_does_not_deadlock(db):
    with db.session():
        job_id = heartbeat_in_transaction.enqueue()
    started = time.monotonic()
    result = worker(db, grace=1).run_until_empty(timeout=20)
    assert (result.succeeded, result.retried, result.failed) == (1, 0, 0), result
    assert seen == ["heartbeat"]
    assert effect_notes(db, job_id) == ["after", "before"]
    assert time.monotonic() - started < 15


# -- errors and args: sizes, depth, the line `mqueue list` shows --------------------------


@mqueue.task(name="hx.fail_big", queue="hx", max_retries=3)
def fail_big() -> None:
    seen.append("fail_big")
    write_effect()
    raise mqueue.Fail(300_000 * "x")


@mqueue.task(name="hx.raise_huge_unicode", queue="hx", max_retries=0)
def raise_huge_unicode() -> None:
    seen.append("unicode")
    write_effect()
    raise RuntimeError("Größe 😀 " + "ü€😀" * 100_000)


def test_huge_errors_are_recorded_cut_by_bytes_and_the_job_runs_once(db, backend):
    if backend == "mariadb":
        with db.engine.connect() as conn:
            assert "STRICT_TRANS_TABLES" in conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()
    with db.session():
        fail_id = fail_big.enqueue()
        unicode_id = raise_huge_unicode.enqueue()
    result = worker(db, lease=2).run_until_empty(timeout=30)
    assert (result.succeeded, result.failed, result.lost) == (0, 2, 0), result
    assert sorted(seen) == ["fail_big", "unicode"]  # each ran exactly once
    for job_id in (fail_id, unicode_id):
        row = job_row(db, job_id)
        assert row.state == "failed"
        assert len(row.last_error.encode("utf-8")) <= MAX_ERROR_BYTES
    assert job_row(db, fail_id).last_error.startswith("Fail: xxxx")
    unicode_error = job_row(db, unicode_id).last_error
    assert "Traceback" not in unicode_error.splitlines()[-1]
    assert 'raise RuntimeError("Größe' in unicode_error  # the end of the traceback is kept
    assert unicode_error.splitlines()[-1].startswith("RuntimeError: Größe 😀 ü€😀")  # and the message's start
    assert effect_notes(db) == []


def test_args_over_the_size_limit_are_refused_at_enqueue_and_nothing_is_stored(db):
    big = "x" * MAX_ARGS_BYTES
    with pytest.raises(ValueError, match=r"hx\.echo: .*1,048,576.*MAX_ARGS_BYTES"):
        with db.session():
            echo.enqueue(data=big)
    with pytest.raises(ValueError, match=r"hx\.echo: .*MAX_ARGS_BYTES"):
        with db.session():
            echo.enqueue_many([{"data": "small"}, {"data": big}])
    assert job_count(db) == 0
    with db.session():
        echo.enqueue(data="x" * 10_000)
    assert job_count(db) == 1


@mqueue.task(name="hx.missing_table", queue="hx", max_retries=0)
def missing_table() -> None:
    mqueue.current_session().execute(text("SELECT * FROM no_such_table"))


def test_a_stored_database_errors_last_line_is_its_own_message(db):
    with db.session():
        job_id = missing_table.enqueue()
    assert worker(db).run_until_empty(timeout=30).failed == 1
    stored = job_row(db, job_id).last_error
    assert "sqlalche.me" not in stored
    last = [line for line in stored.splitlines() if line.strip()][-1]
    assert "no_such_table" in last and last.startswith("sqlalchemy.exc."), stored
    assert mqueue_list_summary(db, job_id) == last.strip()


def test_args_nested_too_deeply_fail_at_once_or_are_refused_at_enqueue(db):
    depth = 20_000
    with db.engine.begin() as conn:
        job_id = conn.execute(insert(task_table).values(
            queue="hx", name="hx.echo", args='{"data": ' + "[" * depth + "]" * depth + "}")).inserted_primary_key[0]
    result = worker(db).run_until_empty(timeout=30)
    assert (result.failed, result.lost) == (1, 0), result
    row = job_row(db, job_id)
    assert row.state == "failed" and "nested too deeply" in row.last_error
    assert seen == []
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ValueError, match=r"hx\.echo: argument 'data' is nested deeper than"):
        with db.session():
            echo.enqueue(data=deep)
    assert job_count(db) == 1  # only the failed row


# -- unknown task names ---------------------------------------------------------------


def test_an_unknown_task_is_a_failed_run_retried_with_backoff_and_max_retries_ends_it(db):
    with db.engine.begin() as conn:
        retried_id = conn.execute(insert(task_table).values(
            queue="hx", name="hx.ecoh", args="{}")).inserted_primary_key[0]
        failed_id = conn.execute(insert(task_table).values(
            queue="hx", name="hx.ecoh", args="{}", retries=2, max_retries=2)).inserted_primary_key[0]
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (0, 1, 1), result
    retried = job_row(db, retried_id)
    assert (retried.state, retried.retries) == ("queued", 1)
    assert 50 < (retried.eta - db_now(db)).total_seconds() <= 60  # the default backoff
    assert retried.last_error.strip() == "UnknownTaskError: unknown task 'hx.ecoh' (did you mean 'hx.echo'?)"
    failed = job_row(db, failed_id)
    assert (failed.state, failed.retries) == ("failed", 3)


# -- timeouts -----------------------------------------------------------------------


@mqueue.task(name="hx.swallow_timeout", queue="hx", timeout=0.3, max_retries=0)
def swallow_timeout() -> None:
    seen.append(mqueue.current_session().connection().connection.dbapi_connection)
    write_effect("early")
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:  # Python bytecode: where the interruption lands
            pass
    except Exception:  # noqa: BLE001 - a careless task
        seen.append("swallowed")


def test_a_timeout_is_not_swallowed_by_except_exception_and_its_connection_is_discarded(db):
    w = worker(db)   # the worker's own engine: its connections are the ones to watch
    event.listen(w.db.engine, "invalidate", lambda dbapi_connection, record, error: invalidated.append(
        dbapi_connection))
    with db.session():
        job_id = swallow_timeout.enqueue()
    started = time.monotonic()
    result = w.run_until_empty(timeout=30)
    assert result.failed == 1, result
    assert "swallowed" not in seen
    assert time.monotonic() - started < 8
    assert seen[0] in invalidated  # never handed back to the pool
    row = job_row(db, job_id)
    assert row.state == "failed" and "JobTimeout" in row.last_error and "timeout" in row.last_error
    assert effect_notes(db, job_id) == []


# -- connection limits (servers only: SQLite has none) ------------------------------------------


@mqueue.task(name="hx.write_a_little", queue="hx", max_retries=0)
def write_a_little(n: int) -> None:
    write_effect(str(n))
    time.sleep(0.02)


@contextmanager
def limited_user(backend: str, database_url: str, limit: int):
    """A URL for a new database user allowed ``limit`` connections (MariaDB 1203, PostgreSQL 53300)."""
    name = f"mq_limit_{secrets.token_hex(4)}"
    anywhere = "'%%'"  # host '%', with the driver's paramstyle escaping
    url = make_url(database_url)
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if backend == "mariadb":
            conn.exec_driver_sql(f"CREATE USER '{name}'@{anywhere} WITH MAX_USER_CONNECTIONS {limit}")
            conn.exec_driver_sql(f"GRANT ALL ON `{url.database}`.* TO '{name}'@{anywhere}")
        else:
            conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT {limit}")
            conn.exec_driver_sql(f"GRANT ALL ON SCHEMA public TO {name}")
            conn.exec_driver_sql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}")
            conn.exec_driver_sql(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name}")
    try:
        yield url.set(username=name, password=None).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "mariadb":
                conn.exec_driver_sql(f"DROP USER '{name}'@{anywhere}")
            else:
                conn.exec_driver_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
                conn.exec_driver_sql(f"DROP OWNED BY {name}")
                conn.exec_driver_sql(f"DROP ROLE {name}")
        admin.dispose()


@pytest.mark.backends("mariadb", "postgresql")
def test_runs_that_get_no_connection_are_handed_back_uncharged(db, backend, database_url, caplog):
    jobs = 12
    with db.session():
        write_a_little.enqueue_many([{"n": n} for n in range(jobs)])
    # On PostgreSQL the worker process also holds its wake-up listener's connection (LISTEN):
    # one more, so that two are left for claims, completions and task sessions as elsewhere.
    with limited_user(backend, database_url, limit=3 if backend == "postgresql" else 2) as url:
        limited = mqueue.Database(url)
        try:
            result = mqueue.Worker(limited, queues=["hx"], concurrency=3, lease=10,
                                   poll_interval=0.05).run_until_empty(timeout=90)
        finally:
            limited.dispose()
    assert (result.succeeded, result.retried, result.failed, result.lost) == (jobs, 0, 0, 0), result
    assert sorted(effect_notes(db), key=int) == [str(n) for n in range(jobs)]
    assert job_states(db) == [("succeeded", 0)] * jobs  # every job done once, none charged a retry
    assert "no database connection" in caplog.text  # the limit was met by task sessions


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def db(db):
    effect_metadata.create_all(db.engine)
    seen.clear()
    invalidated.clear()
    flaky.clear()
    yield db


def worker(db, **options) -> mqueue.Worker:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 5)
    return mqueue.Worker(db, queues=["hx"], **options)


def effect_notes(db, job_id=None) -> list:
    query = select(effect.c.note)
    if job_id is not None:
        query = query.where(effect.c.job_id == job_id)
    with db.engine.connect() as conn:
        return sorted(conn.execute(query).scalars())


def job_row(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).first()


def job_count(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(task_table)).scalar_one()


def job_states(db) -> list[tuple[str, int]]:
    """(state, retries) of every job row, by id: finished jobs stay on record."""
    with db.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(
            select(task_table.c.state, task_table.c.retries).order_by(task_table.c.id))]


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def mqueue_list_summary(db, job_id) -> str:
    from mqueue import admin
    return admin.get_job(db, job_id).error_summary
