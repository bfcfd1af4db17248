"""A session of any ``Database`` on the current session's database joins it.

The application keeps its own ``mqueue.Database`` while the worker (or the
CLI) builds another on the same URL.  Inside a running job, a block on the
application's handle must write into the job's transaction, fenced with the
job's completion, never commit on its own (issue 10, item 4).
"""

from __future__ import annotations

import os
import contextlib
import threading

import pytest
from helpers import note, note_metadata, notes
from sqlalchemy import insert, select, update

import mqueue
from mqueue.schema import task_table
from mqueue.session import database_identity

#: The application's own handle, set by the ``app_db`` fixture.
application: list[mqueue.Database] = []
started = threading.Event()
gate = threading.Event()


def add_note(session, text: str) -> None:
    session.execute(insert(note).values(text=text))


@mqueue.task(name="tsh.write_then_raise", queue="tsh", max_retries=3)
def write_then_raise(text: str) -> None:
    with application[0].session() as session:
        add_note(session, text)
    raise RuntimeError("failed after writing through the application's handle")


@mqueue.task(name="tsh.wait_then_write", queue="tsh")
def wait_then_write(text: str) -> None:
    started.set()
    gate.wait(30)
    with application[0].session() as session:
        add_note(session, text)


@mqueue.task(name="tsh.write_and_wait", queue="tsh")
def write_and_wait(text: str) -> None:
    with application[0].session() as session:
        if session is not mqueue.current_session():
            raise AssertionError("the application's handle did not join the job's session")
        add_note(session, text)
    started.set()
    gate.wait(30)
    with application[0].session() as session:
        add_note(session, f"{text} again")


@pytest.fixture
def app_db(db):
    """The application's handle: the ``db`` fixture's Database, with the scratch table."""
    note_metadata.create_all(db.engine)
    application[:] = [db]
    started.clear()
    gate.clear()
    yield db
    gate.set()
    application.clear()


@pytest.fixture
def worker_db(app_db, database_url):
    """The worker's own Database on the same URL, as the CLI builds it."""
    database = mqueue.Database(database_url)
    yield database
    database.dispose()


def job_row(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).first()


def worker(database, **options) -> mqueue.Worker:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 5)
    return mqueue.Worker(database, queues=["tsh"], **options)


# -- outside any job -----------------------------------------------------------------


def test_sessions_of_two_handles_on_one_database_join(app_db, database_url, observer):
    other = mqueue.Database(database_url)
    try:
        with app_db.session() as outer:
            add_note(outer, "outer")
            with other.session() as inner:
                assert inner is outer
                assert mqueue.current_session() is outer
                add_note(inner, "inner")
            assert notes(observer) == []  # the inner block committed nothing
            assert outer.in_transaction()
        assert notes(observer) == ["inner", "outer"]
        with pytest.raises(RuntimeError):
            with other.session() as outer:
                add_note(outer, "lost")
                with app_db.session() as inner:
                    add_note(inner, "lost too")
                    raise RuntimeError("the inner block failed")
        assert notes(observer) == ["inner", "outer"]
    finally:
        other.dispose()


def test_a_handle_joins_a_callers_session_made_current_and_leaves_it_to_the_caller(app_db, database_url,
                                                                                  observer):
    other = mqueue.Database(database_url)
    session = app_db.Session()
    try:
        with mqueue.use_session(session):
            with other.session() as inner:
                assert inner is session
                add_note(inner, "the caller's")
        assert notes(observer) == []
        assert session.in_transaction()
        session.commit()
        assert notes(observer) == ["the caller's"]
    finally:
        session.close()
        other.dispose()


def test_sessions_on_another_database_do_not_join(app_db, tmp_path, observer):
    other = mqueue.Database(f"sqlite:///{tmp_path / 'other.db'}")
    note_metadata.create_all(other.engine)
    try:
        with app_db.session() as outer:
            add_note(outer, "outer")
            with other.session() as inner:
                assert inner is not outer
                assert mqueue.current_session() is inner
                add_note(inner, "elsewhere")
            assert notes(other.engine) == ["elsewhere"]  # committed on its own
            assert mqueue.current_session() is outer
            assert notes(observer) == []
        assert notes(observer) == ["outer"]
    finally:
        other.dispose()


def test_in_memory_sqlite_joins_only_its_own_engine():
    first, second = mqueue.Database("sqlite://"), mqueue.Database("sqlite:///:memory:")
    try:
        with first.session() as outer:
            with first.session() as same:
                assert same is outer
            with second.session() as inner:
                assert inner is not outer
    finally:
        first.dispose()
        second.dispose()


@pytest.mark.parametrize("one, other, same", [
    ("mysql+pymysql://app:pw@127.0.0.1/app", "mysql+pymysql://app:other@127.0.0.1:3306/app?charset=utf8mb4",
     True),
    ("mariadb+pymysql://app@DB.example/app", "mysql+pymysql://app@db.example:3306/app", True),
    ("mysql+pymysql://app@127.0.0.1/app", "mysql+pymysql://app@127.0.0.1:3307/app", False),
    ("mysql+pymysql://app@127.0.0.1/app", "mysql+pymysql://app@127.0.0.1/other", False),
    ("mysql+pymysql://app@127.0.0.1/app", "mysql+pymysql://admin@127.0.0.1/app", False),
    ("mysql+pymysql://app@127.0.0.1/app", "postgresql+psycopg://app@127.0.0.1:3306/app", False),
    ("postgresql+psycopg://app@127.0.0.1/app", "postgresql+psycopg://app@127.0.0.1:5432/app", True),
    ("sqlite:///app.db", f"sqlite:///{os.path.abspath('app.db')}", True),
    ("sqlite:///app.db", "sqlite:///other.db", False),
    ("sqlite:///file:app.db?uri=true", "sqlite:///app.db", True),
    ("sqlite://", "sqlite://", False),
    ("sqlite:///:memory:", "sqlite:///:memory:", False),
    ("sqlite:///file::memory:?uri=true", "sqlite:///file::memory:?uri=true", False),
])
def test_what_counts_as_one_database(one, other, same):
    first, second = mqueue.Database(one), mqueue.Database(other)
    try:
        mine = database_identity(first.engine)
        assert (mine is not None and mine == database_identity(second.engine)) is same
    finally:
        first.dispose()
        second.dispose()


# -- inside a running job --------------------------------------------------------------


def test_a_failed_task_rolls_back_what_it_wrote_through_the_applications_handle(app_db, worker_db, observer):
    with app_db.session():
        job_id = write_then_raise.enqueue("must not stay")
    result = worker(worker_db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried) == (0, 1)
    assert notes(observer) == []
    row = job_row(observer, job_id)
    assert (row.state, row.retries) == ("queued", 1)
    assert "failed after writing" in row.last_error


@contextlib.contextmanager
def task_started(w):
    """Run ``w.run_until_empty`` in a thread; inside the block the task waits at ``gate``.

    Yields a dict that holds the run's ``result`` once the block ends.
    """
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=w.run_until_empty(timeout=30)))
    thread.start()
    try:
        assert started.wait(10), "the task did not start"
        yield outcome
    finally:
        gate.set()
        thread.join(30)
    assert not thread.is_alive()


def test_a_refused_completion_rolls_back_what_the_task_wrote_through_the_applications_handle(
        app_db, worker_db, observer):
    with app_db.session():
        job_id = wait_then_write.enqueue("must not stay")
    with task_started(worker(worker_db)) as outcome:
        # Another worker took the job over meanwhile: the fence must refuse this run's completion.
        with observer.begin() as conn:
            conn.execute(update(task_table).where(task_table.c.id == job_id)
                         .values(token=task_table.c.token + 1))
    result = outcome["result"]
    assert (result.succeeded, result.lost) == (0, 1)
    assert notes(observer) == []
    assert job_row(observer, job_id).state == "running"  # still the other owner's


def test_a_successful_task_commits_its_writes_through_the_applications_handle_once_with_the_job(
        app_db, worker_db, observer):
    with app_db.session():
        job_id = write_and_wait.enqueue("kept")
    with task_started(worker(worker_db)) as outcome:
        assert notes(observer) == []  # not committed apart from the job
        assert job_row(observer, job_id).state == "running"
    assert outcome["result"].succeeded == 1
    assert notes(observer) == ["kept", "kept again"]
    assert (job_row(observer, job_id).state, job_row(observer, job_id).runs) == ("succeeded", 1)
