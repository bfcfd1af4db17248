"""Statements for worker control: paused queues (``mqueue_queue``) and the worker registry (``mqueue_worker``).

Mixed into ``Dialect`` (``base.py``).  Both tables hold a handful of rows
(one per paused queue, one per live worker) and are never joined with
``mqueue_task``, so nothing here takes a lock a claim or a completion
waits for.  A row is written with one upsert (``upsert``): each backend
overrides it with its native form (``ON CONFLICT``, ``ON DUPLICATE KEY``).
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..schema import queue_table, worker_table
from .functions import seconds_since, utc_now

q = queue_table
w = worker_table

#: A worker row not written for this many of its own leases belongs to a dead worker.
STALE_LEASES = 3
_STALE = seconds_since(w.c.last_seen) > w.c.lease_seconds * STALE_LEASES


class ControlStatements:
    """Paused queues and the worker registry (a mixin of ``Dialect``)."""

    def upsert(self, conn, table, values: dict[str, Any], changes: dict[str, Any]) -> None:
        """Insert ``values`` as a new row of ``table``, or apply ``changes`` to the row with its primary key.

        Portable form: UPDATE, then INSERT in a savepoint if no row matched
        (another writer inserting at the same moment: UPDATE again).  Row
        lock on the primary key.
        """
        key = [column == values[column.name] for column in table.primary_key.columns]
        change = update(table).where(*key).values(**changes)
        if conn.execute(change).rowcount:
            return
        try:
            with conn.begin_nested():
                conn.execute(insert(table).values(**values))
        except IntegrityError:
            conn.execute(change)

    # -- paused queues ------------------------------------------------------
    def set_paused(self, conn, queues: Sequence[str], paused: bool) -> None:
        """Pause (or resume) ``queues`` for every worker: one upsert each, in name order (row lock by
        primary key, so two operators pausing overlapping sets never deadlock)."""
        for name in sorted(set(queues)):
            self.upsert(conn, q, dict(name=name, paused=int(paused), updated_at=utc_now()),
                        dict(paused=int(paused), updated_at=utc_now()))

    def paused_queues(self, conn) -> set[str]:
        """Names of the paused queues.  Reads the small ``mqueue_queue`` table; plain read, no lock.

        Workers run it on a timer (once per poll interval), not per claim.
        """
        return set(conn.execute(select(q.c.name).where(q.c.paused == 1)).scalars())

    # -- worker registry ------------------------------------------------------
    def register_worker(self, conn, name: str, host: str, pid: int, queues: str, lease_seconds: float,
                        running: str, claiming: bool) -> None:
        """Write a worker's row, ``last_seen`` (and on the first write ``started_at``) by the database
        clock.  ``queues`` and ``running`` are JSON lists.  Row lock by primary key."""
        changes = dict(host=host, pid=pid, queues=queues, last_seen=utc_now(), lease_seconds=lease_seconds,
                       running=running, claiming=int(claiming))
        self.upsert(conn, w, dict(changes, name=name, started_at=utc_now()), changes)

    def unregister_worker(self, conn, name: str) -> None:
        """Delete a worker's row (a clean stop).  Primary key."""
        conn.execute(delete(w).where(w.c.name == name))

    def delete_stale_workers(self, conn) -> int:
        """Delete the rows of workers not seen for ``STALE_LEASES`` of their own leases (killed ones).

        Scans the registry (a row per live worker); row locks on what it deletes.
        """
        return conn.execute(delete(w).where(_STALE)).rowcount

    def live_workers(self, conn) -> list:
        """Rows of workers seen within ``STALE_LEASES`` of their leases, by host, pid, name.  Plain read."""
        return conn.execute(select(w).where(~_STALE).order_by(w.c.host, w.c.pid, w.c.name)).all()

