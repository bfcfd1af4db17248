"""Worker control with real daemons: pause and resume across daemons and restarts, the worker
registry through a SIGKILL, SIGUSR2/SIGCONT (also through a supervisor), queue order, and a
shared ``heartbeat`` reaching a running daemon.

Short leases (1-2 s) and a 0.05 s poll interval keep each test within seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from daemons import enqueue, first_start, job_row, jobs_left
from helpers import db_now, python_env, wait_for
from sqlalchemy import func, select

from mqueue import admin
from mqueue.schema import worker_table

POLL = 0.05


def mq(url: str, *args) -> str:
    """``python -m mqueue ARGS --database URL``; its stdout (it must succeed)."""
    result = subprocess.run([sys.executable, "-m", "mqueue", *args, "--database", url], env=python_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def workers_json(url: str) -> list[dict]:
    return json.loads(mq(url, "workers", "--json"))


def started(tasks, job_ids) -> set[int]:
    wanted = set(job_ids)
    return {run[0] for run in tasks.executions() if run[0] in wanted}


def all_started(tasks, job_ids, daemons, timeout: float = 30.0) -> None:
    wait_for(lambda: started(tasks, job_ids) == set(job_ids), timeout=timeout,
             message=lambda: f"not all of {job_ids} ran\n{daemons.output()}")


def effect_jobs(db, queue: str, count: int) -> list[int]:
    return enqueue(db, "proc.effect", [{"n": n} for n in range(count)], queue=queue)


def test_pause_stops_every_daemon_on_one_queue_while_the_other_flows(db, tasks, daemons, database_url):
    three = [daemons.start(("pa", "pb"), poll_interval=POLL) for _ in range(3)]
    for daemon in three:
        daemon.wait_serving()
    [blocked] = enqueue(db, "proc.block", [{}], queue="pa")
    first_start(tasks, blocked, daemons=daemons)

    assert "paused pa" in mq(database_url, "pause", "pa")
    time.sleep(5 * POLL)  # every daemon reads the paused set at least once per poll interval
    held = effect_jobs(db, "pa", 6)
    flowing = effect_jobs(db, "pb", 6)
    all_started(tasks, flowing, daemons)
    time.sleep(10 * POLL)
    assert started(tasks, held) == set()
    assert {q.queue: (q.paused, q.queued) for q in admin.stats(db)}["pa"] == (True, 6)

    tasks.release()  # a job running when its queue was paused finishes
    wait_for(lambda: job_row(db, blocked).state == "succeeded", timeout=20, message=daemons.output)

    mq(database_url, "resume", "pa")
    all_started(tasks, held, daemons)
    wait_for(lambda: jobs_left(db) == 0, timeout=20, message=daemons.output)


def test_a_pause_outlives_a_daemon_restart(db, tasks, daemons, database_url):
    first = daemons.start(("pa", "pb"), poll_interval=POLL)
    first.wait_serving()
    mq(database_url, "pause", "pa")
    first.send(signal.SIGTERM)
    assert first.wait(20) == 0

    second = daemons.start(("pa", "pb"), poll_interval=POLL)
    second.wait_serving()
    wait_for(lambda: "queue pa is paused" in second.stderr(), timeout=10, message=second.stderr)
    held = effect_jobs(db, "pa", 3)
    flowing = effect_jobs(db, "pb", 3)
    all_started(tasks, flowing, daemons)
    time.sleep(10 * POLL)
    assert started(tasks, held) == set()
    mq(database_url, "resume", "pa")
    all_started(tasks, held, daemons)


def test_workers_lists_live_daemons_and_drops_a_killed_one_after_three_leases(db, tasks, daemons, database_url):
    lease = 1.0
    victim, survivor = (daemons.start(("wa", "wb"), lease=lease, poll_interval=POLL) for _ in range(2))
    for daemon in (victim, survivor):
        daemon.wait_serving()
    listed = wait_for(lambda: (rows := workers_json(database_url)) and len(rows) == 2 and rows, timeout=20)
    assert sorted(row["pid"] for row in listed) == sorted([victim.pid, survivor.pid])
    assert all(row["queues"] == ["wa", "wb"] and row["claiming"] and row["lease_seconds"] == lease
               for row in listed)

    victim.send(signal.SIGKILL)
    killed_at = time.monotonic()
    assert victim.wait(5) == -signal.SIGKILL
    assert victim.pid in {row["pid"] for row in workers_json(database_url)}  # not yet: its leases run
    wait_for(lambda: {row["pid"] for row in workers_json(database_url)} == {survivor.pid}, timeout=20,
             message=daemons.output)
    gone_after = time.monotonic() - killed_at
    print(f"\nkilled worker dropped off `mqueue workers` {gone_after:.2f}s after SIGKILL (lease {lease:g}s)")
    assert gone_after >= 3 * lease - 1.0  # its last heartbeat was at most a quarter lease before the kill

    def stored():
        with db.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(worker_table)).scalar_one()
    wait_for(lambda: stored() == 1, timeout=20)  # the survivor's heartbeat deleted the dead row
    survivor.send(signal.SIGTERM)
    assert survivor.wait(20) == 0
    assert stored() == 0  # a clean stop deletes its own row
    assert "no live workers" in mq(database_url, "workers")


def stacks_logged(daemon, count: int = 1) -> bool:
    text = daemon.stderr()
    return text.count("received SIGUSR2: claiming stopped") >= count and "--- thread MainThread" in text \
        and "--- thread mqueue-heartbeat" in text


def test_sigusr2_stops_claiming_and_logs_stacks_until_sigcont(db, tasks, daemons, database_url):
    daemon = daemons.start(("sig",), concurrency=2, poll_interval=POLL)
    daemon.wait_serving()
    [blocked] = enqueue(db, "proc.block", [{}], queue="sig")
    first_start(tasks, blocked, daemons=daemons)

    daemon.send(signal.SIGUSR2)
    wait_for(lambda: stacks_logged(daemon), timeout=10, message=daemon.stderr)
    assert "in block" in daemon.stderr()  # the running task's frame is in the dump
    wait_for(lambda: [(w["claiming"], w["running"]) for w in workers_json(database_url)] == [(False, [blocked])],
             timeout=10)
    waiting = effect_jobs(db, "sig", 3)
    time.sleep(15 * POLL)
    assert started(tasks, waiting) == set()
    tasks.release()  # running jobs go on meanwhile
    wait_for(lambda: job_row(db, blocked).state == "succeeded", timeout=20, message=daemon.stderr)
    assert started(tasks, waiting) == set()

    daemon.send(signal.SIGCONT)
    all_started(tasks, waiting, daemons)
    wait_for(lambda: [w["claiming"] for w in workers_json(database_url)] == [True], timeout=10)
    assert "received SIGCONT: claiming again" in daemon.stderr()
    daemon.send(signal.SIGTERM)
    assert daemon.wait(20) == 0


def test_the_supervisor_passes_sigusr2_and_sigcont_on(db, tasks, daemons, database_url):
    supervisor = daemons.start(("sig",), processes=2, poll_interval=POLL)
    wait_for(lambda: len(supervisor.children()) == 2, timeout=20)
    for pid in supervisor.children():
        supervisor.wait_serving(pid=pid)
    wait_for(lambda: len(workers_json(database_url)) == 2, timeout=20)

    supervisor.send(signal.SIGUSR2)
    wait_for(lambda: stacks_logged(supervisor, 2), timeout=10, message=supervisor.stderr)
    wait_for(lambda: [w["claiming"] for w in workers_json(database_url)] == [False, False], timeout=10)
    waiting = effect_jobs(db, "sig", 4)
    time.sleep(15 * POLL)
    assert started(tasks, waiting) == set()

    supervisor.send(signal.SIGCONT)
    all_started(tasks, waiting, daemons)
    # One child may take every job before the other has logged its SIGCONT.
    wait_for(lambda: supervisor.stderr().count("received SIGCONT: claiming again") == 2, timeout=10,
             message=supervisor.stderr)
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(30) == 0


def queues_in_run_order(tasks, job_queue: dict[int, str]) -> list[str]:
    return [job_queue[run[0]] for run in tasks.executions() if run[0] in job_queue]


def test_round_robin_takes_in_turn_where_priority_drains_the_first_queue(db, tasks, daemons):
    for order, expected in (("priority", ["oa"] * 4 + ["ob"] * 4), ("round-robin", ["oa", "ob"] * 4)):
        job_queue = {job_id: queue for queue in ("oa", "ob") for job_id in effect_jobs(db, queue, 4)}
        daemon = daemons.start(("oa", "ob"), poll_interval=POLL, extra=["--order", order], name=order)
        all_started(tasks, list(job_queue), daemons)
        assert queues_in_run_order(tasks, job_queue) == expected, order
        daemon.send(signal.SIGTERM)
        assert daemon.wait(20) == 0


def test_a_changed_heartbeat_reaches_a_running_daemon(db, tasks, daemons, database_url):
    mq(database_url, "config", "heartbeat", "2")
    daemon = daemons.start(("hb",), lease=None, poll_interval=POLL)
    daemon.wait_serving()
    assert "lease 2.0s" in daemon.stderr()
    [blocked] = enqueue(db, "proc.block", [{}], queue="hb")
    first_start(tasks, blocked, daemons=daemons)

    def lease_left() -> float:
        return (job_row(db, blocked).lease_expires_at - db_now(db)).total_seconds()
    assert lease_left() <= 2.0

    assert "heartbeat:hb = 5" in mq(database_url, "config", "heartbeat:hb", "5")
    wait_for(lambda: [w["lease_seconds"] for w in workers_json(database_url)] == [5], timeout=20,
             message=daemon.stderr)
    wait_for(lambda: lease_left() > 3.0, timeout=10)  # its heartbeats extend the running job by 5 s now
    assert "lease now 5.0s" in daemon.stderr()
    tasks.release()
    wait_for(lambda: job_row(db, blocked).state == "succeeded", timeout=20)
    daemon.send(signal.SIGTERM)
    assert daemon.wait(20) == 0
