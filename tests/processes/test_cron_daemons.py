"""Crons in real time: three ``python -m mqueue start`` daemons serve one minutely cron.

The one test in the suite that waits for real minutes (about two, on
MariaDB, the primary target): every minute boundary crossed while all three
daemons are up must give exactly one job, run once, and exactly one log
line from the daemon that enqueued it.  Everything else about crons is
tested with an injected clock in ``tests/db/test_scheduler.py``.
"""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from collections import Counter

import pytest
from daemons import TASKS_PACKAGE, effects, jobs_left
from helpers import wait_for
from sqlalchemy import select

from mqueue.schema import cron_table

CRON = "proc.minutely"
MINUTE = dt.timedelta(minutes=1)
#: Minute boundaries to wait for after all three daemons serve.
SLOTS = 2
#: How long after the last slot every daemon has ticked at least a few times (they tick about once a second).
SETTLE = dt.timedelta(seconds=5)

_CRON_SOURCE = '''
"""A minutely cron for the real-time cron test: one effect row per run."""

import mqueue

from proctasks.jobs import log_start, write_effect


@mqueue.cron(mqueue.Minutely, name="proc.minutely")
def minutely():
    write_effect(log_start(), "minutely")
'''

ENQUEUED = re.compile(r"cron=proc\.minutely queue=default slot=(\S+ \S+) job=(\d+) outcome=enqueued")


def cron_row(db):
    with db.engine.connect() as conn:
        return conn.execute(select(cron_table).where(cron_table.c.name == CRON)).first()


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def floor_minute(moment: dt.datetime) -> dt.datetime:
    return moment.replace(second=0, microsecond=0)


@pytest.mark.backends("mariadb")
@pytest.mark.timeout(300)
def test_three_daemons_enqueue_each_minute_slot_exactly_once(db, tasks, daemons):
    (tasks.root / TASKS_PACKAGE / "minutely.py").write_text(textwrap.dedent(_CRON_SOURCE).lstrip())
    started = [daemons.start(lease=5.0, poll_interval=0.05, name=f"cron{n}") for n in range(3)]
    for daemon in started:
        daemon.wait_serving()

    # All three serve.  The row's next slot is the first one counted; the job ids of slots
    # before it are at most its last_job_id (the advance and the job commit together).
    row = wait_for(lambda: cron_row(db), timeout=20, message=daemons.output)
    start = db_now(db)
    first, before = row.next_slot, row.last_job_id or 0
    assert start - 2 * SETTLE < first <= start + MINUTE, (start, row)
    last = first + (SLOTS - 1) * MINUTE

    def last_slot_ran():
        current = cron_row(db)
        return current.last_slot == last and jobs_left(db) == 0 and current
    wait_for(last_slot_ran, timeout=(last - start).total_seconds() + 30, interval=0.25,
             message=lambda: f"slot {last} never ran; row {cron_row(db)}\n{daemons.output()}")
    # Let every daemon tick past the last slot, then read the database clock once more.
    wait_for(lambda: db_now(db) >= last + SETTLE, timeout=SETTLE.total_seconds() + 5, interval=0.25)
    end = db_now(db)
    assert all(daemon.alive() for daemon in started), daemons.output()

    # The minute boundaries crossed while all three were up, by the database clock.
    boundaries = []
    moment = first
    while moment <= end:
        boundaries.append(moment)
        moment += MINUTE
    assert len(boundaries) == SLOTS, (first, end)  # end is before the next boundary

    def report() -> str:
        return (f"start {start} first {first} before {before} end {end}\nrow {cron_row(db)}\n"
                f"effects {[(e.job_id, e.pid, e.at) for e in effects(db)]}\n"
                f"runs {tasks.executions()}\n{daemons.output()}")

    counted = [e for e in effects(db) if e.job_id > before]
    job_ids = [e.job_id for e in counted]
    assert len(counted) == len(boundaries), report()
    assert len(set(job_ids)) == len(job_ids)
    # No two runs in one minute (run start times from the execution log: effect.at is a FLOAT column).
    runs = [(job_id, at) for job_id, _pid, _retries, at in tasks.executions() if job_id > before]
    minutes = [floor_minute(dt.datetime.fromtimestamp(at, dt.timezone.utc).replace(tzinfo=None)) for _, at in runs]
    assert sorted(minutes) == boundaries, report()
    row = cron_row(db)
    assert (row.last_slot, row.next_slot, row.last_job_id) == (last, last + MINUTE, max(job_ids))

    # Every counted job started once (no retries), and its effect came from its own run.
    assert Counter(job_id for job_id, _at in runs) == Counter(job_ids), report()

    # One log line per enqueued slot, from whichever daemon won it: never two for one slot.
    logged = [(match.group(1), int(match.group(2)))
              for daemon in started for match in ENQUEUED.finditer(daemon.stderr())]
    logged = [(slot, job_id) for slot, job_id in logged if job_id > before]
    assert sorted(logged) == sorted(zip((str(b) for b in boundaries), job_ids)), (logged, daemons.output())
