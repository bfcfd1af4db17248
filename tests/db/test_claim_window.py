"""``claim_jobs(..., skip=N)``: the window a worker claims from after it lost a claim race.

Only the MySQL dialect honours it (row locks local to a Galera node make
workers on two nodes collide at the head of the queue); elsewhere workers
never claim the same row and it is ignored.  On every backend the claim
stays correct: only due, queued jobs, never a lower priority while a higher
one is due, the head of the level when the window is empty.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select

from mqueue.schema import RUNNING, task_table

QUEUE = "twin"


def add(db, count: int, priority: int = 0) -> list[int]:
    with db.engine.begin() as conn:
        now = db.dialect.db_now(conn)
        conn.execute(insert(task_table), [dict(queue=QUEUE, name="twin.job", args="{}", priority=priority,
                                               eta=now - dt.timedelta(seconds=count - n)) for n in range(count)])
        return list(conn.execute(select(task_table.c.id).where(task_table.c.priority == priority)
                                 .order_by(task_table.c.eta, task_table.c.id)).scalars())


def claim(db, limit: int, skip: int) -> list[int]:
    with db.engine.begin() as conn:
        return [row.id for row in db.dialect.claim_jobs(conn, QUEUE, limit, "host:1:win", 60, skip=skip)]


def states(db, ids) -> set[str]:
    with db.engine.connect() as conn:
        return set(conn.execute(select(task_table.c.state).where(task_table.c.id.in_(ids))).scalars())


def test_a_window_claims_past_the_head_where_locks_are_local_to_a_node(db, backend):
    ids = add(db, 10)
    claimed = claim(db, 2, skip=4)
    assert claimed == (ids[4:6] if db.dialect.name == "mysql" else ids[:2])
    assert states(db, claimed) == {RUNNING}
    # The rows passed over are untouched and claimed next from the head.
    assert claim(db, 10, skip=0) == [i for i in ids if i not in claimed]


def test_an_empty_window_falls_back_to_the_head_and_priorities_still_come_first(db, backend):
    high = add(db, 3, priority=5)
    low = add(db, 10, priority=0)
    assert claim(db, 2, skip=4) == high[:2]          # the high level has no job 4 past its head
    assert claim(db, 4, skip=0) == [high[2]] + low[:3]

