"""Finished jobs on record: history columns, events, daily stats, shared settings

Revision ID: mqueue_0003
Revises: mqueue_0002
Create Date: 2026-12-02

* ``mqueue_task`` keeps finished jobs (``succeeded``, ``canceled``,
  ``expired``): ``finished_at`` (indexed with ``id``, for pruning), ``runs``,
  ``wait_seconds`` and ``run_seconds``.  Existing rows keep their state and
  every worker's view of them; the new columns are nullable or default 0.
* ``mqueue_event``: one row per run that ended without success, and other
  changes the job row cannot show.
* ``mqueue_stats``: per queue per UTC day, what pruning folded away.
* ``mqueue_setting``: settings shared by every worker (``mqueue config``).

Frozen like 0001: imports nothing from mqueue.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "mqueue_0003"
down_revision = "mqueue_0002"
branch_labels = None
depends_on = None

UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
JobId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
#: The database's UTC clock as a server default, as in 0001.
NOW = {"mysql": "(UTC_TIMESTAMP(6))", "mariadb": "(UTC_TIMESTAMP(6))",
       "postgresql": "(clock_timestamp() AT TIME ZONE 'utc')",
       "sqlite": "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"}
FINISHED = ("succeeded", "canceled", "expired")


def upgrade() -> None:
    now = sa.text(NOW[op.get_bind().dialect.name])
    op.add_column("mqueue_task", sa.Column("finished_at", UTCDateTime, nullable=True))
    op.add_column("mqueue_task", sa.Column("runs", sa.Integer, nullable=False, server_default="0"))
    op.add_column("mqueue_task", sa.Column("wait_seconds", sa.Double, nullable=True))
    op.add_column("mqueue_task", sa.Column("run_seconds", sa.Double, nullable=True))
    op.create_index("ix_mqueue_task_finished_at_id", "mqueue_task", ["finished_at", "id"])
    op.create_table(
        "mqueue_event",
        sa.Column("id", JobId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("at", UTCDateTime, nullable=False, server_default=now),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("detail", LongText, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mqueue_event"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_mqueue_event_job_id_id", "mqueue_event", ["job_id", "id"])
    op.create_index("ix_mqueue_event_at", "mqueue_event", ["at"])
    op.create_table(
        "mqueue_stats",
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("wait_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("wait_mean", sa.Double, nullable=False, server_default="0"),
        sa.Column("wait_m2", sa.Double, nullable=False, server_default="0"),
        sa.Column("wait_histogram", sa.Text, nullable=False),
        sa.Column("run_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("run_mean", sa.Double, nullable=False, server_default="0"),
        sa.Column("run_m2", sa.Double, nullable=False, server_default="0"),
        sa.Column("run_histogram", sa.Text, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("retried", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("expired", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("queue", "day", name="pk_mqueue_stats"),
    )
    op.create_table(
        "mqueue_setting",
        sa.Column("key", sa.String(100), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=now),
        sa.PrimaryKeyConstraint("key", name="pk_mqueue_setting"),
    )


def downgrade() -> None:
    # The schema before this revision has no finished states: their rows go.
    task = sa.table("mqueue_task", sa.column("state"))
    op.execute(task.delete().where(task.c.state.in_(FINISHED)))
    op.drop_table("mqueue_setting")
    op.drop_table("mqueue_stats")
    op.drop_index("ix_mqueue_event_at", table_name="mqueue_event")
    op.drop_index("ix_mqueue_event_job_id_id", table_name="mqueue_event")
    op.drop_table("mqueue_event")
    op.drop_index("ix_mqueue_task_finished_at_id", table_name="mqueue_task")
    # Plain DROP COLUMN (SQLite 3.35+), as in 0002.
    for column in ("run_seconds", "wait_seconds", "runs", "finished_at"):
        op.drop_column("mqueue_task", column)
