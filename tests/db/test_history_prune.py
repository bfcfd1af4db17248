"""Retention and qless stats on every backend: pruning by age and by count, in batches,
while a worker completes jobs and while another pruner runs; daily stats exact against a
hand count, before and after pruning.

The clock is injected (``history.prune(db, now=...)``): nothing here waits for time to
pass.  Finished rows with known waits and runs are written directly, since no API can
make a job wait three days; their values are multiples of 1/4 s up to ten days, which a
double-precision column stores exactly.  The expected numbers are computed here by hand, with
qless's buckets spelled out again, not taken from ``mqueue.history``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import random
import threading
from collections import Counter

import pytest
from helpers import note, note_metadata, wait_for
from sqlalchemy import event, func, insert, select

import mqueue
from mqueue import admin, history
from mqueue.schema import event_table, task_table

QUEUE = "thp"
LIVE_QUEUE = "thp-live"
OTHER = "other-host:4242:beef"
#: A day in the past; every row of the exact-stats tests finishes around it.
DAY = dt.date(2026, 6, 15)
#: Far enough ahead that every row near ``DAY`` is past ``jobs-history`` (30 days).
FAR = dt.datetime.combine(DAY, dt.time()) + dt.timedelta(days=400)


@mqueue.task(name="thp.quick", queue=QUEUE)
def quick(n: int) -> None:
    mqueue.current_session().execute(insert(note).values(text=f"quick {n}"))


@mqueue.task(name="thp.once", queue=QUEUE, backoff=0)
def once(n: int) -> None:
    """Fails its first run, succeeds on the second."""
    if mqueue.current_job().retries == 0:
        raise RuntimeError(f"once {n} broke")


@mqueue.task(name="thp.broken", queue=QUEUE)
def broken() -> None:
    raise mqueue.Fail("broken for good")


@pytest.fixture
def db(db):
    note_metadata.create_all(db.engine)
    yield db


def worker(db, **options) -> mqueue.Worker:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 10)
    return mqueue.Worker(db, queues=[QUEUE], **options)


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def at(days: float = 0, seconds: float = 0) -> dt.datetime:
    """A moment relative to midnight (UTC) that starts ``DAY``."""
    return dt.datetime.combine(DAY, dt.time()) + dt.timedelta(days=days, seconds=seconds)


def states(db, ids) -> dict[int, str]:
    """``{id: state}`` of those of ``ids`` that still exist."""
    ids = list(ids)
    with db.engine.connect() as conn:
        return dict(conn.execute(select(task_table.c.id, task_table.c.state)
                                 .where(task_table.c.id.in_(ids))).all()) if ids else {}


def finished_rows(db) -> list:
    """``(id, finished_at)`` of every finished job, newest first (as ``jobs-history-count`` counts)."""
    with db.engine.connect() as conn:
        return conn.execute(select(task_table.c.id, task_table.c.finished_at)
                            .where(task_table.c.finished_at.is_not(None))
                            .order_by(task_table.c.finished_at.desc(), task_table.c.id.desc())).all()


def count_events(db, job_ids=None) -> int:
    query = select(func.count()).select_from(event_table)
    if job_ids is not None:
        query = query.where(event_table.c.job_id.in_(list(job_ids)))
    with db.engine.connect() as conn:
        return conn.execute(query).scalar_one()


_numbers = itertools.count(1_000_000)


def add_jobs(db, rows: list[dict]) -> list[int]:
    """Insert job rows as given (finished ones too); their ids, in order."""
    tagged = [dict(dict(queue=QUEUE, name="thp.quick"), **row, args=f'{{"n": {next(_numbers)}}}') for row in rows]
    with db.engine.begin() as conn:
        conn.execute(insert(task_table), tagged)
        found = dict(conn.execute(select(task_table.c.args, task_table.c.id)
                                  .where(task_table.c.args.in_([row["args"] for row in tagged]))).all())
    return [found[row["args"]] for row in tagged]


def add_events(db, events: list[dict]) -> None:
    with db.engine.begin() as conn:
        conn.execute(insert(event_table), [dict(dict(queue=QUEUE, name="thp.quick", worker=OTHER, detail=None), **e)
                                           for e in events])


def summed_stats(db, queue, first: dt.date, last: dt.date) -> dict:
    """Counts of ``queue_stats`` added up over the days ``first`` to ``last``."""
    total = Counter()
    day = first
    while day <= last:
        stats = admin.queue_stats(db, queue, day)
        total.update(wait=stats.wait.count, run=stats.run.count, failed=stats.failed,
                     retried=stats.retried, expired=stats.expired)
        day += dt.timedelta(days=1)
    return dict(total)


# -- hand-counted stats -------------------------------------------------------------------


def qless_label(seconds: float) -> str:
    """qless's bucket: per second for the first minute, per minute for the first hour,
    per hour for the first day, per day after (a week and more share the last)."""
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    days = int(seconds // 86400)
    return f"{days}d" if days < 7 else "7d+"


def hand_timing(values: list[float]) -> dict:
    n = len(values)
    mean = math.fsum(values) / n if n else 0.0
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return dict(count=n, mean=mean, std=std, histogram=dict(Counter(qless_label(v) for v in values)))


def assert_timing(timing, values: list[float]) -> None:
    expected = hand_timing(values)
    got = timing.to_dict()
    assert got["count"] == expected["count"]
    assert got["mean"] == pytest.approx(expected["mean"], rel=1e-6, abs=1e-9)
    assert got["std"] == pytest.approx(expected["std"], rel=1e-6, abs=1e-9)
    assert got["histogram"] == expected["histogram"]
    assert sum(timing.histogram) == expected["count"]


def assert_day(db, queue, day, waits, runs, failed, retried, expired) -> None:
    stats = admin.queue_stats(db, queue, day)
    assert (stats.queue, stats.day) == (queue, day)
    assert (stats.failed, stats.retried, stats.expired) == (failed, retried, expired)
    assert_timing(stats.wait, waits)
    assert_timing(stats.run, runs)


def assert_same_stats(got, expected) -> None:
    """Counts and histograms equal, floats to 1e-6 relative (folding adds in another order)."""
    assert (got.failed, got.retried, got.expired) == (expected.failed, expected.retried, expected.expired)
    for mine, theirs in ((got.wait, expected.wait), (got.run, expected.run)):
        assert (mine.count, mine.histogram) == (theirs.count, theirs.histogram)
        assert mine.mean == pytest.approx(theirs.mean, rel=1e-6)
        assert mine.std == pytest.approx(theirs.std, rel=1e-6)


def test_the_buckets_are_qlesss():
    assert len(history.BUCKETS) == 60 + 59 + 23 + 6 + 1
    for seconds in (0, 0.25, 59.75, 60, 61, 3599.75, 3600, 7199, 86399.75, 86400, 2 * 86400 - 1,
                    6 * 86400, 7 * 86400 - 0.25, 7 * 86400, 30 * 86400):
        assert history.BUCKETS[history.bucket(seconds)] == qless_label(seconds), seconds


#: Durations at and next to every bucket edge.
EDGES = [0.0, 0.25, 59.75, 60.0, 3599.75, 3600.0, 86399.75, 86400.0, 604799.75, 604800.0]
#: (low, high) seconds: the second, minute, hour, day and week scales.
SCALES = [(0, 60), (60, 3600), (3600, 86400), (86400, 7 * 86400), (7 * 86400, 10 * 86400)]


def spread(rng: random.Random, count: int) -> list[float]:
    """``count`` durations over every scale, edges first; multiples of 1/4 s (exact in any float)."""
    values = list(EDGES)
    while len(values) < count:
        low, high = SCALES[len(values) % len(SCALES)]
        values.append(rng.randrange(low * 4, high * 4) / 4)
    return values[:count]


def test_stats_are_exact_for_1000_jobs_before_and_after_pruning(db):
    rng = random.Random(12)
    waits, runs = spread(rng, 1000), spread(rng, 1000)
    runs.reverse()
    # 1,000 successes spread over DAY, the first at midnight sharp.
    succeeded = add_jobs(db, [dict(state="succeeded", finished_at=at(seconds=80 * i), runs=1 + i % 3,
                                   wait_seconds=waits[i], run_seconds=runs[i]) for i in range(1000)])
    # Just either side of DAY: they belong to the day before and the day after.
    add_jobs(db, [dict(state="succeeded", finished_at=at(seconds=-0.000001), wait_seconds=5.0, run_seconds=7.0),
                  dict(state="succeeded", finished_at=at(days=1), wait_seconds=9.0, run_seconds=11.0)])
    expired = add_jobs(db, [dict(state="expired", finished_at=at(seconds=1000 + i)) for i in range(11)])
    add_jobs(db, [dict(state="canceled", finished_at=at(seconds=2000 + i)) for i in range(6)])  # not counted
    failed = add_jobs(db, [dict(state="failed", retries=3, last_error="boom") for _ in range(7)])
    add_jobs(db, [dict(state="queued", eta=at(days=500))])  # live, not counted
    events = [dict(job_id=job_id, kind="failed", at=at(seconds=3000 + i), detail="boom")
              for i, job_id in enumerate(failed)]
    events += [dict(job_id=succeeded[i], kind="retried", at=at(seconds=80 * i + 1), detail="err")
               for i in range(100, 125)]
    events += [dict(job_id=succeeded[i], kind="rescued", at=at(seconds=80 * i + 1), detail="lease expired")
               for i in range(200, 205)]
    # Runs retried the evening before their job succeeded count on that evening's day.
    events += [dict(job_id=succeeded[i], kind="retried", at=at(seconds=-60 + i), detail="err") for i in range(3)]
    events += [dict(job_id=succeeded[i], kind=kind, at=at(seconds=50_000 + i))
               for i, kind in enumerate(["released"] * 4 + ["put"] * 2)]  # not counted
    add_events(db, events)
    # Another queue the same day: counted apart.
    with db.engine.begin() as conn:
        conn.execute(insert(task_table), [dict(queue="thp-other", name="thp.quick", args="{}", state="succeeded",
                                               finished_at=at(seconds=40_000 + i), wait_seconds=1.0,
                                               run_seconds=2.0) for i in range(50)])
        conn.execute(insert(event_table), [dict(job_id=0, kind="failed", queue="thp-other", name="thp.quick",
                                                at=at(seconds=40_000 + i)) for i in range(2)])

    def check_all() -> None:
        assert_day(db, QUEUE, DAY, waits, runs, failed=7, retried=30, expired=11)
        assert_day(db, QUEUE, DAY - dt.timedelta(days=1), [5.0], [7.0], failed=0, retried=3, expired=0)
        assert_day(db, QUEUE, DAY + dt.timedelta(days=1), [9.0], [11.0], failed=0, retried=0, expired=0)
        assert_day(db, "thp-other", DAY, [1.0] * 50, [2.0] * 50, failed=2, retried=0, expired=0)
        assert_day(db, QUEUE, DAY + dt.timedelta(days=2), [], [], failed=0, retried=0, expired=0)

    check_all()
    assert admin.queue_stats(db, QUEUE, DAY.isoformat()) == admin.queue_stats(db, QUEUE, DAY)

    admin.set_config(db, "stats-history", 3650)  # keep the daily rows while pruning far ahead
    # Part of DAY folded, the rest still in rows: the two parts add up.
    assert history.prune(db, now=FAR, batch=50, max_batches=5).jobs == 250
    check_all()
    # Everything folded.
    result = history.prune(db, now=FAR, batch=50)
    assert result.jobs == 1000 + 2 + 11 + 6 + 50 - 250
    assert finished_rows(db) == []
    assert count_events(db) == 0  # the failed jobs' events were past jobs-history too
    assert sorted(states(db, failed + expired).items()) == [(job_id, "failed") for job_id in failed]
    check_all()

    # stats-history: daily rows older than 30 days before the (injected) now go.
    admin.set_config(db, "stats-history", None)
    assert history.prune(db, now=at(days=31, seconds=1)).stats_days == 3  # DAY-1, DAY, and thp-other's DAY
    assert_day(db, QUEUE, DAY, [], [], failed=0, retried=0, expired=0)
    assert_day(db, "thp-other", DAY, [], [], failed=0, retried=0, expired=0)
    assert_day(db, QUEUE, DAY + dt.timedelta(days=1), [9.0], [11.0], failed=0, retried=0, expired=0)


def test_stats_of_real_runs_stay_the_same_once_pruned(db):
    with db.session():
        once_id = once.enqueue(1)
        quick_ids = [quick.enqueue(n) for n in range(3)]
        broken_id = broken.enqueue()
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (4, 1, 1)
    jobs = [admin.get_job(db, job_id) for job_id in [once_id] + quick_ids]
    day = jobs[0].finished_at.date()
    before = admin.queue_stats(db, QUEUE, day)
    assert (before.failed, before.retried, before.expired) == (1, 1, 0)
    assert_timing(before.wait, [job.wait_seconds for job in jobs])
    assert_timing(before.run, [job.run_seconds for job in jobs])

    admin.set_config(db, "jobs-history-count", 0)  # keep no finished job at all
    assert history.prune(db).jobs == 4
    after = admin.queue_stats(db, QUEUE, day)
    assert (after.failed, after.retried, after.expired) == (1, 1, 0)
    assert_timing(after.wait, [job.wait_seconds for job in jobs])
    assert_timing(after.run, [job.run_seconds for job in jobs])
    assert states(db, [broken_id]) == {broken_id: "failed"}


# -- pruning -----------------------------------------------------------------------------


def start_worker(db, **options) -> tuple[mqueue.Worker, threading.Thread]:
    w = worker(db, concurrency=2, **options)
    thread = threading.Thread(target=w.run, name="thp-worker")
    thread.start()
    return w, thread


def stop_worker(w, thread) -> None:
    w.stop()
    thread.join(30)
    assert not thread.is_alive()


def live_jobs(db) -> dict[int, str]:
    """Jobs no pruning may touch: one running elsewhere, two due and one scheduled in a queue no worker
    here serves, and one scheduled in the served queue."""
    with db.session():
        ids = [quick.options(queue=LIVE_QUEUE).enqueue(n) for n in range(3)]
        ids.append(quick.options(queue=LIVE_QUEUE, delay=3600).enqueue(3))
        ids.append(quick.options(delay=3600).enqueue(4))
    with db.engine.begin() as conn:
        [claimed] = db.dialect.claim_jobs(conn, LIVE_QUEUE, 1, OTHER, 600)
    return {job_id: "running" if job_id == claimed.id else "queued" for job_id in ids}


def test_prune_by_age_while_a_worker_completes_jobs(db):
    admin.set_config(db, "jobs-history", 3600)
    first_day = db_now(db).date()
    live = live_jobs(db)
    with db.session():
        old = quick.enqueue_many([dict(n=n) for n in range(120)]) + once.enqueue_many([dict(n=n) for n in range(30)])
        failed = [broken.enqueue() for _ in range(3)]
        canceled = quick.options(queue=LIVE_QUEUE).enqueue_many([dict(n=n) for n in range(5)])
    for job_id in canceled:
        admin.cancel_job(db, job_id)
    result = worker(db, concurrency=2).run_until_empty(timeout=60)
    assert (result.succeeded, result.retried, result.failed) == (150, 30, 3)
    last_old = max(row.finished_at for row in finished_rows(db))
    cut = wait_for(lambda: (now := db_now(db)) > last_old and now, message="the database clock stands still")
    # Pruning as of an hour after ``cut``: what finished before it goes, what finished after stays.
    prune_now = cut + dt.timedelta(seconds=3600)

    with db.session():
        new = quick.enqueue_many([dict(n=n) for n in range(1000, 1270)]) + once.enqueue_many(
            [dict(n=n) for n in range(1000, 1030)])
    w, thread = start_worker(db)
    pruned = []
    try:
        wait_for(lambda: "succeeded" in states(db, new).values(), timeout=30, message="the worker completes nothing")

        def prune_until_all_done() -> bool:
            pruned.append(history.prune(db, now=prune_now, batch=10).jobs)
            return all(state == "succeeded" for state in states(db, new).values()) and len(states(db, new)) == 300

        wait_for(prune_until_all_done, timeout=60, message=lambda: f"new jobs: {Counter(states(db, new).values())}")
    finally:
        stop_worker(w, thread)
    pruned.append(history.prune(db, now=prune_now, batch=10).jobs)

    assert sum(pruned) == 150 + 5, pruned
    assert states(db, old + canceled) == {}
    assert count_events(db, old) == 0
    assert states(db, new) == {job_id: "succeeded" for job_id in new}
    assert count_events(db, new) == 30  # the new jobs' retried runs stay in their history
    assert states(db, failed) == {job_id: "failed" for job_id in failed}
    assert all("broken for good" in admin.get_job(db, job_id).last_error for job_id in failed)
    assert states(db, live) == live
    # Nothing lost or counted twice: every success is in the day's stats, pruned or not.
    assert summed_stats(db, QUEUE, first_day, db_now(db).date()) == dict(
        wait=450, run=450, failed=3, retried=60, expired=0)


def test_prune_by_count_keeps_exactly_the_newest_jobs_while_a_worker_completes_jobs(db):
    keep = 40
    admin.set_config(db, "jobs-history-count", keep)
    first_day = db_now(db).date()
    live = live_jobs(db)
    with db.session():
        old = quick.enqueue_many([dict(n=n) for n in range(60)])
        failed = [broken.enqueue() for _ in range(2)]
        canceled = quick.options(queue=LIVE_QUEUE).enqueue_many([dict(n=n) for n in range(5)])
    for job_id in canceled:
        admin.cancel_job(db, job_id)
    assert worker(db).run_until_empty(timeout=60).succeeded == 60
    assert history.prune(db, batch=10).jobs == 60 + 5 - keep
    assert len(finished_rows(db)) == keep

    with db.session():
        new = quick.enqueue_many([dict(n=n) for n in range(1000, 1150)])
    w, thread = start_worker(db)
    try:
        def prune_until_all_done() -> bool:
            history.prune(db, batch=10)
            assert len(finished_rows(db)) >= keep  # never fewer than the newest ``keep``
            return all(state == "succeeded" for state in states(db, new).values())

        wait_for(prune_until_all_done, timeout=60, message=lambda: f"new jobs: {Counter(states(db, new).values())}")
    finally:
        stop_worker(w, thread)
    newest = [row.id for row in finished_rows(db)][:keep]
    history.prune(db, batch=10)
    assert [row.id for row in finished_rows(db)] == newest
    assert set(newest) <= set(new) and states(db, old + canceled) == {}
    assert states(db, failed) == {job_id: "failed" for job_id in failed}
    assert states(db, live) == live
    assert summed_stats(db, QUEUE, first_day, db_now(db).date())["run"] == 60 + 150


def commits_during(db, action) -> tuple[object, int]:
    """``action()``'s result and how many transactions it committed."""
    commits = []
    listener = lambda conn: commits.append(1)  # noqa: E731
    event.listen(db.engine, "commit", listener)
    try:
        return action(), len(commits)
    finally:
        event.remove(db.engine, "commit", listener)


def finished_day_of_jobs(db, count: int, events_per_job: int = 1) -> list[int]:
    """``count`` succeeded jobs on ``DAY``, each with ``events_per_job`` retried runs before it."""
    rng = random.Random(count)
    ids = add_jobs(db, [dict(state="succeeded", finished_at=at(seconds=60 * i + 30),
                             wait_seconds=rng.randrange(400) / 4, run_seconds=rng.randrange(40_000) / 4)
                        for i in range(count)])
    add_events(db, [dict(job_id=job_id, kind="retried", at=at(seconds=60 * i + k), detail="err")
                    for i, job_id in enumerate(ids) for k in range(events_per_job)])
    return ids


def test_prune_in_small_batches_deletes_every_finished_job(db):
    admin.set_config(db, "stats-history", 3650)
    ids = finished_day_of_jobs(db, 1000)
    before = admin.queue_stats(db, QUEUE, DAY)

    first, commits = commits_during(db, lambda: history.prune(db, now=FAR, batch=50, max_batches=4))
    assert (first.jobs, first.events) == (200, 200)
    assert commits >= 4  # a transaction per batch
    assert len(finished_rows(db)) == 800

    rest, commits = commits_during(db, lambda: history.prune(db, now=FAR, batch=50))
    assert (rest.jobs, rest.events) == (800, 800)
    assert commits >= 16
    assert finished_rows(db) == [] and states(db, ids) == {} and count_events(db) == 0
    assert_same_stats(admin.queue_stats(db, QUEUE, DAY), before)
    assert history.prune(db, now=FAR, batch=50) == history.PruneResult(0, 0, 0)


def test_two_pruners_at_once_are_harmless(db):
    admin.set_config(db, "stats-history", 3650)
    ids = finished_day_of_jobs(db, 1000, events_per_job=2)
    failed = add_jobs(db, [dict(state="failed", retries=1, last_error="boom") for _ in range(20)])
    add_events(db, [dict(job_id=job_id, kind="failed", at=at(seconds=30_000 + i)) for i, job_id in enumerate(failed)])
    before = admin.queue_stats(db, QUEUE, DAY)
    assert (before.wait.count, before.retried, before.failed) == (1000, 2000, 20)

    barrier = threading.Barrier(2)
    results, errors = [], []

    def pruner() -> None:
        try:
            barrier.wait(10)
            results.append(history.prune(db, now=FAR, batch=50))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=pruner, name=f"thp-pruner-{n}") for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert_same_stats(admin.queue_stats(db, QUEUE, DAY), before)  # nothing counted twice
    assert sum(result.jobs for result in results) == 1000
    assert sum(result.events for result in results) == 2000 + 20
    assert finished_rows(db) == [] and states(db, ids) == {} and count_events(db) == 0
    assert states(db, failed) == {job_id: "failed" for job_id in failed}


@pytest.mark.backends("mariadb", "postgresql")  # SQLite: one writer at a time, so this interleaving cannot happen
def test_a_pruner_pruning_events_does_not_fold_those_of_a_batch_another_pruner_is_folding(db):
    """Pruner A has locked a batch of finished jobs and read their events; before it folds
    them, pruner B runs to the end (its job batches skip A's rows, then its event batches).
    Each event must still be counted once.

    A is held at its first lock of a daily stats row (a SQLAlchemy cursor hook, in A's
    thread only) until B has finished; a B that waited for A instead would let A go after
    a few seconds, and the test would still pass, only slower.
    """
    admin.set_config(db, "stats-history", 3650)
    finished_day_of_jobs(db, 200, events_per_job=2)
    before = admin.queue_stats(db, QUEUE, DAY)
    assert (before.wait.count, before.retried) == (200, 400)
    a_folding, b_done = threading.Event(), threading.Event()

    def hold_a(conn, cursor, statement, parameters, context, executemany) -> None:
        if threading.current_thread().name == "thp-pruner-a" and "mqueue_stats" in statement \
                and "FOR UPDATE" in statement.upper() and not a_folding.is_set():
            a_folding.set()
            b_done.wait(5)

    results, errors = {}, []

    def pruner(name: str) -> None:
        try:
            results[name] = history.prune(db, now=FAR, batch=50)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    event.listen(db.engine, "before_cursor_execute", hold_a)
    a = threading.Thread(target=pruner, args=("a",), name="thp-pruner-a")
    try:
        a.start()
        assert a_folding.wait(10), "pruner A never reached its fold"
        pruner("b")
        b_done.set()
        a.join(30)
    finally:
        b_done.set()
        event.remove(db.engine, "before_cursor_execute", hold_a)
    assert not a.is_alive()
    assert errors == []
    assert_same_stats(admin.queue_stats(db, QUEUE, DAY), before)
    # A holds at least its batch; on a table this small InnoDB may scan and lock every
    # finished row for A's batch, and B then finds nothing to take: still harmless.
    assert results["a"].jobs >= 50 and results["a"].jobs + results["b"].jobs == 200
    assert results["a"].events + results["b"].events == 400
    assert finished_rows(db) == [] and count_events(db) == 0


def test_durations_keep_their_precision_in_rows_and_daily_stats(db):
    """A wait or run is a double: 123.456789 s stays that on the job and in the folded day."""
    admin.set_config(db, "stats-history", 3650)
    values = [123.456789, 0.00123456789, 59.9999995, 12345.678901]
    ids = add_jobs(db, [dict(state="succeeded", finished_at=at(seconds=i), wait_seconds=v, run_seconds=v)
                        for i, v in enumerate(values)])
    for job_id, value in zip(ids, values):
        job = admin.get_job(db, job_id)
        assert (job.wait_seconds, job.run_seconds) == (pytest.approx(value, rel=1e-12),) * 2
    expected = hand_timing(values)
    assert expected["histogram"] == {"2m": 1, "0s": 1, "59s": 1, "3h": 1}
    for stage in ("rows", "folded"):
        if stage == "folded":
            assert history.prune(db, now=FAR).jobs == 4
        stats = admin.queue_stats(db, QUEUE, DAY)
        for timing in (stats.wait, stats.run):
            assert timing.mean == pytest.approx(expected["mean"], rel=1e-12), stage
            assert timing.std == pytest.approx(expected["std"], rel=1e-12), stage
            assert timing.to_dict()["histogram"] == expected["histogram"], stage
