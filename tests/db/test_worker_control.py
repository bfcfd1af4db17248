"""Worker control in-process, on every backend: middleware, paused queues, queue order, the
worker registry and the shared ``heartbeat`` leases.

Tasks write one row into ``ctl_effect`` through the job's own session, so a
write that should have rolled back shows up as a row.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import quick_worker, wait_for
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, event, func, insert, select

import mqueue
from mqueue import admin
from mqueue.migrate import upgrade
from mqueue.schema import task_table, worker_table

effect_metadata = MetaData()
effect = Table(
    "ctl_effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("note", String(100), nullable=True),
)

#: What tasks and middleware saw, reset before every test.
seen: list = []
gate = threading.Event()


def write(note: str) -> None:
    mqueue.current_session().execute(insert(effect).values(job_id=mqueue.current_job().id, note=note))


def per_task(job, call_next):
    seen.append(("per-task", job.name))
    return call_next()


@mqueue.task(name="ctl.work", queue="ctl", middleware=[per_task])
def work(n: int) -> str:
    seen.append(("task", n))
    write(f"task {n}")
    return f"done {n}"


@mqueue.task(name="ctl.work_async", queue="ctl", middleware=[per_task])
async def work_async(n: int) -> str:
    seen.append(("async task", n))
    write(f"async {n}")
    return f"async done {n}"


@mqueue.task(name="ctl.broken", queue="ctl", max_retries=3, backoff=60)
def broken() -> None:
    seen.append("broken ran")
    raise RuntimeError("the task failed")


@mqueue.task(name="ctl.a", queue="qa")
def in_a(n: int) -> None:
    seen.append(("qa", n))


@mqueue.task(name="ctl.b", queue="qb")
def in_b(n: int) -> None:
    seen.append(("qb", n))


@mqueue.task(name="ctl.hold", queue="hold")
def hold() -> None:
    gate.wait(20)


@pytest.fixture
def db(database_url):
    database = mqueue.Database(database_url)
    upgrade(database)
    effect_metadata.create_all(database.engine)
    seen.clear()
    gate.clear()
    yield database
    gate.set()
    database.dispose()


@pytest.fixture
def middleware():
    """Adds process-wide middleware for one test and removes it after."""
    added = []

    def add(fn):
        added.append(mqueue.add_middleware(fn))
        return fn
    yield add
    for fn in added:
        mqueue.remove_middleware(fn)


def effects(db) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.execute(select(effect.c.note).order_by(effect.c.id)).scalars())


def job_row(db, job_id: int):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).one()


def enqueue(db, task, *calls) -> list[int]:
    with db.session():
        return [task.enqueue(**call) for call in calls]


# -- middleware ----------------------------------------------------------------------


def test_middleware_order_job_fields_and_value(db, middleware):
    """Process-wide middleware wraps the task's own, each in the order given; all see the job."""
    def outer(job, call_next):
        seen.append(("outer", job.id, job.name, job.queue, job.retries, dict(job.args)))
        began = time.monotonic()
        value = call_next()
        seen.append(("outer after", value, time.monotonic() - began >= 0))
        return value

    def second(job, call_next):
        seen.append(("second", job.name))
        return call_next()

    middleware(outer)
    middleware(second)
    [job_id] = enqueue(db, work, dict(n=7))
    result = quick_worker(db, ["ctl"]).run_until_empty(timeout=30)
    assert result.succeeded == 1
    assert seen == [("outer", job_id, "ctl.work", "ctl", 0, {"n": 7}), ("second", "ctl.work"),
                    ("per-task", "ctl.work"), ("task", 7), ("outer after", "done 7", True)]
    assert effects(db) == ["task 7"]


def test_middleware_wraps_async_tasks(db, middleware):
    middleware(lambda job, call_next: seen.append(("outer", job.name)) or call_next())
    enqueue(db, work_async, dict(n=1))
    assert quick_worker(db, ["ctl"]).run_until_empty(timeout=30).succeeded == 1
    assert seen == [("outer", "ctl.work_async"), ("per-task", "ctl.work_async"), ("async task", 1)]
    assert effects(db) == ["async 1"]


def test_middleware_writes_commit_with_the_task(db, middleware):
    def audit(job, call_next):
        write(f"before {job.id}")
        value = call_next()
        write(f"after {job.id}")
        return value

    middleware(audit)
    [job_id] = enqueue(db, work, dict(n=1))
    assert quick_worker(db, ["ctl"]).run_until_empty(timeout=30).succeeded == 1
    assert effects(db) == [f"before {job_id}", "task 1", f"after {job_id}"]
    assert job_row(db, job_id).state == "succeeded"


def test_middleware_writes_roll_back_with_a_failed_task(db, middleware):
    middleware(lambda job, call_next: write("middleware") or call_next())
    [job_id] = enqueue(db, broken, {})
    result = quick_worker(db, ["ctl"]).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried) == (0, 1)
    assert effects(db) == []
    row = job_row(db, job_id)
    assert (row.state, row.retries) == ("queued", 1) and "the task failed" in row.last_error


def test_an_exception_from_middleware_is_the_tasks(db, middleware):
    """Raised after the task wrote: its writes roll back and the run is retried with backoff."""
    def strict(job, call_next):
        call_next()
        raise ValueError(f"middleware refused job {job.id} (try {job.retries + 1})")

    middleware(strict)
    [job_id] = enqueue(db, work, dict(n=3))
    result = quick_worker(db, ["ctl"]).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried) == (0, 1)
    assert effects(db) == []
    row = job_row(db, job_id)
    assert row.state == "queued" and row.retries == 1
    assert f"ValueError: middleware refused job {job_id} (try 1)" in row.last_error
    assert row.eta > row.started_at  # the task's backoff (60 s) applies


def test_middleware_can_skip_the_task(db, middleware):
    middleware(lambda job, call_next: "skipped")
    [job_id] = enqueue(db, work, dict(n=1))
    assert quick_worker(db, ["ctl"]).run_until_empty(timeout=30).succeeded == 1
    assert seen == [] and effects(db) == [] and job_row(db, job_id).state == "succeeded"


def test_bad_middleware_is_refused_at_registration():
    with pytest.raises(TypeError, match="fn\\(job, call_next\\)"):
        mqueue.add_middleware("not callable")
    with pytest.raises(TypeError, match="list of functions"):
        mqueue.task(name="ctl.bad", middleware=per_task)
    with pytest.raises(TypeError, match="functions"):
        mqueue.task(name="ctl.bad", middleware=[per_task, 3])


# -- paused queues ---------------------------------------------------------------------


def test_pause_and_resume(db):
    enqueue(db, in_a, dict(n=1), dict(n=2))
    enqueue(db, in_b, dict(n=1), dict(n=2))
    admin.pause_queue(db, "qb", "qc")
    admin.pause_queue(db, "qb")  # twice: still one row
    assert admin.paused_queues(db) == {"qb", "qc"}
    stats = {q.queue: q for q in admin.stats(db)}
    assert (stats["qa"].paused, stats["qb"].paused, stats["qc"].paused) == (False, True, True)
    assert stats["qb"].to_dict()["paused"] is True

    worker = quick_worker(db, ["qa", "qb"])
    assert worker.run_until_empty(timeout=30).succeeded == 2
    assert sorted(seen) == [("qa", 1), ("qa", 2)]
    assert {q.queue: q.queued for q in admin.stats(db)}["qb"] == 2

    admin.resume_queue(db, "qb", "qc")
    assert admin.paused_queues(db) == set()
    seen.clear()
    assert worker.run_until_empty(timeout=30).succeeded == 2
    assert sorted(seen) == [("qb", 1), ("qb", 2)]


def test_pause_needs_a_queue_name(db):
    with pytest.raises(ValueError, match="at least one queue"):
        admin.pause_queue(db)
    with pytest.raises(ValueError, match="queue must be a string"):
        admin.resume_queue(db, "")


def test_a_pause_costs_an_idle_worker_no_statement_of_its_own(db):
    """The paused check is part of the claim's first read of a queue, never a claim statement of its own.

    Prints the idle worker's statement rate with one queue paused and one not.
    """
    admin.pause_queue(db, "qa")
    worker = quick_worker(db, ["qa", "qb"], poll_interval=0.05)
    counts = {"all": 0, "paused": 0, "alone": 0, "registry": 0}

    @event.listens_for(worker.db.engine, "before_cursor_execute")
    def count(_conn, _cursor, statement, *_args):
        counts["all"] += 1
        counts["paused"] += "mqueue_queue" in statement
        counts["alone"] += "mqueue_queue" in statement and "mqueue_task" not in statement
        counts["registry"] += "INSERT INTO mqueue_worker" in statement

    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: counts["paused"] >= 4, timeout=20)
        enqueue(db, in_a, dict(n=1))
        before = dict(counts)
        time.sleep(1.0)
        after = dict(counts)
        assert {q.queue: q.queued for q in admin.stats(db)}["qa"] == 1  # paused: not claimed
        assert seen == []
    finally:
        worker.stop()
        thread.join(30)
    statements = after["all"] - before["all"]
    print(f"idle worker on 2 queues (one paused), poll 0.05s, 1 s: {statements} statements, "
          f"{after['paused'] - before['paused']} of them claims that check the pause")
    assert after["paused"] > before["paused"]
    # Only the registry's heartbeat reads the paused set on its own (for the log), once per beat.
    assert counts["alone"] <= counts["registry"] < statements / 4


# -- queue order ---------------------------------------------------------------------------


def test_priority_order_drains_the_first_queue_first(db):
    enqueue(db, in_b, *(dict(n=n) for n in range(3)))
    enqueue(db, in_a, *(dict(n=n) for n in range(3)))
    assert quick_worker(db, ["qa", "qb"]).run_until_empty(timeout=30).succeeded == 6
    assert [queue for queue, _ in seen] == ["qa"] * 3 + ["qb"] * 3


def test_round_robin_takes_from_the_queues_in_turn(db):
    enqueue(db, in_a, *(dict(n=n) for n in range(4)))
    enqueue(db, in_b, *(dict(n=n) for n in range(2)))
    assert quick_worker(db, ["qa", "qb"], order="round-robin").run_until_empty(timeout=30).succeeded == 6
    assert [queue for queue, _ in seen] == ["qa", "qb", "qa", "qb", "qa", "qa"]


def test_round_robin_shares_a_batch(db):
    """With 4 free threads and 2 queues, the first claim takes 2 jobs of each."""
    enqueue(db, in_a, *(dict(n=n) for n in range(6)))
    enqueue(db, in_b, *(dict(n=n) for n in range(6)))
    worker = quick_worker(db, ["qa", "qb"], order="round-robin", concurrency=4)
    assert worker.run_until_empty(timeout=30, max_runs=4).succeeded == 4
    assert sorted(queue for queue, _ in seen) == ["qa", "qa", "qb", "qb"]


def test_unknown_order_is_refused(db):
    with pytest.raises(ValueError, match="round-robin"):
        quick_worker(db, ["qa"], order="fifo")


# -- the worker registry ------------------------------------------------------------------


def serve(worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def test_workers_register_show_running_jobs_and_leave(db):
    worker = quick_worker(db, ["hold", "qa"], lease=2)
    [job_id] = enqueue(db, hold, {})
    thread = serve(worker)
    try:
        [info] = wait_for(lambda: [w for w in admin.list_workers(db) if w.running == (job_id,)], timeout=20)
        assert info.name == worker.owner and info.queues == ("hold", "qa") and info.claiming
        assert info.pid > 0 and info.host and info.lease_seconds == 2
        assert info.started_at <= info.last_seen
        assert info.to_dict()["running"] == [job_id] and info.to_dict()["last_seen"].endswith("+00:00")
        gate.set()
        wait_for(lambda: [w.running for w in admin.list_workers(db)] == [()], timeout=20)
    finally:
        gate.set()
        worker.stop()
        thread.join(30)
    assert admin.list_workers(db) == []  # a clean stop deletes its row


def test_a_worker_not_seen_for_three_leases_drops_off(db):
    with db.engine.begin() as conn:
        db.dialect.register_worker(conn, "gone:1:a", "gone", 1, json.dumps(["qa"]), 0.1, "[7]", True)
        db.dialect.register_worker(conn, "alive:2:b", "alive", 2, json.dumps(["qa"]), 60, "[]", True)
    assert [w.name for w in admin.list_workers(db)] == ["alive:2:b", "gone:1:a"]
    time.sleep(0.4)
    assert [w.name for w in admin.list_workers(db)] == ["alive:2:b"]
    with db.engine.connect() as conn:  # listed no more, but still stored until a worker's heartbeat
        assert conn.execute(select(func.count()).select_from(worker_table)).scalar_one() == 2
    worker = quick_worker(db, ["qa"], lease=2)
    thread = serve(worker)
    try:
        def stored():
            with db.engine.connect() as conn:
                return set(conn.execute(select(worker_table.c.name)).scalars())
        wait_for(lambda: stored() == {"alive:2:b", worker.owner}, timeout=20)
    finally:
        worker.stop()
        thread.join(30)


def test_a_row_written_by_hand_is_read_leniently(db):
    with db.engine.begin() as conn:
        db.dialect.register_worker(conn, "odd:3:c", "odd", 3, "not json", 60, '[1, "x", true, 2]', False)
    [info] = admin.list_workers(db)
    assert (info.queues, info.running, info.claiming) == ((), (1, 2), False)


# -- the shared heartbeat ---------------------------------------------------------------------


def lease_of(db, job_id: int) -> float:
    row = job_row(db, job_id)
    return (row.lease_expires_at - row.started_at).total_seconds()


def test_shared_heartbeat_sets_the_lease_of_workers_started_without_one(db):
    admin.set_config(db, "heartbeat", 3)
    admin.set_config(db, "heartbeat:hold", 7.5)
    assert admin.get_config(db)["heartbeat:hold"] == 7.5
    worker = quick_worker(db, ["qa", "hold"], lease=None)
    [job_id] = enqueue(db, hold, {})
    thread = serve(worker)
    try:
        wait_for(lambda: job_row(db, job_id).state == "running", timeout=20)
        assert 7 <= lease_of(db, job_id) <= 8
        assert worker.queue_leases == {"qa": 3, "hold": 7.5}
        assert worker.heartbeat_seconds == 0.75
        [info] = admin.list_workers(db)
        assert info.lease_seconds == 3
        # A change reaches the running worker on its next heartbeat.
        admin.set_config(db, "heartbeat:hold", None)
        admin.set_config(db, "heartbeat", 2)
        wait_for(lambda: [w.lease_seconds for w in admin.list_workers(db)] == [2], timeout=20)
        assert worker.queue_leases == {"qa": 2, "hold": 2}
        wait_for(lambda: lease_of(db, job_id) < 5, timeout=20)  # the next heartbeat applies it
    finally:
        gate.set()
        worker.stop()
        thread.join(30)


def test_a_lease_given_to_the_worker_wins(db):
    admin.set_config(db, "heartbeat", 3)
    worker = quick_worker(db, ["hold"], lease=5)
    [job_id] = enqueue(db, hold, {})
    thread = serve(worker)
    try:
        wait_for(lambda: job_row(db, job_id).state == "running", timeout=20)
        assert 4.5 <= lease_of(db, job_id) <= 5.5
        assert [w.lease_seconds for w in admin.list_workers(db)] == [5]
    finally:
        gate.set()
        worker.stop()
        thread.join(30)


@pytest.mark.parametrize("key, value, message", [
    ("heartbeat", 0, "takes a number of seconds > 0"),
    ("heartbeat", "-1", "takes a number of seconds > 0"),
    ("heartbeat", "nan", "takes a number of seconds > 0"),
    ("heartbeat", True, "takes a number of seconds > 0"),
    ("heartbeat:", 5, "unknown setting 'heartbeat:'"),
    ("heartbeat:" + "q" * 101, 5, "unknown setting"),
    ("heartbeats", 5, "known: jobs-history, jobs-history-count, stats-history, heartbeat, heartbeat:QUEUE"),
])
def test_bad_heartbeat_settings_are_refused(db, key, value, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(")) as error:
        admin.set_config(db, key, value)
    assert "\n" not in str(error.value)
    assert "heartbeat:" not in "".join(k for k in admin.get_config(db) if k != "heartbeat")
