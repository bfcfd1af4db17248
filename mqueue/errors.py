"""Every exception mqueue raises on purpose.

The docstring of each class is the advice a user needs; the message adds the
specifics (which task, which URL).  The CLI prints ``str(error)`` as one line.
"""

from __future__ import annotations


class MQueueError(Exception):
    """Base class of mqueue's own errors."""


class NoSessionError(MQueueError):
    """No current session and no default database.

    Open one with ``with db.session():``, make an existing session current
    with ``with mqueue.use_session(session):``, or give a default database
    with ``mqueue.init(queue, database=...)``.
    """

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (
            "no current mqueue session: use 'with db.session():', "
            "'with mqueue.use_session(session):' or mqueue.init(queue, database=url)"))


class SchemaMissingError(MQueueError):
    """The mqueue tables are not in the database: run ``python -m mqueue migrate``."""


class DatabaseUnavailableError(MQueueError):
    """The database could not be reached (refused, reset, timed out)."""


class DatabaseURLError(MQueueError, ValueError):
    """The database URL cannot be used as written: a scheme mqueue does not serve, or a driver that is
    not installed.  The message names the URL (password hidden) and the scheme to write instead,
    e.g. ``postgresql+psycopg://`` or ``mysql+pymysql://``.
    """


class AccessDeniedError(MQueueError):
    """The database server refused the login: check the user name and password in the URL.

    Never retried: waiting does not fix a wrong password.
    """


class UnknownTaskError(MQueueError, LookupError):
    """A job names a task that is not registered in this process."""


class DuplicateTaskError(MQueueError, ValueError):
    """Two different functions were registered under one task name."""


class JobNotFoundError(MQueueError, LookupError):
    """No job with that id (it may have finished and been removed)."""


class InvalidStateError(MQueueError):
    """The job is in a state that does not allow the operation (e.g. cancel a running job)."""


class HasDependentsError(InvalidStateError):
    """Other jobs wait for this one: cancelling it alone would leave them waiting for ever.

    Cancel them too with ``cascade=True`` (``mqueue cancel ID --cascade``), or cancel them first.
    """


class LeaseLostError(MQueueError):
    """This worker no longer owns the job: its lease expired and it may run elsewhere."""


class Retry(Exception):
    """Raise inside a task to ask for another run after ``delay`` seconds.

    e.g.::

        raise mqueue.Retry(30)           # run again in 30 s (counts as a retry)
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Fail(Exception):
    """Raise inside a task to fail the job at once, without further retries.

    e.g.::

        raise mqueue.Fail("customer deleted")
    """


class JobTimeout(BaseException):
    """The run took longer than the task's ``timeout=``.

    A ``BaseException`` (like ``KeyboardInterrupt``): the worker delivers it
    asynchronously into the task's thread, and a task's ``except Exception:``
    must not swallow it and carry on past its timeout.
    """


def headline(stored_error: str | None) -> str | None:
    """The last non-blank line of a stored error text (the exception itself); None if there is none.

    A stored traceback ends with the exception's own line (``executor``
    stores it last), which is what a one-line listing should show.
    """
    lines = [line.strip() for line in (stored_error or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def first_line(error: BaseException) -> str:
    """The first line of an error's own message, for one-line logs.

    For a SQLAlchemy error that is the driver's message (its ``orig``), not
    the SQL statement and the "Background on this error" link that follow.
    """
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__
