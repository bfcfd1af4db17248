"""Process-wide defaults set by ``mqueue.init``: queue name, database, tasks package."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import Database

ENV_URL = "MQUEUE_DATABASE_URL"


@dataclass
class Settings:
    queue: str = "default"
    database: "Database | None" = None
    package: str = "tasks"


settings = Settings()


def init(queue: str = "default", database=None, package: str = "tasks") -> None:
    """Set the default queue, database and tasks package of this process.

    e.g.::

        mqueue.init("mail", database="sqlite:///app.db", package="myapp.tasks")

    ``database`` may be a ``Database``, a URL string or an Engine.
    """
    from .session import as_database
    if not isinstance(queue, str) or not queue:
        raise ValueError(f"queue must be a non-empty string, got {queue!r}")
    settings.queue = queue
    settings.database = as_database(database) if database is not None else None
    settings.package = package


def default_url() -> str:
    """``MQUEUE_DATABASE_URL`` or the zero-setup SQLite file."""
    from .session import DEFAULT_URL
    return os.environ.get(ENV_URL) or DEFAULT_URL
