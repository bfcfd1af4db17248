"""mqueue on a three-node MariaDB Galera cluster: exactly once through lost races and a killed node.

Row locks (and so SKIP LOCKED) are local to a node: workers on two nodes
claim the same rows and one commit fails certification (1213).  These tests
check that such a lost race is retried at once (never an outage backoff),
that every job's effect happens once, that a node killed with SIGKILL and
rejoined by IST costs nothing, that crons ticking on every node enqueue each
slot once, and that one ``unique_key`` never makes two live jobs.

The lease (10 s) is above the commit stall of a node failure on this
cluster (failure detection shortened to ``evs.suspect_timeout`` 2 s, so
about 3 s) plus one heartbeat interval (a quarter of the lease): see the
README, "Running on a Galera cluster".
"""

from __future__ import annotations

import collections
import datetime as dt
import re
import signal
import threading

import pytest
from daemons import effects, enqueue, job_states, jobs_left
from helpers import wait_for
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

import mqueue
from mqueue.cron import Schedule
from mqueue.scheduler import Cron, Scheduler
from mqueue.schema import cron_table, task_table

pytestmark = [pytest.mark.backends("mariadb"), pytest.mark.timeout(300)]

LEASE = 10.0


def checker(url: str) -> mqueue.Database:
    """A handle whose reads wait until the node has applied every earlier commit of the cluster."""
    return mqueue.Database(url, connect_args={"init_command": "SET SESSION wsrep_sync_wait = 1",
                                              "read_timeout": 60})


def claim_conflicts(daemon) -> int:
    """The claim conflicts the daemon's stop summary reports (the line must be there)."""
    found = re.findall(r" totals: .* (\d+) claim conflicts", daemon.stderr())
    assert found, f"{daemon} logged no summary:\n{daemon.stderr()[-3000:]}"
    return int(found[-1])


def start_on_every_node(daemons, node_urls, **options):
    started = [daemons.start(url=url, name=f"node{n + 1}", lease=LEASE, **options)
               for n, url in enumerate(node_urls)]
    for daemon in started:
        daemon.wait_serving(timeout=30)
    return started


def stop_all(started) -> None:
    for daemon in started:
        daemon.send(signal.SIGTERM)
    for daemon in started:
        assert daemon.wait(60) == 0, daemon.stderr()[-3000:]


def test_daemons_on_three_nodes_drain_exactly_once(backend, galera, node_urls, tasks, daemons):
    jobs = 600
    db = checker(node_urls[0])
    ids = enqueue(db, "proc.effect", [{"n": n} for n in range(jobs)])
    started = start_on_every_node(daemons, node_urls, concurrency=2)
    wait_for(lambda: jobs_left(db) == 0, timeout=120, message=daemons.output)
    stop_all(started)

    rows = effects(db)
    assert sorted(row.job_id for row in rows) == sorted(ids)          # every effect once
    assert sorted(run[0] for run in tasks.executions()) == sorted(ids)  # and every task run once
    assert job_states(db) == {"succeeded": jobs}
    for url in node_urls[1:]:  # every node holds the same
        other = checker(url)
        assert len(effects(other)) == jobs and job_states(other) == {"succeeded": jobs}
        other.dispose()
    by_pid = {daemon.pid: sum(row.pid == daemon.pid for row in rows) for daemon in started}
    assert all(count >= jobs // 20 for count in by_pid.values()), by_pid  # no node's worker starved
    conflicts = sum(claim_conflicts(daemon) for daemon in started)
    for daemon in started:
        assert "database unavailable" not in daemon.stderr(), daemon.stderr()[-3000:]
    print(f"\n{jobs} jobs on 3 nodes: {conflicts} claim conflicts, each retried at once; runs per daemon {by_pid}")
    db.dispose()


def test_node_killed_mid_drain_rejoins_by_ist_and_nothing_is_lost_or_doubled(backend, galera, node_urls, tasks,
                                                                              daemons):
    jobs = 900
    db = checker(node_urls[0])
    ids = enqueue(db, "proc.effect", [{"n": n, "sleep": 0.005} for n in range(jobs)])
    started = start_on_every_node(daemons, node_urls, concurrency=2, grace=5)
    wait_for(lambda: len(effects(db)) >= jobs // 4, timeout=60, message=daemons.output)
    galera.kill(2)            # SIGKILL node 3 under its daemon
    galera.restart(2)         # recovered position, rejoins by IST
    assert galera.joined_by_ist(2), galera.nodes[2].log_tail()
    wait_for(lambda: jobs_left(db) == 0, timeout=120, message=daemons.output)

    rows = effects(db)
    assert len(rows) == jobs and sorted(row.job_id for row in rows) == sorted(ids)  # none lost, none doubled
    assert job_states(db) == {"succeeded": jobs}

    # Every daemon recovered on its own: the one on node 3 is back, and each one runs jobs of a second batch.
    wait_for(lambda: "database available again" in started[2].stderr(), timeout=30, message=daemons.output)
    more = enqueue(db, "proc.effect", [{"n": n, "sleep": 0.05} for n in range(90)])
    wait_for(lambda: jobs_left(db) == 0, timeout=90, message=daemons.output)
    rows = effects(db)
    assert len(rows) == jobs + len(more) and len({row.job_id for row in rows}) == len(rows)
    ran_more = {row.pid for row in rows if row.job_id in set(more)}
    assert ran_more == {daemon.pid for daemon in started}, (ran_more, started[2].stderr()[-4000:])
    # The commit stall of the failure (about 3 s here) stayed inside the healthy workers' leases.
    for daemon in started[:2]:
        assert "lease lost" not in daemon.stderr(), daemon.stderr()[-3000:]
    stop_all(started)
    db.dispose()


@mqueue.task(name="galera.cron_job")
def cron_job() -> None:
    pass


def test_crons_ticking_on_every_node_enqueue_each_slot_once(backend, galera, node_urls):
    slots = 15
    queue = "galera_cron"
    cron = Cron(cron_job, Schedule.parse("* * * * *"), queue, skip_if_scheduled=False)
    databases = [mqueue.Database(url) for url in node_urls]
    schedulers = [Scheduler(db, [queue], crons={cron.name: cron}) for db in databases]
    start = dt.datetime(2030, 1, 1, 0, 0, 1)
    barrier = threading.Barrier(len(schedulers))
    created: list[list[int]] = [[] for _ in schedulers]
    errors: list[BaseException] = []

    def tick_every_slot(n: int) -> None:
        try:
            for minute in range(slots + 1):   # the first tick syncs the table (slot 00:01 is the first)
                barrier.wait(timeout=30)      # all three nodes take the same slot at the same moment
                created[n] += schedulers[n].tick(now=start + dt.timedelta(minutes=minute))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=tick_every_slot, args=(n,)) for n in range(len(schedulers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors          # a losing tick never raises
    assert sum(len(ids) for ids in created) == slots
    check = checker(node_urls[0])
    with check.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(task_table)
                            .where(task_table.c.queue == queue)).scalar_one() == slots
        assert conn.execute(select(cron_table.c.last_slot)).scalar_one() == dt.datetime(2030, 1, 1, 0, slots)
    print(f"\n{slots} slots ticked on 3 nodes at once: {sum(s.conflicts for s in schedulers)} lost races")
    for db in databases + [check]:
        db.dispose()


@mqueue.task(name="galera.unique")
def unique_job(n: int) -> None:
    pass


def test_unique_key_enqueued_on_two_nodes_at_once_never_makes_two_live_jobs(backend, galera, node_urls):
    keys = 60
    databases = [mqueue.Database(url) for url in node_urls[:2]]
    barrier = threading.Barrier(2)
    seen: list[tuple[int, str]] = []
    ids: list[dict[str, int]] = [{}, {}]
    errors: list[BaseException] = []

    def enqueue_plain(n: int) -> None:
        """Both nodes enqueue key ``a<k>`` at the same moment, each in its own transaction."""
        db = databases[n]
        for k in range(keys):
            barrier.wait(timeout=30)
            job_id = None
            try:
                with db.session():
                    job_id = unique_job.options(unique_key=f"a{k}").enqueue(n=k)
                ids[n][f"a{k}"] = job_id   # committed (a losing COMMIT raised before this line)
            except DBAPIError as error:
                if not db.dialect.is_conflict(error):
                    raise
                # The losing transaction, rolled back whole: where, and with which error.
                seen.append((error.orig.args[0], "at commit" if job_id is not None else "at a statement"))

    def enqueue_retried(n: int) -> None:
        """The same through run_transaction: the loser runs again and gets the winner's id."""
        db = databases[n]
        for k in range(keys):
            barrier.wait(timeout=30)
            ids[n][f"b{k}"] = mqueue.run_transaction(
                db, lambda session: unique_job.options(unique_key=f"b{k}").enqueue(n=k))

    def run(n: int) -> None:
        try:
            enqueue_plain(n)
            enqueue_retried(n)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    check = checker(node_urls[2])   # the third node sees the cluster's outcome
    with check.engine.connect() as conn:
        live = dict(conn.execute(select(task_table.c.unique_key, func.count()).group_by(task_table.c.unique_key)
                                 ).all())
    assert live == {**{f"a{k}": 1 for k in range(keys)}, **{f"b{k}": 1 for k in range(keys)}}
    for k in range(keys):   # the two sides agree on the one job of each retried key
        assert ids[0][f"b{k}"] == ids[1][f"b{k}"]
    for key in [f"a{k}" for k in range(keys)]:
        found = {side[key] for side in ids if key in side}
        assert len(found) == 1
    print(f"\n{keys} races of one unique_key on two nodes: the loser's transaction failed "
          f"{dict(collections.Counter(seen))}; through run_transaction never")
    for db in databases + [check]:
        db.dispose()
