"""A process that used a Database and then forks: the children never use its pooled connections.

gunicorn ``--preload``, ``multiprocessing`` and a user's own ``os.fork()``
before starting workers all fork a process whose pool already holds
connections.  Shared by two processes, one connection breaks both sides'
protocol state (PyMySQL "Command Out of Sync" / "Lost connection", psycopg
"unexpected result EMPTY_QUERY from command 'BEGIN'"; issue 10, item 19).
"""

from __future__ import annotations

import os
import traceback

import pytest
from daemons import effect, effects, enqueue, job_states, jobs_left
from sqlalchemy import create_engine, event, func, insert, select

import mqueue
from mqueue.schema import task_table
from mqueue.session import peek_session

QUERY_CHILDREN = 4
TRANSACTIONS = 60  # per child, and by the parent while they run
JOBS = 20


@mqueue.task(name="tfork.effect", queue="tfork")
def effect_task(n: int) -> None:
    job = mqueue.current_job()
    mqueue.current_session().execute(insert(effect).values(job_id=job.id, pid=os.getpid(),
                                                           retries=job.retries, note=f"job {n}"))


def one_transaction(db: mqueue.Database, note: str) -> None:
    """A read and a write through ``db``'s pool, committed."""
    with db.session() as session:
        session.execute(select(func.count()).select_from(task_table)).scalar_one()
        session.execute(insert(effect).values(job_id=0, pid=os.getpid(), retries=0, note=note))


def fork(errors_file, body) -> int:
    """Fork; the child runs ``body()`` and exits 0, or writes its traceback to ``errors_file`` and exits 1."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        body()
        status = 0
    except BaseException:  # noqa: B902 - reported to the parent through the file and the status
        errors_file.write_text(traceback.format_exc())
    finally:
        os._exit(status)  # never back into pytest; no atexit, no buffered output twice


def watch_checkouts(db: mqueue.Database, shared_log) -> None:
    """Remember every DBAPI connection the parent checks out; log a child's checkout of one of them.

    A deterministic witness on every backend, SQLite included, where
    sharing does not always show as a protocol error.
    """
    parent, seen = os.getpid(), []

    @event.listens_for(db.engine, "checkout")
    def _checkout(dbapi_connection, _record, _proxy) -> None:
        if os.getpid() == parent:
            if not any(dbapi_connection is known for known in seen):
                seen.append(dbapi_connection)  # kept alive: no other connection reuses its id
        elif any(dbapi_connection is known for known in seen):
            with open(shared_log, "a") as log:
                log.write(f"process {os.getpid()} checked out its parent's connection\n")


@pytest.fixture(params=["url", "adopted engine"])
def app_db(request, db, database_url):
    """The application's Database: built from the URL, or around the application's own engine."""
    if request.param == "url":
        yield db
        return
    engine = create_engine(database_url)
    yield mqueue.Database(engine)
    engine.dispose()


def test_forked_children_never_use_the_parents_pooled_connections(app_db, tmp_path):
    db = app_db
    shared_log = tmp_path / "shared.log"
    watch_checkouts(db, shared_log)
    enqueue(db, "tfork.effect", [{"n": n} for n in range(JOBS)], queue="tfork")
    # Fill the pool: connections checked out together, each used in a transaction, then returned.
    connections = [db.engine.connect() for _ in range(3)]
    for conn in connections:
        with conn.begin():
            conn.execute(select(func.count()).select_from(task_table)).scalar_one()
    for conn in connections:
        conn.close()
    one_transaction(db, "parent before")
    assert db.engine.pool.checkedin() >= 3

    def query(label: str):
        def body() -> None:
            for _ in range(TRANSACTIONS):
                one_transaction(db, label)
        return body

    def work() -> None:
        result = mqueue.Worker(db, queues=["tfork"], concurrency=2, poll_interval=0.05,
                               lease=5).run_until_empty(timeout=30)
        assert (result.succeeded, result.total) == (JOBS, JOBS), result

    children = {fork(tmp_path / f"child-{n}.err", query(f"child {n}")): f"child-{n}"
                for n in range(QUERY_CHILDREN)}
    children[fork(tmp_path / "worker.err", work)] = "worker"

    statuses = {}
    parent_transactions = 0
    while len(statuses) < len(children):
        if parent_transactions < TRANSACTIONS:
            one_transaction(db, "parent")
            parent_transactions += 1
        for pid, name in children.items():
            if name not in statuses:
                done, status = os.waitpid(pid, 0 if parent_transactions >= TRANSACTIONS else os.WNOHANG)
                if done:
                    statuses[name] = os.waitstatus_to_exitcode(status)
    while parent_transactions < TRANSACTIONS:
        one_transaction(db, "parent")
        parent_transactions += 1

    failures = {name: (tmp_path / f"{name}.err").read_text() if (tmp_path / f"{name}.err").exists() else ""
                for name, status in statuses.items() if status != 0}
    assert not failures, f"exit statuses {statuses}:\n" + "\n".join(f"{k}: {v}" for k, v in failures.items())
    assert not shared_log.exists(), shared_log.read_text()
    notes = [row.note for row in effects(db)]
    for n in range(QUERY_CHILDREN):
        assert notes.count(f"child {n}") == TRANSACTIONS
    assert notes.count("parent") == TRANSACTIONS
    assert sorted(n for n in notes if n.startswith("job ")) == sorted(f"job {n}" for n in range(JOBS))
    assert jobs_left(db) == 0 and job_states(db) == {"succeeded": JOBS}


def test_a_session_current_when_forking_is_not_current_in_the_child(db, tmp_path):
    """Its connection is the parent's: the child (a ``multiprocessing`` target, say) opens its own."""
    with db.session() as parents:
        one_transaction(db, "parent")  # joins: the parent's connection is checked out for the block

        def body() -> None:
            assert peek_session() is None
            with db.session() as childs:  # no statement: SQLite's write lock is the parent's now
                assert childs is not parents

        pid = fork(tmp_path / "child.err", body)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert status == 0, (tmp_path / "child.err").read_text()
        assert mqueue.current_session() is parents
    assert [row.note for row in effects(db)] == ["parent"]
