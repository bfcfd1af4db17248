"""Upgrading to the revision that keeps finished jobs, from revision 1, with jobs in every state
revision 1 knew; and back down to revision 2.

Rows are written with revision 1's columns only, as its code wrote them: a job due now,
a retrying one, a scheduled one, one running under a live lease, one whose worker died
(lease run out), failed ones, and one in a queue no worker serves.  After the upgrade
every job must read as before, each worker's view of its job (owner, token, lease) must
still hold, and workers must take it from there.
"""

from __future__ import annotations

import datetime as dt

import pytest
from alembic import command
from helpers import note, note_metadata, notes
from sqlalchemy import func, insert, inspect, select

import mqueue
from mqueue import admin
from mqueue.migrate import alembic_config, current_revision, upgrade
from mqueue.schema import event_table, task_table

QUEUE = "thm"
IDLE_QUEUE = "thm-idle"
ALIVE = "old-host:101:beef"
DEAD = "dead-host:202:cafe"
#: The columns of ``mqueue_task`` at revision 1 that a writer sets (``neg_priority`` is generated).
REVISION_1 = ("id", "queue", "name", "args", "state", "priority", "eta", "retries", "max_retries", "unique_key",
              "owner", "token", "lease_expires_at", "started_at", "last_error", "created_at")
TRACEBACK = 'Traceback (most recent call last):\n  File "tasks.py", line 1\nValueError: boom\n'


@mqueue.task(name="thm.noop", queue=QUEUE)
def noop(n: int) -> None:
    mqueue.current_session().execute(insert(note).values(text=f"noop {n}"))


@pytest.fixture
def db(database_url):
    database = mqueue.Database(database_url)
    yield database
    database.dispose()


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def revision_1_rows(db) -> dict[int, dict]:
    with db.engine.connect() as conn:
        rows = conn.execute(select(*(task_table.c[name] for name in REVISION_1)).order_by(task_table.c.id)).all()
    return {row.id: row._asdict() for row in rows}


def downgrade(db, revision: str) -> None:
    config = alembic_config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def table_names(db) -> set[str]:
    with db.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def test_upgrade_from_revision_1_keeps_every_job_and_each_workers_view_of_it(db):
    upgrade(db, "mqueue_0001")
    assert current_revision(db) == "mqueue_0001"
    note_metadata.create_all(db.engine)
    now = db_now(db)
    ago = lambda seconds: now - dt.timedelta(seconds=seconds)  # noqa: E731
    jobs = dict(
        due=dict(args='{"n": 1}', eta=ago(10), unique_key="due-1"),
        retrying=dict(args='{"n": 2}', eta=ago(5), priority=5, retries=2, last_error="ValueError: earlier"),
        scheduled=dict(args='{"n": 3}', eta=now + dt.timedelta(days=1), unique_key="later-1"),
        running=dict(args='{"n": 4}', eta=ago(30), state="running", owner=ALIVE, token=3, retries=1,
                     lease_expires_at=now + dt.timedelta(seconds=600), started_at=ago(20), unique_key="run-1"),
        orphaned=dict(args='{"n": 5}', eta=ago(300), state="running", owner=DEAD, token=5,
                      lease_expires_at=ago(60), started_at=ago(120)),
        failed=dict(args='{"n": 6}', eta=ago(900), state="failed", retries=11, max_retries=10, token=11,
                    last_error=TRACEBACK),
        failed_kept=dict(args='{"n": 7}', eta=ago(800), state="failed", retries=3, max_retries=2, token=3,
                         last_error=TRACEBACK),
        idle=dict(args='{"n": 8}', queue=IDLE_QUEUE),
    )
    ids = {}
    with db.engine.begin() as conn:
        for label, values in jobs.items():
            row = dict(dict(queue=QUEUE, name="thm.noop"), **values)
            ids[label] = conn.execute(insert(task_table).values(**row)).inserted_primary_key[0]
    before = revision_1_rows(db)

    upgrade(db)
    assert current_revision(db) != "mqueue_0001"
    assert revision_1_rows(db) == before  # every job as it was: state, eta, retries, token, lease, errors
    with db.engine.connect() as conn:
        added = conn.execute(select(task_table.c.finished_at, task_table.c.runs, task_table.c.wait_seconds,
                                    task_table.c.run_seconds, task_table.c.failed_unique_key)).all()
        assert conn.execute(select(func.count()).select_from(event_table)).scalar_one() == 0
    assert set(added) == {(None, 0, None, None, None)}
    assert admin.get_config(db)["jobs-history"] == 30 * 86400
    running = admin.get_job(db, ids["running"])
    assert [(e.kind, e.worker) for e in running.history] == [("put", None), ("popped", ALIVE)]
    assert admin.get_job(db, ids["failed"]).last_error == TRACEBACK

    # The worker that held the job when the database was upgraded still holds it, by its token.
    with db.engine.begin() as conn:
        assert db.dialect.heartbeat_jobs(conn, [(ids["running"], 3)], 60) == []
    with db.engine.begin() as conn:
        assert db.dialect.complete_jobs(conn, [(ids["running"], 3)])[0] == []
    finished = admin.get_job(db, ids["running"])
    assert (finished.state, finished.owner) == ("succeeded", ALIVE)
    assert finished.run_seconds == pytest.approx((finished.finished_at - before[ids["running"]]["started_at"])
                                                 .total_seconds(), abs=0.01)
    assert finished.run_seconds >= 20
    assert [e.kind for e in finished.history] == ["put", "popped", "succeeded"]

    # The dead worker's job is rescued as any other, then everything due runs.
    with db.engine.begin() as conn:
        assert db.dialect.rescue_expired(conn, [QUEUE]) == 1
    w = mqueue.Worker(db, queues=[QUEUE], lease=10, poll_interval=0.05)
    result = w.run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (3, 0, 0)
    assert notes(db.engine) == ["noop 1", "noop 2", "noop 5"]
    for label in ("due", "retrying", "orphaned"):
        job = admin.get_job(db, ids[label])
        assert (job.state, job.runs, job.owner) == ("succeeded", 1, w.owner), label
        assert job.wait_seconds is not None and job.run_seconds is not None, label
        assert job.unique_key is None
    due = admin.get_job(db, ids["due"])
    assert due.wait_seconds >= 10  # counted from its eta
    assert due.wait_seconds == pytest.approx((due.started_at - before[ids["due"]]["eta"]).total_seconds(), abs=0.01)
    assert admin.get_job(db, ids["retrying"]).retries == 2
    orphaned = admin.get_job(db, ids["orphaned"])
    assert [(e.kind, e.worker) for e in orphaned.history] == [
        ("put", None), ("popped", DEAD), ("rescued", DEAD), ("popped", w.owner), ("succeeded", w.owner)]
    assert orphaned.history[1].at == before[ids["orphaned"]]["started_at"]
    assert "lease expired" in orphaned.errors[0].detail
    scheduled = admin.get_job(db, ids["scheduled"])
    assert (scheduled.state, scheduled.eta, scheduled.unique_key) == ("queued", before[ids["scheduled"]]["eta"],
                                                                      "later-1")

    # A job that failed before the upgrade can be retried, and runs.
    admin.retry_job(db, ids["failed"])
    assert w.run_until_empty(timeout=30).succeeded == 1
    retried = admin.get_job(db, ids["failed"])
    assert (retried.state, retried.runs, retried.retries) == ("succeeded", 1, 0)
    assert [e.kind for e in retried.history] == ["put", "put", "popped", "succeeded"]
    listed = [j.id for j in admin.list_jobs(db, state="succeeded")]  # newest first
    assert (listed[0], listed[-1]) == (ids["failed"], ids["running"])
    assert set(listed) == {ids[label] for label in ("running", "due", "retrying", "orphaned", "failed")}

    # Down to revision 2: finished jobs go (it has no such state), live ones stay as they are.
    live = {job_id: row for job_id, row in revision_1_rows(db).items()
            if job_id in (ids["scheduled"], ids["failed_kept"], ids["idle"])}
    downgrade(db, "mqueue_0002")
    assert current_revision(db) == "mqueue_0002"
    assert not {"mqueue_event", "mqueue_stats", "mqueue_setting", "mqueue_tag", "mqueue_dependency", "mqueue_queue",
                "mqueue_worker"} & table_names(db)
    with db.engine.connect() as conn:
        columns = {column["name"] for column in inspect(conn).get_columns("mqueue_task")}
    assert not {"finished_at", "runs", "wait_seconds", "run_seconds"} & columns
    assert revision_1_rows(db) == live

    # And up again: the same jobs, and they still run.
    upgrade(db)
    assert revision_1_rows(db) == live
    with db.session():
        again = noop.enqueue(9)
    assert w.run_until_empty(timeout=30).succeeded == 1
    assert admin.get_job(db, again).state == "succeeded"
    assert admin.get_job(db, ids["failed_kept"]).state == "failed"
