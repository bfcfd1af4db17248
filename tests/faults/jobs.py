"""Enqueue helpers for the fault tests: rows inserted by hand, recorded in the enqueue ledger."""

from __future__ import annotations

import json
import time

from helpers import wait_for
from ledger import BLOCK, WORK, Harness, check, job_row, live_jobs
from sqlalchemy import insert, select

from mqueue.schema import task_table


def enqueue(db, harness: Harness, name: str, calls: list[dict]) -> list[int]:
    """Insert jobs in one transaction; their ids go to the ledger once COMMIT returned."""
    ids = []
    with db.engine.begin() as conn:
        for kwargs in calls:
            result = conn.execute(insert(task_table).values(queue="default", name=name, args=json.dumps(kwargs)))
            ids.append(int(result.inserted_primary_key[0]))
    harness.record("C", ids)
    return ids


def block_job(db, harness, point: str, write: bool = True) -> int:
    (job_id,) = enqueue(db, harness, BLOCK, [{"point": point, "write": write}])
    return job_id


def work_jobs(db, harness, count: int, **kwargs) -> list[int]:
    return enqueue(db, harness, WORK, [dict(n=n, **kwargs) for n in range(count)])


def rerun(harness, job_id, daemons, timeout):
    """The first start of ``job_id`` with retries >= 1 (after a rescue)."""
    return wait_for(lambda: next((a for a in harness.starts(job_id) if a[3] >= 1), None), timeout=timeout,
                    message=lambda: f"job {job_id} was not run again\n{daemons.output()}")


def drained_and_checked(db, harness, daemons, expect_fail=frozenset(), timeout=30):
    """Wait until no job is queued, waiting or running, then assert the invariants."""
    wait_for(lambda: live_jobs(db) == 0, timeout=timeout,
             message=lambda: f"{live_jobs(db)} live job(s)\n{daemons.output()}")
    report = check(db, harness, expect_fail=set(expect_fail))
    assert report.violations() == [], f"{report}\n{daemons.output()}"
    return report


def state_owner(db, job_id):
    row = job_row(db, job_id)
    return (row.state, row.owner) if row is not None else None


def lease_expired(db, job_id) -> bool:
    """The job's lease is over by the database's clock (read without waiting for any lock)."""
    reader = db.dialect.reader(db.engine)
    with reader.connect() as conn:
        now = db.dialect.db_now(conn)
        expires = conn.execute(select(task_table.c.lease_expires_at).where(task_table.c.id == job_id)).scalar()
    if isinstance(expires, str):
        from datetime import datetime
        expires = datetime.fromisoformat(expires)
    if isinstance(now, str):
        from datetime import datetime
        now = datetime.fromisoformat(now)
    return expires is not None and expires < now


def now() -> float:
    return time.time()


def work_effects(db) -> list:
    """The effect ledger without the rows of the ``Minutely`` cron (a test may cross a minute)."""
    from ledger import effects
    return [row for row in effects(db) if row.note != "cron"]


def proxied(database_url: str, proxy) -> str:
    """``database_url`` through ``proxy`` (unchanged when there is none, as on SQLite)."""
    if proxy is None:
        return database_url
    from sqlalchemy.engine import make_url
    return make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
