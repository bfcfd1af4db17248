"""Test rig: a real, empty database of every backend for each test.

Fixtures
--------
``backend``
    The backend under test: ``"sqlite"``, ``"mariadb"`` or ``"postgresql"``.
    Every test that uses it (directly or through ``database_url``) is
    generated once per selected backend, with the backend name as test id.
``database_url``
    A SQLAlchemy URL string for an empty database (no tables) of ``backend``:

    * sqlite: ``sqlite:///<tmp_path>/test.db`` (a new file per test);
    * mariadb: ``mysql+pymysql://root@127.0.0.1:3306/<db>?charset=utf8mb4``;
    * postgresql: ``postgresql+psycopg://postgres@127.0.0.1:5432/<db>``.

    The server databases are created once per pytest session (named
    ``mqueue_test_<pid>_<random>``) and dropped at its end; before each test
    every table in them is dropped, after closing any connection a previous
    test left open on them.

Selecting backends
------------------
``--backends=sqlite,postgresql`` (or ``MQUEUE_TEST_BACKENDS``; default: all)
limits which backends tests are generated for; the others are not generated
at all (never skipped). A test can restrict itself further with
``@pytest.mark.backends("mariadb", "postgresql")``.

If a selected server cannot be reached, the run stops before any test with
one message saying which server is down and how to start it.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from pytest_mysql import factories
from sqlalchemy.engine import URL

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    # Makes ``from helpers import ...`` work whatever pytest's import mode.
    sys.path.insert(0, str(TESTS_DIR))

BACKENDS = ("sqlite", "mariadb", "postgresql")
SERVER_BACKENDS = ("mariadb", "postgresql")
BACKENDS_ENV = "MQUEUE_TEST_BACKENDS"

MARIADB_HOST = "127.0.0.1"
MARIADB_PORT = 3306
MARIADB_USER = "root"

POSTGRESQL_HOST = "127.0.0.1"
POSTGRESQL_PORT = 5432
POSTGRESQL_USER = "postgres"

CONNECT_TIMEOUT = 5  # seconds, for reaching a server
LOCK_TIMEOUT = 20  # seconds, for dropping tables between tests

_NOT_SELECTED = "<backend not selected>"
_selected_key = pytest.StashKey[tuple[str, ...]]()



def _start_hint(down: set[str]) -> str:
    others = ",".join(b for b in BACKENDS if b not in down)
    return (
        "Start it with scripts/test (it installs and starts MariaDB and PostgreSQL "
        f"when needed), or leave it out: --backends={others} (or {BACKENDS_ENV}={others})."
    )


# --------------------------------------------------------------------------
# Options and backend selection
# --------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mqueue", "mqueue database backends")
    group.addoption(
        "--backends",
        action="store",
        default=None,
        metavar="NAMES",
        help=(
            "comma-separated database backends to generate tests for, out of "
            f"{','.join(BACKENDS)} (default: all, or ${BACKENDS_ENV})"
        ),
    )


def _parse_backends(raw: str, source: str) -> tuple[str, ...]:
    names = {part.strip().lower() for part in raw.split(",") if part.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(BACKENDS)
    unknown = sorted(names - set(BACKENDS))
    if unknown or not names:
        raise pytest.UsageError(
            f"{source}: unknown or missing backend(s) {', '.join(unknown) or repr(raw)}; "
            f"choose from {','.join(BACKENDS)}"
        )
    return tuple(b for b in BACKENDS if b in names)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): generate this test only for these database backends "
        f"(out of {', '.join(BACKENDS)})",
    )
    raw = config.getoption("backends")
    source = "--backends"
    if raw is None:
        raw, source = os.environ.get(BACKENDS_ENV) or "all", BACKENDS_ENV
    config.stash[_selected_key] = _parse_backends(raw, source)


def pytest_report_header(config: pytest.Config) -> str:
    return "mqueue backends: " + ", ".join(config.stash[_selected_key])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [name.strip() for name in argnames.split(",")]
        if "backend" in argnames:
            return  # the test chose its backends itself
    allowed: set[str] = set(BACKENDS)
    for mark in metafunc.definition.iter_markers("backends"):
        allowed &= set(_parse_backends(",".join(mark.args), f"{metafunc.definition.nodeid}: backends mark"))
    names = [b for b in metafunc.config.stash[_selected_key] if b in allowed]
    if names:
        metafunc.parametrize("backend", names, ids=names, indirect=True)
    else:
        # Nothing to run it against: generate a placeholder that
        # pytest_collection_modifyitems deselects (rather than pytest's
        # "empty parameter set" skip).
        metafunc.parametrize("backend", [_NOT_SELECTED], ids=["no-backend"], indirect=True)


def _item_backend(item: pytest.Item) -> Any:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept = [item for item in items if _item_backend(item) != _NOT_SELECTED]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if _item_backend(i) == _NOT_SELECTED])
        items[:] = kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """Check once, before running anything, that the needed servers answer."""
    config = session.config
    if config.option.collectonly or not session.items:
        return
    needed = {_item_backend(item) for item in session.items}
    problems = {}
    for backend in SERVER_BACKENDS:
        if backend in needed:
            server = _server(backend, config)
            error = server.probe()
            if error:
                problems[backend] = f"{server.label} is not reachable at {server.display_url()}: {error}"
    if problems:
        raise pytest.UsageError("\n".join(problems.values()) + "\n" + _start_hint(set(problems)))


# --------------------------------------------------------------------------
# Server databases
# --------------------------------------------------------------------------


def _unique_name() -> str:
    return f"mqueue_test_{os.getpid()}_{secrets.token_hex(4)}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class MariaDBDatabase:
    """One database on the MariaDB server, used by all tests of a session."""

    label = "MariaDB"

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.host, self.port, self.user, self.password = host, int(port), user, password
        self.name = _unique_name()
        self._admin_conn: Any = None

    def _connect(self, database: str | None = None) -> Any:
        import pymysql

        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
        )

    def _sqlalchemy_url(self, database: str | None) -> URL:
        return URL.create(
            "mysql+pymysql",
            username=self.user,
            password=self.password or None,
            host=self.host,
            port=self.port,
            database=database,
            query={"charset": "utf8mb4"},
        )

    @property
    def url(self) -> str:
        return self._sqlalchemy_url(self.name).render_as_string(hide_password=False)

    def display_url(self) -> str:
        return self._sqlalchemy_url(None).set(query={}).render_as_string(hide_password=True)

    def probe(self) -> str | None:
        try:
            self._connect().close()
        except Exception as exc:  # noqa: BLE001 - reported to the user
            return _one_line(exc)
        return None

    def create(self) -> None:
        with closing(self._connect()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")

    def _admin(self) -> Any:
        """An autocommit connection to the server, reconnected if lost."""
        import pymysql

        conn = self._admin_conn
        if conn is not None:
            try:
                conn.ping(reconnect=False)
                return conn
            except pymysql.MySQLError:
                try:
                    conn.close()
                except pymysql.MySQLError:
                    pass
        self._admin_conn = self._connect()
        return self._admin_conn

    def _close_other_connections(self, cur: Any) -> None:
        import pymysql

        cur.execute(
            "SELECT id FROM information_schema.processlist WHERE db = %s AND id <> CONNECTION_ID()",
            (self.name,),
        )
        for (thread_id,) in cur.fetchall():
            try:
                cur.execute(f"KILL CONNECTION {int(thread_id)}")
            except pymysql.MySQLError:
                pass  # it went away by itself meanwhile

    def reset(self) -> None:
        """Drop every table, view and sequence in the database."""
        conn = self._admin()
        with conn.cursor() as cur:
            self._close_other_connections(cur)
            cur.execute(f"SET SESSION lock_wait_timeout = {LOCK_TIMEOUT}")
            cur.execute("SET SESSION FOREIGN_KEY_CHECKS = 0")
            try:
                cur.execute(
                    "SELECT table_name, table_type FROM information_schema.tables "
                    "WHERE table_schema = %s",
                    (self.name,),
                )
                for table, table_type in cur.fetchall():
                    kind = {"VIEW": "VIEW", "SEQUENCE": "SEQUENCE"}.get(table_type, "TABLE")
                    cur.execute(f"DROP {kind} IF EXISTS `{self.name}`.`{table}`")
            finally:
                cur.execute("SET SESSION FOREIGN_KEY_CHECKS = 1")

    def drop(self) -> None:
        conn = self._admin()
        with conn.cursor() as cur:
            self._close_other_connections(cur)
            cur.execute(f"SET SESSION lock_wait_timeout = {LOCK_TIMEOUT}")
            cur.execute(f"DROP DATABASE IF EXISTS `{self.name}`")
        conn.close()
        self._admin_conn = None


class PostgreSQLDatabase:
    """One database on the PostgreSQL server, used by all tests of a session."""

    label = "PostgreSQL"

    def __init__(self, host: str, port: int, user: str, password: str = "") -> None:
        self.host, self.port, self.user, self.password = host, int(port), user, password
        self.name = _unique_name()
        self._admin_conn: Any = None

    def _connect(self, dbname: str) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            dbname=dbname,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
        )

    def _sqlalchemy_url(self, database: str | None) -> URL:
        return URL.create(
            "postgresql+psycopg",
            username=self.user,
            password=self.password or None,
            host=self.host,
            port=self.port,
            database=database,
        )

    @property
    def url(self) -> str:
        return self._sqlalchemy_url(self.name).render_as_string(hide_password=False)

    def display_url(self) -> str:
        return self._sqlalchemy_url(None).render_as_string(hide_password=True)

    def probe(self) -> str | None:
        try:
            self._connect("postgres").close()
        except Exception as exc:  # noqa: BLE001 - reported to the user
            return _one_line(exc)
        return None

    def create(self) -> None:
        from psycopg import sql

        with self._connect("postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def _admin(self) -> Any:
        """An autocommit connection to the test database, reconnected if lost."""
        import psycopg

        conn = self._admin_conn
        if conn is not None and not conn.closed:
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                conn.close()
        self._admin_conn = self._connect(self.name)
        return self._admin_conn

    def reset(self) -> None:
        """Drop every schema (so every table, type, sequence) and recreate public."""
        from psycopg import sql

        conn = self._admin()
        # Close connections earlier tests left open (they may hold locks);
        # from PostgreSQL 14 on, wait up to 5s for each to be gone.
        if conn.info.server_version >= 140000:
            terminate = "pg_terminate_backend(pid, 5000)"
        else:
            terminate = "pg_terminate_backend(pid)"
        conn.execute(
            f"SELECT {terminate} FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}s'")
        schemas = conn.execute(
            "SELECT nspname FROM pg_namespace "
            "WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
        ).fetchall()
        for (schema,) in schemas:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute("CREATE SCHEMA public")

    def drop(self) -> None:
        from psycopg import sql

        if self._admin_conn is not None:
            self._admin_conn.close()
            self._admin_conn = None
        with self._connect("postgres") as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )


def _mariadb_password(config: pytest.Config) -> str:
    # pytest-mysql's own setting (--mysql-passwd / mysql_passwd ini), default "".
    return config.getoption("mysql_passwd") or config.getini("mysql_passwd") or ""


def _server(backend: str, config: pytest.Config) -> MariaDBDatabase | PostgreSQLDatabase:
    """A (not yet created) database object, used for probing the server."""
    if backend == "mariadb":
        return MariaDBDatabase(MARIADB_HOST, MARIADB_PORT, MARIADB_USER, _mariadb_password(config))
    return PostgreSQLDatabase(POSTGRESQL_HOST, POSTGRESQL_PORT, POSTGRESQL_USER)


def _session_database(db: MariaDBDatabase | PostgreSQLDatabase) -> Iterator[Any]:
    try:
        db.create()
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        pytest.fail(
            f"could not create test database {db.name} on {db.label} at "
            f"{db.display_url()}: {_one_line(exc)}\n{_start_hint({db.label.lower()})}",
            pytrace=False,
        )
    try:
        yield db
    finally:
        db.drop()


# pytest-mysql: the already running MariaDB server (no process management).
mariadb_server = factories.mysql_noproc(host=MARIADB_HOST, port=MARIADB_PORT, user=MARIADB_USER)


@pytest.fixture(scope="session")
def _mariadb_database(mariadb_server: Any, request: pytest.FixtureRequest) -> Iterator[MariaDBDatabase]:
    db = MariaDBDatabase(
        mariadb_server.host,
        mariadb_server.port,
        mariadb_server.user,
        _mariadb_password(request.config),
    )
    yield from _session_database(db)


@pytest.fixture(scope="session")
def _postgresql_database() -> Iterator[PostgreSQLDatabase]:
    db = PostgreSQLDatabase(POSTGRESQL_HOST, POSTGRESQL_PORT, POSTGRESQL_USER)
    yield from _session_database(db)


# --------------------------------------------------------------------------
# Public fixtures
# --------------------------------------------------------------------------


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test (parametrized by pytest_generate_tests)."""
    return request.param


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLAlchemy URL of an empty database of ``backend`` for this test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    db: MariaDBDatabase | PostgreSQLDatabase = request.getfixturevalue(f"_{backend}_database")
    try:
        db.reset()
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        pytest.fail(
            f"could not empty test database {db.name} on {db.label} at "
            f"{db.display_url()}: {_one_line(exc)}",
            pytrace=False,
        )
    yield db.url


@pytest.fixture
def db(database_url: str) -> Iterator[Any]:
    """A ``mqueue.Database`` on an empty database of ``backend``, migrated to the latest schema.

    Test modules that need more (their own tables) override it by asking for ``db`` itself.
    """
    import mqueue
    from mqueue.migrate import upgrade

    database = mqueue.Database(database_url)
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def observer(database_url: str) -> Iterator[Any]:
    """A plain SQLAlchemy engine on the test's database, to see what other connections see."""
    from sqlalchemy import create_engine
    engine = create_engine(database_url)
    yield engine
    engine.dispose()
