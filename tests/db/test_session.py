"""db.session(), current_session(), ctx.session and use_session() on every backend.

What a block wrote is checked through a separate plain engine (no mqueue
hooks), so "committed" means another connection can see it.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import create_engine, insert, select

import mqueue
from mqueue.migrate import upgrade
from mqueue.registry import task
from mqueue.schema import task_table

from helpers import note, note_metadata, notes  # noqa: E402 - shared scratch table


@task(name="tsess.noop", queue="tsess")
def noop(label: str) -> None:
    pass


@pytest.fixture
def db(db):
    note_metadata.create_all(db.engine)
    return db


def job_labels(engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(task_table.c.args)).scalars())


def add_note(session, text: str) -> None:
    session.execute(insert(note).values(text=text))


def test_clean_exit_commits(db, observer):
    with db.session() as session:
        add_note(session, "kept")
        assert notes(observer) == []  # not before the block ends
    assert notes(observer) == ["kept"]


def test_exception_rolls_back_and_propagates(db, observer):
    with pytest.raises(ZeroDivisionError):
        with db.session() as session:
            add_note(session, "lost")
            1 / 0
    assert notes(observer) == []
    # The database is usable afterwards.
    with db.session() as session:
        add_note(session, "after")
    assert notes(observer) == ["after"]


def test_base_exceptions_roll_back_too(db, observer):
    with pytest.raises(KeyboardInterrupt):
        with db.session() as session:
            add_note(session, "interrupted")
            raise KeyboardInterrupt
    assert notes(observer) == []


def test_session_is_closed_after_the_block(db):
    with db.session() as session:
        add_note(session, "x")
    assert not session.in_transaction()
    with pytest.raises(mqueue.NoSessionError):
        mqueue.current_session()


def test_nested_session_joins_the_outer_one(db, observer):
    with db.session() as outer:
        add_note(outer, "outer")
        with db.session() as inner:
            assert inner is outer
            assert mqueue.current_session() is outer
            add_note(inner, "inner")
        # The inner block's clean exit committed nothing.
        assert notes(observer) == []
        assert mqueue.current_session() is outer
        assert outer.in_transaction()
    assert notes(observer) == ["inner", "outer"]


def test_error_in_nested_session_rolls_back_the_whole_outer_one(db, observer):
    with pytest.raises(RuntimeError, match="inner failed"):
        with db.session() as outer:
            add_note(outer, "outer")
            with db.session() as inner:
                add_note(inner, "inner")
                raise RuntimeError("inner failed")
    assert notes(observer) == []


def test_current_session_and_ctx_inside(db):
    with db.session() as session:
        assert mqueue.current_session() is session
        assert mqueue.ctx.session is session
        assert mqueue.current_session().get_bind() is db.engine


def test_no_session_outside_says_how_to_open_one():
    with pytest.raises(mqueue.NoSessionError) as caught:
        mqueue.current_session()
    message = str(caught.value)
    assert "db.session()" in message
    assert "use_session" in message
    assert "mqueue.init" in message
    with pytest.raises(mqueue.NoSessionError):
        mqueue.ctx.session
    assert issubclass(mqueue.NoSessionError, mqueue.MQueueError)


def test_use_session_never_commits_the_callers_session(db, observer):
    session = db.Session()
    try:
        with mqueue.use_session(session) as current:
            assert current is session
            assert mqueue.current_session() is session
            assert mqueue.ctx.session is session
            add_note(session, "caller's")
            noop.enqueue("from use_session")
        assert notes(observer) == []
        assert job_labels(observer) == []
        assert session.in_transaction()
        session.rollback()
        assert notes(observer) == []
        assert job_labels(observer) == []
    finally:
        session.close()
    with pytest.raises(mqueue.NoSessionError):
        mqueue.current_session()


def test_use_session_leaves_commit_to_the_caller(db, observer):
    session = db.Session()
    try:
        with mqueue.use_session(session):
            noop.enqueue("committed by the caller")
        session.commit()
        assert len(job_labels(observer)) == 1
    finally:
        session.close()


def test_use_session_does_not_roll_back_or_close_on_an_exception(db, observer):
    session = db.Session()
    try:
        with pytest.raises(ValueError):
            with mqueue.use_session(session):
                add_note(session, "survives")
                raise ValueError("in the caller's code")
        assert session.in_transaction()
        # Still usable: the pending insert is there and can be committed.
        assert session.execute(select(note.c.text)).scalars().all() == ["survives"]
        session.commit()
        assert notes(observer) == ["survives"]
    finally:
        session.close()


def test_db_session_inside_use_session_joins_and_does_not_commit(db, observer):
    session = db.Session()
    try:
        with mqueue.use_session(session):
            with db.session() as inner:
                assert inner is session
                add_note(inner, "joined")
        assert notes(observer) == []
        assert session.in_transaction()
        session.rollback()
        assert notes(observer) == []
    finally:
        session.close()


def test_use_session_restores_the_previous_session(db):
    other = db.Session()
    try:
        with db.session() as outer:
            with mqueue.use_session(other):
                assert mqueue.current_session() is other
            assert mqueue.current_session() is outer
    finally:
        other.close()


def test_threads_never_see_each_others_session(db, observer):
    barrier = threading.Barrier(3, timeout=20)
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def with_session(label: str) -> None:
        try:
            with db.session() as session:
                barrier.wait()  # all three threads are inside at once
                seen[label] = (session, mqueue.current_session(), mqueue.ctx.session)
                barrier.wait()
                add_note(session, label)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    def without_session() -> None:
        try:
            barrier.wait()
            try:
                mqueue.current_session()
            except mqueue.NoSessionError:
                seen["none"] = "NoSessionError"
            barrier.wait()
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
            barrier.abort()

    with db.session() as main_session:  # the main thread's own session is invisible to all of them
        threads = [threading.Thread(target=with_session, args=(label,)) for label in ("a", "b")]
        threads.append(threading.Thread(target=without_session))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert mqueue.current_session() is main_session
    assert errors == []
    a, b = seen["a"], seen["b"]
    assert a[0] is a[1] is a[2]
    assert b[0] is b[1] is b[2]
    assert a[0] is not b[0]
    assert main_session not in (a[0], b[0])
    assert seen["none"] == "NoSessionError"
    assert notes(observer) == ["a", "b"]


def test_asyncio_tasks_never_see_each_others_session(db):
    async def one(label: str, inside: asyncio.Event, others: list[asyncio.Event], seen: dict) -> None:
        with db.session() as session:
            inside.set()
            for event in others:  # every task is inside its own block now
                await event.wait()
            await asyncio.sleep(0)
            seen[label] = (session, mqueue.current_session(), mqueue.ctx.session)

    async def bystander(events: list[asyncio.Event], seen: dict) -> None:
        for event in events:
            await event.wait()
        try:
            mqueue.current_session()
        except mqueue.NoSessionError:
            seen["none"] = True

    async def main() -> dict:
        seen: dict = {}
        events = [asyncio.Event() for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(
            *(one(str(i), events[i], events, seen) for i in range(3)), bystander(events, seen)), 20)
        return seen

    seen = asyncio.run(main())
    sessions = [seen[str(i)][0] for i in range(3)]
    for i in range(3):
        assert seen[str(i)][0] is seen[str(i)][1] is seen[str(i)][2]
    assert len({id(s) for s in sessions}) == 3
    assert seen["none"] is True


def test_database_accepts_an_engine(database_url, observer):
    engine = create_engine(database_url)
    try:
        db = mqueue.Database(engine)
        assert db.engine.pool is engine.pool  # the same connections (MySQL: with READ COMMITTED set)
        upgrade(db)
        note_metadata.create_all(engine)
        with db.session() as session:
            assert session.get_bind().pool is engine.pool
            add_note(session, "through an engine")
            noop.enqueue("engine")
        assert notes(observer) == ["through an engine"]
        assert len(job_labels(observer)) == 1
    finally:
        engine.dispose()


def test_repr_hides_the_password():
    db = mqueue.Database("postgresql+psycopg://app:hunter2@db.example.com/app")
    try:
        assert "hunter2" not in repr(db)
        assert "hunter2" not in db.safe_url
        assert "***" in db.safe_url
    finally:
        db.dispose()
