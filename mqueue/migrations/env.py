"""Alembic environment for mqueue's own tables.

Run through ``python -m mqueue migrate`` (the engine's connection is passed
in ``config.attributes["connection"]``) or, in mqueue's repository, through
``alembic -c alembic.ini ...`` with ``sqlalchemy.url`` set.  mqueue records
its revision in ``mqueue_alembic_version`` so it never collides with the
application's own ``alembic_version``.
"""

from alembic import context
from sqlalchemy import engine_from_config, pool

from mqueue.schema import metadata

VERSION_TABLE = "mqueue_alembic_version"


def include_object(obj, name, type_, reflected, compare_to):
    """Compare only mqueue's tables: the application's are none of our business."""
    if type_ == "table":
        return name.startswith("mqueue_") and name != VERSION_TABLE
    return True


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                      include_object=include_object, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


config = context.config
connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    section = config.get_section(config.config_ini_section, {})
    url = context.get_x_argument(as_dictionary=True).get("url")  # alembic -x url=... overrides the ini
    if url:
        section["sqlalchemy.url"] = url
    engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.begin() as conn:
        run(conn)
