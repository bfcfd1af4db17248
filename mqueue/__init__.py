"""mqueue: a task queue that lives in your application's SQL database.

A job enqueued inside a transaction exists if and only if that transaction
commits; a task's own writes commit together with its completion, once.
"""

import importlib

from .config import init
from .cron import (DAILY, HOURLY, MINUTELY, MONTHLY, WEEKLY, YEARLY, Daily, Days, Hourly, Hours, Minutely,
                   Minutes, Monthly, Months, Weekday, Weekly, Yearly)
from .errors import (AccessDeniedError, DatabaseUnavailableError, DatabaseURLError, DuplicateTaskError, Fail,
                     HasDependentsError, InvalidStateError, JobNotFoundError, LeaseLostError, MQueueError, NoSessionError, Retry,
                     SchemaMissingError, UnknownTaskError)
from .jobs import Job, current_job
from .middleware import add_middleware, remove_middleware
from .registry import Task, task
from .scheduler import cron
from .session import Database, ctx, current_session, use_session
from .worker import RunResult, Worker, start

__version__ = "0.1.0"

__all__ = [
    "DAILY", "HOURLY", "MINUTELY", "MONTHLY", "WEEKLY", "YEARLY", "Daily", "Days", "Hourly", "Hours",
    "Minutely", "Minutes", "Monthly", "Months", "Weekday", "Weekly", "Yearly", "cron",
    "AccessDeniedError", "Database", "DatabaseURLError", "DatabaseUnavailableError", "DuplicateTaskError",
    "Fail", "HasDependentsError", "InvalidStateError", "Job", "JobNotFoundError", "LeaseLostError", "MQueueError", "NoSessionError",
    "Retry", "SchemaMissingError", "RunResult", "Task", "UnknownTaskError", "Worker", "ctx", "current_job",
    "add_middleware", "current_session", "init", "remove_middleware", "start", "task", "use_session",
]

#: Submodules of the public API loaded on first use (``mqueue.migrate.upgrade(db)``,
#: ``mqueue.admin.list_jobs(db)``, ``mqueue.testing.perform_job(...)``): Alembic alone
#: would add ~0.1 s to ``import mqueue``.
_LAZY_MODULES = ("admin", "migrate", "testing")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
