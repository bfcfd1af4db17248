"""SQL expressions whose text differs per backend, compiled in one place.

``utc_now(offset_seconds)`` is the database's clock in UTC, optionally
shifted.  mqueue judges due-ness and lease expiry by this clock only, never a
worker's, so hosts with skewed clocks still agree.
"""

from __future__ import annotations

from sqlalchemy import DateTime, Float, String, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement


class utc_now(FunctionElement):
    """The database's current UTC time plus ``offset`` seconds (a number or SQL expression)."""

    type = DateTime()
    inherit_cache = True
    name = "utc_now"

    def __init__(self, offset: float | ColumnElement | None = None) -> None:
        if offset is None:
            super().__init__()
        else:
            if not isinstance(offset, ColumnElement):
                offset = literal(float(offset))
            super().__init__(offset)


def _offset(element, compiler, **kw) -> str | None:
    clauses = list(element.clauses)
    return compiler.process(clauses[0], **kw) if clauses else None


@compiles(utc_now, "mysql")
@compiles(utc_now, "mariadb")
def _mysql_now(element, compiler, **kw):
    offset = _offset(element, compiler, **kw)
    if offset is None:
        return "(UTC_TIMESTAMP(6))"
    return f"TIMESTAMPADD(MICROSECOND, CAST(({offset}) * 1000000 AS SIGNED), UTC_TIMESTAMP(6))"


@compiles(utc_now, "postgresql")
def _postgresql_now(element, compiler, **kw):
    offset = _offset(element, compiler, **kw)
    # clock_timestamp(), not now(): now() is frozen at transaction start, and a
    # long task transaction must not compute a lease that has already expired.
    base = "(clock_timestamp() AT TIME ZONE 'utc')"
    if offset is None:
        return base
    return f"({base} + make_interval(secs => CAST(({offset}) AS double precision)))"


@compiles(utc_now, "sqlite")
def _sqlite_now(element, compiler, **kw):
    offset = _offset(element, compiler, **kw)
    # Same text layout SQLAlchemy writes for datetimes (6 fraction digits),
    # because SQLite compares times as text.  %f gives milliseconds only.
    if offset is None:
        return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"
    return (f"(strftime('%Y-%m-%d %H:%M:%f', 'now', "
            f"printf('%+.3f seconds', {offset})) || '000')")


class due_now(FunctionElement):
    """The database's current UTC time for comparisons with indexed times (``eta <= due_now()``).

    On PostgreSQL ``clock_timestamp()`` is volatile, and a volatile
    expression is never an index condition: ``eta <= clock_timestamp()``
    made the claim filter every row of a priority level (measured: 10,000
    future rows read per idle poll).  ``statement_timestamp()`` is stable,
    so the index range stops at the first future row; it is the start of
    the statement, which is what a claim means by "due".  Elsewhere the
    clock already is constant within a statement.
    """

    type = DateTime()
    inherit_cache = True
    name = "due_now"


@compiles(due_now)
def _due_now_default(element, compiler, **kw):
    return compiler.process(utc_now(), **kw)


@compiles(due_now, "postgresql")
def _postgresql_due_now(element, compiler, **kw):
    return "(statement_timestamp() AT TIME ZONE 'utc')"


class seconds_since(FunctionElement):
    """Seconds from a stored time to the database's clock now (a float; negative if it is ahead).

    Lets a claim record how long a job waited, and a completion how long it
    ran, inside the statements they already are, by the one clock that
    judged due-ness and leases.
    """

    type = Float()
    inherit_cache = True
    name = "seconds_since"


@compiles(seconds_since, "mysql")
@compiles(seconds_since, "mariadb")
def _mysql_seconds_since(element, compiler, **kw):
    since = compiler.process(list(element.clauses)[0], **kw)
    return f"(TIMESTAMPDIFF(MICROSECOND, {since}, UTC_TIMESTAMP(6)) / 1000000.0)"


@compiles(seconds_since, "postgresql")
def _postgresql_seconds_since(element, compiler, **kw):
    since = compiler.process(list(element.clauses)[0], **kw)
    return f"CAST(EXTRACT(EPOCH FROM ((clock_timestamp() AT TIME ZONE 'utc') - {since})) AS double precision)"


@compiles(seconds_since, "sqlite")
def _sqlite_seconds_since(element, compiler, **kw):
    since = compiler.process(list(element.clauses)[0], **kw)
    # julianday() is a double in days: about 40 us of resolution today.
    return f"((julianday('now') - julianday({since})) * 86400.0)"


class minute_of(FunctionElement):
    """A stored time cut to its minute, as text ``YYYY-MM-DD HH:MM`` (for grouping by minute).

    The same text on every backend, so callers parse one layout.
    """

    type = String()
    inherit_cache = True
    name = "minute_of"


@compiles(minute_of, "mysql")
@compiles(minute_of, "mariadb")
def _mysql_minute_of(element, compiler, **kw):
    # LEFT of the text form rather than DATE_FORMAT: no percent signs to escape for the driver.
    return f"LEFT(CAST({compiler.process(list(element.clauses)[0], **kw)} AS CHAR), 16)"


@compiles(minute_of, "postgresql")
def _postgresql_minute_of(element, compiler, **kw):
    return f"to_char({compiler.process(list(element.clauses)[0], **kw)}, 'YYYY-MM-DD HH24:MI')"


@compiles(minute_of, "sqlite")
def _sqlite_minute_of(element, compiler, **kw):
    # Times are stored in one canonical text layout (``schema.py``): its first 16 characters.
    return f"substr({compiler.process(list(element.clauses)[0], **kw)}, 1, 16)"
