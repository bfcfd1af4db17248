"""Published events: what tracked jobs did, and every job that failed for good (``admin.events``).

An event row is written in the transaction of the change it reports, so a
reader never sees an event of a change that rolled back, and sees every one
that committed.  Ids come from the database in insert order, which for one
job is commit order (each event of a job is written under that job's row
lock, after the previous one committed).  Across jobs a smaller id can
commit after a larger one; the reader therefore remembers the ids missing
below the highest it has read and asks for them again until they appear,
or for ``GAP_SECONDS`` (an id can also be missing for good: a rolled-back
insert).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from typing import Any, Iterator, Sequence

from .errors import headline
from .session import Database, as_database

log = logging.getLogger("mqueue.events")

#: Stored kind -> published kind (the history says ``rescued``, a subscriber hears ``stalled``).
PUBLISHED_NAMES = {"rescued": "stalled"}
STORED_NAMES = {published: stored for stored, published in PUBLISHED_NAMES.items()}
KINDS = ("put", "popped", "succeeded", "retried", "failed", "canceled", "expired", "moved", "priority",
         "stalled", "released")
#: How long an id missing below the highest read is waited for.
GAP_SECONDS = 30.0
#: Rows per query.
BATCH = 500


@dataclasses.dataclass(frozen=True)
class Event:
    """One published event.  ``at`` is naive UTC; ``detail`` is the error of a failed run, if any."""

    id: int
    at: dt.datetime
    kind: str
    job_id: int
    queue: str
    name: str
    worker: str | None
    detail: str | None

    @classmethod
    def from_row(cls, row) -> "Event":
        return cls(row.id, row.at, PUBLISHED_NAMES.get(row.kind, row.kind), row.job_id, row.queue, row.name,
                   row.worker, row.detail)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["at"] = None if self.at is None else self.at.replace(tzinfo=dt.timezone.utc).isoformat()
        return out

    def __str__(self) -> str:
        at = "-" if self.at is None else self.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        parts = [str(self.id), at, self.kind, f"job={self.job_id}", f"queue={self.queue}", f"task={self.name}"]
        if self.worker:
            parts.append(f"worker={self.worker}")
        if headline(self.detail):
            parts.append(headline(self.detail))
        return " ".join(parts)


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """Published kinds as stored; ``ValueError`` naming the known ones for anything else."""
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown event kind {unknown[0]!r}; kinds: {', '.join(KINDS)}")
    return [STORED_NAMES.get(kind, kind) for kind in kinds]


def events(database: "Database | str", follow: bool = False, since: int | None = None,
           kind: "str | Sequence[str] | None" = None, job_id: int | None = None,
           poll_interval: float = 0.5) -> Iterator[Event]:
    """Published events with id above ``since`` (all if None), oldest first; see ``admin.events``."""
    kinds = check_kinds([kind] if isinstance(kind, str) else list(kind or ()))
    db = as_database(database)
    reader = _Reader(db, since, kinds, job_id)
    listener = _Listener(db) if follow and db.dialect.name == "postgresql" else None
    try:
        while True:
            batch = reader.read()
            yield from batch
            if len(batch) >= BATCH or reader.behind:
                continue
            if not follow:
                return
            if listener is not None:
                listener.wait(poll_interval)
            else:
                time.sleep(poll_interval)
    finally:
        if listener is not None:
            listener.close()
        if db is not database:
            db.dispose()


class _Reader:
    """Reads events past ``after`` and ids missing below it (see the module docstring)."""

    def __init__(self, db: Database, after: int | None, kinds: list[str], job_id: int | None) -> None:
        self.db, self.after, self.kinds, self.job_id = db, after or 0, kinds, job_id
        self.missing: dict[int, float] = {}
        self.behind = False

    def read(self) -> list[Event]:
        dialect = self.db.dialect
        with dialect.reader(self.db.engine).begin() as conn:
            ids = dialect.event_ids(conn, self.after, BATCH, list(self.missing))
            if not ids:
                self.behind = False
                self._forget_old_gaps()
                return []
            found_missing = [event_id for event_id in ids if event_id in self.missing]
            newer = [event_id for event_id in ids if event_id > self.after]
            rows = dialect.published_events(conn, None, len(ids), self.kinds, self.job_id, ids=ids)
        for event_id in found_missing:
            del self.missing[event_id]
        if newer:
            now = time.monotonic()
            present = set(newer)
            expected = range(self.after + 1, max(newer))
            if len(expected) - len(present) < 10_000:  # a huge jump (id cache, restore) is not waited for
                for event_id in expected:
                    if event_id not in present:
                        self.missing.setdefault(event_id, now)
            self.after = max(newer)
        self.behind = len(newer) >= BATCH
        self._forget_old_gaps()
        return [Event.from_row(row) for row in rows]

    def _forget_old_gaps(self) -> None:
        limit = time.monotonic() - GAP_SECONDS
        for event_id in [i for i, since in self.missing.items() if since < limit]:
            del self.missing[event_id]


class _Listener:
    """PostgreSQL: ``LISTEN`` on a connection of its own; a published event's commit wakes the reader."""

    def __init__(self, db: Database) -> None:
        from .dialects.postgresql import EVENTS_CHANNEL
        self.raw = db.engine.raw_connection()
        self.connection = self.raw.driver_connection
        self.raw.detach()  # never back to the pool: it stays in LISTEN and autocommit
        self.connection.autocommit = True
        self.connection.execute(f"LISTEN {EVENTS_CHANNEL}")

    def wait(self, timeout: float) -> None:
        try:
            for _ in self.connection.notifies(timeout=timeout, stop_after=1):
                pass
        except Exception as error:  # a broken listener only loses its speed: polling goes on
            log.warning("event listener failed, polling instead: %s", error)
            time.sleep(timeout)

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
