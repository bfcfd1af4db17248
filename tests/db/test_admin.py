"""mqueue.admin on every backend: list, show, cancel, retry, stats, crons, enqueue by name.

Jobs are put into the states an operator meets through the dialect's own
transitions (claim, fail), as a worker would, so the rows look exactly like
production ones.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

import pytest
from sqlalchemy import insert, select

import mqueue
from mqueue import admin
from mqueue.dialects.functions import utc_now
from mqueue.encoding import encode_args
from mqueue.errors import InvalidStateError, JobNotFoundError, SchemaMissingError, UnknownTaskError
from mqueue.registry import unregister
from mqueue.schema import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, cron_table, task_table
from mqueue.worker import Worker

TRACEBACK = ('Traceback (most recent call last):\n  File "tasks.py", line 3, in send\n'
             '    raise ValueError("smtp down")\nValueError: smtp down\n')


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def add(db, name="admin_test.job", queue="default", priority=0, eta=None, args="{}", **extra) -> int:
    """Insert a job row the way enqueue does; ``eta`` is a datetime or seconds from the database's now."""
    values = dict(name=name, queue=queue, priority=priority, args=args, **extra)
    if isinstance(eta, (int, float)):
        values["eta"] = utc_now(eta)
    elif eta is not None:
        values["eta"] = eta
    with db.session() as session:
        return db.dialect.insert_job(session, values)


def claim(db, queue, owner="host-a:101:beef", limit=1):
    with db.session() as session:
        return db.dialect.claim_jobs(session, queue, limit, owner, 60)


def fail(db, queue, error=TRACEBACK) -> int:
    [row] = claim(db, queue)
    with db.session() as session:
        assert db.dialect.fail_job(session, row.id, row.token, error)
    return row.id


def succeed(db, queue, owner="host-a:101:beef") -> int:
    [row] = claim(db, queue, owner=owner)
    with db.session() as session:
        assert db.dialect.complete_job(session, row.id, row.token)
    return row.id


def row_of(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).first()


# -- list ------------------------------------------------------------------------

def test_list_running_first_then_claim_order_then_failed(db):
    now = db_now(db)
    failed = add(db, queue="bad", eta=now - dt.timedelta(seconds=50))
    assert fail(db, "bad") == failed
    running = add(db, queue="busy", eta=now - dt.timedelta(seconds=40))
    assert claim(db, "busy")[0].id == running
    late = add(db, eta=now + dt.timedelta(seconds=100))
    tie_first = add(db, eta=now - dt.timedelta(seconds=10))
    tie_second = add(db, eta=now - dt.timedelta(seconds=10))
    oldest = add(db, eta=now - dt.timedelta(seconds=20))
    urgent = add(db, priority=5, eta=now - dt.timedelta(seconds=5))
    low = add(db, priority=-1, eta=now - dt.timedelta(seconds=60))

    jobs = admin.list_jobs(db)
    assert [job.id for job in jobs] == [running, urgent, oldest, tie_first, tie_second, late, low, failed]
    assert [job.state for job in jobs] == [RUNNING] + [QUEUED] * 6 + [FAILED]
    # The queued part is exactly what workers would claim, in that order.
    assert [row.id for row in claim(db, "default", limit=10)] == [urgent, oldest, tie_first, tie_second, low]


def test_list_filters_and_limit(db):
    a1, a2, a3 = add(db, queue="a", eta=-3), add(db, queue="a", eta=-2), add(db, queue="a", eta=-1)
    b1 = add(db, queue="b")
    fail(db, "a")  # a1

    assert [j.id for j in admin.list_jobs(db, queue="a")] == [a2, a3, a1]
    assert [j.id for j in admin.list_jobs(db, queue="b")] == [b1]
    assert [j.id for j in admin.list_jobs(db, state="failed")] == [a1]
    assert [j.id for j in admin.list_jobs(db, queue="a", state="queued")] == [a2, a3]
    assert [j.id for j in admin.list_jobs(db, queue="b", state="failed")] == []
    assert [j.id for j in admin.list_jobs(db, queue="a", limit=2)] == [a2, a3]
    assert admin.list_jobs(db, queue="nope") == []
    with pytest.raises(ValueError, match="unknown state 'done'; choose from queued, running, failed"):
        admin.list_jobs(db, state="done")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        admin.list_jobs(db, limit=0)


def test_accepts_a_url_and_explains_missing_tables(db, database_url, backend):
    job = add(db)
    assert [j.id for j in admin.list_jobs(database_url)] == [job]
    db.drop_all()
    with pytest.raises(SchemaMissingError, match="run: python -m mqueue migrate"):
        admin.list_jobs(db)
    with pytest.raises(SchemaMissingError):
        admin.stats(database_url)


def test_reads_do_not_wait_for_an_open_write_transaction(db):
    """On SQLite every write transaction holds the database lock; reads take a snapshot instead."""
    visible = add(db)
    running = add(db, queue="busy")
    claim(db, "busy")
    holding, release = threading.Event(), threading.Event()

    def writer():
        with db.session() as session:
            db.dialect.insert_job(session, dict(name="admin_test.uncommitted", queue="default", args="{}"))
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        db.check_schema()  # what every CLI job command does first
        assert [job.id for job in admin.list_jobs(db)] == [running, visible]
        assert admin.get_job(db, visible).id == visible
        assert [(s.queued, s.running) for s in admin.stats(db)] == [(0, 1), (1, 0)]
        assert admin.list_crons(db) == []
        with pytest.raises(InvalidStateError, match="is running"):
            admin.cancel_job(db, running)  # refused from the snapshot, without waiting for the lock
        assert time.monotonic() - started < 5
    finally:
        release.set()
        thread.join(10)
    assert len(admin.list_jobs(db)) == 3


# -- show ------------------------------------------------------------------------

def test_get_job_everything_about_one_job(db):
    args = encode_args({"to": "a@example.com", "when": dt.date(2030, 1, 2)})
    job_id = add(db, name="admin_test.send", queue="mail", priority=2, args=args, max_retries=4)
    fail(db, "mail")

    job = admin.get_job(db, job_id)
    assert (job.id, job.name, job.queue, job.state, job.priority, job.retries, job.max_retries) == \
        (job_id, "admin_test.send", "mail", FAILED, 2, 1, 4)
    assert job.decoded_args() == {"to": "a@example.com", "when": dt.date(2030, 1, 2)}
    assert job.last_error == TRACEBACK
    assert job.error_summary == "ValueError: smtp down"
    assert job.owner == "host-a:101:beef" and job.started_at is not None  # the worker of its last run
    assert (job.runs, job.finished_at, job.finished) == (1, None, False)
    assert abs((job.created_at - db_now(db)).total_seconds()) < 30

    document = json.loads(json.dumps(job.to_dict()))
    assert document["args"] == {"to": "a@example.com", "when": {"$type": "date", "$value": "2030-01-02"}}
    assert document["eta"] == job.eta.replace(tzinfo=dt.timezone.utc).isoformat()
    assert document["eta"].endswith("+00:00")
    assert document["last_error"] == TRACEBACK and document["state"] == "failed"

    with pytest.raises(JobNotFoundError,
                       match=rf"^no job {job_id + 1} \(never existed, or finished and pruned after jobs-history\)$"):
        admin.get_job(db, job_id + 1)


def test_undecodable_args_are_shown_not_fatal(db):
    job = admin.get_job(db, add(db, args="[1, 2]"))
    assert job.raw_args == "[1, 2]" and job.to_dict()["args"] == [1, 2]
    with pytest.raises(ValueError, match="JSON object"):
        job.decoded_args()


# -- cancel ----------------------------------------------------------------------

def test_cancel_queued_and_failed_jobs(db):
    queued = add(db, name="admin_test.queued", eta=3600, unique_key="q1")
    due = add(db, eta=-1)
    failed = add(db, queue="bad", unique_key="f1")
    fail(db, "bad")
    kept = add(db, eta=-1)

    was = admin.cancel_job(db, queued)
    assert (was.id, was.name, was.state) == (queued, "admin_test.queued", QUEUED)
    assert admin.cancel_job(db, due).state == QUEUED
    assert admin.cancel_job(db, failed).state == FAILED
    for job_id in (queued, due, failed):
        row = row_of(db, job_id)  # kept on record as canceled, its unique key cleared
        assert (row.state, row.unique_key) == (CANCELED, None)
        assert row.finished_at is not None and row.lease_expires_at is None
        assert admin.get_job(db, job_id).finished
    assert row_of(db, kept).state == QUEUED
    assert [row.id for row in claim(db, "default", limit=5)] == [kept]  # a canceled job is never claimed
    assert claim(db, "bad") == []
    for operation, verb in ((admin.cancel_job, "cancelled"), (admin.retry_job, "retried")):
        with pytest.raises(InvalidStateError, match=rf"^job {queued} has already finished \(canceled\) "
                                                    rf"and cannot be {verb}; a finished job never runs again"):
            operation(db, queued)
    assert row_of(db, queued).state == CANCELED
    with pytest.raises(JobNotFoundError, match=f"no job {kept + 1} "):
        admin.cancel_job(db, kept + 1)


def test_cancel_and_retry_refuse_a_running_job(db):
    job_id = add(db)
    [claimed] = claim(db, "default", owner="web-3:4242:ab")
    for operation, verb in ((admin.cancel_job, "cancelled"), (admin.retry_job, "retried")):
        with pytest.raises(InvalidStateError) as caught:
            operation(db, job_id)
        force = f" (or, if its worker is dead, force it back: mqueue retry {job_id} --force)" if verb == "retried" else ""
        assert str(caught.value) == (
            f"job {job_id} is running on worker web-3:4242:ab and cannot be {verb} safely; "
            f"wait for it to finish or for its lease to expire{force}")
    row = row_of(db, job_id)
    assert (row.state, row.token, row.owner) == (RUNNING, claimed.token, "web-3:4242:ab")


def test_cancel_racing_a_claim_never_touches_a_claimed_job(db):
    """Each job ends either claimed (and still there) or cancelled, never both."""
    ids = [add(db, queue="race") for _ in range(40)]
    claimed: list[int] = []
    cancelled: list[int] = []
    refused: list[int] = []

    def claimer():
        while True:
            rows = claim(db, "race")
            if not rows:
                return
            claimed.append(rows[0].id)

    def canceller():
        for job_id in reversed(ids):
            try:
                cancelled.append(admin.cancel_job(db, job_id).id)
            except InvalidStateError:
                refused.append(job_id)

    threads = [threading.Thread(target=claimer), threading.Thread(target=canceller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not set(claimed) & set(cancelled)
    assert sorted(claimed + cancelled) == ids
    assert set(refused) <= set(claimed)
    assert all(row_of(db, job_id).state == RUNNING for job_id in claimed)
    assert all(row_of(db, job_id).state == CANCELED for job_id in cancelled)


# -- retry -----------------------------------------------------------------------

def test_retry_failed_job_resets_retries_and_keeps_error(db):
    job_id = add(db, queue="bad", eta=-5)
    fail(db, "bad")
    before = admin.get_job(db, job_id)
    assert (before.state, before.retries) == (FAILED, 1)

    after = admin.retry_job(db, job_id)
    assert (after.state, after.retries, after.last_error) == (QUEUED, 0, TRACEBACK)
    assert after.eta > before.eta and after.eta <= db_now(db)
    assert [row.id for row in claim(db, "bad")] == [job_id]


def test_retry_queued_job_makes_it_due_now_never_later(db):
    scheduled = add(db, eta=3600)
    due = add(db, eta=-600)
    due_eta = admin.get_job(db, due).eta

    assert admin.retry_job(db, scheduled).eta <= db_now(db)
    assert admin.retry_job(db, due).eta == due_eta  # already due: keeps its place in line
    assert {row.id for row in claim(db, "default", limit=5)} == {scheduled, due}
    with pytest.raises(JobNotFoundError):
        admin.retry_job(db, due + 100)


def test_retry_all_failed_by_queue(db):
    for queue in ("a", "a", "b"):
        add(db, queue=queue)
        fail(db, queue)
    add(db, queue="a")  # queued: untouched

    assert admin.retry_failed(db, "a") == 2
    assert [j.queue for j in admin.list_jobs(db, state="failed")] == ["b"]
    assert all(j.retries == 0 for j in admin.list_jobs(db, queue="a"))
    assert admin.retry_failed(db, "a") == 0
    assert admin.retry_failed(db, None) == 1
    assert admin.list_jobs(db, state="failed") == []


def test_retried_job_runs_again_in_a_worker(db):
    attempts = []

    @mqueue.task(name="admin_test.flaky", max_retries=0)
    def flaky(n):
        attempts.append(n)
        if len(attempts) == 1:
            raise RuntimeError("first run breaks")

    try:
        with db.session():
            job_id = flaky.enqueue(7)
        first = Worker(db, queues=["default"], poll_interval=0.05).run_until_empty(timeout=30)
        assert first.failed == 1
        assert admin.get_job(db, job_id).error_summary == "RuntimeError: first run breaks"
        admin.retry_job(db, job_id)
        second = Worker(db, queues=["default"], poll_interval=0.05).run_until_empty(timeout=30)
        assert (second.succeeded, attempts) == (1, [7, 7])
        done = admin.get_job(db, job_id)
        assert (done.state, done.runs, done.finished) == (SUCCEEDED, 2, True)
        with pytest.raises(InvalidStateError, match="has already finished"):
            admin.retry_job(db, job_id)  # a succeeded job never runs again
        third = Worker(db, queues=["default"], poll_interval=0.05).run_until_empty(timeout=30)
        assert (third.succeeded, third.failed, attempts) == (0, 0, [7, 7])
    finally:
        unregister("admin_test.flaky")


# -- stats -----------------------------------------------------------------------

def test_stats_counts_and_oldest_due_age(db):
    now = db_now(db)
    add(db, queue="a", priority=9)
    add(db, queue="a", priority=9)
    claim(db, "a")                      # running
    fail(db, "a")                       # failed
    add(db, queue="a", eta=now - dt.timedelta(seconds=30))
    add(db, queue="a", eta=-1)
    add(db, queue="a", eta=3600)        # scheduled
    add(db, queue="b", eta=60)
    add(db, queue="b", priority=9)
    succeed(db, "b")                    # succeeded: finished, neither due nor running
    admin.cancel_job(db, add(db, queue="b", eta=-100))  # canceled: not due either

    assert [s.queue for s in admin.stats(db)] == ["a", "b"]
    a, b = admin.stats(db)
    assert (a.queued, a.scheduled, a.running, a.failed, a.succeeded, a.canceled) == (2, 1, 1, 1, 0, 0)
    assert 30 <= a.oldest_due_seconds < 60
    assert (b.queued, b.scheduled, b.running, b.failed, b.oldest_due_seconds) == (0, 1, 0, 0, None)
    assert json.loads(json.dumps(b.to_dict())) == {
        "queue": "b", "queued": 0, "scheduled": 1, "running": 0, "failed": 0, "oldest_due_seconds": None, "other": 0,
        "waiting": 0, "succeeded": 1, "canceled": 1, "expired": 0, "paused": False}


def test_stats_empty(db):
    assert admin.stats(db) == []


# -- crons -----------------------------------------------------------------------

def test_list_crons(db):
    last = dt.datetime(2030, 1, 1, 3, 0)
    with db.engine.begin() as conn:
        conn.execute(insert(cron_table), [
            dict(name="tasks.zeta", queue="reports", schedule="0 3 * * *", tz="Europe/Berlin",
                 last_slot=last, next_slot=last + dt.timedelta(days=1), last_job_id=17),
            dict(name="tasks.alpha", queue="reports", schedule="*/5 * * * *", tz="UTC",
                 last_slot=None, next_slot=dt.datetime(2030, 1, 1, 0, 5), last_job_id=None),
            dict(name="tasks.beta", queue="default", schedule="@hourly", tz="UTC",
                 last_slot=None, next_slot=None, last_job_id=None),
        ])
    crons = admin.list_crons(db)
    assert [(c.queue, c.name) for c in crons] == [
        ("default", "tasks.beta"), ("reports", "tasks.alpha"), ("reports", "tasks.zeta")]
    zeta = crons[2]
    assert (zeta.schedule, zeta.tz, zeta.last_run, zeta.next_run, zeta.last_job_id) == \
        ("0 3 * * *", "Europe/Berlin", last, dt.datetime(2030, 1, 2, 3, 0), 17)
    assert crons[0].last_run is None and crons[0].next_run is None
    document = json.loads(json.dumps(zeta.to_dict()))
    assert (document["last_run"], document["next_run"]) == ("2030-01-01T03:00:00+00:00",
                                                            "2030-01-02T03:00:00+00:00")


# -- enqueue by name -------------------------------------------------------------

@pytest.fixture
def mail_task():
    @mqueue.task(name="admin_test.mail", queue="mailq", priority=3)
    def mail(to, subject="hi"):
        pass

    yield mail
    unregister("admin_test.mail")


def test_enqueue_by_name_registered_checks_signature_and_uses_task_defaults(db, mail_task):
    job = admin.get_job(db, admin.enqueue_by_name(db, "admin_test.mail", {"to": "a@example.com"}))
    assert (job.name, job.queue, job.priority, job.decoded_args()) == (
        "admin_test.mail", "mailq", 3, {"to": "a@example.com"})

    job = admin.get_job(db, admin.enqueue_by_name(db, "admin_test.mail", {"to": "b", "subject": "x"},
                                                  delay=120, priority=-2, queue="other"))
    assert (job.queue, job.priority) == ("other", -2)
    assert 100 < (job.eta - db_now(db)).total_seconds() <= 120

    with pytest.raises(TypeError, match="admin_test.mail: got an unexpected keyword argument 'nope'"):
        admin.enqueue_by_name(db, "admin_test.mail", {"to": "c", "nope": 1})
    with pytest.raises(TypeError, match="missing a required argument: 'to'"):
        admin.enqueue_by_name(db, "admin_test.mail", {})
    with pytest.raises(UnknownTaskError,
                       match=r"unknown task 'admin_test.mial' \(did you mean 'admin_test.mail'\?\)"):
        admin.enqueue_by_name(db, "admin_test.mial", {}, require_registered=True)
    assert len(admin.list_jobs(db)) == 2


def test_enqueue_by_name_unregistered_inserts_the_row_as_given(db):
    job = admin.get_job(db, admin.enqueue_by_name(db, "elsewhere.report", {"day": "2030-01-01", "n": [1, 2]}))
    assert (job.name, job.queue, job.priority, job.state) == ("elsewhere.report", "default", 0, QUEUED)
    assert json.loads(job.raw_args) == {"day": "2030-01-01", "n": [1, 2]}
    assert job.eta <= db_now(db)

    job = admin.get_job(db, admin.enqueue_by_name(db, "elsewhere.report", {}, delay=dt.timedelta(minutes=5),
                                                  priority=4, queue="reports"))
    assert (job.queue, job.priority) == ("reports", 4)
    assert 250 < (job.eta - db_now(db)).total_seconds() <= 300

    with pytest.raises(TypeError, match="must be a JSON object of named arguments, got an array"):
        admin.enqueue_by_name(db, "elsewhere.report", [1])
    with pytest.raises(ValueError, match="priority must be an integer"):
        admin.enqueue_by_name(db, "elsewhere.report", {}, priority="high")
    with pytest.raises(ValueError, match="delay must be seconds >= 0"):
        admin.enqueue_by_name(db, "elsewhere.report", {}, delay=-1)
    with pytest.raises(TypeError, match="which mqueue cannot store"):
        admin.enqueue_by_name(db, "elsewhere.report", {"x": object()})
    assert len(admin.list_jobs(db)) == 2
