"""The job a task is running, as the task sees it: ``mqueue.current_job()``."""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable

_current_job: contextvars.ContextVar["Job | None"] = contextvars.ContextVar("mqueue_job", default=None)


@dataclasses.dataclass(frozen=True)
class Job:
    """A claimed job: ``id, name, queue, args`` (named arguments), ``retries``, ``token``.

    ``heartbeat()`` extends the lease now (workers also do it on their own);
    it raises ``LeaseLostError`` if another worker owns the job by now, so a
    long task can stop early.  On SQLite, inside a task whose session holds
    the write lock, it goes through that session (and commits with it).
    """

    id: int
    name: str
    queue: str
    args: dict[str, Any]
    retries: int
    token: int
    max_retries: int | None = None
    _heartbeat: Callable[["Job"], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat(self)


def current_job() -> Job | None:
    """The job the calling task runs, or None outside a task."""
    return _current_job.get()


def set_current_job(job: Job | None) -> contextvars.Token:
    return _current_job.set(job)


def reset_current_job(token: contextvars.Token) -> None:
    _current_job.reset(token)
