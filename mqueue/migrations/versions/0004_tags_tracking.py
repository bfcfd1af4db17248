"""Tags, tracking and published events

Revision ID: mqueue_0004
Revises: mqueue_0003
Create Date: 2026-12-02

* ``mqueue_task.tracked``: a tracked job emits an event on every change of state.
* ``mqueue_event.emitted``: the events ``admin.events`` publishes (a tracked
  job's, and every ``failed``); the others are history only.
* ``mqueue_tag``: a job's tags, found by tag through ``(tag, job_id)``;
  compared byte for byte (``utf8mb4_bin`` on MySQL).
* PostgreSQL: a trigger notifies ``mqueue_events`` of each published event,
  at its commit (a copy of ``mqueue.dialects.postgresql.EVENT_NOTIFY_DDL``).

Frozen like 0001: imports nothing from mqueue.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "mqueue_0004"
down_revision = "mqueue_0003"
branch_labels = None
depends_on = None

NOTIFY = (
    "CREATE OR REPLACE FUNCTION mqueue_event_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN PERFORM pg_notify('mqueue_events', NEW.id::text); RETURN NULL; END $$",
    "CREATE TRIGGER mqueue_event_notify AFTER INSERT ON mqueue_event "
    "FOR EACH ROW WHEN (NEW.emitted = 1) EXECUTE FUNCTION mqueue_event_notify()",
)


def upgrade() -> None:
    op.add_column("mqueue_task", sa.Column("tracked", sa.SmallInteger, nullable=False, server_default="0"))
    op.add_column("mqueue_event", sa.Column("emitted", sa.SmallInteger, nullable=False, server_default="0"))
    op.create_table(
        "mqueue_tag",
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("tag", sa.String(100).with_variant(mysql.VARCHAR(100, collation="utf8mb4_bin"), "mysql", "mariadb"),
                  nullable=False),
        sa.PrimaryKeyConstraint("job_id", "tag", name="pk_mqueue_tag"),
    )
    op.create_index("ix_mqueue_tag_tag_job_id", "mqueue_tag", ["tag", "job_id"])
    if op.get_bind().dialect.name == "postgresql":
        for statement in NOTIFY:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS mqueue_event_notify ON mqueue_event")
        op.execute("DROP FUNCTION IF EXISTS mqueue_event_notify()")
    op.drop_index("ix_mqueue_tag_tag_job_id", table_name="mqueue_tag")
    op.drop_table("mqueue_tag")
    op.drop_column("mqueue_event", "emitted")
    op.drop_column("mqueue_task", "tracked")
