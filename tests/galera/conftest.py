"""Fixtures for the Galera tests: one three-node cluster per test session, a fresh database per test.

The cluster comes from ``scripts/galera_cluster.py`` (the same rig
``scripts/bench.py galera`` uses): Debian's ``mariadb-server``, ``galera-4``
and ``rsync`` (``scripts/test`` installs what is missing), own datadirs and
ports, torn down at the end of the session.  The tests are MariaDB tests:
marked ``backends("mariadb")``, they are left out with ``--backends`` that
do not name it.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
for extra in (TESTS / "processes", TESTS.parent / "scripts"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from daemons import Daemons, prepare_database, write_tasks  # noqa: E402
from galera_cluster import GaleraCluster  # noqa: E402


@pytest.fixture(scope="session")
def galera():
    """Three synced nodes on loopback, started once; killed and removed after the last test."""
    cluster = GaleraCluster().start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def node_urls(galera):
    """URLs of one new database on each node, with mqueue's tables and the ``effect`` table (created on node 1)."""
    for index in range(len(galera.nodes)):
        if not galera.nodes[index].running():
            galera.restart(index)  # a test that failed half-way left a node down
    urls = galera.create_database(f"mqueue_g_{secrets.token_hex(4)}")
    prepare_database(urls[0]).dispose()
    return urls


@pytest.fixture
def tasks(tmp_path):
    return write_tasks(tmp_path)


@pytest.fixture
def daemons(tasks, node_urls):
    started = Daemons(tasks, node_urls[0])
    yield started
    started.close()
