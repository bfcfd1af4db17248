"""mqueue_task and mqueue_cron

Revision ID: mqueue_0001
Revises:
Create Date: 2026-11-23

Frozen: this file imports nothing from mqueue, so later edits to the models
(``mqueue.schema``) never change what it creates.  Changes go in new revisions.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement

revision = "mqueue_0001"
down_revision = None
branch_labels = ("mqueue",)
depends_on = None

#: As created in 2026-11: microsecond UTC times; ids that SQLite auto-increments.
UTCDateTime = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
JobId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class utc_now_0001(FunctionElement):
    """The database's UTC clock, as the server default of this revision's time columns."""

    type = sa.DateTime()
    inherit_cache = True
    name = "utc_now_0001"


@compiles(utc_now_0001, "mysql")
@compiles(utc_now_0001, "mariadb")
def _mysql_now(element, compiler, **kw):
    return "(UTC_TIMESTAMP(6))"


@compiles(utc_now_0001, "postgresql")
def _postgresql_now(element, compiler, **kw):
    return "(clock_timestamp() AT TIME ZONE 'utc')"


@compiles(utc_now_0001, "sqlite")
def _sqlite_now(element, compiler, **kw):
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


def upgrade() -> None:
    op.create_table(
        "mqueue_task",
        sa.Column("id", JobId, primary_key=True, autoincrement=True),
        sa.Column("queue", sa.String(100), nullable=False, server_default="default"),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("args", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, server_default="queued"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("neg_priority", sa.Integer, sa.Computed("0 - priority", persisted=True)),
        sa.Column("eta", UTCDateTime, nullable=False, server_default=utc_now_0001()),
        sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_retries", sa.Integer, nullable=True),
        sa.Column("unique_key", sa.String(255), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=utc_now_0001()),
        sa.PrimaryKeyConstraint("id", name="pk_mqueue_task"),
        sa.UniqueConstraint("unique_key", name="uq_mqueue_task_unique_key"),
        sqlite_autoincrement=True,  # ids are never reused: the (id, token) fence relies on it
    )
    op.create_index("ix_mqueue_task_queue_state_neg_priority_eta_id", "mqueue_task",
                    ["queue", "state", "neg_priority", "eta", "id"])
    op.create_table(
        "mqueue_cron",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("schedule", sa.String(100), nullable=False),
        sa.Column("tz", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("last_slot", UTCDateTime, nullable=True),
        sa.Column("next_slot", UTCDateTime, nullable=True),
        sa.Column("last_job_id", sa.BigInteger, nullable=True),
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utc_now_0001()),
        sa.PrimaryKeyConstraint("name", name="pk_mqueue_cron"),
    )


def downgrade() -> None:
    op.drop_table("mqueue_cron")
    op.drop_index("ix_mqueue_task_queue_state_neg_priority_eta_id", table_name="mqueue_task")
    op.drop_table("mqueue_task")
