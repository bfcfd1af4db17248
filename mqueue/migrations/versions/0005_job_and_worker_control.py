"""Job control and worker control

Revision ID: mqueue_0005
Revises: mqueue_0004
Create Date: 2026-12-02

* ``mqueue_task.pending_deps``, ``has_dependents`` and ``mqueue_dependency``:
  ``depends_on`` (a job ``waiting`` until its dependencies succeeded).
* ``mqueue_task.expires_at``: a job not started by then becomes ``expired``.
* ``mqueue_queue``: paused queues, shared by every worker.
* ``mqueue_worker``: the worker registry (``mqueue workers``).

Frozen like 0001: imports nothing from mqueue.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "mqueue_0005"
down_revision = "mqueue_0004"
branch_labels = None
depends_on = None

TIME = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


#: The database's UTC clock as a server default, as in 0001.
NOW = {"mysql": "(UTC_TIMESTAMP(6))", "mariadb": "(UTC_TIMESTAMP(6))",
       "postgresql": "(clock_timestamp() AT TIME ZONE 'utc')",
       "sqlite": "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"}


def _now():
    return sa.text(NOW[op.get_bind().dialect.name])


def upgrade() -> None:
    op.add_column("mqueue_task", sa.Column("pending_deps", sa.Integer, nullable=False, server_default="0"))
    op.add_column("mqueue_task", sa.Column("has_dependents", sa.SmallInteger, nullable=False, server_default="0"))
    op.add_column("mqueue_task", sa.Column("expires_at", TIME, nullable=True))
    op.create_index("ix_mqueue_task_expires_at", "mqueue_task", ["expires_at"])
    op.create_table(
        "mqueue_dependency",
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("depends_on", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "depends_on", name="pk_mqueue_dependency"),
    )
    op.create_index("ix_mqueue_dependency_depends_on_job_id", "mqueue_dependency", ["depends_on", "job_id"])
    op.create_table(
        "mqueue_queue",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("paused", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", TIME, nullable=False, server_default=_now()),
        sa.PrimaryKeyConstraint("name", name="pk_mqueue_queue"),
    )
    op.create_table(
        "mqueue_worker",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("started_at", TIME, nullable=False),
        sa.Column("last_seen", TIME, nullable=False),
        sa.Column("lease_seconds", sa.Double, nullable=False),
        sa.Column("running", sa.Text, nullable=False),
        sa.Column("claiming", sa.SmallInteger, nullable=False, server_default="1"),
        sa.PrimaryKeyConstraint("name", name="pk_mqueue_worker"),
    )
    op.create_index("ix_mqueue_worker_last_seen", "mqueue_worker", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_mqueue_worker_last_seen", table_name="mqueue_worker")
    op.drop_table("mqueue_worker")
    op.drop_table("mqueue_queue")
    op.drop_index("ix_mqueue_dependency_depends_on_job_id", table_name="mqueue_dependency")
    op.drop_table("mqueue_dependency")
    # Plain DROP COLUMN (SQLite 3.35+), as in 0002.  Waiting jobs have no
    # state before this revision: they become queued (their order is lost).
    task = sa.table("mqueue_task", sa.column("state"))
    op.execute(task.update().where(task.c.state == "waiting").values(state="queued"))
    op.drop_index("ix_mqueue_task_expires_at", table_name="mqueue_task")
    for column in ("expires_at", "has_dependents", "pending_deps"):
        op.drop_column("mqueue_task", column)
