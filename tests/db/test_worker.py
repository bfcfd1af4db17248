"""The worker in-process, on every backend: outcomes, fencing, ordering, wake-up.

Tasks write one row into ``effect`` (no unique constraint) through the job's
own session, so a duplicate run shows up as a second row instead of hiding.
"""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import threading
import time

import pytest
from helpers import wait_for
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, event, func, insert, select, update
from sqlalchemy.orm import registry as orm_registry

import mqueue
from mqueue.schema import task_table

effect_metadata = MetaData()
effect = Table(
    "effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("note", String(100), nullable=True),
)

mapper_registry = orm_registry(metadata=effect_metadata)


class OrmEffect:
    """An ORM-mapped effect, for tasks that only ``session.add`` (no flush, no SQL yet)."""


mapper_registry.map_imperatively(OrmEffect, Table(
    "orm_effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
))

#: What the tasks below saw, reset before every test.
seen: list = []
started: dict[int, float] = {}
gate = threading.Event()


def write_effect(note: str | None = None) -> None:
    job = mqueue.current_job()
    mqueue.current_session().execute(insert(effect).values(job_id=job.id, note=note))


@mqueue.task(name="tw.ok", queue="tw")
def ok(n: int) -> None:
    seen.append(n)
    write_effect(str(n))


@mqueue.task(name="tw.add_only", queue="tw")
def add_only() -> None:
    """Leaves a pending ORM object: the completion must flush and commit it, not skip it."""
    row = OrmEffect()
    row.job_id = mqueue.current_job().id
    mqueue.current_session().add(row)


@mqueue.task(name="tw.read_only", queue="tw")
def read_only() -> None:
    seen.append(mqueue.current_session().execute(select(func.count()).select_from(effect)).scalar_one())


@mqueue.task(name="tw.boom", queue="tw")
def boom(n: int) -> None:
    write_effect("before the error")
    raise RuntimeError(f"boom number {n}")


@mqueue.task(name="tw.retry_later", queue="tw")
def retry_later() -> None:
    write_effect()
    raise mqueue.Retry(30)


@mqueue.task(name="tw.give_up", queue="tw")
def give_up() -> None:
    write_effect()
    raise mqueue.Fail("customer deleted")


@mqueue.task(name="tw.always_fails", queue="tw", max_retries=2, backoff=0)
def always_fails() -> None:
    seen.append(mqueue.current_job().retries)
    write_effect()
    raise ValueError("still broken")


@mqueue.task(name="tw.timeout_then_write", queue="tw", timeout=0.3, max_retries=1, backoff=60)
def timeout_then_write() -> None:
    """Blocks past its timeout, swallows the interruption, then writes anyway."""
    seen.append("start")
    try:
        gate.wait(1.0)
    except BaseException:  # noqa: B902 - a careless task that hides the interruption
        seen.append("interrupted")
    try:
        write_effect("late")
    except BaseException:  # noqa: B902
        seen.append("interrupted")
        write_effect("late")


@mqueue.task(name="tw.write_then_timeout", queue="tw", timeout=0.3, max_retries=0)
def write_then_timeout() -> None:
    """Writes first (holding its transaction open), then blocks past its timeout."""
    write_effect("early")
    seen.append("wrote")
    try:
        gate.wait(1.0)
    except BaseException:  # noqa: B902
        seen.append("interrupted")


@mqueue.task(name="tw.introspect", queue="tw")
def introspect(label: str, when: dt.date) -> None:
    job = mqueue.current_job()
    db = introspect_db[0]
    with db.engine.connect() as conn:
        before = conn.execute(select(task_table.c.lease_expires_at).where(task_table.c.id == job.id)).scalar()
    time.sleep(0.02)  # let the database clock move on before extending the lease
    job.heartbeat()
    with db.engine.connect() as conn:
        after = conn.execute(select(task_table.c.lease_expires_at).where(task_table.c.id == job.id)).scalar()
    seen.append(dict(id=job.id, name=job.name, queue=job.queue, args=job.args, retries=job.retries,
                     before=before, after=after, same_session=mqueue.ctx.session is mqueue.current_session()))
    if job.retries == 0:
        raise mqueue.Retry(0)
    write_effect()


introspect_db: list = []


@mqueue.task(name="tw.record_order")
def record_order(label: str) -> None:
    seen.append(label)


@mqueue.task(name="tw.fenced", queue="tw-fence")
def fenced(write: bool = True) -> None:
    """``write=False``: never touches its session, so the worker's completer completes it."""
    job = mqueue.current_job()
    seen.append(("start", job.retries))
    if job.retries == 0:
        gate.wait(30)
    if write:
        write_effect(f"retries={job.retries}")


second_gate = threading.Event()


@mqueue.task(name="tw.twice", queue="tw-twice")
def twice() -> None:
    """Quiet; the first run waits for ``gate``, the second for ``second_gate``."""
    retries = mqueue.current_job().retries
    seen.append(("start", retries))
    (gate if retries == 0 else second_gate).wait(30)


@mqueue.task(name="tw.wake", queue="tw-wake")
def wake(n: int) -> None:
    started[n] = time.perf_counter()


@pytest.fixture
def db(db):
    effect_metadata.create_all(db.engine)
    seen.clear()
    started.clear()
    gate.clear()
    second_gate.clear()
    yield db
    gate.set()
    second_gate.set()


def effect_count(db, job_id=None) -> int:
    query = select(func.count()).select_from(effect)
    if job_id is not None:
        query = query.where(effect.c.job_id == job_id)
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one()


def job_row(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).first()


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def worker(db, queues=("tw",), **options) -> mqueue.Worker:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 5)
    return mqueue.Worker(db, queues=list(queues), **options)


# -- outcomes ------------------------------------------------------------------


def test_run_until_empty_counts_outcomes(db):
    with db.session():
        for n in range(3):
            ok.enqueue(n)
        boom.enqueue(1)
        boom.enqueue(2)
        give_up.enqueue()
    result = worker(db, concurrency=2).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (3, 2, 1)
    assert sorted(seen) == [0, 1, 2]


def test_run_until_empty_waits_for_a_due_job_that_another_transaction_holds(db, observer):
    """A claim passes over a row another transaction has locked (SKIP LOCKED): that is not an empty
    queue.  Before the fix, a worker starting while its own housekeeping scan held a due row returned
    with the job never run (seen once on MariaDB)."""
    with db.session():
        job_id = ok.enqueue(1)
    results = []
    with observer.connect() as conn:
        transaction = conn.begin()
        # An UPDATE locks the row on every backend (on SQLite, the whole database).
        conn.execute(update(task_table).where(task_table.c.id == job_id).values(name=task_table.c.name))
        thread = threading.Thread(target=lambda: results.append(worker(db).run_until_empty(timeout=30)))
        thread.start()
        thread.join(0.5)
        waited = thread.is_alive()
        transaction.commit()
    thread.join(30)
    assert waited, "run_until_empty returned while the due job was locked"
    assert results[0].succeeded == 1 and seen == [1]
    assert job_row(db, job_id).state == "succeeded"


def test_success_commits_the_task_writes_with_the_completion(db):
    with db.session():
        job_id = ok.enqueue(7)
    w = worker(db)
    assert w.run_until_empty(timeout=30).succeeded == 1
    assert effect_count(db, job_id) == 1
    row = job_row(db, job_id)  # kept on record: succeeded by this worker's one run, its lease gone
    assert (row.state, row.runs, row.owner, row.lease_expires_at) == ("succeeded", 1, w.owner, None)
    assert row.finished_at is not None and row.started_at <= row.finished_at
    assert worker(db).run_until_empty(timeout=30).succeeded == 0  # never run again
    assert effect_count(db, job_id) == 1


def test_exception_rolls_back_the_task_writes_and_backs_off(db):
    with db.session():
        job_id = boom.enqueue(3)
    w = worker(db)
    result = w.run_until_empty(timeout=30)
    assert result.retried == 1
    assert effect_count(db, job_id) == 0
    row = job_row(db, job_id)
    assert row.state == "queued"
    assert row.retries == 1
    # Default backoff: 60 s for the first retry, by the database's clock.
    delay = (row.eta - db_now(db)).total_seconds()
    assert 50 < delay <= 60, delay
    assert "Traceback" in row.last_error
    assert "RuntimeError: boom number 3" in row.last_error
    assert row.owner == w.owner and row.lease_expires_at is None  # the worker of its last run, lease gone


def test_retry_asks_for_a_delay_and_fail_gives_up_at_once(db):
    with db.session():
        retry_id = retry_later.enqueue()
        fail_id = give_up.enqueue()
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (0, 1, 1)
    assert effect_count(db) == 0
    retried = job_row(db, retry_id)
    assert (retried.state, retried.retries) == ("queued", 1)
    delay = (retried.eta - db_now(db)).total_seconds()
    assert 20 < delay <= 30, delay
    failed = job_row(db, fail_id)
    assert failed.state == "failed"
    assert "customer deleted" in failed.last_error


def test_max_retries_then_failed_and_unique_key_freed(db):
    with db.session():
        job_id = always_fails.options(unique_key="tw-key").enqueue()
        assert always_fails.options(unique_key="tw-key").enqueue() == job_id
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (0, 2, 1)
    assert seen == [0, 1, 2]  # max_retries=2: three runs in all
    row = job_row(db, job_id)
    assert (row.state, row.retries, row.unique_key) == ("failed", 3, None)
    assert "ValueError: still broken" in row.last_error
    assert effect_count(db) == 0
    with db.session():
        again = always_fails.options(unique_key="tw-key").enqueue()
    assert again != job_id


def test_timeout_fails_the_run_and_refuses_its_late_completion(db):
    with db.session():
        job_id = timeout_then_write.enqueue()
    started_at = time.monotonic()
    result = worker(db).run_until_empty(timeout=30)
    assert seen[0] == "start"
    assert result.retried == 1, result
    assert result.succeeded == 0
    row = job_row(db, job_id)
    assert (row.state, row.retries) == ("queued", 1)
    assert "timeout" in row.last_error.lower()
    assert effect_count(db, job_id) == 0
    assert time.monotonic() - started_at < 10


def test_timeout_refuses_a_run_that_wrote_before_blocking(db):
    with db.session():
        job_id = write_then_timeout.enqueue()
    result = worker(db).run_until_empty(timeout=30)
    assert seen[0] == "wrote"
    assert result.failed == 1, result
    row = job_row(db, job_id)
    assert row is not None and row.state == "failed"
    assert "timeout" in row.last_error.lower()
    assert effect_count(db, job_id) == 0


def test_unknown_task_and_bad_arguments_fail_and_the_worker_goes_on(db):
    rows = [
        dict(queue="tw", name="tw.no_such_task", args="{}"),
        dict(queue="tw", name="tw.ok", args="{not json"),
        dict(queue="tw", name="tw.ok", args='{"bogus": 1}'),
        dict(queue="tw", name="tw.ok", args="[1, 2]"),
        dict(queue="tw", name="tw.ok", args='{"n": 5}'),
    ]
    ids = []
    with db.engine.begin() as conn:
        for values in rows:
            ids.append(conn.execute(insert(task_table).values(**values)).inserted_primary_key[0])
    result = worker(db).run_until_empty(timeout=30)
    # An unknown name is a failed run retried with backoff (a rolling deploy may bring the task).
    assert (result.succeeded, result.retried, result.failed) == (1, 1, 3)
    assert seen == [5]
    assert job_row(db, ids[-1]).state == "succeeded"
    errors = [job_row(db, job_id) for job_id in ids[:-1]]
    assert (errors[0].state, errors[0].retries) == ("queued", 1)
    assert all(row.state == "failed" for row in errors[1:])
    assert "unknown task 'tw.no_such_task'" in errors[0].last_error
    for row in errors:
        assert "\n" not in row.last_error.strip(), row.last_error  # one clear line, no traceback
        assert len(row.last_error) < 500
    assert "bogus" in errors[2].last_error


# -- the running job -------------------------------------------------------------


def test_current_job_inside_a_task_and_none_outside(db):
    introspect_db[:] = [db]
    assert mqueue.current_job() is None
    with db.session():
        job_id = introspect.enqueue("x", when=dt.date(2024, 2, 29))
    result = worker(db, lease=30, heartbeat_interval=60).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried) == (1, 1)
    assert mqueue.current_job() is None
    assert [s["retries"] for s in seen] == [0, 1]
    for snapshot in seen:
        assert snapshot["id"] == job_id
        assert snapshot["name"] == "tw.introspect"
        assert snapshot["queue"] == "tw"
        assert snapshot["args"] == {"label": "x", "when": dt.date(2024, 2, 29)}
        assert snapshot["same_session"]
        assert snapshot["after"] > snapshot["before"]  # heartbeat() extended the lease
    assert effect_count(db, job_id) == 1


def test_queues_named_first_are_served_first(db):
    with db.session():
        for n in range(3):
            record_order.options(queue="tw-low").enqueue(f"low{n}")
        for n in range(3):
            record_order.options(queue="tw-high").enqueue(f"high{n}")
    result = worker(db, queues=["tw-high", "tw-low"]).run_until_empty(timeout=30)
    assert result.succeeded == 6
    assert seen == ["high0", "high1", "high2", "low0", "low1", "low2"]


def test_higher_priority_runs_first_then_oldest(db):
    with db.session():
        for priority, label in [(0, "p0-a"), (-1, "p-1"), (10, "p10"), (0, "p0-b"), (5, "p5")]:
            record_order.options(queue="tw-prio", priority=priority).enqueue(label)
    result = worker(db, queues=["tw-prio"]).run_until_empty(timeout=30)
    assert result.succeeded == 5
    assert seen == ["p10", "p5", "p0-a", "p0-b", "p-1"]


# -- the fence ---------------------------------------------------------------------


@pytest.mark.parametrize("write", [True, False], ids=["writes", "quiet"])
def test_a_worker_that_lost_its_lease_cannot_complete(db, write):
    with db.session():
        job_id = fenced.enqueue(write=write)
    # Worker A never renews its 1 s lease (as if paused), and holds one job at most.
    first = worker(db, queues=["tw-fence"], lease=1, heartbeat_interval=60)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(a=first.run_until_empty(timeout=30)))
    thread.start()
    try:
        wait_for(lambda: seen == [("start", 0)], timeout=10, message=lambda: f"first run: {seen}")
        # Its lease expires and the job is handed out again, while A is still in the task.
        wait_for(lambda: (job_row(db, job_id).state, job_row(db, job_id).retries) == ("queued", 1),
                 timeout=10, message=lambda: f"job not re-queued: {job_row(db, job_id)}")
        second = worker(db, queues=["tw-fence"], lease=5).run_until_empty(timeout=30)
        assert second.succeeded == 1
        assert seen[-1] == ("start", 1)
        assert effect_count(db, job_id) == int(write)
    finally:
        gate.set()
        thread.join(30)
    assert not thread.is_alive()
    assert (outcome["a"].succeeded, outcome["a"].lost) == (0, 1)
    assert effect_count(db, job_id) == int(write)
    row = job_row(db, job_id)  # succeeded once, by the second run: A's late completion changed nothing
    assert (row.state, row.runs, row.retries) == ("succeeded", 2, 1)


def test_a_stale_run_finishing_does_not_drop_the_same_jobs_new_run(db):
    """A worker whose run lost its lease may hold the job again under a new claim.

    When the stale run ends (its completion refused), the new run must stay
    held, or it would no longer be heartbeated (and run twice at once).
    """
    with db.session():
        job_id = twice.enqueue()
    w = worker(db, queues=["tw-twice"], concurrency=2, lease=1, heartbeat_interval=60)
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        # No heartbeats: the worker's own rescue re-queues the job and it claims it again.
        wait_for(lambda: seen == [("start", 0), ("start", 1)], timeout=15, message=lambda: f"runs: {seen}")
        gate.set()  # the stale run returns; the completer refuses it
        wait_for(lambda: w._result.lost == 1, timeout=10, message=lambda: f"{w._result}")
        with w._held_lock:
            held = w._held.get(job_id)
        assert held is not None and held.row.retries == 1
    finally:
        gate.set()
        second_gate.set()
        w.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_tasks_that_wrote_nothing_are_completed_together_and_fenced(db):
    """``complete_jobs``: one transaction for many; a pair whose token moved on is refused."""
    with db.session():
        ids = [record_order.enqueue(str(n)) for n in range(3)]
    with db.engine.begin() as conn:
        claimed = db.dialect.claim_jobs(conn, "default", 3, "test-owner", 30)
    assert sorted(r.id for r in claimed) == ids
    stale = claimed[1]
    with db.engine.begin() as conn:
        lost, done = db.dialect.complete_jobs(conn, [(r.id, r.token + (r is stale)) for r in claimed])
    assert (lost, done) == ([stale.id], [])
    assert [job_row(db, job_id).state for job_id in ids] == ["succeeded", "running", "succeeded"]
    finished = {job_id: job_row(db, job_id).finished_at for job_id in (ids[0], ids[2])}
    # Asked again (as after a COMMIT whose reply was lost): the completed ones are done already, not ours now.
    with db.engine.begin() as conn:
        lost, done = db.dialect.complete_jobs(conn, [(r.id, r.token) for r in claimed])
    assert (lost, done) == ([ids[0], ids[2]], [ids[0], ids[2]])
    assert [job_row(db, job_id).state for job_id in ids] == ["succeeded"] * 3
    assert {job_id: job_row(db, job_id).finished_at for job_id in (ids[0], ids[2])} == finished  # not again
    # A token that never held the job is lost, not done.
    with db.engine.begin() as conn:
        lost, done = db.dialect.complete_jobs(conn, [(stale.id, stale.token + 5)])
    assert (lost, done) == ([stale.id], [])


def test_a_task_that_only_added_orm_objects_or_read_commits_through_its_session(db):
    with db.session():
        added = add_only.enqueue()
        read_only.enqueue()
    assert worker(db).run_until_empty(timeout=30).succeeded == 2
    with db.engine.connect() as conn:
        assert conn.execute(select(OrmEffect.__table__.c.job_id)).scalars().all() == [added]
    assert seen == [0]


def test_a_heartbeat_racing_the_jobs_own_completion_does_not_call_the_lease_lost(db, caplog):
    """The completion's UPDATE holds the row; a heartbeat waiting on it then finds it succeeded.

    That is the job finishing, not another worker taking it over: no
    "lease lost" warning, and the run counts as succeeded.
    """
    with db.session():
        job_id = ok.enqueue(7)
    w = worker(db, heartbeat_interval=60)
    heartbeats: list[threading.Thread] = []

    def before_commit(session) -> None:
        # The task's session commits its completion (the fenced UPDATE has
        # run): heartbeat from another thread now, while it holds the row.
        if seen == [7] and not heartbeats:
            heartbeats.append(threading.Thread(target=w._heartbeat_step))
            heartbeats[0].start()
            time.sleep(0.3)  # the heartbeat blocks on the row (or SQLite's write lock)

    def after_commit(session) -> None:
        # ... and finds the job no longer running while the worker still holds it.
        if heartbeats:
            heartbeats[0].join(30)

    event.listen(w.db.Session, "before_commit", before_commit)
    event.listen(w.db.Session, "after_commit", after_commit)
    try:
        with caplog.at_level(logging.WARNING, logger="mqueue"):
            result = w.run_until_empty(timeout=30)
    finally:
        event.remove(w.db.Session, "before_commit", before_commit)
        event.remove(w.db.Session, "after_commit", after_commit)
    assert heartbeats and not heartbeats[0].is_alive()
    assert (result.succeeded, result.lost) == (1, 0)
    assert effect_count(db, job_id) == 1 and job_row(db, job_id).state == "succeeded"
    assert "lease lost" not in caplog.text


def test_job_ids_are_never_reused(db):
    """The fence is (id, token): a stale worker must never meet a later job under its old id.

    A succeeded job's row stays until pruning deletes it; after that (here:
    deleted as pruning would) its id must not come back.
    """
    with db.session():
        first = ok.enqueue(1)
    assert worker(db).run_until_empty(timeout=30).succeeded == 1
    assert job_row(db, first).state == "succeeded"
    with db.engine.begin() as conn:
        conn.execute(task_table.delete().where(task_table.c.id == first))
    with db.session():
        second = ok.enqueue(2)
    assert second > first


# -- wake-up -------------------------------------------------------------------------


def test_enqueue_in_the_workers_process_wakes_it_at_once(db):
    # An idle worker polls at growing intervals (5 ms doubling up to
    # poll_interval).  After 0.35 s idle its current wait runs from ~0.32 s to
    # ~0.64 s, so polling alone would start a job enqueued at 0.35 s some
    # 0.3 s later; only the in-process wake-up starts it within a few ms.
    w = worker(db, queues=["tw-wake"], poll_interval=2.0)
    thread = threading.Thread(target=w.run)
    thread.start()
    delays = []
    try:
        for n in range(20):
            time.sleep(IDLE_GAP_SECONDS)  # let the worker go idle, on purpose
            enqueued = time.perf_counter()
            with db.session():
                wake.enqueue(n)
            wait_for(lambda: n in started, timeout=5, interval=0.002, message=f"job {n} did not start")
            delays.append(started[n] - enqueued)
    finally:
        w.stop()
        thread.join(30)
    median = statistics.median(delays)
    print(f"\n[{db.dialect.name}] in-process enqueue-to-start: median {median * 1000:.1f} ms, "
          f"max {max(delays) * 1000:.1f} ms over {len(delays)} jobs")
    assert median < 0.2, [round(d, 3) for d in delays]


IDLE_GAP_SECONDS = 0.35


@pytest.mark.backends("sqlite")
def test_sqlite_completes_jobs_that_wrote_nothing_in_the_next_claims_transaction(db):
    """One writer at a time: the producer's claim completes the jobs finished since the last claim.

    Apart, each no-op job took two turns of the write lock (its claim, its
    completion); together about one.  A job the producer leaves (it was not
    claiming for ``COMPLETION_HANDOFF_SECONDS``) is still completed by the
    completer: hence a margin, not an exact count.
    """
    jobs = 30
    with db.session():
        ids = [record_order.enqueue(str(n)) for n in range(jobs)]
    w = mqueue.Worker(db, queues=["default"], concurrency=1)
    write_transactions = []
    event.listen(w.db.engine, "before_cursor_execute",
                 lambda *args: write_transactions.append(1) if args[2] == "BEGIN IMMEDIATE" else None)
    result = w.run_until_empty(timeout=60)
    assert (result.succeeded, result.total) == (jobs, jobs)
    assert [job_row(db, job_id).state for job_id in ids] == ["succeeded"] * jobs
    assert sorted(seen) == sorted(str(n) for n in range(jobs))
    # A claim per job (and one that finds the queue empty), a few of the worker's own writes.
    assert len(write_transactions) < 1.5 * jobs, len(write_transactions)
