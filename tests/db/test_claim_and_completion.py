"""``Dialect.claim`` and ``Dialect.complete_many``: the worker's claim and its batched completions.

Each commits before it returns, on every backend.  A batch of jobs all
still held, without dependents and untracked is completed by one guarded
UPDATE.  On PostgreSQL each is one statement on its own (autocommit) in the
common case: the claim for an idle poll and for a batch from one priority
level, and that completion.  The
transactional paths (``claim_jobs``, ``complete_jobs``) run only when
needed: a chosen job that needs more writes than the claim (a tracked
job's ``popped`` event, a job past its expiry), a first level that gave
fewer jobs than asked while another level has due ones, a lost lease, a
dependent to release, a ``succeeded`` event to publish.  These tests hold
every backend to the same results, and count the statements.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import event, insert, select

from mqueue import admin
from mqueue.dialects.base import MAX_LEVELS
from mqueue.schema import EXPIRED, QUEUED, RUNNING, SUCCEEDED, WAITING, event_table, task_table

QUEUE = "claims"
OWNER = "host:1:claim"


def add(db, priority: int = 0, seconds_ago: float = 10.0, **values) -> int:
    with db.engine.begin() as conn:
        now = db.dialect.db_now(conn)
        row = dict(queue=QUEUE, name="claims.job", args="{}", priority=priority,
                   eta=now - dt.timedelta(seconds=seconds_ago), **values)
        return conn.execute(insert(task_table).values(**row).returning(task_table.c.id)).scalar_one()


def claim(db, limit: int):
    return db.dialect.claim(db.engine, QUEUE, limit, OWNER, 60)


def count_statements(db, action):
    """``action()``'s result and the statements it sent (their text)."""
    executed = []
    listener = lambda *args: executed.append(args[2])  # noqa: E731 - the statement text
    event.listen(db.engine, "before_cursor_execute", listener)
    try:
        return action(), executed
    finally:
        event.remove(db.engine, "before_cursor_execute", listener)


def states(db, ids) -> dict[int, str]:
    with db.engine.connect() as conn:
        rows = conn.execute(select(task_table.c.id, task_table.c.state).where(task_table.c.id.in_(ids)))
        return dict(rows.all())


def test_priorities_first_then_oldest_across_levels(db, backend):
    high = [add(db, priority=5, seconds_ago=s) for s in (20, 10)]
    low = [add(db, priority=0, seconds_ago=s) for s in (30, 20, 10)]
    future = add(db, priority=9, seconds_ago=-3600)       # a higher level with nothing due
    rows = claim(db, 4)
    assert [row.id for row in rows] == high + low[:2]
    assert all(row.token == 1 and not row.expired for row in rows)
    assert states(db, high + low + [future]) == {**{i: RUNNING for i in high + low[:2]},
                                                  low[2]: QUEUED, future: QUEUED}
    assert [row.id for row in claim(db, 4)] == [low[2]]
    assert claim(db, 4) == []


def test_a_tracked_job_at_the_head_is_claimed_with_its_popped_event(db, backend):
    tracked = add(db, seconds_ago=20, tracked=1)
    plain = add(db, seconds_ago=10)
    rows = claim(db, 2)
    assert [(row.id, row.tracked) for row in rows] == [(tracked, True), (plain, False)]
    with db.engine.connect() as conn:
        kinds = conn.execute(select(event_table.c.job_id, event_table.c.kind)).all()
    assert [tuple(k) for k in kinds] == [(tracked, "popped")]


def test_a_job_past_its_expiry_is_marked_expired_in_the_claim(db, backend):
    gone = add(db, seconds_ago=20, expires_at=dt.datetime(2000, 1, 1))
    plain = add(db, seconds_ago=10)
    rows = claim(db, 2)
    assert [(row.id, row.expired) for row in rows] == [(gone, True), (plain, False)]
    assert states(db, [gone, plain]) == {gone: EXPIRED, plain: RUNNING}


def test_a_paused_queue_gives_nothing_until_resumed(db, backend):
    job = add(db)
    admin.pause_queue(db, QUEUE)
    assert claim(db, 4) == []
    admin.resume_queue(db, QUEUE)
    assert [row.id for row in claim(db, 4)] == [job]


def test_a_due_job_below_more_levels_than_the_walk_takes_is_found(db, backend):
    with db.engine.begin() as conn:
        now = db.dialect.db_now(conn)
        conn.execute(insert(task_table), [dict(queue=QUEUE, name="claims.job", args="{}", priority=1000 - n,
                                               eta=now + dt.timedelta(hours=1)) for n in range(MAX_LEVELS)])
    due = add(db, priority=-5)
    assert [row.id for row in claim(db, 2)] == [due]


#: Jobs queued before the claim (of 4) whose statements are counted: an idle poll, a batch that
#: fills the limit from one level, and one that takes the last 2 jobs of the queue's only level.
CLAIM_CASES = {"idle": 0, "batch": 6, "last-of-one-level": 2}
#: Statements per claim case.  MariaDB's first statement reads the lowest and the highest level and
#: locks the first level's due jobs at once, so a batch is that SELECT and the UPDATE, and taking the
#: last jobs of the only level needs no probe for a next one.  SQLite's count includes
#: its ``BEGIN IMMEDIATE``; the servers' BEGIN and COMMIT are not statements here.
STATEMENTS = {"sqlite": {"idle": 2, "batch": 3, "last-of-one-level": 3},
              "mysql": {"idle": 1, "batch": 2, "last-of-one-level": 2},
              "postgresql": {"idle": 1, "batch": 1, "last-of-one-level": 1}}


@pytest.mark.parametrize("case", list(CLAIM_CASES))
def test_statements_per_claim(db, backend, case):
    for _ in range(CLAIM_CASES[case]):
        add(db)
    rows, executed = count_statements(db, lambda: claim(db, 4))
    assert len(rows) == min(CLAIM_CASES[case], 4)
    assert len(executed) == STATEMENTS[db.dialect.name][case], executed


def claimed_pairs(db, count: int, **values) -> list[tuple[int, int]]:
    for _ in range(count):
        add(db, **values)
    return [(row.id, row.token) for row in claim(db, count)]


#: Statements of a batched completion of held jobs (SQLite's includes ``BEGIN IMMEDIATE``).
COMPLETION_STATEMENTS = {"sqlite": 2, "mysql": 1, "postgresql": 1}


def test_a_batch_of_held_jobs_is_completed_at_once(db, backend):
    pairs = claimed_pairs(db, 5)
    (lost, gone), executed = count_statements(db, lambda: db.dialect.complete_many(db.engine, pairs))
    assert (lost, gone) == ([], [])
    assert states(db, [i for i, _ in pairs]) == {i: SUCCEEDED for i, _ in pairs}
    assert len(executed) == COMPLETION_STATEMENTS[db.dialect.name], executed


def test_a_lost_lease_in_the_batch_is_reported_and_the_others_complete(db, backend):
    pairs = claimed_pairs(db, 3)
    stale = (pairs[1][0], pairs[1][1] - 1)              # an earlier run's token: its lease was lost
    lost, gone = db.dialect.complete_many(db.engine, [pairs[0], stale, pairs[2]])
    assert (lost, gone) == ([stale[0]], [])
    assert states(db, [i for i, _ in pairs]) == {pairs[0][0]: SUCCEEDED, stale[0]: RUNNING,
                                                 pairs[2][0]: SUCCEEDED}
    # Completed already under this token (a COMMIT whose reply was lost): lost here, and gone.
    assert db.dialect.complete_many(db.engine, [pairs[0]]) == ([pairs[0][0]], [pairs[0][0]])


def test_a_completion_in_the_batch_releases_its_dependents(db, backend):
    pairs = claimed_pairs(db, 2)
    waiting = add(db, state=WAITING, pending_deps=1)
    with db.engine.begin() as conn:
        db.dialect.add_dependencies(conn, waiting, [pairs[0][0]])
    assert db.dialect.complete_many(db.engine, pairs) == ([], [])
    assert states(db, [i for i, _ in pairs] + [waiting]) == {pairs[0][0]: SUCCEEDED, pairs[1][0]: SUCCEEDED,
                                                             waiting: QUEUED}


def test_a_tracked_job_in_the_batch_publishes_succeeded(db, backend):
    pairs = claimed_pairs(db, 1, tracked=1) + claimed_pairs(db, 1)
    assert db.dialect.complete_many(db.engine, pairs, tracked=[pairs[0][0]]) == ([], [])
    with db.engine.connect() as conn:
        kinds = conn.execute(select(event_table.c.job_id, event_table.c.kind).order_by(event_table.c.id)).all()
    assert [tuple(k) for k in kinds] == [(pairs[0][0], "popped"), (pairs[0][0], "succeeded")]


# -- PostgreSQL: the claim and the batched completion go straight to the driver's cursor ---------
@pytest.mark.backends("postgresql")
def test_a_connection_lost_under_the_claim_is_an_error_and_replaced(db, backend, database_url):
    """A killed session gives SQLAlchemy's DBAPIError (what the worker's outage handling reads),
    the dead connection leaves the pool, and the next claim gets the job."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError
    job_id = add(db)
    with db.engine.connect() as conn:   # the one pooled connection the claim will check out
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    killer = create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with killer.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), dict(pid=pid)).scalar_one()
    finally:
        killer.dispose()
    with pytest.raises(DBAPIError) as raised:
        claim(db, 1)
    assert raised.value.connection_invalidated
    assert db.dialect.is_transient(raised.value)
    assert [row.id for row in claim(db, 1)] == [job_id]


@pytest.mark.backends("postgresql")
def test_an_error_in_a_driver_statement_leaves_its_connection_transactional(db, backend, database_url):
    """After a failed statement in autocommit the pooled connection is switched back: the next
    transaction on it rolls back as a whole."""
    from sqlalchemy import bindparam, create_engine, literal
    from sqlalchemy.exc import DBAPIError
    from mqueue.dialects.driver import DriverStatement
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        divide = DriverStatement(select((literal(1) / bindparam("by")).label("quotient")), ("by",))
        assert divide.run(engine, dict(by=1))[0].quotient == 1
        with pytest.raises(DBAPIError) as raised:
            divide.run(engine, dict(by=0))
        assert not raised.value.connection_invalidated
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection.autocommit is False
            conn.execute(insert(task_table).values(queue=QUEUE, name="claims.job", args="{}"))
            conn.rollback()
        with db.engine.connect() as conn:
            assert conn.execute(select(task_table.c.id)).all() == []
    finally:
        engine.dispose()


def test_a_driver_statement_runs_through_sqlalchemy_on_other_drivers(db, backend, database_url):
    """Only psycopg's cursor is used directly; elsewhere the statement goes through ``Connection.execute``."""
    from types import SimpleNamespace
    from sqlalchemy import bindparam, create_engine, literal
    from mqueue.dialects.driver import DriverStatement
    engine = create_engine(database_url)
    try:
        divide = DriverStatement(select((literal(6) / bindparam("by")).label("quotient")), ("by",))
        rows, executed = count_statements(SimpleNamespace(engine=engine), lambda: divide.run(engine, dict(by=3)))
        assert rows[0].quotient == 2 and len(executed) == 1
    finally:
        engine.dispose()


# -- claim_and_complete: the producer's claim that also completes the jobs finished since the last one --

#: The completion's one guarded UPDATE, then the claim's statements, in one transaction (SQLite's
#: one ``BEGIN IMMEDIATE`` included): the level probe(s) and the claim (MariaDB: SELECT, UPDATE).
CLAIM_AND_COMPLETE_STATEMENTS = {"sqlite": 4, "mysql": 3, "postgresql": 3}


def claim_and_complete(db, limit: int, pairs, tracked=()):
    return db.dialect.claim_and_complete(db.engine, QUEUE, limit, OWNER, 60, pairs, tracked)


def test_a_claim_completes_a_finished_batch_in_its_transaction(db, backend):
    pairs = claimed_pairs(db, 3)
    queued = [add(db) for _ in range(2)]
    (rows, lost), executed = count_statements(db, lambda: claim_and_complete(db, 4, pairs))
    assert lost == []
    assert sorted(row.id for row in rows) == queued
    assert states(db, [i for i, _ in pairs] + queued) == {**{i: SUCCEEDED for i, _ in pairs},
                                                          **{i: RUNNING for i in queued}}
    assert len(executed) == CLAIM_AND_COMPLETE_STATEMENTS[db.dialect.name], executed


def test_a_lost_lease_in_the_claims_batch_is_reported_and_the_rest_completes(db, backend):
    pairs = claimed_pairs(db, 3)
    stale = (pairs[1][0], pairs[1][1] - 1)
    waiting = add(db, state=WAITING, pending_deps=1)
    with db.engine.begin() as conn:
        db.dialect.add_dependencies(conn, waiting, [pairs[2][0]])
    queued = add(db)
    rows, lost = claim_and_complete(db, 4, [pairs[0], stale, pairs[2]])
    assert lost == [stale[0]]
    # The dependent the completion released is due at once: the same claim takes it.
    assert sorted(row.id for row in rows) == [waiting, queued]
    assert states(db, [i for i, _ in pairs] + [waiting, queued]) == {
        pairs[0][0]: SUCCEEDED, stale[0]: RUNNING, pairs[2][0]: SUCCEEDED, waiting: RUNNING, queued: RUNNING}


def test_a_tracked_job_completed_by_a_claim_publishes_succeeded(db, backend):
    pairs = claimed_pairs(db, 1, tracked=1) + claimed_pairs(db, 1)
    rows, lost = claim_and_complete(db, 4, pairs, tracked=[pairs[0][0]])
    assert (rows, lost) == ([], [])
    with db.engine.connect() as conn:
        kinds = conn.execute(select(event_table.c.job_id, event_table.c.kind).order_by(event_table.c.id)).all()
    assert [tuple(k) for k in kinds] == [(pairs[0][0], "popped"), (pairs[0][0], "succeeded")]
    assert states(db, [i for i, _ in pairs]) == {i: SUCCEEDED for i, _ in pairs}
