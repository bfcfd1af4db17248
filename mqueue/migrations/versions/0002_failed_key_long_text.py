"""failed_unique_key; args and last_error hold 1 MiB on MySQL; SQLite normalizes eta

Revision ID: mqueue_0002
Revises: mqueue_0001
Create Date: 2026-12-02

* ``failed_unique_key``: a job that fails for good keeps its unique key here,
  outside the UNIQUE index, so ``retry`` can restore it.
* MySQL/MariaDB ``TEXT`` holds 64 KiB: ``args`` and ``last_error`` become
  ``MEDIUMTEXT`` (16 MiB).  PostgreSQL and SQLite text has no such limit.
* SQLite: triggers rewrite a hand-written ``eta`` (epoch seconds, ISO text
  with ``T``, ``Z`` or an offset) into the one layout SQLite compares
  correctly, and fail a job whose eta is not a time (a copy of ``mqueue.dialects.sqlite.NORMALIZE_ETA_TRIGGERS``).

Frozen like 0001: imports nothing from mqueue.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

revision = "mqueue_0002"
down_revision = "mqueue_0001"
branch_labels = None
depends_on = None

LONG_TEXT_COLUMNS = (("args", False), ("last_error", True))
CANONICAL_TIME = ("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] "
                  "[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]")
READ_ETA = ("(CASE WHEN typeof(NEW.eta) IN ('integer', 'real') "
            "THEN strftime('%Y-%m-%d %H:%M:%f', NEW.eta, 'unixepoch') "
            "ELSE strftime('%Y-%m-%d %H:%M:%f', NEW.eta) END || '000')")
SQLITE_TRIGGERS = {
    name: f"""CREATE TRIGGER IF NOT EXISTS {name} {event_clause} ON mqueue_task
WHEN NOT (typeof(NEW.eta) = 'text' AND NEW.eta GLOB '{CANONICAL_TIME}')
BEGIN
    UPDATE mqueue_task SET
        eta = COALESCE({READ_ETA}, NEW.eta),
        state = CASE WHEN {READ_ETA} IS NULL THEN 'failed' ELSE state END,
        last_error = CASE WHEN {READ_ETA} IS NULL
            THEN 'eta ' || quote(NEW.eta) || ' is not a time; write UTC as YYYY-MM-DD HH:MM:SS, '
                 || 'ISO 8601 or epoch seconds, then retry the job'
            ELSE last_error END
    WHERE id = NEW.id;
END"""
    for name, event_clause in (("mqueue_task_eta_on_insert", "AFTER INSERT"),
                               ("mqueue_task_eta_on_update", "AFTER UPDATE OF eta"))}


def _is_mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    op.add_column("mqueue_task", sa.Column("failed_unique_key", sa.String(255), nullable=True))
    if op.get_bind().dialect.name == "sqlite":
        for trigger in SQLITE_TRIGGERS.values():
            op.execute(trigger)
    if _is_mysql():
        for name, nullable in LONG_TEXT_COLUMNS:
            op.alter_column("mqueue_task", name, type_=mysql.MEDIUMTEXT(), existing_type=sa.Text(),
                            existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    if _is_mysql():
        for name, nullable in LONG_TEXT_COLUMNS:
            op.alter_column("mqueue_task", name, type_=sa.Text(), existing_type=mysql.MEDIUMTEXT(),
                            existing_nullable=nullable)
    # A plain DROP COLUMN (SQLite 3.35+): a batch copy of the table cannot
    # write the generated column neg_priority.
    op.drop_column("mqueue_task", "failed_unique_key")
