"""Statements for the record of finished work: history reads, pruning, daily stats, shared settings.

Mixed into ``Dialect`` (``base.py``); backends override nothing here.
Pruning takes finished rows in small batches, each in a short transaction
of its own, locked ``FOR UPDATE SKIP LOCKED`` where the backend has it: two
pruners then take disjoint batches, and neither waits for the other except
on the daily stats rows, which both lock in (queue, day) order.  Workers
never touch finished rows, so pruning never waits for a claim or a
completion either.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from .functions import minute_of, utc_now

from ..schema import (EXPIRED, FAILED, FINISHED, SUCCEEDED, dependency_table, event_table, setting_table, stats_table,
                      tag_table, task_table)

t = task_table
e = event_table
s = stats_table
g = tag_table

#: Event kinds that count as a failed run retried, and as a job failed for good (``mqueue stats``).
RETRIED_KINDS = ("retried", "rescued")
FAILED_KINDS = ("failed",)


class HistoryStatements:
    """History, retention, stats and settings statements (a mixin of ``Dialect``)."""

    skip_locked: bool

    # -- a job's history ----------------------------------------------------
    def job_events(self, conn, job_id: int) -> list:
        """Events of one job in the order they were written.  Index ``(job_id, id)``; plain read."""
        return conn.execute(select(e).where(e.c.job_id == job_id).order_by(e.c.id)).all()

    # -- pruning ------------------------------------------------------------
    def history_count_cutoff(self, conn, keep: int) -> tuple[dt.datetime, int] | None:
        """``(finished_at, id)`` of the ``keep``-th newest finished job: older ones are beyond the count.

        None when there are at most ``keep``.  Walks ``keep`` entries of the
        ``(finished_at, id)`` index backwards; plain read.
        """
        row = conn.execute(select(t.c.finished_at, t.c.id).where(t.c.finished_at.is_not(None))
                           .order_by(t.c.finished_at.desc(), t.c.id.desc()).offset(keep - 1).limit(1)).first()
        return (row.finished_at, row.id) if row is not None else None

    def prunable_jobs(self, conn, older_than: dt.datetime, beyond: tuple[dt.datetime, int] | None,
                      limit: int) -> list:
        """Up to ``limit`` finished jobs that finished before ``older_than`` or before ``beyond`` (a
        ``(finished_at, id)`` position), oldest first, locked for this transaction.

        Index range on ``(finished_at, id)``; rows another pruner holds are
        skipped where the backend can (SQLite: the write lock serializes).
        """
        old = t.c.finished_at < older_than
        if beyond is not None:
            at, job_id = beyond
            old = or_(old, t.c.finished_at < at, and_(t.c.finished_at == at, t.c.id < job_id))
        query = (select(t.c.id, t.c.queue, t.c.state, t.c.finished_at, t.c.wait_seconds, t.c.run_seconds)
                 .where(t.c.finished_at.is_not(None), old, t.c.state.in_(FINISHED))
                 .order_by(t.c.finished_at, t.c.id).limit(limit))
        if self.skip_locked:
            query = query.with_for_update(skip_locked=True)
        return conn.execute(query).all()

    def events_of_jobs(self, conn, job_ids: Sequence[int], lock: bool = False) -> list:
        """``(queue, kind, at)`` of every event of these jobs (to fold before they go).  Index ``(job_id, id)``.

        With ``lock`` they are locked (waiting, in id order) for this
        transaction, so no other pruner folds them too; one that had
        already deleted them leaves them out.
        """
        query = select(e.c.queue, e.c.kind, e.c.at).where(e.c.job_id.in_(list(job_ids))).order_by(e.c.id)
        return conn.execute(query.with_for_update() if lock else query).all()

    def delete_jobs(self, conn, job_ids: Sequence[int]) -> int:
        """Delete finished jobs, their events, tags and dependency rows (either side) (rows the caller
        locked).  Primary keys, and the ``(depends_on, job_id)`` index."""
        ids = list(job_ids)
        conn.execute(delete(e).where(e.c.job_id.in_(ids)))
        conn.execute(delete(g).where(g.c.job_id.in_(ids)))
        dep = dependency_table
        conn.execute(delete(dep).where(dep.c.job_id.in_(ids)))
        conn.execute(delete(dep).where(dep.c.depends_on.in_(ids)))
        return conn.execute(delete(t).where(t.c.id.in_(ids), t.c.state.in_(FINISHED))).rowcount

    def prunable_events(self, conn, older_than: dt.datetime, limit: int) -> list:
        """Up to ``limit`` events written before ``older_than`` of jobs that are not finished (a
        failed job loses its oldest history; a finished job's events go with it, in
        ``delete_jobs``), oldest first, locked; index on ``at``, then the job by primary key."""
        finished_job = select(t.c.id).where(t.c.id == e.c.job_id, t.c.state.in_(FINISHED)).exists()
        query = (select(e.c.id, e.c.queue, e.c.kind, e.c.at).where(e.c.at < older_than, ~finished_job)
                 .order_by(e.c.at, e.c.id).limit(limit))
        if self.skip_locked:
            query = query.with_for_update(skip_locked=True)
        return conn.execute(query).all()

    def delete_events(self, conn, event_ids: Sequence[int]) -> int:
        return conn.execute(delete(e).where(e.c.id.in_(list(event_ids)))).rowcount

    # -- daily stats ----------------------------------------------------------
    def lock_stats_row(self, conn, queue: str, day: str):
        """The ``mqueue_stats`` row of ``(queue, day)`` locked for this transaction, or None.

        Pruners lock these in sorted key order, so two never deadlock.
        """
        return conn.execute(select(s).where(s.c.queue == queue, s.c.day == day).with_for_update()).first()

    def write_stats_row(self, conn, values: dict[str, Any], exists: bool) -> bool:
        """Update the locked row, or insert a new one; False if another pruner inserted it first
        (the caller then locks it and folds again)."""
        if exists:
            conn.execute(update(s).where(s.c.queue == values["queue"], s.c.day == values["day"]).values(**values))
            return True
        try:
            with conn.begin_nested():
                conn.execute(insert(s).values(**values))
            return True
        except IntegrityError:
            return False

    def stats_row(self, conn, queue: str, day: str):
        """The folded stats of one queue and day, or None.  Primary key; plain read."""
        return conn.execute(select(s).where(s.c.queue == queue, s.c.day == day)).first()

    def delete_stats_before(self, conn, day: str) -> int:
        """Drop daily stats older than ``day`` (``YYYY-MM-DD``).  Primary key order is (queue, day): few rows."""
        return conn.execute(delete(s).where(s.c.day < day)).rowcount

    def finished_in(self, conn, queue: str, start: dt.datetime, end: dt.datetime) -> list:
        """``(state, wait_seconds, run_seconds)`` of jobs of ``queue`` that succeeded or expired in
        ``[start, end)``.  Claim index prefix ``(queue, state)``; plain read."""
        return conn.execute(select(t.c.state, t.c.wait_seconds, t.c.run_seconds).where(
            t.c.queue == queue, t.c.state.in_((SUCCEEDED, EXPIRED)),
            t.c.finished_at >= start, t.c.finished_at < end)).all()

    def event_counts(self, conn, queue: str, start: dt.datetime, end: dt.datetime) -> dict[str, int]:
        """Events of ``queue`` written in ``[start, end)``, counted by kind.  Index on ``at``; plain read."""
        rows = conn.execute(select(e.c.kind, func.count()).where(
            e.c.queue == queue, e.c.at >= start, e.c.at < end).group_by(e.c.kind)).all()
        return {kind: int(count) for kind, count in rows}

    # -- tags -----------------------------------------------------------------
    def add_tags(self, conn, pairs: Sequence[tuple[int, str]]) -> None:
        """Insert ``(job_id, tag)`` rows that do not exist yet.  Primary key ``(job_id, tag)``."""
        job_ids = sorted({job_id for job_id, _ in pairs})
        have = {(job_id, tag) for job_id, tag in conn.execute(select(g.c.job_id, g.c.tag).where(g.c.job_id.in_(job_ids)))}
        new = [dict(job_id=job_id, tag=tag) for job_id, tag in dict.fromkeys(pairs) if (job_id, tag) not in have]
        if new:
            conn.execute(insert(g), new)

    def remove_tags(self, conn, job_id: int, tags: Sequence[str]) -> None:
        conn.execute(delete(g).where(g.c.job_id == job_id, g.c.tag.in_(list(tags))))

    def tags_of(self, conn, job_ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """Each job's tags, sorted (jobs without tags are absent).  Primary key prefix ``job_id``."""
        tags: dict[int, list[str]] = {}
        if job_ids:
            for job_id, tag in conn.execute(select(g.c.job_id, g.c.tag).where(g.c.job_id.in_(list(job_ids)))
                                            .order_by(g.c.job_id, g.c.tag)):
                tags.setdefault(job_id, []).append(tag)
        return {job_id: tuple(values) for job_id, values in tags.items()}

    def jobs_tagged(self, conn, tag: str, limit: int, queue: str | None = None, state: str | None = None) -> list:
        """Rows of jobs with ``tag``, newest (highest id) first: the ``(tag, job_id)`` index walked
        backwards, each job by primary key.  Plain read."""
        query = (select(t).join(g, g.c.job_id == t.c.id).where(g.c.tag == tag)
                 .order_by(g.c.job_id.desc()).limit(limit))
        if queue is not None:
            query = query.where(t.c.queue == queue)
        if state is not None:
            query = query.where(t.c.state == state)
        return conn.execute(query).all()

    def set_tracked(self, conn, job_id: int, tracked: bool) -> bool:
        """Track or stop tracking a job (any state).  Row lock by primary key."""
        return conn.execute(update(t).where(t.c.id == job_id).values(tracked=int(tracked))).rowcount == 1

    def tracked_jobs(self, conn, limit: int) -> list:
        """Rows of tracked jobs, newest (highest id) first, at most ``limit``.

        No index covers ``tracked`` (it must not slow the hot path): a scan
        of the primary key backwards that stops after ``limit`` matches; plain read.
        """
        return conn.execute(select(t).where(t.c.tracked == 1).order_by(t.c.id.desc()).limit(limit)).all()

    def failed_errors(self, conn, queue: str | None, limit: int) -> list:
        """``(id, queue, name, last_error)`` of failed jobs (of ``queue``), oldest id first, at most
        ``limit``: what the dashboard groups by error.  Claim index prefix ``(queue, state)``
        with a queue, else a scan; plain read."""
        query = (select(t.c.id, t.c.queue, t.c.name, t.c.last_error).where(t.c.state == FAILED)
                 .order_by(t.c.id).limit(limit))
        if queue is not None:
            query = query.where(t.c.queue == queue)
        return conn.execute(query).all()

    def succeeded_per_minute(self, conn, since: dt.datetime) -> list:
        """``(queue, minute, count)`` of jobs that succeeded at or after ``since``, per queue and minute
        (``minute`` as text ``YYYY-MM-DD HH:MM``).  Index range on ``(finished_at, id)``; plain read."""
        minute = minute_of(t.c.finished_at)
        return conn.execute(select(t.c.queue, minute.label("minute"), func.count().label("jobs"))
                            .where(t.c.finished_at >= since, t.c.state == SUCCEEDED)
                            .group_by(t.c.queue, minute)).all()

    # -- published events --------------------------------------------------------
    def published_events(self, conn, after: int | None, limit: int, kinds: Sequence[str] = (),
                         job_id: int | None = None, ids: Sequence[int] = ()) -> list:
        """Published events with id above ``after`` (or with the given ``ids``), in id order.

        A range of the primary key (or the ``(job_id, id)`` index for one
        job); plain read.
        """
        query = select(e).where(e.c.emitted == 1).order_by(e.c.id).limit(limit)
        if ids:
            query = query.where(e.c.id.in_(list(ids)))
        elif after is not None:
            query = query.where(e.c.id > after)
        if kinds:
            query = query.where(e.c.kind.in_(list(kinds)))
        if job_id is not None:
            query = query.where(e.c.job_id == job_id)
        return conn.execute(query).all()

    def event_ids(self, conn, after: int, limit: int, also: Sequence[int] = ()) -> list[int]:
        """Ids of every event (published or not) above ``after`` (at most ``limit``, ascending),
        and those of ``also`` that exist: how a reader finds gaps.  Primary key only."""
        ids = list(conn.execute(select(e.c.id).where(e.c.id > after).order_by(e.c.id).limit(limit)).scalars())
        if also:
            ids += conn.execute(select(e.c.id).where(e.c.id.in_(list(also)))).scalars()
        return sorted(set(ids))

    # -- shared settings ------------------------------------------------------
    def read_settings(self, conn) -> dict[str, str]:
        """Every stored setting (a handful of rows); plain read."""
        return {row.key: row.value for row in conn.execute(select(setting_table.c.key, setting_table.c.value))}

    def write_setting(self, conn, key: str, value: str | None) -> None:
        """Set (or with None, remove) one setting.  Row lock on its primary key."""
        c = setting_table.c
        if value is None:
            conn.execute(delete(setting_table).where(c.key == key))
            return
        change = update(setting_table).where(c.key == key).values(value=value, updated_at=utc_now())
        if conn.execute(change).rowcount:
            return
        try:
            with conn.begin_nested():
                conn.execute(insert(setting_table).values(key=key, value=value))
        except IntegrityError:  # set at the same moment by someone else: the later write wins
            conn.execute(change)
