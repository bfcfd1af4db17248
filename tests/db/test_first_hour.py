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
from helpers import wait_for
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, func, insert, select, text

import mqueue
from mqueue.loops import outage_delay
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


def attempts_possible(elapsed: float) -> int:
    """How many attempts one loop can make in ``elapsed`` seconds of outage (first at once, then backing off)."""
    attempts, at = 1, 0.0
    while at + outage_delay(attempts) <= elapsed:
        at += outage_delay(attempts)
        attempts += 1
    return attempts


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
    assert (job.state, job.token, job.owner, job.retries, job.lease_expires_at) == ("queued", old.token + 1, None,
                                                                                    0, None)
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
