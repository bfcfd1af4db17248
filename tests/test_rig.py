"""Checks of the test rig itself (tests/conftest.py and tests/helpers.py)."""

from __future__ import annotations

import socket
import sys
import time

import pytest
import sqlalchemy as sa
from helpers import REPO_ROOT, free_port, run_python, wait_for
from server_ports import ephemeral_start

# Filled by test_database_url_is_usable, checked by the test after it.
_previous: dict[str, dict[str, object]] = {}

_probe = sa.Table(
    "rig_probe",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("text", sa.String(100), nullable=False),
)
_child = sa.Table(
    "rig_child",
    _probe.metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("probe_id", sa.Integer, sa.ForeignKey("rig_probe.id"), nullable=False),
)

_TEXT = "queued \u2713 \U0001f680"  # needs utf8mb4 on MariaDB


def test_database_url_is_usable(backend: str, database_url: str) -> None:
    url = sa.make_url(database_url)
    expected_driver = {
        "sqlite": "sqlite",
        "mariadb": "mysql+pymysql",
        "postgresql": "postgresql+psycopg",
    }[backend]
    assert url.drivername == expected_driver

    engine = sa.create_engine(database_url)
    assert sa.inspect(engine).get_table_names() == []
    _probe.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(_probe.insert(), [{"id": 1, "text": _TEXT}])
        conn.execute(_child.insert(), [{"id": 7, "probe_id": 1}])
    with engine.connect() as conn:
        assert conn.execute(sa.select(_probe.c.id, _probe.c.text)).all() == [(1, _TEXT)]
    assert set(sa.inspect(engine).get_table_names()) == {"rig_probe", "rig_child"}

    # Leave a connection open, in the middle of a transaction holding locks
    # on the tables: emptying the database for the next test must not hang.
    holder = engine.connect()
    holder.execute(sa.select(_probe).where(_probe.c.id == 1).with_for_update()).all()
    _previous[backend] = {"url": database_url, "engine": engine, "holder": holder}


def test_next_test_gets_an_empty_database(backend: str, database_url: str) -> None:
    previous = _previous.pop(backend, None)
    if previous is not None and backend != "sqlite":
        # Same session database as the previous test, yet emptied.
        assert database_url == previous["url"]
    if previous is not None and backend == "sqlite":
        assert database_url != previous["url"]

    engine = sa.create_engine(database_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
        # And it is usable again with the same table names.
        _probe.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(_probe.insert(), [{"id": 2, "text": "again"}])
            assert conn.execute(sa.select(sa.func.count()).select_from(_probe)).scalar_one() == 1
    finally:
        engine.dispose()
        if previous is not None:
            # The rig may already have closed it from the server side.
            try:
                previous["holder"].close()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001
                pass
            previous["engine"].dispose()  # type: ignore[attr-defined]


def test_database_url_is_not_a_server_default(backend: str, database_url: str) -> None:
    database = sa.make_url(database_url).database or ""
    if backend == "sqlite":
        assert database.endswith("test.db")
    else:
        assert database.startswith("mqueue_test_")


@pytest.mark.backends("postgresql", "mariadb")
def test_backends_mark_limits_generation(request: pytest.FixtureRequest, backend: str) -> None:
    assert backend in ("mariadb", "postgresql")
    assert request.node.name == f"test_backends_mark_limits_generation[{backend}]"


def test_wait_for_returns_the_truthy_value() -> None:
    start = time.monotonic()
    calls = []

    def predicate() -> list[int] | None:
        calls.append(1)
        return [len(calls)] if len(calls) >= 3 else None

    assert wait_for(predicate, timeout=5, interval=0.01) == [3]
    assert time.monotonic() - start < 2


def test_wait_for_times_out_with_the_message() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="the thing never happened"):
        wait_for(lambda: False, timeout=0.2, interval=0.05, message="the thing never happened")
    assert 0.2 <= time.monotonic() - start < 2
    with pytest.raises(AssertionError, match="lazy 42"):
        wait_for(lambda: 0, timeout=0.05, message=lambda: f"lazy {42}")


def test_free_port_can_be_bound_and_is_below_the_ephemeral_range() -> None:
    port = free_port()
    assert 1024 <= port < ephemeral_start()  # no outgoing connection takes it before a server binds it
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_run_python_runs_this_interpreter_with_repo_on_path(tmp_path) -> None:
    result = run_python(
        "import os, sys; print(sys.executable); print(sys.path[1] if sys.path[0] == '' else sys.path[0]);"
        " print(os.environ['RIG_PROBE']); print(os.getcwd()); sys.stderr.write('err'); sys.exit(3)",
        env={"RIG_PROBE": "yes"},
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 3
    executable, first_path, probe, cwd = result.stdout.splitlines()
    assert executable == sys.executable
    assert first_path == str(REPO_ROOT)
    assert probe == "yes"
    assert cwd == str(tmp_path)
    assert result.stderr == "err"

    args = run_python(["-c", "import sys; print(sys.argv[1:])", "a", "b"])
    assert args.returncode == 0
    assert args.stdout.strip() == "['a', 'b']"
