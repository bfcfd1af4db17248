"""All database-specific SQL lives in this package.

``dialect_for(engine_or_name)`` returns the object that knows how one backend
claims, fences and classifies errors.  Nothing outside this package writes
raw SQL or tests ``dialect.name``.
"""

from __future__ import annotations

from .base import Dialect
from .mysql import MySQLDialect
from .postgresql import PostgreSQLDialect
from .sqlite import SQLiteDialect

_BY_NAME: dict[str, type[Dialect]] = {
    "mysql": MySQLDialect,
    "mariadb": MySQLDialect,
    "postgresql": PostgreSQLDialect,
    "sqlite": SQLiteDialect,
}
_INSTANCES: dict[str, Dialect] = {}


def dialect_for(name_or_bind) -> Dialect:
    """The mqueue dialect for a backend name, Engine, Connection or Session."""
    name = name_or_bind if isinstance(name_or_bind, str) else _bind_name(name_or_bind)
    if name not in _INSTANCES:
        try:
            _INSTANCES[name] = _BY_NAME[name]()
        except KeyError:
            raise ValueError(f"mqueue supports MySQL/MariaDB, PostgreSQL and SQLite, not {name!r}") from None
    return _INSTANCES[name]


def _bind_name(bind) -> str:
    get_bind = getattr(bind, "get_bind", None)
    if get_bind is not None:
        bind = get_bind()
    return bind.dialect.name


__all__ = ["Dialect", "dialect_for"]
