"""Finished work on record: a job's history, retention (pruning) and qless daily stats.

A job's history is read off two places (see ``schema.py``): its row gives
``put`` (``created_at``), its last ``popped`` (``started_at`` by ``owner``)
and how it finished (``finished_at``); ``mqueue_event`` gives every run
that ended otherwise (``retried`` with its error, ``failed``, ``rescued``,
``released``) and changes made by hand.  So a success writes no event row.

Stats per queue per UTC day (qless): ``wait`` (eta to first start) and
``run`` (start to finish of the last run) of the jobs that succeeded that
day, as count, mean, sample standard deviation and a histogram in qless's
buckets; and counts of ``failed`` (jobs that failed for good), ``retried``
(runs that failed and were retried, lost leases included) and ``expired``.
They are computed from the finished rows and events still present plus
``mqueue_stats``, into which pruning folds what it deletes in the same
transaction, so the numbers do not change when rows are pruned.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import logging
import math
import random
import time
from typing import Any, Iterable

from sqlalchemy.exc import DBAPIError

from . import shared_settings
from .dialects.history import FAILED_KINDS, RETRIED_KINDS
from .errors import first_line
from .schema import EXPIRED, FINISHED, RUNNING, SUCCEEDED
from .session import Database

log = logging.getLogger("mqueue.history")

#: Rows per pruning statement: short transactions that never hold locks long.
PRUNE_BATCH = 500

#: qless's histogram buckets: per second for the first minute, per minute for
#: the first hour, per hour for the first day, then per day (the last bucket
#: holds a week and more).
BUCKETS: tuple[str, ...] = tuple([f"{n}s" for n in range(60)] + [f"{n}m" for n in range(1, 60)]
                                 + [f"{n}h" for n in range(1, 24)] + [f"{n}d" for n in range(1, 7)] + ["7d+"])


def bucket(seconds: float) -> int:
    """Index in ``BUCKETS`` of a duration (a negative one, from clock noise, counts as 0 s)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return int(seconds)
    if seconds < 3600:
        return 59 + int(seconds // 60)
    if seconds < 86400:
        return 118 + int(seconds // 3600)
    return min(141 + int(seconds // 86400), len(BUCKETS) - 1)


# -- summaries that combine exactly ------------------------------------------------

@dataclasses.dataclass
class Summary:
    """Count, mean and M2 (sum of squared deviations) plus a histogram: two summaries of disjoint
    parts merge into the summary of the whole (Chan et al.), so folded and live parts add up."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    histogram: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        self.histogram[bucket(value)] += 1

    def merge(self, other: "Summary") -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        self.histogram.update(other.histogram)

    @classmethod
    def stored(cls, count: int, mean: float, m2: float, histogram: str) -> "Summary":
        counts = collections.Counter({int(key): int(value) for key, value in json.loads(histogram or "{}").items()})
        return cls(int(count), float(mean), float(m2), counts)

    def histogram_json(self) -> str:
        return json.dumps({str(key): value for key, value in sorted(self.histogram.items())})

    def timing(self) -> "Timing":
        std = math.sqrt(max(0.0, self.m2) / (self.count - 1)) if self.count > 1 else 0.0
        return Timing(self.count, self.mean if self.count else 0.0, std,
                      tuple(self.histogram.get(index, 0) for index in range(len(BUCKETS))))


@dataclasses.dataclass
class DayPart:
    """What one queue did on one UTC day, from some of the rows (merged with other parts)."""

    wait: Summary = dataclasses.field(default_factory=Summary)
    run: Summary = dataclasses.field(default_factory=Summary)
    failed: int = 0
    retried: int = 0
    expired: int = 0

    def merge(self, other: "DayPart") -> None:
        self.wait.merge(other.wait)
        self.run.merge(other.run)
        self.failed += other.failed
        self.retried += other.retried
        self.expired += other.expired

    def add_job(self, state: str, wait_seconds: float | None, run_seconds: float | None) -> None:
        if state == SUCCEEDED:
            if wait_seconds is not None:
                self.wait.add(wait_seconds)
            if run_seconds is not None:
                self.run.add(run_seconds)
        elif state == EXPIRED:
            self.expired += 1

    def add_events(self, kind: str, count: int = 1) -> None:
        if kind in RETRIED_KINDS:
            self.retried += count
        elif kind in FAILED_KINDS:
            self.failed += count

    @classmethod
    def from_row(cls, row) -> "DayPart":
        if row is None:
            return cls()
        return cls(Summary.stored(row.wait_count, row.wait_mean, row.wait_m2, row.wait_histogram),
                   Summary.stored(row.run_count, row.run_mean, row.run_m2, row.run_histogram),
                   int(row.failed), int(row.retried), int(row.expired))

    def row_values(self, queue: str, day: str) -> dict[str, Any]:
        return dict(queue=queue, day=day,
                    wait_count=self.wait.count, wait_mean=self.wait.mean, wait_m2=self.wait.m2,
                    wait_histogram=self.wait.histogram_json(),
                    run_count=self.run.count, run_mean=self.run.mean, run_m2=self.run.m2,
                    run_histogram=self.run.histogram_json(),
                    failed=self.failed, retried=self.retried, expired=self.expired)


# -- results -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds: how many, mean, sample standard deviation (0 below two), and counts per ``BUCKETS``."""

    count: int
    mean: float
    std: float
    histogram: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return dict(count=self.count, mean=self.mean, std=self.std,
                    histogram={label: n for label, n in zip(BUCKETS, self.histogram) if n})


@dataclasses.dataclass(frozen=True)
class DayStats:
    """``admin.queue_stats``: one queue's numbers for one UTC day."""

    queue: str
    day: dt.date
    wait: Timing
    run: Timing
    failed: int
    retried: int
    expired: int

    def to_dict(self) -> dict[str, Any]:
        return dict(queue=self.queue, day=self.day.isoformat(), wait=self.wait.to_dict(), run=self.run.to_dict(),
                    failed=self.failed, retried=self.retried, expired=self.expired)


@dataclasses.dataclass(frozen=True)
class HistoryEntry:
    """One event in a job's life: ``kind`` at ``at`` (naive UTC), by ``worker``, with ``detail``
    (the error of a failed run)."""

    at: dt.datetime | None
    kind: str
    worker: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        at = None if self.at is None else self.at.replace(tzinfo=dt.timezone.utc).isoformat()
        return dict(at=at, kind=self.kind, worker=self.worker, detail=self.detail)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    jobs: int = 0
    events: int = 0
    stats_days: int = 0


# -- reading ---------------------------------------------------------------------------

def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.combine(day, dt.time())
    return start, start + dt.timedelta(days=1)


def read_day_stats(dialect, conn, queue: str, day: dt.date) -> DayStats:
    """Folded numbers plus the rows still present, for one queue and day (one read transaction)."""
    start, end = day_bounds(day)
    part = DayPart.from_row(dialect.stats_row(conn, queue, day.isoformat()))
    for state, wait_seconds, run_seconds in dialect.finished_in(conn, queue, start, end):
        part.add_job(state, wait_seconds, run_seconds)
    for kind, count in dialect.event_counts(conn, queue, start, end).items():
        part.add_events(kind, count)
    return DayStats(queue, day, part.wait.timing(), part.run.timing(), part.failed, part.retried, part.expired)


#: Stored events the history reads off the job row instead (a tracked job publishes them too).
_FROM_ROW = frozenset({"popped", SUCCEEDED, "canceled", "expired"})


def job_history(row, events: Iterable) -> list[HistoryEntry]:
    """A job's life in order: ``put``, then per run ``popped`` and how it ended, then how it finished."""
    entries = [HistoryEntry(row.created_at, "put")]
    for event in events:
        if event.kind in _FROM_ROW or (event.kind == "put" and event.detail is None):
            continue
        if event.started_at is not None:
            entries.append(HistoryEntry(event.started_at, "popped", event.worker))
        entries.append(HistoryEntry(event.at, event.kind, event.worker, event.detail))
    if row.state in (RUNNING, SUCCEEDED) and row.started_at is not None:
        entries.append(HistoryEntry(row.started_at, "popped", row.owner))
    if row.state in FINISHED:
        entries.append(HistoryEntry(row.finished_at, row.state, row.owner if row.state == SUCCEEDED else None))
    return entries


# -- pruning ---------------------------------------------------------------------------

def _day(moment: dt.datetime) -> str:
    return moment.date().isoformat()


def _fold(dialect, conn, parts: dict[tuple[str, str], DayPart]) -> None:
    """Add ``parts`` to their daily rows, locking them in key order (two pruners never deadlock)."""
    for queue, day in sorted(parts):
        for _ in range(3):
            row = dialect.lock_stats_row(conn, queue, day)
            total = DayPart.from_row(row)
            total.merge(parts[(queue, day)])
            if dialect.write_stats_row(conn, total.row_values(queue, day), exists=row is not None):
                break
        else:
            raise RuntimeError(f"could not fold stats of queue {queue!r} on {day}: the row keeps changing")


def _batch(db: Database, prune_batch, *args):
    """Run one pruning batch in its own transaction, again after a deadlock or lock timeout.

    Two pruners lock stats rows in the same order, but a backend may still
    pick a scan that waits on rows the other holds (InnoDB on small
    tables); the batch rolls back whole, so running it again folds nothing twice.
    """
    for attempt in range(1, 6):
        try:
            with db.engine.begin() as conn:
                return prune_batch(db.dialect, conn, *args)
        except DBAPIError as error:
            if attempt == 5 or not db.dialect.is_transient(error):
                raise
            log.info("pruning batch rolled back (%s); trying again", first_line(error))
            time.sleep(0.05 * attempt * random.uniform(1, 2))


def _prune_jobs_batch(dialect, conn, older_than: dt.datetime, beyond, limit: int) -> tuple[int, int]:
    """Lock a batch of old finished jobs and their events, fold them into daily stats, delete them."""
    rows = dialect.prunable_jobs(conn, older_than, beyond, limit)
    if not rows:
        return 0, 0
    ids = [row.id for row in rows]
    events = dialect.events_of_jobs(conn, ids, lock=True)
    parts: dict[tuple[str, str], DayPart] = collections.defaultdict(DayPart)
    for row in rows:
        if row.finished_at is not None:
            parts[(row.queue, _day(row.finished_at))].add_job(row.state, row.wait_seconds, row.run_seconds)
    for event in events:
        if event.at is not None:
            parts[(event.queue, _day(event.at))].add_events(event.kind)
    _fold(dialect, conn, parts)
    return dialect.delete_jobs(conn, ids), len(events)


def _prune_events_batch(dialect, conn, older_than: dt.datetime, limit: int) -> int:
    """Old events of jobs not finished (a failed job's oldest runs); a finished job's go with it."""
    events = dialect.prunable_events(conn, older_than, limit)
    if not events:
        return 0
    parts: dict[tuple[str, str], DayPart] = collections.defaultdict(DayPart)
    for event in events:
        parts[(event.queue, _day(event.at))].add_events(event.kind)
    _fold(dialect, conn, parts)
    return dialect.delete_events(conn, [event.id for event in events])


def prune(database: "Database | str", now: dt.datetime | None = None, batch: int = PRUNE_BATCH,
          max_batches: int | None = None) -> PruneResult:
    """Delete finished jobs past ``jobs-history`` seconds or beyond the newest ``jobs-history-count``,
    events past ``jobs-history``, and daily stats past ``stats-history`` days.

    Workers call this on their own (about once a minute); scripts and tests
    may too.  ``now`` (naive UTC) replaces the database's clock for the
    cut-offs, so a test can look 31 days ahead without waiting.  Each batch
    of ``batch`` rows is one short transaction that first folds what it
    deletes into ``mqueue_stats``; any number of pruners may run at once.
    ``max_batches`` bounds the work of one call (a worker's turn).
    """
    from .session import as_database
    db = as_database(database)
    try:
        with db.engine.begin() as conn:
            config = shared_settings.read(db.dialect, conn)
            if now is None:
                now = db.dialect.db_now(conn)
            keep = config["jobs-history-count"]
            beyond = db.dialect.history_count_cutoff(conn, keep) if keep > 0 else None
        older_than = now - dt.timedelta(seconds=config["jobs-history"])
        if keep == 0:
            older_than = dt.datetime.max  # keep no finished job at all
        jobs = events = batches = 0
        while max_batches is None or batches < max_batches:
            batches += 1
            deleted, their_events = _batch(db, _prune_jobs_batch, older_than, beyond, batch)
            jobs, events = jobs + deleted, events + their_events
            if deleted < batch:
                break
        event_cutoff = now - dt.timedelta(seconds=config["jobs-history"])
        while max_batches is None or batches < max_batches:
            batches += 1
            deleted = _batch(db, _prune_events_batch, event_cutoff, batch)
            events += deleted
            if deleted < batch:
                break
        with db.engine.begin() as conn:
            first_kept = (now - dt.timedelta(days=config["stats-history"])).date().isoformat()
            days = db.dialect.delete_stats_before(conn, first_kept)
        if jobs or events or days:
            log.info("pruned %d finished job(s), %d event(s), %d day(s) of stats", jobs, events, days)
        return PruneResult(jobs, events, days)
    finally:
        if db is not database:
            db.dispose()
