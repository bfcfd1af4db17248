"""mqueue_task and mqueue_cron

Revision ID: mqueue_0001
Revises:
Create Date: 2026-11-23
"""
from alembic import op
import sqlalchemy as sa

from mqueue.schema import JobId, UTCDateTime
from mqueue.dialects.functions import utc_now

revision = "mqueue_0001"
down_revision = None
branch_labels = ("mqueue",)
depends_on = None


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
        sa.Column("eta", UTCDateTime, nullable=False, server_default=utc_now()),
        sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_retries", sa.Integer, nullable=True),
        sa.Column("unique_key", sa.String(255), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lease_expires_at", UTCDateTime, nullable=True),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False, server_default=utc_now()),
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
        sa.Column("updated_at", UTCDateTime, nullable=False, server_default=utc_now()),
        sa.PrimaryKeyConstraint("name", name="pk_mqueue_cron"),
    )


def downgrade() -> None:
    op.drop_table("mqueue_cron")
    op.drop_index("ix_mqueue_task_queue_state_neg_priority_eta_id", table_name="mqueue_task")
    op.drop_table("mqueue_task")
