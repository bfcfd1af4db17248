"""``mqueue.run_transaction``: a transaction that lost a race runs again, whole; anything else is raised.

The lost race here is a real lock wait that times out (MariaDB 1205,
PostgreSQL 55P03) on a row another connection holds; on a Galera cluster
the same path handles certification failures (``tests/galera``).
"""

from __future__ import annotations

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DBAPIError

import mqueue
from mqueue.registry import task
from mqueue.schema import task_table

from helpers import note, note_metadata, notes  # noqa: E402 - shared scratch table


@task(name="ttx.noop", queue="ttx")
def noop(n: int) -> None:
    pass


@pytest.fixture
def db(db):
    note_metadata.create_all(db.engine)
    return db


def test_commits_and_returns_what_work_returns(db, observer):
    def work(session):
        session.execute(insert(note).values(text="signed up"))
        return noop.options(unique_key="welcome:1").enqueue(n=1)

    job_id = mqueue.run_transaction(db, work)
    assert notes(observer) == ["signed up"]
    with observer.connect() as conn:
        assert conn.execute(select(task_table.c.id)).scalars().all() == [job_id]
    # Run again (as after a lost race): the enqueue finds the live job and returns its id.
    assert mqueue.run_transaction(db, lambda session: noop.options(unique_key="welcome:1").enqueue(n=1)) == job_id


def test_refused_inside_an_open_session(db, observer):
    with db.session():
        with pytest.raises(RuntimeError, match="outside any db.session"):
            mqueue.run_transaction(db, lambda session: None)


def test_an_error_that_is_no_lost_race_is_raised_at_once(db, observer):
    calls = []

    def work(session):
        calls.append(1)
        session.execute(insert(note).values(text="rolled back"))
        session.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(DBAPIError):
        mqueue.run_transaction(db, work, attempts=5)
    assert len(calls) == 1 and notes(observer) == []


@pytest.mark.backends("mariadb", "postgresql")
def test_a_lost_race_runs_the_whole_transaction_again(db, backend, observer):
    with db.session() as session:
        session.execute(insert(note).values(text="contended"))
    blocker = observer.connect()
    blocker.begin()
    blocker.execute(select(note.c.id).with_for_update())   # holds the row until released
    calls = []

    def work(session):
        calls.append(1)
        if len(calls) == 2:
            blocker.rollback()   # the other transaction is gone: this attempt wins
        session.execute(insert(note).values(text=f"attempt {len(calls)}"))
        if backend == "mariadb":
            session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
        else:
            session.execute(text("SET LOCAL lock_timeout = '300ms'"))
        session.execute(update(note).where(note.c.text == "contended").values(text="updated"))
        return len(calls)

    try:
        assert mqueue.run_transaction(db, work) == 2
    finally:
        blocker.close()
    assert sorted(notes(observer)) == ["attempt 2", "updated"]   # attempt 1 left nothing behind


@pytest.mark.backends("mariadb", "postgresql")
def test_a_race_lost_every_time_raises_the_last_error(db, backend, observer):
    with db.session() as session:
        session.execute(insert(note).values(text="contended"))
    blocker = observer.connect()
    blocker.begin()
    blocker.execute(select(note.c.id).with_for_update())
    calls = []

    def work(session):
        calls.append(1)
        if backend == "mariadb":
            session.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
        else:
            session.execute(text("SET LOCAL lock_timeout = '200ms'"))
        session.execute(update(note).values(text="never"))

    try:
        with pytest.raises(DBAPIError) as raised:
            mqueue.run_transaction(db, work, attempts=2)
    finally:
        blocker.close()
    assert len(calls) == 2 and db.dialect.is_conflict(raised.value)
    assert notes(observer) == ["contended"]
