"""mqueue's schema through Alembic, the two ways the README describes.

1. ``python -m mqueue migrate`` (``upgrade``): the scripts ship inside the
   package (``mqueue/migrations``), so this works from an installed wheel
   with no repository at hand.  The revision is kept in
   ``mqueue_alembic_version``; running it twice changes nothing.
2. The application's own Alembic environment runs mqueue's revisions as a
   branch of its history: ``version_location()`` says where they are,
   ``include_object`` keeps its autogenerate off mqueue's tables and
   ``adopt`` takes over a database that way 1 made.

A database switches from one way to the other by moving the record of
mqueue's revision: ``upgrade`` moves it out of the application's
``alembic_version``, ``adopt`` into the application's version table, each
inside the run that migrates, so the schema never runs a revision twice.
When the record cannot be found or is contradictory, both stop before
changing anything and say what to run.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Column, MetaData, String, Table, delete, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from .errors import MQueueError
from .session import Database, as_database, safe_url

#: Where ``python -m mqueue migrate`` records mqueue's revision.
VERSION_TABLE = "mqueue_alembic_version"
#: Alembic's default version table: where an application's Alembic records
#: mqueue's branch unless its env.py names another table.
APP_VERSION_TABLE = "alembic_version"
#: The table whose presence says mqueue's schema exists.
TASK_TABLE = "mqueue_task"

log = logging.getLogger("mqueue.migrate")


class MigrationConflictError(MQueueError, CommandError):
    """mqueue's tables and the records of their revision disagree; nothing was changed.

    The message says what the database holds and what to run.  A
    ``CommandError`` too, so the ``alembic`` command prints it as one line.
    """


def alembic_config() -> Config:
    """An Alembic config pointing at the migration scripts inside the installed package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("mqueue") / "migrations"))
    return config


def version_location() -> str:
    """The directory of mqueue's revisions, for an application's ``version_locations``.

    e.g.::

        python -m mqueue migrate --print-location
        # /srv/app/.venv/lib/python3.12/site-packages/mqueue/migrations/versions

    In ``alembic.ini``, ``mqueue:migrations/versions`` names the same
    directory wherever mqueue is installed (Alembic reads ``package:path``
    as a package resource).
    """
    return str(resources.files("mqueue") / "migrations" / "versions")


def revisions() -> list[str]:
    """mqueue's revision ids, oldest first (one branch, labelled ``mqueue``)."""
    script = ScriptDirectory.from_config(alembic_config())
    return [revision.revision for revision in reversed(list(script.walk_revisions()))]


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """For the application's env.py: autogenerate leaves mqueue's tables to mqueue's revisions.

    e.g.::

        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=mqueue.migrate.include_object)

    Without it, ``alembic revision --autogenerate`` proposes to drop
    ``mqueue_task``, ``mqueue_cron`` and ``mqueue_alembic_version``, which
    are not in the application's metadata.
    """
    return not (type_ == "table" and (name or "").startswith("mqueue_"))


def upgrade(database: "Database | str", revision: str = "head") -> None:
    """Apply mqueue's migrations up to ``revision`` (default: the latest).

    e.g.::

        import mqueue
        mqueue.migrate.upgrade("sqlite:///app.db")    # or a mqueue.Database

    A database whose mqueue tables the application's Alembic made (their
    revision in ``alembic_version``) is taken over first, in the same
    transaction: the record moves to ``mqueue_alembic_version``.  Tables with
    no record at all raise ``MigrationConflictError`` before anything changes.
    A URL gets an engine of its own, closed again before returning.
    """
    db = as_database(database)
    config = alembic_config()
    try:
        with db.engine.begin() as connection:
            _take_over_from_application(connection, db.safe_url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except DBAPIError as error:
        raise db.translate(error) from None
    finally:
        if db is not database:
            db.dispose()


def current_revision(database: "Database | str") -> str | None:
    """The revision ``python -m mqueue migrate`` recorded, or None."""
    db = as_database(database)
    try:
        with db.engine.connect() as connection:
            return _version_context(connection).get_current_revision()
    finally:
        if db is not database:
            db.dispose()


def adopt(context: EnvironmentContext) -> None:
    """In the application's env.py: take over a database that ``python -m mqueue migrate`` made.

    e.g.::

        with context.begin_transaction():
            mqueue.migrate.adopt(context)
            context.run_migrations()

    If ``mqueue_alembic_version`` records mqueue's revision and the
    application's version table does not, that revision is stamped into the
    application's table and ``mqueue_alembic_version`` is dropped, so
    ``alembic upgrade heads`` runs only the revisions after it instead of
    creating ``mqueue_task`` again.  Does nothing in ``--sql`` mode, when the
    environment does not include mqueue's revisions, or when there is
    nothing to take over; raises ``MigrationConflictError`` (nothing changed)
    when the two records disagree or the tables have no record at all.
    """
    if context.is_offline_mode():
        return
    migration = context.get_context()
    connection = migration.connection
    script = context.script
    ours = revisions()
    if not _knows(script, ours[0]):
        return  # mqueue's revisions are not in this environment: python -m mqueue migrate runs them
    opened_transaction = not connection.in_transaction()
    where = safe_url(connection.engine.url)
    recorded = _recorded(connection, VERSION_TABLE)
    applied = [revision.revision for revision in script.iterate_revisions(migration.get_current_heads(), "base")]
    current = _latest(ours, applied)
    table = migration.version_table
    if not recorded:
        if current is None and inspect(connection).has_table(TASK_TABLE):
            raise _unrecorded_tables(where, table, "run alembic upgrade heads again")
        return
    if len(recorded) > 1 or not _knows(script, recorded[0]):
        raise _unknown_revision(recorded, where)
    if current is None:
        migration.stamp(script, recorded[0])
        log.warning("took over mqueue's revision %s from %s into %s; %s is dropped: "
                    "run mqueue's migrations with alembic from now on", recorded[0], VERSION_TABLE, table,
                    VERSION_TABLE)
    elif current != recorded[0]:
        raise MigrationConflictError(
            f"mqueue's revision is recorded twice in {where}: {current} in {table}, {recorded[0]} in "
            f"{VERSION_TABLE}; keep the one that matches the tables, e.g. DROP TABLE {VERSION_TABLE}")
    _version_table(VERSION_TABLE).drop(connection)
    if opened_transaction:
        connection.commit()  # no outer transaction (SQLite, MySQL): ours would be rolled back on close


# -- the records of mqueue's revision --------------------------------------------------

def _take_over_from_application(connection: Connection, where: str) -> None:
    """Before ``python -m mqueue migrate``: move mqueue's revision out of ``alembic_version``.

    Only a row that is exactly one of mqueue's revisions moves; the
    application's own rows stay.  Tables without any record stop the
    migration here, before ``mqueue_alembic_version`` exists (Alembic would
    otherwise create it and then fail on CREATE TABLE mqueue_task).
    """
    ours = revisions()
    recorded = _recorded(connection, VERSION_TABLE)
    if any(revision not in ours for revision in recorded):
        raise _unknown_revision(recorded, where)
    theirs = [revision for revision in _recorded(connection, APP_VERSION_TABLE) if revision in ours]
    if not theirs:
        if not recorded and inspect(connection).has_table(TASK_TABLE):
            raise _unrecorded_tables(where, APP_VERSION_TABLE, "run python -m mqueue migrate again (if your "
                                     "Alembic made them, run its alembic upgrade heads instead)")
        return
    if len(theirs) > 1 or (recorded and recorded != theirs):
        raise MigrationConflictError(
            f"mqueue's revision is recorded twice in {where}: {', '.join(theirs)} in {APP_VERSION_TABLE}, "
            f"{', '.join(recorded)} in {VERSION_TABLE}; keep the one that matches the tables, "
            f"e.g. DELETE FROM {APP_VERSION_TABLE} WHERE version_num = '{theirs[0]}'")
    if not recorded:
        _version_context(connection).stamp(ScriptDirectory.from_config(alembic_config()), theirs[0])
    app_versions = _version_table(APP_VERSION_TABLE)
    connection.execute(delete(app_versions).where(app_versions.c.version_num == theirs[0]))
    log.warning("took over mqueue's revision %s from %s into %s: python -m mqueue migrate runs mqueue's "
                "migrations from now on; remove mqueue's version location from the application's Alembic",
                theirs[0], APP_VERSION_TABLE, VERSION_TABLE)


def _unrecorded_tables(where: str, app_table: str, then: str) -> MigrationConflictError:
    """mqueue's tables with no record (``db.create_all()``, by hand, the original MQueue's): never guess."""
    return MigrationConflictError(
        f"table {TASK_TABLE} exists in {where} but neither {VERSION_TABLE} nor {app_table} records its "
        f"revision: rename or drop mqueue's tables (the original MQueue's: see 'Coming from MQueue' in "
        f"mqueue's README), then {then}")


def _unknown_revision(recorded: list[str], where: str) -> MigrationConflictError:
    """A database migrated by a later mqueue (a deploy rolled back): never guess its schema."""
    return MigrationConflictError(
        f"{VERSION_TABLE} in {where} records {', '.join(recorded)}, which this mqueue does not know: "
        f"install the mqueue that migrated it, or a later one")


def _version_context(connection: Connection) -> MigrationContext:
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})


def _version_table(name: str) -> Table:
    """An Alembic version table as Alembic creates it (enough to read, delete from or drop it)."""
    return Table(name, MetaData(), Column("version_num", String(32), primary_key=True))


def _recorded(connection: Connection, name: str) -> list[str]:
    """The revisions in version table ``name`` (none if it does not exist)."""
    if not inspect(connection).has_table(name):
        return []
    return list(connection.execute(select(_version_table(name).c.version_num)).scalars())


def _knows(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is not None
    except CommandError:  # alembic's ResolutionError: no such revision here
        return False


def _latest(ours: list[str], applied: list[str]) -> str | None:
    """The newest of mqueue's revisions among ``applied`` (mqueue's history is one line)."""
    present = [revision for revision in ours if revision in set(applied)]
    return present[-1] if present else None
