"""Crons: ``@mqueue.cron`` registration, the last-run table kept in step with
the code, and the compare-and-set enqueue of due slots.

Each worker serving a cron's queue calls ``Scheduler.tick()`` about once a
second.  A due slot is taken by one compare-and-set UPDATE of the cron's
``next_slot`` and its job is inserted in the same transaction, so each
scheduled time yields exactly one job however many workers run; the losers
update nothing and insert nothing.  After downtime only the latest missed
slot runs.  The scheduling decision takes ``now`` as an argument, so tests
drive it with a fixed clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Callable, Sequence

from sqlalchemy.exc import DBAPIError

from .config import settings
from .cron import Schedule, _naive_utc, check_cron_function
from .encoding import encode_args
from .errors import first_line
from .registry import Task, task as register_task
from .session import Database

log = logging.getLogger("mqueue.scheduler")


@dataclasses.dataclass(frozen=True)
class Cron:
    task: Task
    schedule: Schedule
    queue: str | None
    skip_if_scheduled: bool

    @property
    def name(self) -> str:
        return self.task.name

    def queue_name(self) -> str:
        return self.queue or self.task.queue or settings.queue


_crons: dict[str, Cron] = {}


def cron(spec, *, tz: str = "UTC", queue: str | None = None, skip_if_scheduled: bool = True,
         name: str | None = None, **task_options) -> Callable[[Callable], Task]:
    """Run a no-argument function on a schedule; it is also an ordinary task.

    e.g.::

        @mqueue.cron("*/5 * * * *")
        def sync_prices(): ...

        @mqueue.cron(mqueue.Daily(hour=3), tz="Europe/Berlin", queue="reports")
        def nightly_report(): ...

    A bad expression or time zone, or a function that requires arguments,
    raises ``ValueError`` here, at decoration time.  Over ``@mqueue.task``
    the task keeps its name and options unless given here too.  One task
    has one schedule: a second, different ``@mqueue.cron`` on the same
    name raises ``ValueError`` (give it another ``name=``).
    """
    schedule = Schedule.parse(spec, tz=tz)

    def register(fn: Callable) -> Task:
        options = dict(task_options)
        task_name, task_queue = name, queue
        if isinstance(fn, Task):
            options = {"priority": fn.priority, "max_retries": fn.max_retries, "backoff": fn.backoff,
                       "timeout": fn.timeout, **options}
            task_name, task_queue = name or fn.name, queue or fn.queue
            fn = fn.fn
        check_cron_function(fn)
        wanted_name = task_name or f"{fn.__module__}.{fn.__qualname__}"
        existing = _crons.get(wanted_name)
        if existing is not None and (existing.schedule, existing.queue, existing.skip_if_scheduled) != \
                (schedule, task_queue, skip_if_scheduled):
            raise ValueError(f"task {wanted_name!r} already has the cron schedule {existing.schedule.expression!r} "
                             f"({existing.schedule.tz}); a second schedule needs its own task: give it name=")
        registered = register_task(fn, name=task_name, queue=task_queue, **options)
        _crons[registered.name] = Cron(registered, schedule, task_queue, skip_if_scheduled)
        return registered

    return register


def registered_crons() -> dict[str, Cron]:
    return dict(_crons)


def unregister_cron(name: str) -> None:
    """Forget a cron (tests)."""
    _crons.pop(name, None)


class Scheduler:
    """Keeps ``mqueue_cron`` in step for ``queues`` and enqueues due slots."""

    def __init__(self, db: Database, queues: Sequence[str], crons: dict[str, Cron] | None = None) -> None:
        self.db = db
        self.queues = list(queues)
        every = registered_crons() if crons is None else crons
        self.crons = {n: c for n, c in every.items() if c.queue_name() in self.queues}
        self.synced = False
        #: Slots whose compare-and-set lost a race with another worker's (counted for the worker's summary).
        self.conflicts = 0

    def sync(self, now: dt.datetime | None = None) -> None:
        """Insert new crons, update changed schedules, delete rows of crons removed from the code."""
        dialect = self.db.dialect
        with self.db.engine.begin() as conn:
            now = dialect.db_now(conn) if now is None else _naive_utc(now)
            rows = dialect.cron_rows(conn)
            for name, spec in self.crons.items():
                row = rows.get(name)
                wanted = (spec.queue_name(), spec.schedule.expression, spec.schedule.tz)
                if row is not None and (row.queue, row.schedule, row.tz) == wanted and row.next_slot is not None:
                    continue
                first = spec.schedule.next_after(now)
                if dialect.upsert_cron(conn, name, *wanted, next_slot=first):
                    log.info("cron=%s queue=%s schedule=%r tz=%s next=%s outcome=%s", name, wanted[0],
                             wanted[1], wanted[2], first, "added" if row is None else "changed")
            removed = [name for name, row in rows.items() if row.queue in self.queues and name not in self.crons]
            if dialect.delete_crons(conn, removed):
                log.info("removed cron row(s) no longer in the code: %s", ", ".join(removed))
        self.synced = True

    def tick(self, now: dt.datetime | None = None) -> list[int]:
        """Enqueue every cron whose slot is due; return the new job ids.

        The first tick syncs the table, also when no cron serves these
        queues any more: that is how the rows of removed crons go away.
        """
        if not self.synced:
            try:
                self.sync(now)
            except DBAPIError as error:
                if not self.db.dialect.is_conflict(error):
                    raise
                self.conflicts += 1  # another worker synced the same rows at the same moment
                log.debug("syncing the cron table lost a race to another worker: %s", first_line(error))
                return []
        if not self.crons:
            return []
        dialect = self.db.dialect
        with dialect.reader(self.db.engine).connect() as conn:  # a plain read: no write lock on SQLite
            now = dialect.db_now(conn) if now is None else _naive_utc(now)
            rows = dialect.cron_rows(conn)
        created = []
        for name, spec in self.crons.items():
            row = rows.get(name)
            if row is None or row.next_slot is None:
                self.synced = False  # someone deleted it: re-sync on the next tick
                continue
            if now < row.next_slot:
                continue
            try:
                job_id = self._take_slot(spec, row, now)
            except DBAPIError as error:
                if dialect.is_conflict(error):
                    # Another worker's compare-and-set won (on Galera its commit certified
                    # first, ours failed with 1213): it enqueues the slot.  Had neither won,
                    # the slot is still due and the next tick takes it.
                    self.conflicts += 1
                    log.debug("cron=%s slot due at %s: lost the race to another worker: %s", name,
                              row.next_slot, first_line(error))
                    continue
                if dialect.is_transient(error) or dialect.is_unreachable(error):
                    raise  # the caller retries the whole tick
                # one broken cron must not keep the others from running
                log.error("cron=%s queue=%s slot due at %s could not be enqueued: %s", name, spec.queue_name(),
                          row.next_slot, first_line(error))
                continue
            if job_id is not None:
                created.append(job_id)
        return created

    def _take_slot(self, spec: Cron, row, now: dt.datetime) -> int | None:
        """One transaction: CAS the cron row forward, then enqueue (unless skipped)."""
        dialect = self.db.dialect
        slot = spec.schedule.latest_at_or_before(now) or row.next_slot
        if slot < row.next_slot:
            slot = row.next_slot
        next_slot = spec.schedule.next_after(max(slot, now))
        with self.db.engine.begin() as conn:
            if not dialect.advance_cron(conn, spec.name, row.next_slot, slot, next_slot):
                return None  # another worker took this slot
            if spec.skip_if_scheduled and dialect.job_is_live(conn, row.last_job_id):
                log.info("cron=%s queue=%s slot=%s job=%s outcome=skipped (still queued or running)",
                         spec.name, spec.queue_name(), slot, row.last_job_id)
                return None
            job_id = dialect.insert_job(conn, dict(
                queue=spec.queue_name(), name=spec.name, args=encode_args({}),
                priority=spec.task.priority, max_retries=spec.task.max_retries))
            dialect.set_cron_job(conn, spec.name, job_id)
        log.info("cron=%s queue=%s slot=%s job=%s outcome=enqueued", spec.name, spec.queue_name(), slot, job_id)
        return job_id
