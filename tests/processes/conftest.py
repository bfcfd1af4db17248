"""Fixtures for the process tests: a tasks package on disk, a database, daemons."""

from __future__ import annotations

import pytest
from daemons import Daemons, prepare_database, write_tasks


@pytest.fixture
def tasks(tmp_path):
    """The ``proctasks`` package, its execution log and its release flag, in ``tmp_path``."""
    return write_tasks(tmp_path)


@pytest.fixture
def db(database_url):
    """A migrated database with the ``effect`` table, for enqueueing and checks."""
    database = prepare_database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def daemons(tasks, database_url, db):
    """Starts daemons on ``database_url``; kills whatever is still running at the end."""
    started = Daemons(tasks, database_url)
    yield started
    started.close()
