"""Database handles and the current-session context.

The current session lives in a stdlib ``ContextVar``: every thread and every
asyncio task sees only its own, so a web handler's enqueue can never land in
another request's transaction.

A session of any ``Database`` on the database of the current session joins
it, whichever handle opened that one: inside a running job the worker's own
handle opened it, and the application's handle (same URL, another object,
as the CLI builds its own) must be fenced with the job, not commit apart.

After ``os.fork()`` every live ``Database`` drops its pool in the child
(without closing the parent's connections): a pooled connection used on both
sides of a fork breaks both (PyMySQL "Command Out of Sync", psycopg
"unexpected result EMPTY_QUERY from command 'BEGIN'").

e.g.::

    db = mqueue.Database("sqlite:///app.db")
    with db.session():
        tasks.mail.enqueue(to="a@example.com")   # commits with the block
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import weakref
from typing import Any, Iterator

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from .dialects import Dialect, dialect_for
from .errors import (AccessDeniedError, DatabaseUnavailableError, DatabaseURLError, NoSessionError,
                     SchemaMissingError, first_line)

DEFAULT_URL = "sqlite:///mqueue.db"

#: The scheme to write for each backend, with a driver mqueue installs (PyMySQL) or offers (psycopg 3).
SCHEMES = {"mysql": "mysql+pymysql", "mariadb": "mysql+pymysql", "postgresql": "postgresql+psycopg",
           "sqlite": "sqlite"}
#: Schemes written by habit that SQLAlchemy does not know (Heroku's and libpq's ``postgres://``).
SCHEME_ALIASES = {"postgres": "postgresql"}

_current: contextvars.ContextVar[Session | None] = contextvars.ContextVar("mqueue_session", default=None)

#: Every live Database, for the fork hook below.
_databases: "weakref.WeakSet[Database]" = weakref.WeakSet()


def safe_url(url: str | URL) -> str:
    """A URL fit for printing: the password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


class Database:
    """An engine plus a session factory, configured for mqueue's needs on each backend.

    e.g.::

        db = mqueue.Database("mysql+pymysql://app:pw@127.0.0.1/app", pool_size=10)
        with db.session() as session:
            session.add(User(name="ada"))
            tasks.welcome.enqueue(name="ada")
    """

    def __init__(self, url_or_engine: str | URL | Engine, **engine_kwargs: Any) -> None:
        #: Built around the application's own engine (its creator, connect_args
        #: and listeners cannot be rebuilt from the URL).
        self.adopted = isinstance(url_or_engine, Engine)
        #: The caller's engine options, for a worker that needs its own engine on the same URL.
        self.engine_kwargs = dict(engine_kwargs)
        if self.adopted:
            self.dialect: Dialect = dialect_for(url_or_engine)
            self.engine = self.dialect.adopt_engine(url_or_engine)
        else:
            url = make_url(url_or_engine)
            if url.get_backend_name() in SCHEME_ALIASES:
                raise unusable_url(url, f"SQLAlchemy has no scheme {url.drivername + '://'!r}")
            try:
                self.dialect = dialect_for(url.get_backend_name())
            except ValueError as error:
                raise unusable_url(url, str(error)) from None
            options = self.dialect.engine_options(url)
            options.update(engine_kwargs)
            try:
                self.engine = create_engine(url, **options)
            except ImportError as error:  # the URL's driver (MySQLdb, psycopg2, ...) is not installed
                raise unusable_url(url, f"its driver is not installed ({error})") from None
        self.dialect.configure_engine(self.engine, own=not self.adopted)
        self.Session = sessionmaker(bind=self.engine, expire_on_commit=False)
        _databases.add(self)

    def __repr__(self) -> str:
        return f"Database({self.safe_url!r})"

    @property
    def safe_url(self) -> str:
        return safe_url(self.engine.url)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """Open a session, make it current, commit on success, roll back on error.

        Inside another session of the same database (another ``Database``
        on it too, a running job's, or one made current by ``use_session``)
        this joins the outer session: the outer block decides commit or rollback.
        """
        outer = _current.get()
        if outer is not None and self._joins(outer):
            yield outer
            return
        session = self.Session()
        reset = _current.set(session)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            _current.reset(reset)
            session.close()

    def _joins(self, session: Session) -> bool:
        """Whether ``session`` is bound to this database (any engine on it), so a session here joins it."""
        try:
            engine = session.get_bind().engine  # an Engine's .engine is itself
        except Exception:  # noqa: BLE001 - unbound or bound per mapper: not ours to join
            return False
        if engine.pool is self.engine.pool:
            return True
        mine = database_identity(self.engine)
        return mine is not None and mine == database_identity(engine)

    def create_all(self) -> None:
        """Create mqueue's tables directly (tests); production uses ``python -m mqueue migrate``."""
        from .schema import metadata
        try:
            metadata.create_all(self.engine)
        except DBAPIError as error:
            raise self.translate(error) from None

    def drop_all(self) -> None:
        from .schema import metadata
        metadata.drop_all(self.engine)

    def check_file(self) -> None:
        """Raise ``SchemaMissingError`` if the database is a SQLite file that does not exist yet.

        Connecting would create it, empty: a command that only looks (``mqueue
        list``) must not leave a file behind in whatever directory it ran in.
        """
        path = self.dialect.missing_database_file(self.engine.url)
        if path is not None:
            raise SchemaMissingError(f"database file {path} does not exist; "
                                     f"run: python -m mqueue migrate to create it")

    def check_schema(self) -> None:
        """Raise a clear error if the server is unreachable or mqueue's tables are missing."""
        from .schema import metadata
        try:
            with self.dialect.reader(self.engine).connect() as conn:  # never waits for a writer
                present = set(inspect(conn).get_table_names())
        except DBAPIError as error:
            raise self.translate(error) from None
        missing = [name for name in metadata.tables if name not in present]  # mqueue_task first
        if missing:
            raise SchemaMissingError(
                f"table {missing[0]} missing in {self.safe_url}; run: python -m mqueue migrate")

    def translate(self, error: BaseException) -> BaseException:
        """Turn a driver error into mqueue's one-line error where one applies."""
        return translate_error(self.engine, error)

    def dispose(self) -> None:
        self.engine.dispose()


def database_identity(engine: Engine) -> tuple | None:
    """What identifies ``engine``'s database (backend, host, port, name or file, user); None if unknown."""
    try:
        dialect = dialect_for(engine)
    except ValueError:  # a backend mqueue does not serve: never the same database
        return None
    return dialect.database_identity(engine.url)


def _forget_pools_after_fork() -> None:
    """In a forked child: a fresh pool for every Database, the parent's connections left untouched.

    ``close=False`` only drops the references: closing would end the
    parent's sessions on the server (PostgreSQL's Terminate message).  A
    session current in the forking thread (a fork inside ``db.session()``
    or a running task) holds one of the parent's connections: it stops
    being current, so the child opens its own.
    """
    for database in list(_databases):
        database.engine.dispose(close=False)
    _current.set(None)


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def translate_error(bind, error: BaseException) -> BaseException:
    """A missing table or unreachable server as mqueue's one-line error; else ``error`` itself."""
    engine = bind.get_bind() if hasattr(bind, "get_bind") else bind
    dialect = dialect_for(engine)
    where = safe_url(engine.url)
    if dialect.is_missing_table(error):
        return SchemaMissingError(f"{_missing_table(error)} missing in {where}; run: python -m mqueue migrate")
    if dialect.is_access_denied(error):
        return AccessDeniedError(f"database {where} refused the login: {first_line(error)}; "
                                 f"check the user name and password in the URL")
    if dialect.is_unreachable(error):
        cause = first_line(error)
        return DatabaseUnavailableError(f"cannot reach database {where}: {cause}")
    return error


def _missing_table(error: BaseException) -> str:
    """``table mqueue_task`` when the driver's message names one of mqueue's tables, else ``mqueue tables``.

    Whole names only: a MySQL message says ``'app.mqueue_task'``, and the
    database's own name may start with ``mqueue_`` too.
    """
    from .schema import metadata
    message = first_line(error)
    for name in sorted(metadata.tables, key=len, reverse=True):
        if re.search(rf"\b{re.escape(name)}\b", message):
            return f"table {name}"
    return "mqueue tables"


def unusable_url(url: URL, problem: str) -> DatabaseURLError:
    """The error for a URL whose scheme or driver cannot be used: which URL, why, and what to write."""
    backend = url.get_backend_name()
    scheme = SCHEMES.get(SCHEME_ALIASES.get(backend, backend))
    advice = (f"; use {safe_url(url.set(drivername=scheme))}" if scheme
              else f"; use one of {', '.join(sorted({s + '://' for s in SCHEMES.values()}))}")
    return DatabaseURLError(f"cannot use database URL {safe_url(url)}: {problem}{advice}")


def as_database(database: "Database | str | URL | Engine") -> Database:
    """Accept a Database, URL string or Engine wherever the API takes a database."""
    return database if isinstance(database, Database) else Database(database)


def current_session() -> Session:
    """The session of the enclosing ``db.session()`` / ``use_session()`` / running task."""
    session = _current.get()
    if session is None:
        raise NoSessionError()
    return session


def peek_session() -> Session | None:
    """The current session or None (no error)."""
    return _current.get()


@contextlib.contextmanager
def use_session(session: Session) -> Iterator[Session]:
    """Make a caller-managed session current; mqueue never commits or closes it.

    e.g.::

        with mqueue.use_session(flask_db.session):
            tasks.mail.enqueue(to=user.email)
    """
    reset = _current.set(session)
    try:
        yield session
    finally:
        _current.reset(reset)


class _Context:
    """``mqueue.ctx.session``: the current session as an attribute (MQueue's idiom)."""

    @property
    def session(self) -> Session:
        return current_session()

    @property
    def job(self):
        from .jobs import current_job
        return current_job()


ctx = _Context()
