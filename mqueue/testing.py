"""Helpers for an application's own tests: run a job now, as a worker would.

``perform_job`` is Oban's ``perform_job`` for mqueue: the job is real (a
row, a claim, the job's own session, the fenced completion), only no daemon
and no waiting are involved.  To drain whole queues, delayed and retrying
jobs included, use ``Worker(db, queues).run_until_empty(with_scheduled=True,
max_runs=...)`` (Oban's ``drain_queue(with_scheduled: true)``).

e.g.::

    from mqueue.testing import perform_job

    def test_welcome_mail_is_recorded(db):
        result = perform_job(db, tasks.mail.welcome, user_id=7)
        assert result.outcome == "succeeded"
        with db.session() as session:
            assert session.scalar(select(Outbox.user_id)) == 7
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import settings
from .errors import NoSessionError
from .executor import SUCCEEDED
from .registry import Task, TaskCall, get_task
from .session import Database, as_database, peek_session

__all__ = ["PerformResult", "perform_job"]


@dataclasses.dataclass(frozen=True)
class PerformResult:
    """How a job run by ``perform_job`` ended.

    ``outcome`` is a worker's word for it: ``"succeeded"``, ``"retried"``
    (a failed run that will run again after its backoff), ``"failed"`` (for
    good) or ``"lost"`` (its lease was lost: nothing committed).  ``value``
    is what the task returned when it succeeded; ``error`` the exception of
    a retried or failed run (the row keeps its traceback too).
    """

    job_id: int
    outcome: str
    value: Any = None
    error: BaseException | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome == "succeeded"


def perform_job(database: "Database | str | None", task: "Task | TaskCall | str", /, *args: Any,
                **kwargs: Any) -> PerformResult:
    """Enqueue one job of ``task`` with these arguments and run it now, in this thread; how it ended.

    e.g.::

        result = perform_job(db, tasks.charge, order_id=42)
        assert result.outcome == "retried" and isinstance(result.error, PaymentBusy)
        perform_job(db, tasks.report.options(queue="reports"), day=date(2030, 1, 2))

    Everything a worker does happens, on ``database`` (a ``Database`` or URL;
    None: the one given to ``mqueue.init``): the arguments are bound and
    encoded as ``enqueue`` does them (a mismatch raises ``TypeError``); the
    row is committed, claimed under a lease and run in a fresh session of its
    own (``mqueue.current_session()`` and ``mqueue.current_job()`` inside the
    task); on success the task's writes commit with the fenced completion;
    on an exception they roll back and the job is retried or failed by the
    task's policy, its error kept on the row.  A retried job waits for its
    backoff as usual: ``run_until_empty(with_scheduled=True)`` runs it.
    Heartbeats run and ``timeout=`` is enforced, in this thread.

    Call it outside ``db.session()``: the job is enqueued and run in
    transactions of its own, as in production.
    """
    if peek_session() is not None:
        raise RuntimeError("perform_job enqueues and runs the job in transactions of its own, as a worker "
                           "does; call it outside db.session() and use_session()")
    call = task if isinstance(task, TaskCall) else (get_task(task) if isinstance(task, str) else task).options()
    if database is None and settings.database is None:
        raise NoSessionError("perform_job needs a database: pass one, or set it with mqueue.init(queue, database=url)")
    db = as_database(database if database is not None else settings.database)
    try:
        with db.session():
            job_id = call.enqueue(*args, **kwargs)
        from .worker import Worker
        ran = Worker(db, queues=[call.task.queue or settings.queue]).run_job(job_id)
    finally:
        if db is not database and db is not settings.database:
            db.dispose()
    if ran is None:
        raise RuntimeError(f"job {job_id} was not queued when perform_job came to claim it (a worker of this "
                           f"process took it first, or a live job with the same unique_key)")
    outcome, running = ran
    return PerformResult(job_id, str(outcome), running.value if outcome == SUCCEEDED else None, running.error)
