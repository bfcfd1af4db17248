"""The worker's shape on every backend: pool sized from the concurrency, runs
that can be repeated, jobs held only while running, loops that outlive errors.
"""

from __future__ import annotations

import threading

import pytest
from helpers import wait_for
from sqlalchemy import select

import mqueue
from mqueue.schema import task_table

barrier_parties = 4
barrier = threading.Barrier(barrier_parties, timeout=20)
held_open = threading.Event()


@mqueue.task(name="tshape.together", queue="tshape")
def together(n: int) -> None:
    """Holds a connection of the job's pool until every thread has one (no transaction:
    on SQLite a transaction would take the single write lock)."""
    with mqueue.current_session().get_bind().connect():
        barrier.wait()


@mqueue.task(name="tshape.noop", queue="tshape-noop")
def noop(n: int) -> None:
    pass


@mqueue.task(name="tshape.hold", queue="tshape-hold")
def hold(n: int) -> None:
    held_open.wait(20)


@pytest.fixture(autouse=True)
def _reset():
    barrier.reset()
    held_open.clear()
    yield
    held_open.set()
    barrier.abort()


def enqueue(db, task, count: int) -> list[int]:
    with db.session():
        return task.enqueue_many([{"n": n} for n in range(count)])


def test_a_worker_sizes_its_pool_from_its_concurrency(db, database_url):
    """Issue 10, item 9: a pool smaller than the threads ended in a pool TimeoutError per job.

    The application's Database has room for two connections; four threads each
    hold their task's connection until all four have one.
    """
    small = mqueue.Database(database_url, pool_size=2, max_overflow=0, pool_timeout=1)
    try:
        enqueue(db, together, barrier_parties)
        result = mqueue.Worker(small, queues=["tshape"], concurrency=barrier_parties, lease=10,
                               poll_interval=0.05).run_until_empty(timeout=60)
        assert (result.succeeded, result.retried, result.failed) == (barrier_parties, 0, 0)
    finally:
        small.dispose()


def test_a_worker_given_a_url_sizes_its_own_pool(db, database_url):
    enqueue(db, together, barrier_parties)
    worker = mqueue.Worker(database_url, queues=["tshape"], concurrency=barrier_parties, lease=10,
                           poll_interval=0.05)
    try:
        result = worker.run_until_empty(timeout=60)
    finally:
        worker.db.dispose()
    assert (result.succeeded, result.failed) == (barrier_parties, 0)


def test_run_until_empty_can_be_called_again_on_the_same_worker(db):
    """Issue 10, item 13: the second call returned at once with the first call's counts."""
    worker = mqueue.Worker(db, queues=["tshape-noop"], lease=10, poll_interval=0.05)
    enqueue(db, noop, 3)
    assert worker.run_until_empty(timeout=30).succeeded == 3
    enqueue(db, noop, 2)
    second = worker.run_until_empty(timeout=30)
    assert (second.succeeded, second.failed) == (2, 0)
    with db.engine.connect() as conn:  # every job succeeded once, none left to run
        assert conn.execute(select(task_table.c.state, task_table.c.runs)).all() == [("succeeded", 1)] * 5


def test_a_busy_worker_leaves_waiting_jobs_to_others(db):
    """Issue 10, item 3: a 1-thread worker busy with a job holds no second one.

    Before, it claimed ``concurrency + 4`` jobs and marked them running, so an
    idle worker could not run them and a crash charged them a failed run.
    """
    busy = mqueue.Worker(db, queues=["tshape-hold"], concurrency=1, lease=10, poll_interval=0.02)
    thread = threading.Thread(target=busy.run_until_empty, kwargs={"timeout": 30}, daemon=True)
    ids = enqueue(db, hold, 3)
    thread.start()
    try:
        wait_for(lambda: _states(db, ids).count("running") == 1, timeout=10)
        for _ in range(10):  # ten of its poll intervals and more: still one job held
            busy._wake.set()
            threading.Event().wait(0.05)
            assert sorted(_states(db, ids)) == ["queued", "queued", "running"]
    finally:
        held_open.set()
        thread.join(30)
    assert _states(db, ids) == ["succeeded"] * 3


def _states(db, ids) -> list[str]:
    with db.engine.connect() as conn:
        return [row.state for row in conn.execute(select(task_table.c.state).where(task_table.c.id.in_(ids)))]


def test_an_adopted_engine_too_small_for_the_threads_is_refused_clearly(database_url):
    """Rebuilding the application's engine from its URL would drop its creator and connect_args."""
    from sqlalchemy import create_engine
    engine = create_engine(database_url, pool_size=2, max_overflow=0)
    try:
        with pytest.raises(ValueError, match=r"needs \d+: create the engine with pool_size="):
            mqueue.Worker(mqueue.Database(engine), queues=["tshape"], concurrency=8)
    finally:
        engine.dispose()


def _unreachable(database_url: str, tmp_path) -> str:
    """The test's database at an address where nothing answers."""
    import socket
    from sqlalchemy.engine import make_url
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return f"sqlite:///{tmp_path}/no/such/dir/q.db"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]   # free once closed: nothing listens there
    return url.set(port=port).render_as_string(hide_password=False)


def test_run_waits_for_a_database_that_is_not_up_and_stops_when_asked(database_url, tmp_path, caplog):
    """Issue 10, item 11, from Python: ``Worker.run()`` waits as ``start`` does (it raised before)."""
    worker = mqueue.Worker(_unreachable(database_url, tmp_path), queues=["tshape"], poll_interval=0.05)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as error:  # noqa: B902 - reported below
            failures.append(error)

    with caplog.at_level("WARNING", logger="mqueue.startup"):
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for(lambda: "waiting for the database (attempt 2" in caplog.text or failures, timeout=20)
        assert failures == [] and thread.is_alive()
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


@mqueue.task(name="tshape.exits", queue="tshape-crash", max_retries=0)
def exits(n: int) -> None:
    raise SystemExit(3)


@mqueue.task(name="tshape.odd_error", queue="tshape-crash", max_retries=0)
def odd_error(n: int) -> None:
    raise mqueue.Fail("cannot read /srv/in/report-\udcff.csv")   # a file name that is not UTF-8


def test_a_task_that_kills_its_thread_or_writes_an_odd_error_does_not_stall_the_worker(db):
    """A SystemExit from a task, or an error text with a lone surrogate, escaped the
    executor: the thread died, the job stayed held (and heartbeated) for ever, and
    ``run_until_empty`` never returned."""
    with db.session():
        crash = exits.enqueue(1)
        odd = odd_error.enqueue(2)
        after = noop.options(queue="tshape-crash").enqueue(3)
    result = mqueue.Worker(db, queues=["tshape-crash"], concurrency=1, lease=2,
                           poll_interval=0.05).run_until_empty(timeout=20)
    assert (result.succeeded, result.failed, result.lost) == (1, 1, 1)
    with db.engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(select(task_table).where(task_table.c.id.in_([crash, odd, after])))}
    assert rows[after].state == "succeeded"                    # ran after the crash, on the same thread
    assert rows[crash].state == "running"                       # left to the lease: rescued like a dead worker's
    assert rows[odd].state == "failed" and "report-\\udcff.csv" in rows[odd].last_error


def test_run_after_run_until_empty_serves_until_stopped(db):
    worker = mqueue.Worker(db, queues=["tshape-noop"], lease=10, poll_interval=0.05)
    assert worker.run_until_empty(timeout=30).total == 0
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        (job_id,) = enqueue(db, noop, 1)
        wait_for(lambda: _states(db, [job_id]) == ["succeeded"], timeout=10)
        assert thread.is_alive()   # before: it returned as soon as the queue was empty
    finally:
        worker.stop()
        thread.join(10)


def test_a_workers_engine_gets_the_daemon_options_whatever_it_is_given(db, database_url):
    """Lock waits bounded below the lease and a pool sized from the threads, also for a
    Database built by the application and for a SQLite URL (which kept 5 + 10)."""
    from mqueue.dialects.base import LOCK_WAIT_OPTION
    for given in (db, database_url):
        worker = mqueue.Worker(given, queues=["tshape"], concurrency=16, lease=40)
        pool = worker.db.engine.pool
        assert pool.size() + pool._max_overflow >= 2 * 16 + 6
        if db.dialect.skip_locked:   # the servers; SQLite has no row locks to wait for
            assert worker.db.engine.get_execution_options()[LOCK_WAIT_OPTION] == 10
        worker.db.dispose()
