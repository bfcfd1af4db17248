"""The tables mqueue owns, as SQLAlchemy Core metadata.

``mqueue_task`` holds every job, live or finished.  A job that succeeds
stays as ``succeeded`` (the completion is one fenced UPDATE in the task's
own transaction, where it used to be a DELETE: no extra statement), so its
row is its record: times, run count, wait and run seconds.  Finished rows
never slow a claim: the claim index starts with ``(queue, state)``, so a
claim reads only ``queued`` entries.  Workers prune finished rows after
``jobs-history`` (see ``history.py``), folding them into ``mqueue_stats``
first so the daily numbers stay exact.

``mqueue_event`` keeps what the job row cannot: one row per run that ended
without success (``retried`` with its error, ``failed``, ``rescued``,
``released``), with the worker and the run's start.  The success path
writes none: ``put``, the last ``popped`` and ``succeeded`` are read off the
job row (``created_at``, ``started_at``/``owner``, ``finished_at``).  Every
event is written in the transaction of the change it records, after the
fenced UPDATE matched, so history never disagrees with the job.

Design notes, each backed by a measurement in DATABASE-NOTES.md:

* The claim reads ``queue, state`` then orders by ``neg_priority, eta, id``.
  ``neg_priority`` is a stored generated column (``0 - priority``) so the
  claim index is ascending on every backend: MariaDB before 10.8 cannot
  build a descending index, and an ORDER BY that does not follow the index
  makes InnoDB filesort and lock every candidate row, starving SKIP LOCKED.
* Lease columns (``owner``, ``token``, ``lease_expires_at``) are in no
  index, so heartbeats on PostgreSQL stay HOT updates.
* ``unique_key`` holds a key only while the job is queued or running (it
  is cleared when the job finishes), so a plain UNIQUE index gives "one live
  job per key" on all three backends.  A job that fails for good moves its
  key to ``failed_unique_key``, which no index covers: the key is free for a
  new job, and retrying the failed one by hand puts it back (or says which
  live job holds it meanwhile).
* Times are naive UTC with microseconds: ``DATETIME(6)`` on MySQL,
  ``timestamp`` on PostgreSQL, fixed-width text on SQLite.  SQLite stores
  whatever a hand-written INSERT gives (an integer, ISO text with ``T`` or
  ``Z``), so times are read leniently there (``read_time``) and a value that
  cannot be read comes back as None instead of stopping the reader.
* ``args`` and ``last_error`` hold at least 1 MiB of UTF-8 on every backend
  (MySQL ``TEXT`` stops at 64 KiB: ``MEDIUMTEXT`` there, 16 MiB).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (BigInteger, Column, Computed, DateTime, Double, Index, Integer, MetaData,
                        PrimaryKeyConstraint, SmallInteger, String, Table, Text)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeDecorator

from .dialects.functions import utc_now

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)



def read_time(value: Any) -> dt.datetime | None:
    """A stored time as a naive UTC datetime, read leniently; None if it cannot be read.

    Accepts what a hand-written row plainly means: a datetime, epoch seconds
    (integer or real), ISO 8601 text with ``T``/space, ``Z`` or an offset
    (converted to UTC).  Anything else is None, never an exception: one bad
    row must not stop a claim or a listing.
    """
    try:
        if isinstance(value, dt.datetime):
            moment = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return dt.datetime.fromtimestamp(value, dt.timezone.utc).replace(tzinfo=None)
        elif isinstance(value, str):
            text = value.strip()
            try:
                return read_time(float(text))
            except ValueError:
                moment = dt.datetime.fromisoformat(text)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return moment


class LenientDateTime(TypeDecorator):
    """``DateTime`` whose reads never raise (see ``read_time``); writes are unchanged."""

    impl = DateTime
    cache_ok = True

    def result_processor(self, dialect, coltype):
        # Overridden on purpose: the driver-level processor (SQLite's
        # ``fromisoformat``) is what raises on an integer or odd text.
        inner = self.impl_instance.result_processor(dialect, coltype)

        def process(value):
            if inner is not None:
                try:
                    return read_time(inner(value))
                except (TypeError, ValueError):
                    pass
            return read_time(value)

        return process


#: Microsecond UTC timestamps on every backend.
UTCDateTime = LenientDateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
#: Arguments and errors: at least 1 MiB of UTF-8 everywhere (``encoding.MAX_ARGS_BYTES``).
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
#: SQLite only auto-increments INTEGER PRIMARY KEY.
JobId = BigInteger().with_variant(Integer(), "sqlite")

# Job states.  A job that waits (new, delayed or retrying) is QUEUED.
QUEUED = "queued"
RUNNING = "running"
FAILED = "failed"
WAITING = "waiting"
SUCCEEDED = "succeeded"
CANCELED = "canceled"
EXPIRED = "expired"
#: Finished jobs are never run again; workers prune them after ``jobs-history``.
FINISHED = (SUCCEEDED, CANCELED, EXPIRED)
STATES = (QUEUED, RUNNING, FAILED, WAITING) + FINISHED


task_table = Table(
    "mqueue_task", metadata,
    Column("id", JobId, primary_key=True, autoincrement=True),
    Column("queue", String(100), nullable=False, server_default="default"),
    Column("name", String(255), nullable=False),
    Column("args", LongText, nullable=False),
    Column("state", String(16), nullable=False, server_default=QUEUED),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("neg_priority", Integer, Computed("0 - priority", persisted=True)),
    Column("eta", UTCDateTime, nullable=False, server_default=utc_now()),
    Column("retries", Integer, nullable=False, server_default="0"),
    Column("max_retries", Integer, nullable=True),
    Column("unique_key", String(255), nullable=True, unique=True),
    Column("owner", String(255), nullable=True),
    Column("token", BigInteger, nullable=False, server_default="0"),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("last_error", LongText, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, server_default=utc_now()),
    # The key of a job that failed for good, kept for ``retry`` (no index: it must not block new jobs).
    Column("failed_unique_key", String(255), nullable=True),
    # Set when the job finishes (succeeded, canceled, expired); pruning walks it.
    Column("finished_at", UTCDateTime, nullable=True),
    # Claims so far (each claim is a run, whatever its end).
    Column("runs", Integer, nullable=False, server_default="0"),
    # Seconds from eta to the first claim, and from the last claim to success (for ``mqueue stats``).
    Column("wait_seconds", Double, nullable=True),
    Column("run_seconds", Double, nullable=True),
    # 1: the job emits an event on every change of state (``admin.events``); 0/1 is portable where
    # a boolean default is not (MySQL reports it as 0, PostgreSQL as false).
    Column("tracked", SmallInteger, nullable=False, server_default="0"),
    # Dependencies (``depends_on``): how many have not succeeded yet; the job is
    # ``waiting`` while this is above 0, and the last dependency's completion
    # turns it ``queued`` in its own transaction.
    Column("pending_deps", Integer, nullable=False, server_default="0"),
    # 1 once another job depends on this one: only then does its completion look for dependents.
    Column("has_dependents", SmallInteger, nullable=False, server_default="0"),
    # A job not started by then is never run: it becomes ``expired``.
    Column("expires_at", UTCDateTime, nullable=True),
    Index(None, "queue", "state", "neg_priority", "eta", "id"),
    Index(None, "finished_at", "id"),
    # The expiry sweep reads only jobs past their expiry (jobs without one are not in its range).
    Index(None, "expires_at"),
    # SQLite reuses the largest rowid once that row is deleted (as a succeeded
    # job's is); AUTOINCREMENT never does, so (id, token) fences never collide.
    sqlite_autoincrement=True,
)

cron_table = Table(
    "mqueue_cron", metadata,
    Column("name", String(255), primary_key=True),
    Column("queue", String(100), nullable=False),
    Column("schedule", String(100), nullable=False),
    Column("tz", String(64), nullable=False, server_default="UTC"),
    Column("last_slot", UTCDateTime, nullable=True),
    Column("next_slot", UTCDateTime, nullable=True),
    Column("last_job_id", BigInteger, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False, server_default=utc_now()),
)

event_table = Table(
    "mqueue_event", metadata,
    Column("id", JobId, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("at", UTCDateTime, nullable=False, server_default=utc_now()),
    Column("kind", String(16), nullable=False),
    Column("queue", String(100), nullable=False),
    Column("name", String(255), nullable=False),
    Column("worker", String(255), nullable=True),
    # The start of the run this event ended (``popped`` in the history), if it ended one.
    Column("started_at", UTCDateTime, nullable=True),
    Column("detail", LongText, nullable=True),
    # Published by ``admin.events``: every event of a tracked job, and every ``failed``.
    Column("emitted", SmallInteger, nullable=False, server_default="0"),
    Index(None, "job_id", "id"),
    Index(None, "at"),
    sqlite_autoincrement=True,
)

#: A job's tags (qless): only jobs that have some have rows, found by tag through ``(tag, job_id)``.
tag_table = Table(
    "mqueue_tag", metadata,
    Column("job_id", BigInteger, nullable=False),
    # Compared byte for byte: MySQL's default collation would make "Urgent" and "urgent" one tag.
    Column("tag", String(100).with_variant(mysql.VARCHAR(100, collation="utf8mb4_bin"), "mysql", "mariadb"),
           nullable=False),
    PrimaryKeyConstraint("job_id", "tag"),
    Index(None, "tag", "job_id"),
)

#: Per queue per UTC day, what pruning removed: counts, mean and M2 (sum of
#: squared deviations, so two parts combine exactly) and a qless histogram
#: (JSON object bucket -> count) for wait and run, and counts of events.
stats_table = Table(
    "mqueue_stats", metadata,
    Column("queue", String(100), nullable=False),
    Column("day", String(10), nullable=False),
    Column("wait_count", BigInteger, nullable=False, server_default="0"),
    Column("wait_mean", Double, nullable=False, server_default="0"),
    Column("wait_m2", Double, nullable=False, server_default="0"),
    Column("wait_histogram", Text, nullable=False),
    Column("run_count", BigInteger, nullable=False, server_default="0"),
    Column("run_mean", Double, nullable=False, server_default="0"),
    Column("run_m2", Double, nullable=False, server_default="0"),
    Column("run_histogram", Text, nullable=False),
    Column("failed", BigInteger, nullable=False, server_default="0"),
    Column("retried", BigInteger, nullable=False, server_default="0"),
    Column("expired", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("queue", "day"),
)

#: Settings shared by every worker (``mqueue config``); absent keys take their defaults.
setting_table = Table(
    "mqueue_setting", metadata,
    Column("key", String(100), primary_key=True),
    Column("value", String(255), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False, server_default=utc_now()),
)

#: ``depends_on``: one row per (dependent job, dependency), found from either side.
dependency_table = Table(
    "mqueue_dependency", metadata,
    Column("job_id", BigInteger, nullable=False),
    Column("depends_on", BigInteger, nullable=False),
    PrimaryKeyConstraint("job_id", "depends_on"),
    Index(None, "depends_on", "job_id"),
)

#: Per-queue controls shared by every worker: a row only for a queue that was
#: ever paused (``mqueue pause``); workers read the paused set on a timer.
queue_table = Table(
    "mqueue_queue", metadata,
    Column("name", String(100), primary_key=True),
    Column("paused", SmallInteger, nullable=False, server_default="0"),
    Column("updated_at", UTCDateTime, nullable=False, server_default=utc_now()),
)

#: Live workers (``mqueue workers``): each writes its row on its heartbeat;
#: a row not seen for 3 leases is dropped.
worker_table = Table(
    "mqueue_worker", metadata,
    Column("name", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Text, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    # Its lease: the row is stale (the worker is gone) once not seen for 3 of them.
    Column("lease_seconds", Double, nullable=False),
    # JSON list of the ids of the jobs it runs now.
    Column("running", Text, nullable=False),
    # 0 while claiming is stopped (SIGUSR2), 1 otherwise.
    Column("claiming", SmallInteger, nullable=False, server_default="1"),
    Index(None, "last_seen"),
)
