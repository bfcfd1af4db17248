"""Job-state transitions under hostile conditions: long enqueuing transactions,
big rows, many scheduled jobs, rows written by hand.

Each test names the issue it guards against; the rows are written either
through the dialect's own transitions (as a worker would) or by hand with
plain SQL (as an operator might).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pytest
from sqlalchemy import insert, select, text, update

import mqueue
from mqueue import admin
from mqueue.dialects.functions import utc_now
from mqueue.errors import InvalidStateError
from mqueue.schema import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, task_table

t = task_table
QUEUE = "thard"


@mqueue.task(name="thard.ok", queue=QUEUE)
def ok(n: int = 0) -> None:
    pass


def add(db, unique_key=None, priority=0, eta=None, queue=QUEUE, name="thard.ok", args="{}") -> int:
    values = dict(queue=queue, name=name, args=args, priority=priority)
    if eta is not None:
        values["eta"] = utc_now(eta)
    with db.session() as session:
        if unique_key is None:
            return db.dialect.insert_job(session, values)
        return db.dialect.insert_unique(session, dict(values, unique_key=unique_key))


def claim(db, limit=1, queue=QUEUE):
    with db.session() as session:
        return db.dialect.claim_jobs(session, queue, limit, "host:1:test", 60)


def row_of(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(t).where(t.c.id == job_id)).first()


# -- issue 10 item 5: a unique enqueue holds no lock on the live job ---------------------------

@pytest.mark.backends("mariadb", "postgresql")  # SQLite has one writer: any open write transaction blocks all
def test_an_open_unique_enqueue_does_not_block_the_live_jobs_heartbeat_or_completion(db, database_url):
    live = add(db, unique_key="report:7")
    [row] = claim(db)
    worker_db = mqueue.Database(database_url, **db.dialect.worker_engine_options(2, lease_seconds=4))
    enqueuer = db.Session()
    done: list = []

    def finish_the_running_job():
        with worker_db.session() as session:
            done.append(worker_db.dialect.heartbeat_jobs(session.connection(), [(row.id, row.token)], 4))
            done.append(worker_db.dialect.complete_job(session.connection(), row.id, row.token))

    try:
        # A long script's transaction: it enqueues the same key and stays open.
        assert db.dialect.insert_unique(enqueuer, dict(queue=QUEUE, name="thard.ok", args="{}",
                                                       unique_key="report:7")) == live
        worker = threading.Thread(target=finish_the_running_job)
        started = time.monotonic()
        worker.start()
        worker.join(3)
        assert done == [[], True], "the running job's heartbeat/completion waited for the enqueuer"
        assert time.monotonic() - started < 3
    finally:
        enqueuer.rollback()
        enqueuer.close()
        worker.join(30)
        worker_db.dispose()
    done = row_of(db, live)
    assert (done.state, done.unique_key) == (SUCCEEDED, None)
    # The key is free again: the next enqueue makes a new job.
    assert add(db, unique_key="report:7") != live


def test_a_unique_enqueue_after_the_live_job_finished_makes_a_new_job(db):
    first = add(db, unique_key="k1")
    assert add(db, unique_key="k1") == first
    [row] = claim(db)
    with db.session() as session:
        assert db.dialect.complete_job(session.connection(), row.id, row.token)
    assert (row_of(db, first).state, row_of(db, first).unique_key) == (SUCCEEDED, None)
    second = add(db, unique_key="k1")
    assert second != first
    assert row_of(db, second).unique_key == "k1"


@pytest.mark.backends("mariadb")
def test_a_unique_enqueue_in_an_old_repeatable_read_snapshot_finds_the_live_job(db):
    """An application's REPEATABLE READ session that read before the live job committed
    cannot see it with a plain read: the enqueue still returns its id, not an error."""
    app = db.engine.execution_options(isolation_level="REPEATABLE READ")
    with app.connect() as conn, conn.begin():
        conn.execute(select(t.c.id)).all()  # the snapshot starts here
        live = add(db, unique_key="rr:1")
        values = dict(queue=QUEUE, name="thard.ok", args="{}", unique_key="rr:1")
        assert db.dialect.insert_unique(conn, values) == live


@pytest.mark.backends("mariadb", "postgresql")
def test_a_worker_engine_bounds_lock_waits_below_the_lease(db, database_url, backend):
    worker_db = mqueue.Database(database_url, **db.dialect.worker_engine_options(3, lease_seconds=20))
    tiny_db = mqueue.Database(database_url, **db.dialect.worker_engine_options(1, lease_seconds=0.5))
    try:
        for database, seconds in ((worker_db, 5), (tiny_db, 1)):
            with database.engine.connect() as conn:
                if backend == "mariadb":
                    assert conn.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar() == seconds
                else:
                    assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == f"{seconds}s"
        # An application's own Database keeps the server's setting.
        with db.engine.connect() as conn:
            if backend == "mariadb":
                assert conn.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar() >= 50
            else:
                assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "0"
    finally:
        worker_db.dispose()
        tiny_db.dispose()


# -- issue 10 item 6: 1 MiB of arguments and of error text --------------------------------------

def test_one_mib_of_args_and_error_round_trips(db):
    payload = "é" * (512 * 1024 - 16)  # two bytes each in UTF-8: just under 1 MiB of JSON
    args = json.dumps({"text": payload}, ensure_ascii=False)
    assert 1_000_000 < len(args.encode()) <= 1_048_576
    job_id = add(db, args=args)
    [row] = claim(db)
    assert row.id == job_id and row.args == args
    error = "x" * 1_048_576
    with db.session() as session:
        assert db.dialect.fail_job(session.connection(), row.id, row.token, error)
    stored = row_of(db, job_id)
    assert stored.args == args
    assert stored.last_error == error


# -- issue 10 item 14: retry restores the unique key ------------------------------------------

def fail_for_good(db, job_id):
    [row] = claim(db)
    assert row.id == job_id
    with db.session() as session:
        assert db.dialect.fail_job(session.connection(), row.id, row.token, "ValueError: no")


def test_retry_of_a_failed_job_restores_its_unique_key(db):
    job_id = add(db, unique_key="sync:1")
    fail_for_good(db, job_id)
    assert row_of(db, job_id).unique_key is None  # a new job may take the key meanwhile
    assert admin.get_job(db, job_id).unique_key == "sync:1"

    retried = admin.retry_job(db, job_id)
    assert (retried.state, retried.unique_key, retried.retries) == (QUEUED, "sync:1", 0)
    assert row_of(db, job_id).unique_key == "sync:1"
    assert add(db, unique_key="sync:1") == job_id  # the key is live again


def test_retry_when_a_live_job_holds_the_key_says_which_and_changes_nothing(db):
    old = add(db, unique_key="sync:2")
    fail_for_good(db, old)
    plain = add(db)
    fail_for_good(db, plain)
    new = add(db, unique_key="sync:2")
    assert new != old
    with pytest.raises(InvalidStateError) as caught:
        admin.retry_job(db, old)
    message = str(caught.value)
    assert f"job {old}" in message and f"live job {new}" in message and "sync:2" in message
    assert "\n" not in message
    assert row_of(db, old).state == FAILED
    # retry --all-failed leaves it failed too, and retries the others.
    assert admin.retry_failed(db, QUEUE) == 1
    assert (row_of(db, old).state, row_of(db, plain).state) == (FAILED, QUEUED)
    # Once the holder is gone the retry restores the key.
    admin.cancel_job(db, new)
    assert admin.retry_job(db, old).unique_key == "sync:2"


def test_a_job_rescued_for_good_keeps_its_key_for_retry(db):
    job_id = add(db, unique_key="sync:3")
    with db.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == job_id).values(max_retries=0))
    claim(db)
    with db.engine.begin() as conn:  # its worker died long ago
        conn.execute(update(t).where(t.c.id == job_id).values(lease_expires_at=utc_now(-5)))
        assert db.dialect.rescue_expired(conn, [QUEUE]) == 1
    stored = row_of(db, job_id)
    assert (stored.state, stored.unique_key, stored.failed_unique_key) == (FAILED, None, "sync:3")
    assert admin.retry_job(db, job_id).unique_key == "sync:3"


# -- issue 10 item 15: claims stay cheap with many scheduled jobs -----------------------------

SCHEDULED = 20_000


def fill_scheduled(db, count=SCHEDULED):
    """``count`` jobs due in an hour at priority 0 and 3, plus due jobs at priorities 3, 0 and -2."""
    now = db_now(db)
    later = now + dt.timedelta(hours=1)
    rows = [dict(queue=QUEUE, name="thard.ok", args="{}", priority=(i % 2) * 3, eta=later + dt.timedelta(seconds=i))
            for i in range(count)]
    with db.engine.begin() as conn:
        for start in range(0, count, 5000):
            conn.execute(insert(t), rows[start:start + 5000])
    due = {}
    for priority, age in ((0, 30), (0, 20), (3, 5), (-2, 60), (3, 10)):
        due[(priority, age)] = add(db, priority=priority, eta=-age)
    return due


def db_now(db):
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def claim_cost(db, backend, limit):
    """Claim ``limit`` jobs in one transaction; return (rows, index entries or pages read)."""
    with db.engine.connect() as conn, conn.begin():
        if backend == "mariadb":
            def reads():  # index entries read, also those index condition pushdown skipped
                return sum(int(v) for k, v in conn.exec_driver_sql(
                    "SHOW SESSION STATUS WHERE Variable_name LIKE 'Handler_read%%' "
                    "OR Variable_name = 'Handler_icp_attempts'").all())
        elif backend == "postgresql":
            def reads():
                return conn.exec_driver_sql(
                    "SELECT pg_stat_get_xact_blocks_fetched('ix_mqueue_task_queue_state_neg_priority_eta_id'"
                    "::regclass)").scalar()
        else:
            def reads():
                return 0
        before = reads()
        rows = db.dialect.claim_jobs(conn, QUEUE, limit, "host:1:test", 60)
        return rows, reads() - before


def test_a_claim_takes_priority_then_eta_then_id_and_only_due_jobs_among_many_scheduled(db, backend):
    due = fill_scheduled(db)
    rows, cost = claim_cost(db, backend, 10)
    assert [row.id for row in rows] == [due[(3, 10)], due[(3, 5)], due[(0, 30)], due[(0, 20)], due[(-2, 60)]]
    # Measured before the level walk: MariaDB ~40,000 handler reads, PostgreSQL ~200 index pages.
    assert cost < 200, cost
    idle, cost = claim_cost(db, backend, 10)
    assert idle == []
    assert cost < 100, cost


@pytest.mark.backends("mariadb", "postgresql")
def test_an_idle_poll_reads_no_future_rows(db, backend):
    fill_scheduled(db)
    claim_cost(db, backend, 10)  # take the due ones
    _, small = claim_cost(db, backend, 10)
    with db.engine.begin() as conn:  # ten times the scheduled rows
        conn.execute(insert(t), [dict(queue=QUEUE, name="thard.ok", args="{}", priority=0,
                                      eta=dt.datetime(2100, 1, 1) + dt.timedelta(seconds=i)) for i in range(5000)])
    _, after = claim_cost(db, backend, 10)
    assert after <= small + 10, (small, after)


@pytest.mark.backends("sqlite")
def test_sqlite_claim_plan_is_an_index_range_on_eta_within_one_level(db):
    from mqueue.dialects.base import PRIORITY_LEVELS
    statements = [db.dialect.claim_statement, PRIORITY_LEVELS]
    with db.engine.connect() as conn:
        plans = []
        for statement in statements:
            compiled = statement.compile(dialect=conn.dialect)
            params = dict(compiled.params, from_queue=QUEUE, level=0, limit=1, new_owner="x", lease_seconds=1.0)
            plans.append([row[3] for row in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(compiled), tuple(params[k] for k in compiled.positiontup)).all()])
    claim_plan, level_plan = plans
    assert any("ix_mqueue_task_queue_state_neg_priority_eta_id (queue=? AND state=? AND neg_priority=? AND eta<?)"
               in step for step in claim_plan), claim_plan
    assert not any(step.startswith("SCAN mqueue_task") for step in claim_plan + level_plan), plans
    assert any("neg_priority>?" in step for step in level_plan), level_plan


# -- issue 10 item 18: hand-written times on SQLite -----------------------------------------

@pytest.mark.backends("sqlite")
def test_hand_written_times_on_sqlite_never_stop_the_queue(db):
    good = [add(db, args=json.dumps({"n": i})) for i in range(200)]
    odd_etas = [1_600_000_000, "2020-01-01T00:00:00Z", "2020-01-01T02:00:00+02:00", "2020-01-01 00:00:00",
                1_600_000_000.5]
    with db.engine.begin() as conn:
        for eta in odd_etas:
            conn.execute(text("INSERT INTO mqueue_task (queue, name, args, eta) VALUES (:q, 'thard.ok', '{}', :eta)"),
                         dict(q=QUEUE, eta=eta))
        conn.execute(text("INSERT INTO mqueue_task (queue, name, args, created_at) "
                          "VALUES (:q, 'thard.ok', '{}', 'not a time')"), dict(q=QUEUE))
        conn.execute(text("INSERT INTO mqueue_task (queue, name, args, created_at) "
                          "VALUES (:q, 'thard.ok', '{}', 1600000000)"), dict(q=QUEUE))
        conn.execute(text("INSERT INTO mqueue_task (queue, name, args, eta) VALUES (:q, 'thard.ok', '{}', 'soon')"),
                     dict(q=QUEUE))
    listed = admin.list_jobs(db, queue=QUEUE, limit=1000)
    assert len(listed) == 208
    assert {job.eta for job in listed if job.id > good[-1]} >= {dt.datetime(2020, 9, 13, 12, 26, 40),
                                                                dt.datetime(2020, 1, 1)}
    result = mqueue.Worker(db, queues=[QUEUE], concurrency=2, poll_interval=0.05).run_until_empty(timeout=60)
    assert (result.succeeded, result.failed) == (207, 0)
    assert len(admin.list_jobs(db, queue=QUEUE, state=SUCCEEDED, limit=1000)) == 207
    [unreadable] = [job for job in admin.list_jobs(db, queue=QUEUE, limit=1000) if job.state != SUCCEEDED]
    assert (unreadable.state, unreadable.eta) == (FAILED, None)
    assert unreadable.error_summary.startswith("eta 'soon' is not a time; write UTC as")


# -- issue 10 item 20: rows in states the claim never sees ------------------------------------

def test_a_running_row_without_a_lease_counts_as_expired(db):
    job_id = add(db)
    with db.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == job_id).values(state=RUNNING, lease_expires_at=None))
    with db.engine.begin() as conn:
        assert db.dialect.rescue_expired(conn, [QUEUE]) == 1
    stored = row_of(db, job_id)
    assert (stored.state, stored.retries) == (QUEUED, 1)
    assert "lease expired" in stored.last_error


def test_cancel_and_retry_act_on_leaseless_running_rows_and_unknown_states(db):
    leaseless, paused, other = add(db), add(db), add(db)
    with db.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == leaseless).values(state=RUNNING, lease_expires_at=None))
        conn.execute(update(t).where(t.c.id.in_([paused, other])).values(state="paused", eta=utc_now(3600)))
    [stats] = [s for s in admin.stats(db) if s.queue == QUEUE]
    assert (stats.queued, stats.scheduled, stats.running, stats.failed, stats.other) == (0, 0, 1, 0, 2)
    assert {job.id: job.state for job in admin.list_jobs(db, queue=QUEUE)} == {
        leaseless: RUNNING, paused: "paused", other: "paused"}

    retried = admin.retry_job(db, paused)
    assert (retried.state, retried.retries) == (QUEUED, 0)
    assert retried.eta <= db_now(db)
    assert admin.retry_job(db, leaseless).state == QUEUED
    assert admin.cancel_job(db, other).state == "paused"
    assert row_of(db, other).state == CANCELED
    with db.engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == leaseless).values(state=RUNNING, lease_expires_at=None))
    assert admin.cancel_job(db, leaseless).id == leaseless
    assert row_of(db, leaseless).state == CANCELED
    # A running job with a lease is still refused.
    [row] = claim(db)
    with pytest.raises(InvalidStateError):
        admin.cancel_job(db, row.id)


@pytest.mark.backends("sqlite")
def test_hand_written_etas_on_sqlite_keep_their_meaning(db, backend):
    """Epoch seconds in the future wait; ISO text with T/Z from a minute ago is due now (not tomorrow)."""
    now = db_now(db)
    soon = now - dt.timedelta(seconds=60)
    future_epoch = int((now + dt.timedelta(hours=1)).replace(tzinfo=dt.timezone.utc).timestamp())
    with db.engine.begin() as conn:
        insert_eta = text("INSERT INTO mqueue_task (queue, name, args, eta) VALUES (:q, 'thard.ok', '{}', :eta)")
        conn.execute(insert_eta, dict(q=QUEUE, eta=future_epoch))
        conn.execute(insert_eta, dict(q=QUEUE, eta=soon.strftime("%Y-%m-%dT%H:%M:%SZ")))
        conn.execute(insert_eta, dict(q=QUEUE, eta=(soon + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")))
        conn.execute(insert_eta, dict(q=QUEUE, eta="not a time"))
    job = add(db, eta=3600)
    with db.engine.begin() as conn:  # and when an operator sets it by hand
        conn.execute(text("UPDATE mqueue_task SET eta = :eta WHERE id = :id"),
                     dict(eta=soon.strftime("%Y-%m-%dT%H:%M:%S"), id=job))
    rows = claim(db, limit=10)
    assert [row.id for row in rows] == [2, 3, job]
    assert {job.id: job.eta for job in admin.list_jobs(db, queue=QUEUE)} == {
        1: dt.datetime.fromtimestamp(future_epoch, dt.timezone.utc).replace(tzinfo=None),
        2: soon.replace(microsecond=0), 3: soon.replace(microsecond=0), 4: None,
        job: soon.replace(microsecond=0)}
    assert admin.get_job(db, 4).state == FAILED
    assert admin.retry_job(db, 4).eta <= db_now(db)  # retry makes it due now, in the layout SQLite compares
    assert claim(db)[0].id == 4


def test_insert_jobs_of_rows_that_differ_in_more_than_args_keeps_each_rows_values_and_order(db):
    """``insert_jobs`` sends the columns other than ``args`` once when every row shares them; rows
    that do not (not one TaskCall's) take the row-by-row batch, each with its own values."""
    rows = [dict(queue=QUEUE, name="thard.ok", args=json.dumps({"n": n}), priority=n % 3) for n in range(30)]
    rows[7]["queue"] = "thard-other"
    with db.session() as session:
        ids = db.dialect.insert_jobs(session, rows)
    assert ids == sorted(ids) and len(set(ids)) == 30
    with db.engine.connect() as conn:
        stored = {r.id: r for r in conn.execute(select(t.c.id, t.c.queue, t.c.args, t.c.priority))}
    assert [(stored[i].queue, json.loads(stored[i].args)["n"], stored[i].priority) for i in ids] == \
        [(row["queue"], n, n % 3) for n, row in enumerate(rows)]
    assert db.dialect.shared_values(rows) is None
    assert db.dialect.shared_values(rows[9:10]) == dict(queue=QUEUE, name="thard.ok", priority=0)
