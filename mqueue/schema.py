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
* ``unique_key`` holds a key only while the job is queued or running (it is
  cleared when the job fails, and the row is deleted when it succeeds), so a
  plain UNIQUE index gives "one live job per key" on all three backends.
* Times are naive UTC with microseconds: ``DATETIME(6)`` on MySQL,
  ``timestamp`` on PostgreSQL, fixed-width text on SQLite.
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Computed, DateTime, Index, Integer, MetaData,
                        String, Table, Text)
from sqlalchemy.dialects import mysql

from .dialects.functions import utc_now

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: Microsecond UTC timestamps on every backend.
UTCDateTime = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
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
    Column("args", Text, nullable=False),
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
    Column("last_error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, server_default=utc_now()),
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
