"""``python -m mqueue migrate``: bring a database to mqueue's latest schema.

The Alembic scripts ship inside the package (``mqueue/migrations``), so this
works from an installed wheel with no repository at hand.  The revision is
kept in ``mqueue_alembic_version``; running it twice changes nothing.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from sqlalchemy.exc import DBAPIError

from .session import Database, as_database


def alembic_config() -> Config:
    """An Alembic config pointing at the migration scripts inside the installed package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("mqueue") / "migrations"))
    return config


def upgrade(database: "Database | str", revision: str = "head") -> None:
    """Apply mqueue's migrations up to ``revision`` (default: the latest).

    e.g.::

        import mqueue
        mqueue.migrate.upgrade("sqlite:///app.db")    # or a mqueue.Database

    A URL gets an engine of its own, closed again before returning.
    """
    db = as_database(database)
    config = alembic_config()
    try:
        with db.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except DBAPIError as error:
        raise db.translate(error) from None
    finally:
        if db is not database:
            db.dispose()


def current_revision(database: "Database | str") -> str | None:
    from alembic.runtime.migration import MigrationContext
    db = as_database(database)
    with db.engine.connect() as connection:
        return MigrationContext.configure(
            connection, opts={"version_table": "mqueue_alembic_version"}).get_current_revision()
