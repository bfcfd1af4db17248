"""A job's life on record, on every backend: history, errors, finished states, shared settings.

Jobs run in a real worker (``run_until_empty``); their tasks write into the
scratch ``note`` table through the job's own session, so a run whose
completion rolled back leaves no note, and the history must not show it
either.  A lease is lost the way it is in production: the lease runs out,
a rescue re-queues the job and another worker claims it, all on other
connections while the first run's task is still running.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
from helpers import db_now, note, note_metadata, notes, quick_worker
from sqlalchemy import func, insert, select, update

import mqueue
from mqueue import admin, history
from mqueue.dialects.functions import utc_now
from mqueue.errors import InvalidStateError, JobNotFoundError
from mqueue.schema import event_table, setting_table, task_table

QUEUE = "th"
FENCE_QUEUE = "th-fence"
#: The owner string of a worker elsewhere, which takes the job over.
OTHER = "other-host:4242:beef"

#: The Database the tasks below reach outside the job's own session.
task_db: list = []
#: Claims made by a task on behalf of ``OTHER``.
taken: list = []


def write_note(text: str) -> None:
    mqueue.current_session().execute(insert(note).values(text=text))


@mqueue.task(name="th.ok", queue=QUEUE)
def ok(n: int) -> None:
    write_note(f"ok {n}")


@mqueue.task(name="th.flaky", queue=QUEUE, backoff=0)
def flaky() -> None:
    """Fails its first two runs (after writing), succeeds on the third."""
    retries = mqueue.current_job().retries
    write_note(f"flaky run {retries}")
    if retries < 2:
        raise RuntimeError(f"flaky run {retries} broke")


@mqueue.task(name="th.write_then_raise", queue=QUEUE, max_retries=0)
def write_then_raise() -> None:
    write_note("written before the error")
    raise RuntimeError("raised after writing")


@mqueue.task(name="th.handed_over", queue=FENCE_QUEUE)
def handed_over(write: bool) -> None:
    """On its first run the lease runs out and ``OTHER`` claims the job while this run goes on.

    ``write=False`` leaves the session untouched, so the worker's completer
    completes it (``complete_jobs``) instead of the task's own transaction.
    """
    job = mqueue.current_job()
    if job.retries == 0:
        db = task_db[0]
        with db.engine.begin() as conn:
            conn.execute(update(task_table).where(task_table.c.id == job.id)
                         .values(lease_expires_at=utc_now(-5)))
            assert db.dialect.rescue_expired(conn, [FENCE_QUEUE]) == 1
        with db.engine.begin() as conn:
            taken.extend(db.dialect.claim_jobs(conn, FENCE_QUEUE, 1, OTHER, 60))
    if write:
        write_note(f"handed_over run {job.retries}")


@pytest.fixture
def db(db):
    note_metadata.create_all(db.engine)
    task_db[:] = [db]
    taken.clear()
    yield db
    task_db.clear()


def worker(db, queues=(QUEUE,), **options) -> mqueue.Worker:
    return quick_worker(db, queues, **options)


def kinds(job) -> list[str]:
    return [entry.kind for entry in job.history]


def event_kinds(db, job_id=None) -> list[str]:
    query = select(event_table.c.kind).order_by(event_table.c.id)
    if job_id is not None:
        query = query.where(event_table.c.job_id == job_id)
    with db.engine.connect() as conn:
        return list(conn.execute(query).scalars())


def assert_in_time_order(job) -> None:
    times = [entry.at for entry in job.history]
    assert None not in times, job.history
    assert times == sorted(times), [(entry.kind, entry.at) for entry in job.history]


# -- a job that failed twice, then succeeded ------------------------------------------


def test_history_of_a_job_that_failed_twice_then_succeeded(db):
    with db.session():
        job_id = flaky.enqueue()
    w = worker(db)
    result = w.run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (1, 2, 0)
    assert notes(db.engine) == ["flaky run 2"]  # the failed runs' writes rolled back

    job = admin.get_job(db, job_id)
    assert (job.state, job.runs, job.retries, job.finished) == ("succeeded", 3, 2, True)
    assert kinds(job) == ["put", "popped", "retried", "popped", "retried", "popped", "succeeded"]
    assert [entry.worker for entry in job.history] == [None] + [w.owner] * 6
    assert_in_time_order(job)

    # Every failed run's error, oldest first, each with its own text.
    assert [entry.kind for entry in job.errors] == ["retried", "retried"]
    first, second = (entry.detail for entry in job.errors)
    assert "RuntimeError: flaky run 0 broke" in first and "flaky run 1" not in first
    assert "RuntimeError: flaky run 1 broke" in second and "flaky run 0" not in second
    assert "Traceback" in first
    assert "RuntimeError: flaky run 1 broke" in job.last_error

    # The times on the job agree with its history.
    assert job.created_at <= job.started_at <= job.finished_at
    assert job.created_at < job.finished_at
    assert job.history[0].at == job.created_at
    assert job.history[-2].at == job.started_at  # the last run's start
    assert job.history[-1].at == job.finished_at
    assert job.owner == w.owner and job.lease_expires_at is None
    # wait: eta to the first start; run: start to finish of the last run.
    first_start = job.history[1].at
    assert job.wait_seconds is not None and job.run_seconds is not None
    assert job.wait_seconds == pytest.approx((first_start - job.created_at).total_seconds(), abs=0.01)
    assert job.run_seconds == pytest.approx((job.finished_at - job.started_at).total_seconds(), abs=0.01)
    assert job.wait_seconds >= 0 and job.run_seconds >= 0

    assert [j.id for j in admin.list_jobs(db, state="succeeded")] == [job_id]
    assert [j.id for j in admin.list_jobs(db, queue=QUEUE, state="succeeded")] == [job_id]
    assert admin.list_jobs(db, state="queued") == []

    as_json = json.loads(json.dumps(job.to_dict()))
    assert [entry["kind"] for entry in as_json["history"]] == kinds(job)
    assert as_json["finished_at"] is not None and as_json["runs"] == 3
    # The success wrote no event row: put, the last popped and succeeded come from the job's row.
    assert event_kinds(db, job_id) == ["retried", "retried"]


def test_a_job_that_succeeds_at_once_has_put_popped_succeeded(db):
    with db.session():
        job_id = ok.enqueue(1)
    w = worker(db)
    assert w.run_until_empty(timeout=30).succeeded == 1
    job = admin.get_job(db, job_id)
    assert kinds(job) == ["put", "popped", "succeeded"]
    assert [entry.worker for entry in job.history] == [None, w.owner, w.owner]
    assert (job.runs, job.retries, job.errors) == (1, 0, [])
    assert_in_time_order(job)
    assert event_kinds(db) == []


# -- rolled-back completions leave no history -----------------------------------------


@pytest.mark.parametrize("write", [True, False], ids=["writes", "quiet"])
def test_a_completion_refused_for_a_lost_lease_leaves_no_succeeded_entry(db, write):
    with db.session():
        job_id = handed_over.enqueue(write=write)
    w = worker(db, queues=[FENCE_QUEUE], heartbeat_interval=60)
    result = w.run_until_empty(timeout=30)
    assert (result.succeeded, result.lost) == (0, 1)
    [claim] = taken
    assert notes(db.engine) == []

    job = admin.get_job(db, job_id)
    assert (job.state, job.owner, job.finished_at) == ("running", OTHER, None)
    assert kinds(job) == ["put", "popped", "rescued", "popped"]
    assert [entry.worker for entry in job.history] == [None, w.owner, w.owner, OTHER]
    assert "lease expired" in job.history[2].detail
    assert_in_time_order(job)
    assert admin.list_jobs(db, state="succeeded") == []
    assert event_kinds(db) == ["rescued"]

    # The worker that holds the job now completes it: one success, its own.
    with db.engine.begin() as conn:
        lost, _ = db.dialect.complete_jobs(conn, [(claim.id, claim.token)])
    assert lost == []
    job = admin.get_job(db, job_id)
    assert kinds(job) == ["put", "popped", "rescued", "popped", "succeeded"]
    assert job.history[-1].worker == OTHER
    assert job.runs == 2
    assert_in_time_order(job)


def test_a_task_that_raises_after_writing_leaves_no_succeeded_entry(db):
    with db.session():
        job_id = write_then_raise.enqueue()
    w = worker(db)
    result = w.run_until_empty(timeout=30)
    assert (result.succeeded, result.failed) == (0, 1)
    assert notes(db.engine) == []
    job = admin.get_job(db, job_id)
    assert (job.state, job.finished_at, job.runs) == ("failed", None, 1)
    assert kinds(job) == ["put", "popped", "failed"]
    assert [entry.kind for entry in job.errors] == ["failed"]
    assert "RuntimeError: raised after writing" in job.errors[0].detail
    assert_in_time_order(job)
    assert admin.list_jobs(db, state="succeeded") == []


# -- cancel, finished jobs, pruned jobs -----------------------------------------------


def test_cancel_keeps_the_job_as_canceled_with_its_history(db):
    with db.session():
        queued_id = ok.options(unique_key="th-cancel").enqueue(1)
        failing_id = write_then_raise.enqueue()

    as_it_was = admin.cancel_job(db, queued_id)
    assert as_it_was.state == "queued"
    assert worker(db).run_until_empty(timeout=30).failed == 1  # the canceled job never runs
    assert notes(db.engine) == []

    canceled = admin.get_job(db, queued_id)
    assert (canceled.state, canceled.unique_key, canceled.runs) == ("canceled", None, 0)
    assert canceled.finished_at is not None and canceled.finished_at >= canceled.created_at
    assert kinds(canceled) == ["put", "canceled"]
    assert canceled.history[-1].at == canceled.finished_at
    # Its unique key is free for a new job.
    with db.session():
        again = ok.options(unique_key="th-cancel").enqueue(2)
    assert again != queued_id

    admin.cancel_job(db, failing_id)
    failed_then_canceled = admin.get_job(db, failing_id)
    assert failed_then_canceled.state == "canceled"
    assert kinds(failed_then_canceled) == ["put", "popped", "failed", "canceled"]
    assert "raised after writing" in failed_then_canceled.last_error
    assert [entry.kind for entry in failed_then_canceled.errors] == ["failed"]
    assert_in_time_order(failed_then_canceled)

    assert [j.id for j in admin.list_jobs(db, state="canceled")] == [failing_id, queued_id]  # newest first
    [stats] = admin.stats(db)
    assert (stats.queue, stats.canceled, stats.queued, stats.failed) == (QUEUE, 2, 1, 0)


def test_finished_jobs_cannot_be_retried_or_canceled(db):
    with db.session():
        succeeded_id = ok.enqueue(1)
        canceled_id = ok.enqueue(2)
        expired_id = ok.enqueue(3)
    admin.cancel_job(db, canceled_id)
    with db.engine.begin() as conn:  # no transition writes ``expired`` yet: as a row would be
        conn.execute(update(task_table).where(task_table.c.id == expired_id)
                     .values(state="expired", finished_at=utc_now()))
    assert worker(db).run_until_empty(timeout=30).succeeded == 1
    assert notes(db.engine) == ["ok 1"]

    for job_id, state in ((succeeded_id, "succeeded"), (canceled_id, "canceled"), (expired_id, "expired")):
        for action in (admin.retry_job, admin.cancel_job):
            with pytest.raises(InvalidStateError, match=rf"job {job_id} has already finished \({state}\)"):
                action(db, job_id)
        assert admin.get_job(db, job_id).state == state
    assert worker(db).run_until_empty(timeout=30).succeeded == 0  # a finished job never runs again
    assert notes(db.engine) == ["ok 1"]


def test_a_pruned_job_is_not_found(db):
    with db.session():
        job_id = ok.enqueue(1)
    assert worker(db).run_until_empty(timeout=30).succeeded == 1
    assert admin.get_job(db, job_id).state == "succeeded"
    assert history.prune(db, now=db_now(db) + dt.timedelta(days=31)).jobs == 1
    for action in (admin.get_job, admin.retry_job, admin.cancel_job):
        with pytest.raises(JobNotFoundError, match=f"no job {job_id} .*pruned"):
            action(db, job_id)
    assert admin.list_jobs(db, state="succeeded") == []


# -- shared settings ---------------------------------------------------------------------


DEFAULTS = {"jobs-history": 30 * 86400, "jobs-history-count": 50_000, "stats-history": 30, "heartbeat": 60}


def test_get_config_shows_defaults_and_set_config_changes_them_for_everyone(db, database_url):
    assert admin.get_config(db) == DEFAULTS
    assert admin.set_config(db, "jobs-history-count", 10) == 10
    assert admin.set_config(db, "jobs-history", "3600") == 3600
    assert admin.set_config(db, "stats-history", " 7 ") == 7
    assert admin.set_config(db, "stats-history", 0) == 0
    # Another handle on the same database (another host's worker) sees the same.
    assert admin.get_config(database_url) == {**DEFAULTS, "jobs-history": 3600, "jobs-history-count": 10,
                                              "stats-history": 0}
    assert admin.set_config(db, "jobs-history-count", None) == 50_000  # back to the default
    assert admin.get_config(db) == {**DEFAULTS, "jobs-history": 3600, "jobs-history-count": 50_000, "stats-history": 0}


@pytest.mark.parametrize("key, value, message", [
    ("jobs-histroy", 5, r"unknown setting 'jobs-histroy'; known: jobs-history, jobs-history-count, stats-history"),
    ("jobs_history", 5, r"unknown setting 'jobs_history'"),
    ("jobs-history", -1, r"setting jobs-history takes a whole number >= 0 \(.*\), got -1"),
    ("jobs-history", "soon", r"setting jobs-history takes a whole number >= 0 \(.*\), got 'soon'"),
    ("jobs-history-count", 2.5, r"setting jobs-history-count takes a whole number >= 0 \(.*\), got 2.5"),
    ("jobs-history-count", True, r"setting jobs-history-count takes a whole number >= 0 \(.*\), got True"),
    ("stats-history", "", r"setting stats-history takes a whole number >= 0 \(.*\), got ''"),
])
def test_set_config_refuses_unknown_keys_and_bad_values_and_stores_nothing(db, key, value, message):
    with pytest.raises(ValueError, match=message) as caught:
        admin.set_config(db, key, value)
    assert "\n" not in str(caught.value)
    assert admin.get_config(db) == DEFAULTS
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(setting_table)).scalar_one() == 0


def test_a_stored_value_that_does_not_parse_counts_as_the_default(db):
    with db.engine.begin() as conn:  # written by hand
        conn.execute(insert(setting_table).values(key="jobs-history-count", value="lots"))
        conn.execute(insert(setting_table).values(key="stats-history", value="12"))
    assert admin.get_config(db) == {**DEFAULTS, "stats-history": 12}
