"""The two tables mqueue owns, as SQLAlchemy Core metadata.

``mqueue_task`` is the hot table: only jobs that are waiting, running or
failed live in it.  A job that succeeds is deleted in the same transaction
as the task's own writes, so finished work never piles up where workers
claim.  Later features (tags, dependencies, a history table) are additive
migrations.

Design notes, each backed by a measurement in DATABASE-NOTES.md:

* The claim reads ``queue, state`` then orders by ``neg_priority, eta, id``.
  ``neg_priority`` is a stored generated column (``0 - priority``) so the
  claim index is ascending on every backend: MariaDB before 10.8 cannot
  build a descending index, and an ORDER BY that does not follow the index
  makes InnoDB filesort and lock every candidate row, starving SKIP LOCKED.
* Lease columns (``owner``, ``token``, ``lease_expires_at``) are in no
  index, so heartbeats on PostgreSQL stay HOT updates.
* ``unique_key`` holds a key only while the job is queued or running (the
  row is deleted when it succeeds), so a plain UNIQUE index gives "one live
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

from sqlalchemy import (BigInteger, Column, Computed, DateTime, Index, Integer, MetaData,
                        String, Table, Text)
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
STATES = (QUEUED, RUNNING, FAILED)


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
    Index(None, "queue", "state", "neg_priority", "eta", "id"),
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
