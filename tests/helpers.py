"""Small helpers shared by the test suite.

Import them as ``from helpers import wait_for`` (``tests/conftest.py`` puts
this directory on ``sys.path``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Column, Integer, MetaData, String, Table, select

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.append(str(REPO_ROOT / "scripts"))

from server_ports import unused_port  # noqa: E402

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    Raises ``AssertionError`` with ``message`` (a string, or a callable
    producing one, evaluated only on failure) once ``timeout`` seconds have
    passed. The predicate is always called at least once, and once more right
    at the deadline, so a slow machine does not lose the last chance.
    Exceptions raised by the predicate propagate unchanged.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    result = predicate()
    if result:
        return result
    text = message() if callable(message) else message
    raise AssertionError(f"timed out after {timeout:g}s: {text}")


def attempts_possible(elapsed: float) -> int:
    """How many attempts one of mqueue's loops can make in ``elapsed`` seconds of outage.

    The first at once, then after each backoff step (``mqueue.loops.outage_delay``).
    """
    from mqueue.loops import outage_delay
    attempts, at = 1, 0.0
    while at + outage_delay(attempts) <= elapsed:
        at += outage_delay(attempts)
        attempts += 1
    return attempts


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on, below the ephemeral range (``scripts/server_ports.py``):
    a server a test starts on it later finds it still free."""
    return unused_port(host)


def python_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child Python: ours, plus ``env``, with the repo
    root first on ``PYTHONPATH`` so ``import mqueue`` (and ``tasks_example``)
    work without installation."""
    result = dict(os.environ)
    if env:
        result.update(env)
    paths = [str(REPO_ROOT)]
    existing = result.get("PYTHONPATH")
    if existing:
        paths.extend(p for p in existing.split(os.pathsep) if p and p != str(REPO_ROOT))
    result["PYTHONPATH"] = os.pathsep.join(paths)
    result.setdefault("PYTHONUNBUFFERED", "1")
    return result


def run_python(
    code_or_args: str | Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run the current interpreter in a subprocess and wait for it.

    ``code_or_args`` is either a string of Python code (run with ``-c``) or a
    sequence of arguments for the interpreter (e.g. ``["-m", "mqueue",
    "worker"]``). ``env`` entries are added to the current environment; the
    repo root is put on ``PYTHONPATH``. ``cwd`` defaults to the repo root.
    Output is captured as text; the result is a ``CompletedProcess``. Extra
    keyword arguments (e.g. ``input=``) go to ``subprocess.run``.
    """
    if isinstance(code_or_args, str):
        argv = [sys.executable, "-c", code_or_args]
    else:
        argv = [sys.executable, *code_or_args]
    kwargs.setdefault("capture_output", True)
    return subprocess.run(
        argv,
        env=python_env(env),
        cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
        timeout=timeout,
        check=check,
        text=True,
        **kwargs,
    )


# -- a scratch table that tests write next to their enqueues ------------------------

note_metadata = MetaData()
note = Table(
    "note", note_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("text", String(100), nullable=False),
)


def notes(engine) -> list[str]:
    """Every note's text, sorted, as a fresh connection sees them."""
    with engine.connect() as conn:
        return sorted(conn.execute(select(note.c.text)).scalars())


def whole_lines(path: Path) -> list[str]:
    """The complete lines of a file others append to: a read may meet an append half-done."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[:text.rfind("\n") + 1].splitlines()


def sqlite_write_lock_free(path) -> bool:
    """True if no connection holds the SQLite database's write lock right now."""
    import sqlite3
    conn = sqlite3.connect(str(path), timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


class server_user:
    """A MariaDB or PostgreSQL user with a password and all rights on ``database_url``'s database.

    ``with server_user(backend, database_url, connection_limit=1) as url:``
    yields the URL (password included) and drops the user on exit.  A
    connection limit beyond it is refused as a full server would refuse it
    (MariaDB 1203, PostgreSQL 53300), without touching server-wide settings.
    """

    def __init__(self, backend: str, database_url: str, connection_limit: int | None = None) -> None:
        import uuid

        from sqlalchemy.engine import make_url
        self.backend = backend
        self.admin_url = make_url(database_url)
        self.name = f"mq_{uuid.uuid4().hex[:12]}"
        self.password = f"Pw-{uuid.uuid4().hex[:10]}"
        self.limit = connection_limit

    def _admin(self, *statements: str) -> None:
        from sqlalchemy import create_engine, text
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def __enter__(self) -> str:
        database = self.admin_url.database
        if self.backend == "mariadb":
            statements = []
            for host in ("%", "localhost", "127.0.0.1"):
                limit = "" if self.limit is None else f" WITH MAX_USER_CONNECTIONS {self.limit}"
                statements += [f"CREATE USER '{self.name}'@'{host}' IDENTIFIED BY '{self.password}'{limit}",
                               f"GRANT ALL ON `{database}`.* TO '{self.name}'@'{host}'"]
            self._admin(*statements)
        else:
            limit = "" if self.limit is None else f" CONNECTION LIMIT {self.limit}"
            self._admin(f"CREATE ROLE {self.name} LOGIN PASSWORD '{self.password}'{limit}",
                        f'GRANT ALL ON DATABASE "{database}" TO {self.name}',
                        f"GRANT ALL ON SCHEMA public TO {self.name}",
                        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {self.name}",
                        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {self.name}")
        return self.admin_url.set(username=self.name, password=self.password).render_as_string(
            hide_password=False)

    def __exit__(self, *exc) -> None:
        if self.backend == "mariadb":
            self._admin(*(f"DROP USER IF EXISTS '{self.name}'@'{host}'" for host in ("%", "localhost", "127.0.0.1")))
        else:
            self._admin(f"REASSIGN OWNED BY {self.name} TO CURRENT_USER", f"DROP OWNED BY {self.name}",
                        f"DROP ROLE IF EXISTS {self.name}")


def quick_worker(db, queues: Sequence[str], **options: Any):
    """A ``mqueue.Worker`` with short polls and a short lease, for tests that run it in-process."""
    import mqueue
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 5)
    return mqueue.Worker(db, queues=list(queues), **options)


def db_now(db):
    """The database's clock (naive UTC)."""
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)
