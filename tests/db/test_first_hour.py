"""What a new user meets in the first hour (issue 11), in-process on every backend.

Log lines that say why a job failed, one outage line per backoff step, a
missing table named with what to run, enqueue errors that name the wrong
keyword, URLs that say which scheme to use, forcing a stuck job back, and
the testing helpers (``run_until_empty(with_scheduled=True)``,
``mqueue.testing.perform_job``).
"""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
from helpers import attempts_possible, wait_for
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, func, insert, select, text

import mqueue
from mqueue.schema import task_table

effect_metadata = MetaData()
effect = Table(
    "fh_effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("note", String(100), nullable=True),
)

#: Set by ``hold`` when it starts; it then waits for ``release``.
holding = threading.Event()
release = threading.Event()


def write_effect(note: str | None = None) -> None:
    job = mqueue.current_job()
    mqueue.current_session().execute(insert(effect).values(job_id=job.id, note=note))


@mqueue.task(name="fh.smtp", queue="fh", max_retries=1, backoff=0)
def smtp(to: str) -> None:
    write_effect("rolled back")
    raise ValueError(f"smtp down for {to}\nthe relay said more on a second line")


@mqueue.task(name="fh.hold", queue="fh")
def hold() -> None:
    """Touches no database while it waits, so no lock is held (SQLite's write lock included)."""
    holding.set()
    release.wait(30)


@pytest.fixture
def db(db):
    effect_metadata.create_all(db.engine)
    holding.clear()
    release.clear()
    yield db
    release.set()


def worker(db, **options) -> mqueue.Worker:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 5)
    return mqueue.Worker(db, queues=["fh"], **options)


def effect_count(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(effect)).scalar_one()


def outcome_lines(caplog, outcome: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f" outcome={outcome}" in r.getMessage()]


# -- item 5: outcome lines say why, hand-backs say how long -----------------------------


def test_failed_and_retried_outcome_lines_carry_the_errors_first_line_and_debug_the_traceback(db, caplog):
    caplog.set_level(logging.DEBUG, logger="mqueue")
    with db.session():
        job_id = smtp.enqueue("a@example.com")
    result = worker(db).run_until_empty(timeout=30)
    assert (result.retried, result.failed) == (1, 1)
    assert effect_count(db) == 0
    error = "error=ValueError: smtp down for a@example.com"
    [retried] = outcome_lines(caplog, "retried")
    [failed] = outcome_lines(caplog, "failed")
    for line in (retried, failed):
        assert re.match(rf"job={job_id} task=fh.smtp queue=fh duration=\d+\.\d{{3}}s outcome=\w+ ", line), line
        assert line.endswith(error), line  # the first line only
    assert [r.levelname for r in caplog.records if r.getMessage() in (retried, failed)] == ["INFO", "WARNING"]
    tracebacks = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.DEBUG and r.getMessage().startswith(f"job={job_id} traceback")]
    assert len(tracebacks) == 2
    assert "Traceback (most recent call last)" in tracebacks[0]
    assert 'raise ValueError(f"smtp down' in tracebacks[0]


def test_a_hand_back_line_has_a_duration_like_every_outcome_line(db, caplog):
    caplog.set_level(logging.INFO, logger="mqueue")
    with db.session():
        job_id = hold.enqueue()
    w = worker(db, grace=0)
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        assert holding.wait(10), "the task did not start"
        time.sleep(0.2)  # the run's age when it is handed back
        w.stop()
        thread.join(30)
    finally:
        release.set()
        thread.join(30)
    [line] = outcome_lines(caplog, "released")
    match = re.fullmatch(rf"job={job_id} task=fh.hold queue=fh duration=(\d+\.\d{{3}})s outcome=released", line)
    assert match, line
    assert float(match.group(1)) >= 0.2
    with db.engine.connect() as conn:
        assert conn.execute(select(task_table.c.state).where(task_table.c.id == job_id)).scalar_one() == "queued"


# -- item 6: one line per backoff step; a missing table says what to run ------------------


def test_a_dropped_table_is_one_line_per_backoff_step_naming_the_table_and_the_fix(db, caplog):
    caplog.set_level(logging.INFO, logger="mqueue")
    w = worker(db)
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        wait_for(lambda: any(" serving fh" in r.getMessage() for r in caplog.records))
        with db.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {task_table.name}"))
        dropped = time.monotonic()

        def warnings():
            return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        wait_for(lambda: len(warnings()) >= 4, timeout=15, message=lambda: "\n".join(warnings()))
    finally:
        w.stop()
        thread.join(30)
    elapsed = time.monotonic() - dropped
    lines = warnings()
    # Two loops (claiming, rescuing) query the table; each backoff step is logged once between them.
    attempts = [int(re.search(r"\(attempt (\d+) while ", line).group(1)) for line in lines]
    assert attempts == list(range(1, len(lines) + 1)), lines
    assert len(lines) <= attempts_possible(elapsed) + 1, (elapsed, lines)
    for line in lines:
        assert line.startswith(f"table mqueue_task missing in {db.safe_url}; run: python -m mqueue migrate"), line
        assert "unavailable" not in line


# -- item 11: stats lists known queues that have no jobs ------------------------------------------


def test_stats_lists_the_queues_given_and_those_of_the_crons_with_zero_counts(db):
    from mqueue import admin
    from mqueue.schema import cron_table
    with db.engine.begin() as conn:
        conn.execute(insert(cron_table).values(name="fh.nightly", queue="reports", schedule="0 3 * * *", tz="UTC"))
    with db.session():
        smtp.enqueue("a@example.com")
    assert [(s.queue, s.queued, s.oldest_due_seconds is None) for s in admin.stats(db, queues=["mail", "fh"])] == [
        ("fh", 1, False), ("mail", 0, True), ("reports", 0, True)]
    assert [s.queue for s in admin.stats(db)] == ["fh", "reports"]


# -- item 12: a running job whose worker died can be forced back --------------------------------


def test_retry_force_takes_a_running_job_back_and_fences_the_old_run_out(db):
    from mqueue import admin
    with db.session():
        job_id = smtp.enqueue("a@example.com")
    with db.engine.begin() as conn:
        [old] = db.dialect.claim_jobs(conn, "fh", 1, "dead-host:1:aa", 60)
    with pytest.raises(mqueue.InvalidStateError, match=rf"force it back: mqueue retry {job_id} --force\)$"):
        admin.retry_job(db, job_id)

    job = admin.retry_job(db, job_id, force=True)
    # The owner stays as the worker of the last run; the history shows that run and the forced put.
    assert (job.state, job.token, job.owner, job.retries, job.lease_expires_at) == \
        ("queued", old.token + 1, "dead-host:1:aa", 0, None)
    assert [(entry.kind, entry.worker) for entry in admin.get_job(db, job_id).history][-2:] == \
        [("popped", "dead-host:1:aa"), ("put", "dead-host:1:aa")]
    with db.engine.connect() as conn:
        assert job.eta <= db.dialect.db_now(conn)
    # Whatever the old run still tries is refused by the fence.
    with db.engine.begin() as conn:
        assert db.dialect.heartbeat_jobs(conn, [(job_id, old.token)], 60) == [job_id]
        assert not db.dialect.complete_job(conn, job_id, old.token)
        assert not db.dialect.fail_job(conn, job_id, old.token, "late")
        assert not db.dialect.release_job(conn, job_id, old.token)
    # The next claim runs it under a token of its own.
    with db.engine.begin() as conn:
        [new] = db.dialect.claim_jobs(conn, "fh", 1, "live-host:2:bb", 60)
    assert (new.id, new.token) == (job_id, old.token + 2)
    # A job that is not running is retried as before, forced or not.
    with db.engine.begin() as conn:
        assert db.dialect.fail_job(conn, job_id, new.token, "boom")
    assert admin.retry_job(db, job_id, force=True).state == "queued"


# -- item 14: testing helpers ------------------------------------------------------------------

order: list = []


@mqueue.task(name="fh.record", queue="fh")
def record(label: str) -> dict:
    job = mqueue.current_job()
    order.append(label)
    write_effect(label)
    return {"job": job.id, "label": job.args["label"]}


@mqueue.task(name="fh.always_retry", queue="fh", max_retries=2, backoff=60)
def always_retry() -> None:
    order.append(mqueue.current_job().retries)
    raise RuntimeError("still broken")


@mqueue.task(name="fh.again", queue="fh")
def again(n: int) -> None:
    """Enqueues its successor in its own transaction, forever."""
    again.options(delay=30).enqueue(n + 1)


@mqueue.task(name="fh.slow", queue="fh", timeout=0.2, max_retries=0)
def slow() -> None:
    write_effect("too late")
    for _ in range(250):  # Python code between short sleeps: the timeout interrupts it there
        time.sleep(0.02)


@mqueue.task(name="fh.fenced", queue="fh")
def fenced(observer_url: str) -> None:
    """Writes, but another worker takes the job over before it completes."""
    from sqlalchemy import create_engine, update
    if mqueue.current_session().get_bind().dialect.name != "sqlite":  # there a write takes the only write lock
        write_effect("must roll back")
    engine = create_engine(observer_url)
    try:
        with engine.begin() as conn:
            conn.execute(update(task_table).where(task_table.c.id == mqueue.current_job().id)
                         .values(token=task_table.c.token + 1))
    finally:
        engine.dispose()
    write_effect("must roll back too")


@pytest.fixture
def clean_order():
    order.clear()
    yield order


def job_state(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table.c.state, task_table.c.retries, task_table.c.last_error)
                            .where(task_table.c.id == job_id)).first()


def test_run_until_empty_runs_only_what_is_due_unless_with_scheduled(db, clean_order):
    with db.session():
        job_id = always_retry.enqueue()
    result = worker(db).run_until_empty(timeout=30)
    assert (result.retried, result.failed) == (1, 0)  # the retry waits out its 60 s backoff
    assert job_state(db, job_id).state == "queued"

    result = worker(db).run_until_empty(timeout=30, with_scheduled=True)
    assert (result.retried, result.failed) == (1, 1)
    assert order == [0, 1, 2]
    assert job_state(db, job_id)[:2] == ("failed", 3)


def test_with_scheduled_runs_delayed_jobs_in_eta_order(db, clean_order):
    with db.session():
        record.options(delay=7200).enqueue("last")
        record.options(delay=3600).enqueue("second")
        record.enqueue("first")
    result = worker(db).run_until_empty(timeout=30, with_scheduled=True)
    assert (result.succeeded, result.total) == (3, 3)
    assert order == ["first", "second", "last"]


def test_max_runs_bounds_a_drain_that_would_never_end(db):
    with db.session():
        again.enqueue(0)
    result = worker(db, concurrency=2).run_until_empty(timeout=30, with_scheduled=True, max_runs=5)
    assert (result.succeeded, result.total) == (5, 5)
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(task_table)
                            .where(task_table.c.state == "queued")).scalar_one() == 1
    with pytest.raises(ValueError, match="max_runs must be an integer >= 1, got 0"):
        worker(db).run_until_empty(max_runs=0)


def test_perform_job_runs_one_job_with_its_session_and_fenced_completion(db, clean_order):
    from mqueue.testing import perform_job
    with db.session():
        other = record.enqueue("not me")  # perform_job claims its own job, never another one
    result = perform_job(db, record, "mine")
    assert (result.outcome, result.error, result.succeeded) == ("succeeded", None, True)
    assert result.value == {"job": result.job_id, "label": "mine"}
    assert order == ["mine"]
    with db.engine.connect() as conn:
        assert conn.execute(select(effect.c.note, effect.c.job_id)).all() == [("mine", result.job_id)]
    assert job_state(db, other).state == "queued"
    row = job_state(db, result.job_id)
    assert row is None or row.state == "succeeded"

    # Per-call options, and a task given by name.
    assert perform_job(db, record.options(queue="elsewhere", priority=3), label="options").succeeded
    assert perform_job(db, "fh.record", "by name").succeeded


def test_perform_job_failures_retries_timeouts_and_lost_leases_behave_as_in_a_worker(db, database_url, clean_order):
    from mqueue.testing import perform_job
    result = perform_job(db, smtp, to="a@example.com")
    assert (result.outcome, type(result.error), result.value) == ("retried", ValueError, None)
    row = job_state(db, result.job_id)
    assert (row.state, row.retries) == ("queued", 1) and "smtp down for a@example.com" in row.last_error
    assert effect_count(db) == 0

    started = time.monotonic()
    result = perform_job(db, slow)
    assert (result.outcome, type(result.error).__name__) == ("failed", "JobTimeout")
    assert time.monotonic() - started < 4 and effect_count(db) == 0

    result = perform_job(db, fenced, database_url)
    assert result.outcome == "lost" and effect_count(db) == 0

    with pytest.raises(TypeError, match="got an unexpected keyword argument 'lable'"):
        perform_job(db, record, lable="x")
    with db.session(), pytest.raises(RuntimeError, match="call it outside db.session"):
        perform_job(db, record, "inside")
