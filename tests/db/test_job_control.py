"""Job control on every backend: dependencies, move, priority, expiry, bulk retry and cancel.

Jobs run through a real ``Worker`` in this process (threads), or are put in
their states through the dialect's own transitions (claim, fail), as a
worker would.  Concurrency across processes is in
``tests/processes/test_proc_job_control.py``.
"""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from helpers import db_now, quick_worker, wait_for
from sqlalchemy import event, func, select

import mqueue
from mqueue import admin
from mqueue.errors import HasDependentsError, InvalidStateError
from mqueue.history import prune
from mqueue.schema import (CANCELED, EXPIRED, FAILED, QUEUED, RUNNING, SUCCEEDED, WAITING, dependency_table,
                           task_table)

QUEUE = "jc"
ran: list[int] = []
ran_lock = threading.Lock()
#: Jobs of ``flaky`` with these ``n`` fail for good.
failing: set[int] = set()


@mqueue.task(name="jc.step", queue=QUEUE)
def step(n: int) -> None:
    with ran_lock:
        ran.append(n)


@mqueue.task(name="jc.write", queue=QUEUE)
def write(n: int) -> None:
    """Writes in the job's session, so its completion is the fenced UPDATE in the task's transaction."""
    from sqlalchemy import text
    mqueue.current_session().execute(text("SELECT 1"))
    with ran_lock:
        ran.append(n)


@mqueue.task(name="jc.flaky", queue=QUEUE, max_retries=0)
def flaky(n: int) -> None:
    if n in failing:
        raise mqueue.Fail(f"job {n} is told to fail")
    with ran_lock:
        ran.append(n)


@mqueue.task(name="jc.soon", queue=QUEUE, expires=3600)
def soon(n: int) -> None:
    with ran_lock:
        ran.append(n)


@pytest.fixture(autouse=True)
def _clean():
    ran.clear()
    failing.clear()
    yield


def drain(db, concurrency: int = 1, queues=(QUEUE,)):
    return quick_worker(db, list(queues), concurrency=concurrency).run_until_empty(timeout=120)


def state(db, job_id):
    return admin.get_job(db, job_id).state


def row(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).one()


# -- dependencies ------------------------------------------------------------------------------

def test_chain_of_1000_runs_in_order(db):
    with db.session():
        previous = step.enqueue(0)
        first = previous
        for n in range(1, 1000):
            previous = step.options(depends_on=[previous]).enqueue(n)
    assert state(db, first) == QUEUED
    assert state(db, previous) == WAITING and row(db, previous).pending_deps == 1
    result = drain(db, concurrency=4)
    assert result.succeeded == 1000
    assert ran == list(range(1000))


def test_fan_in_of_1000_runs_the_last_job_once(db):
    with db.session():
        quiet = step.enqueue_many([{"n": n} for n in range(500)])      # batched completions
        writing = write.enqueue_many([{"n": n} for n in range(500, 1000)])  # completions in the task's transaction
        last = step.options(depends_on=quiet + writing).enqueue(-1)
    assert row(db, last).pending_deps == 1000 and state(db, last) == WAITING
    drain(db, concurrency=8)
    assert sorted(ran) == [-1] + list(range(1000))
    assert ran[-1] == -1
    job = admin.get_job(db, last)
    assert (job.state, job.runs, job.pending_deps) == (SUCCEEDED, 1, 0)
    assert set(job.depends_on) == set(quiet + writing) and set(job.dependency_states) == {SUCCEEDED}


def test_unknown_and_succeeded_dependencies_count_as_done(db):
    with db.session():
        done = step.enqueue(1)
    drain(db)
    with db.session():
        free = step.options(depends_on=[done, 10 ** 9]).enqueue(2)
        live = step.enqueue(3)
        held = step.options(depends_on=[done, live]).enqueue(4)
    assert (state(db, free), row(db, free).pending_deps) == (QUEUED, 0)
    assert (state(db, held), row(db, held).pending_deps) == (WAITING, 1)
    assert admin.get_job(db, held).depends_on == (live,)  # done ones are not recorded
    assert admin.get_job(db, live).dependents == (held,)
    drain(db)
    assert state(db, held) == SUCCEEDED


def test_dependent_added_while_the_dependency_runs_is_released(db):
    """The claim saw no dependent; the completion finds one and releases it (the slow path)."""
    with db.session():
        first = write.enqueue(1)
    with db.session() as session:
        [claimed] = db.dialect.claim_jobs(session, QUEUE, 1, "host:1:a", 60)
    assert not claimed.has_dependents
    with db.session():
        dependent = step.options(depends_on=[first]).enqueue(2)
    assert state(db, dependent) == WAITING
    # A completion that rolls back releases nothing.
    session = db.Session()
    assert db.dialect.complete_job(session.connection(), first, claimed.token, False, claimed.has_dependents)
    session.rollback()
    session.close()
    assert state(db, dependent) == WAITING and state(db, first) == RUNNING
    with db.session() as session:
        assert db.dialect.complete_job(session.connection(), first, claimed.token, False, claimed.has_dependents)
    assert (state(db, dependent), row(db, dependent).pending_deps) == (QUEUED, 0)


def test_a_completion_without_dependents_is_one_statement(db):
    """The fenced UPDATE alone: no look for dependents unless the job has some."""
    with db.session():
        plain, base = write.enqueue_many([{"n": 1}, {"n": 2}])
        dependent = step.options(depends_on=[base]).enqueue(3)
    with db.session() as session:
        claimed = {row.id: row for row in db.dialect.claim_jobs(session, QUEUE, 2, "host:1:a", 60)}
    assert (claimed[plain].has_dependents, claimed[base].has_dependents) == (False, True)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args):
        if "mqueue_" in statement:
            statements.append(statement.split()[0].upper())
    event.listen(db.engine, "before_cursor_execute", record)
    try:
        for job_id, expected in ((plain, ["UPDATE"]), (base, ["UPDATE", "SELECT", "UPDATE"])):
            statements.clear()
            with db.session() as session:
                row = claimed[job_id]
                assert db.dialect.complete_job(session.connection(), row.id, row.token, row.tracked,
                                               row.has_dependents)
            assert statements == expected
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert state(db, dependent) == QUEUED


def test_dependency_failed_for_good_blocks_until_retried(db):
    with db.session():
        base = flaky.enqueue(1)
        dependent = step.options(depends_on=[base]).enqueue(2)
    failing.add(1)
    drain(db)
    assert state(db, base) == FAILED
    job = admin.get_job(db, dependent)
    assert (job.state, job.depends_on, job.dependency_states, job.blocked_by) == (WAITING, (base,), (FAILED,),
                                                                                  (base,))
    assert admin.get_job(db, base).dependents == (dependent,)
    # The dependent cannot jump the queue: retrying it by hand is refused, and nothing changes.
    with pytest.raises(InvalidStateError, match=f"job {dependent} is waiting for its dependencies "
                                                f"\\({base} failed\\)"):
        admin.retry_job(db, dependent)
    assert state(db, dependent) == WAITING
    failing.clear()
    admin.retry_job(db, base)
    drain(db)
    assert (state(db, base), state(db, dependent)) == (SUCCEEDED, SUCCEEDED)
    assert ran == [1, 2]


def test_cancel_refused_with_waiting_dependents_unless_cascade(db):
    with db.session():
        base = step.enqueue(1)
        middle = step.options(depends_on=[base], track=True).enqueue(2)
        top = step.options(depends_on=[middle]).enqueue(3)
        other = step.enqueue(4)
    with pytest.raises(HasDependentsError) as refused:
        admin.cancel_job(db, base)
    assert isinstance(refused.value, InvalidStateError)
    message = str(refused.value)
    assert "\n" not in message and str(middle) in message and "--cascade" in message
    assert {state(db, job) for job in (base, middle, top)} == {QUEUED, WAITING}
    assert admin.cancel_job(db, base, cascade=True).state == QUEUED  # as it was
    assert [state(db, job) for job in (base, middle, top, other)] == [CANCELED, CANCELED, CANCELED, QUEUED]
    assert [e.kind for e in admin.events(db, job_id=middle)] == ["put", "canceled"]
    assert admin.get_job(db, top).history[-1].kind == "canceled"
    # A job whose dependents are no longer waiting cancels alone.
    with db.session():
        again = step.enqueue(5)
        waiter = step.options(depends_on=[again]).enqueue(6)
    admin.cancel_job(db, waiter)
    assert admin.cancel_job(db, again).id == again


def test_prune_deletes_dependency_rows(db):
    with db.session():
        base = step.enqueue(1)
        dependent = step.options(depends_on=[base]).enqueue(2)
    drain(db)
    admin.set_config(db, "jobs-history-count", 0)
    prune(db)
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(dependency_table)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(task_table)).scalar_one() == 0
    assert dependent


# -- move and priority ---------------------------------------------------------------------------

def test_move_and_priority_of_waiting_queued_and_failed_jobs(db):
    with db.session():
        queued = step.options(track=True).enqueue(1)
        waiting = step.options(depends_on=[queued]).enqueue(2)
        doomed = flaky.options(queue="elsewhere").enqueue(3)
    failing.add(3)
    drain(db, queues=("elsewhere",))
    assert state(db, doomed) == FAILED
    for job_id, was in ((queued, QUEUED), (waiting, WAITING), (doomed, FAILED)):
        moved = admin.move_job(db, job_id, "other")
        assert (moved.queue, moved.state) == ("other", was)
        changed = admin.set_priority(db, job_id, 7)
        assert (changed.priority, changed.state) == (7, was)
    history = [(e.kind, e.detail) for e in admin.get_job(db, waiting).history]
    assert ("moved", f"from {QUEUE} to other") in history and ("priority", "from 0 to 7") in history
    assert [(e.kind, e.detail) for e in admin.events(db, job_id=queued)] == [
        ("put", None), ("moved", f"from {QUEUE} to other"), ("priority", "from 0 to 7")]
    assert admin.move_job(db, queued, "other").history == ()  # same queue: nothing changes
    drain(db, queues=("other",))
    assert (state(db, queued), state(db, waiting)) == (SUCCEEDED, SUCCEEDED)
    for operation, argument in ((admin.move_job, "x"), (admin.set_priority, 1)):
        with pytest.raises(InvalidStateError, match="already finished"):
            operation(db, queued, argument)


def test_priority_changes_the_claim_order(db):
    with db.session():
        ids = step.enqueue_many([{"n": n} for n in range(3)])
    admin.set_priority(db, ids[2], 5)
    drain(db)
    assert ran == [2, 0, 1]


def test_move_of_a_running_job_voids_its_lease(db):
    with db.session():
        job_id = write.enqueue(1)
    with db.session() as session:
        [claimed] = db.dialect.claim_jobs(session, QUEUE, 1, "host:1:a", 60)
    moved = admin.move_job(db, job_id, "other")
    assert (moved.state, moved.queue, moved.token) == (QUEUED, "other", claimed.token + 1)
    with db.session() as session:
        assert not db.dialect.complete_job(session.connection(), job_id, claimed.token)
        assert db.dialect.heartbeat_jobs(session, [(job_id, claimed.token)], 60) == [job_id]
    history = admin.get_job(db, job_id).history
    assert [(e.kind, e.worker) for e in history[-2:]] == [("popped", "host:1:a"), ("moved", "host:1:a")]
    drain(db, queues=("other",))
    assert (state(db, job_id), ran) == (SUCCEEDED, [1])


# -- expiry ----------------------------------------------------------------------------------------

def test_expiry_sweep_with_an_injected_clock(db):
    now = db_now(db)
    with db.session():
        late = step.options(expires=60, track=True).enqueue(1)
        blocked = step.options(expires=dt.timedelta(seconds=60), depends_on=[late]).enqueue(2)
        later = step.options(expires=now + dt.timedelta(hours=3)).enqueue(3)
        default = soon.enqueue(4)
        never = step.enqueue(5)
    expires_at = admin.get_job(db, default).expires_at
    assert dt.timedelta(seconds=3500) < expires_at - now < dt.timedelta(seconds=3700)
    assert admin.expire_jobs(db, now=now + dt.timedelta(seconds=30)) == 0
    assert admin.expire_jobs(db, queue="nope", now=now + dt.timedelta(hours=2)) == 0
    assert admin.expire_jobs(db, now=now + dt.timedelta(hours=2)) == 3
    assert [state(db, job) for job in (late, blocked, later, default, never)] == [
        EXPIRED, EXPIRED, QUEUED, EXPIRED, QUEUED]
    job = admin.get_job(db, late)
    assert job.finished_at is not None and job.runs == 0 and job.history[-1].kind == "expired"
    assert [e.kind for e in admin.events(db, job_id=late)] == ["put", "expired"]
    assert admin.queue_stats(db, QUEUE).expired == 3
    drain(db)
    assert sorted(ran) == [3, 5]


@pytest.mark.backends("mariadb", "postgresql")
def test_the_expiry_sweep_leaves_the_jobs_it_does_not_expire_to_claims(db):
    """Before the fix, the sweep's locking read kept the queued rows of its queues locked until its
    transaction ended (MariaDB): a claim meanwhile passed over them, and a worker's ``run_until_empty``
    that started beside its own sweep returned with a due job never run (seen once in CI)."""
    now = db_now(db)
    with db.session():
        for n in range(4):
            step.options(queue="elsewhere").enqueue(n)
        first = step.enqueue(4)
    assert sweep_then_claim(db, expired=0) == [first]
    with db.session():  # one past its expiry, beside one that is not
        gone = step.options(expires=now - dt.timedelta(seconds=1)).enqueue(5)
        second = step.enqueue(6)
    assert sweep_then_claim(db, expired=1) == [second]
    assert state(db, gone) == EXPIRED


def sweep_then_claim(db, expired: int) -> list[int]:
    """What a claim gets while the sweep's transaction is still open."""
    with db.engine.connect() as sweep, sweep.begin():
        assert db.dialect.expire_jobs(sweep, [QUEUE], 100) == expired
        with db.engine.begin() as conn:
            return [row.id for row in db.dialect.claim_jobs(conn, QUEUE, 10, "host:1:a", 30)]


def test_a_claimed_job_past_its_expiry_is_not_run(db):
    now = db_now(db)
    with db.session():
        gone = step.options(expires=now - dt.timedelta(seconds=1), track=True).enqueue(1)
        kept = step.options(expires=now + dt.timedelta(hours=1)).enqueue(2)
    result = drain(db)
    assert ran == [2] and result.succeeded == 1
    job = admin.get_job(db, gone)
    assert (job.state, job.runs) == (EXPIRED, 0)
    assert [e.kind for e in admin.events(db, job_id=gone)] == ["put", "expired"]
    assert state(db, kept) == SUCCEEDED


def test_a_worker_sweeps_waiting_jobs_past_their_expiry(db):
    """No claim ever reaches a waiting job: the worker's rescue loop expires it."""
    now = db_now(db)
    with db.session():
        blocker = step.options(queue="elsewhere").enqueue(1)
        waiting = step.options(depends_on=[blocker], expires=now - dt.timedelta(seconds=1)).enqueue(2)
    assert state(db, waiting) == WAITING
    w = quick_worker(db, [QUEUE], lease=1)
    thread = threading.Thread(target=w.run, name="jc-sweeping-worker")
    thread.start()
    try:
        wait_for(lambda: state(db, waiting) == EXPIRED, timeout=20)
    finally:
        w.stop()
        thread.join(30)
    assert not thread.is_alive() and ran == []


def test_bad_expires_and_depends_on_are_refused():
    for bad in (0, -1, "soon", True, float("nan")):
        with pytest.raises(ValueError, match="expires must be"):
            step.options(expires=bad)
    for bad in ("12", [1, "2"], [0], [True]):
        with pytest.raises(ValueError, match="depends_on must be"):
            step.options(depends_on=bad)
    with pytest.raises(ValueError, match="expires must be"):
        mqueue.task(name="jc.bad", expires=dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="depends_on applies to one job"):
        step.options(depends_on=[1]).enqueue_many([{"n": 1}])


# -- bulk ----------------------------------------------------------------------------------------

def test_retry_and_cancel_all_failed_in_batches(db):
    failing.update(range(700))
    with db.session():
        ids = flaky.enqueue_many([{"n": n} for n in range(700)])
        other = flaky.options(queue="other").enqueue(700)
    failing.add(700)
    drain(db, concurrency=4, queues=(QUEUE, "other"))
    assert {state(db, job) for job in ids + [other]} == {FAILED}
    failing.difference_update(range(350))
    assert admin.retry_failed(db, QUEUE) == 700 > admin.BULK_BATCH
    drain(db, concurrency=4)
    assert sorted(ran) == list(range(350))
    with db.session():
        waiter = step.options(depends_on=[ids[-1]]).enqueue(-1)
    assert admin.cancel_failed(db, QUEUE) == 349  # the one waited for stays failed
    assert state(db, ids[-1]) == FAILED and state(db, waiter) == WAITING
    assert admin.cancel_failed(db) == 1 and state(db, other) == CANCELED
    assert admin.retry_failed(db) == 1 and state(db, ids[-1]) == QUEUED
