"""Fixtures for the fault tests: the harness (tasks, logs, ledger), a database, daemons, a proxy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

PROCESSES = Path(__file__).resolve().parent.parent / "processes"
if str(PROCESSES) not in sys.path:
    sys.path.insert(0, str(PROCESSES))

from daemons import Daemons  # noqa: E402
from ledger import Harness, prepare  # noqa: E402
from proxy import Proxy  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


@pytest.fixture
def fdb(database_url):
    """A migrated database with the ``fault_effect`` ledger table."""
    database = prepare(database_url)
    yield database
    database.dispose()


@pytest.fixture
def fdaemons(harness, database_url, fdb):
    started = Daemons(harness, database_url)
    yield started
    started.close()


@pytest.fixture
def proxy(backend, database_url):
    """A fault proxy in front of the test's server (SQLite: none)."""
    if backend == "sqlite":
        yield None
        return
    url = make_url(database_url)
    with Proxy((url.host, url.port)) as running:
        yield running
