"""SIGKILL at each point of a job's life, and a COMMIT whose reply never arrives.

Points not covered by ``tests/processes`` (which kills mid-task): while
the worker is busy with one job and another waits, after the task's writes just before the
worker commits, while the worker's COMMIT reply is held by the proxy, and
while a heartbeat waits on a lock.  After each: lost 0, duplicate and
phantom effects 0, the orphaned job runs again within lease + 5 s (unless
it had committed), and no daemon log holds a traceback.
"""

from __future__ import annotations

import signal
import time

import pytest
from helpers import wait_for
from jobs import (block_job, drained_and_checked, lease_expired, proxied, rerun, state_owner, work_effects,
                  work_jobs)
from ledger import COMPLETION, job_row, log_problems
from sqlalchemy import select, text

from mqueue.schema import task_table

LEASE = 2.0
RECOVERY_BAR = LEASE + 5


def kill(daemon) -> float:
    daemon.send(signal.SIGKILL)
    killed_at = time.time()
    assert daemon.wait(5) == -signal.SIGKILL
    return killed_at


def no_tracebacks(daemons):
    for daemon in daemons.started:
        assert log_problems(daemon.stderr()) == [], daemon.stderr()[-3000:]


def test_a_busy_worker_holds_no_job_it_has_not_started(backend, fdb, harness, fdaemons):
    """A worker claims no more jobs than it has free threads (issue 10, item 3).

    Before, a 1-thread worker busy with one job also held a prefetched one:
    another idle worker could not run it, and a SIGKILL charged it a failed
    run although it never started.
    """
    victim = fdaemons.start(concurrency=1, lease=LEASE, poll_interval=0.05)
    victim.wait_serving()
    blocker = block_job(fdb, harness, "start")
    wait_for(lambda: harness.reached(blocker, "start"), timeout=15, message=fdaemons.output)
    (waiting,) = work_jobs(fdb, harness, 1)
    time.sleep(1.0)  # twenty of the busy worker's poll intervals: it must leave the job alone
    assert state_owner(fdb, waiting) == ("queued", None)
    helper = fdaemons.start(concurrency=1, lease=LEASE, poll_interval=0.05)
    first = wait_for(lambda: next(iter(harness.starts(waiting)), None), timeout=15, message=fdaemons.output)
    assert first[2] == helper.pid and first[3] == 0   # run by the idle worker, never charged

    killed_at = kill(victim)
    again = rerun(harness, blocker, fdaemons, timeout=RECOVERY_BAR + 5)
    assert again[2] == helper.pid and again[4] - killed_at < RECOVERY_BAR
    drained_and_checked(fdb, harness, fdaemons)
    assert len(harness.starts(waiting)) == 1
    no_tracebacks(fdaemons)


def test_sigkill_after_the_writes_before_commit(backend, fdb, harness, fdaemons):
    victim = fdaemons.start(concurrency=1, lease=LEASE)
    victim.wait_serving()
    job_id = block_job(fdb, harness, "end")
    wait_for(lambda: harness.reached(job_id, "end"), timeout=15, message=fdaemons.output)
    rescuer = fdaemons.start(concurrency=1, lease=LEASE)
    rescuer.wait_serving()

    killed_at = kill(victim)
    again = rerun(harness, job_id, fdaemons, timeout=RECOVERY_BAR + 5)
    print(f"\n[{backend}] SIGKILL before COMMIT: ran again {again[4] - killed_at:.2f}s after the kill")
    assert again[2] == rescuer.pid and again[4] - killed_at < RECOVERY_BAR
    drained_and_checked(fdb, harness, fdaemons)
    assert [(r.job_id, r.pid) for r in work_effects(fdb)] == [(job_id, rescuer.pid)]
    no_tracebacks(fdaemons)


def test_sigkill_during_a_heartbeat(backend, fdb, harness, fdaemons):
    """The test locks the job's row (SQLite: the database) so the victim's heartbeat waits; then SIGKILL."""
    victim = fdaemons.start(concurrency=1, lease=LEASE)
    victim.wait_serving()
    job_id = block_job(fdb, harness, "start")
    wait_for(lambda: harness.reached(job_id, "start"), timeout=15, message=fdaemons.output)
    rescuer = fdaemons.start(concurrency=1, lease=LEASE)
    rescuer.wait_serving()

    with fdb.engine.connect() as conn:
        with conn.begin():
            if backend == "sqlite":
                conn.execute(text("UPDATE mqueue_task SET priority = priority WHERE id = :id"), {"id": job_id})
            else:
                conn.execute(select(task_table.c.id).where(task_table.c.id == job_id).with_for_update())
            # Heartbeats run every lease/4; the lease can only run out if they are stuck on our lock.
            wait_for(lambda: lease_expired(fdb, job_id), timeout=LEASE + 5,
                     message=lambda: f"the heartbeat was not blocked\n{fdaemons.output()}")
            killed_at = kill(victim)
    again = rerun(harness, job_id, fdaemons, timeout=RECOVERY_BAR + 5)
    print(f"\n[{backend}] SIGKILL during a heartbeat: ran again {again[4] - killed_at:.2f}s after the kill")
    assert again[2] == rescuer.pid and again[4] - killed_at < RECOVERY_BAR
    drained_and_checked(fdb, harness, fdaemons)
    no_tracebacks(fdaemons)


@pytest.mark.backends("mariadb", "postgresql")
@pytest.mark.parametrize("then_kill", [False, True], ids=["unknown-outcome", "sigkill-while-held"])
def test_commit_reply_held(backend, database_url, fdb, harness, fdaemons, proxy, then_kill):
    """The task's COMMIT reaches the server but its reply is held, then the connection is reset.

    The job did commit: its effect counts once and it never runs again,
    whether the worker learns the outcome by asking again (unknown outcome)
    or is killed while waiting for the reply.
    """
    victim = fdaemons.start(url=proxied(database_url, proxy), concurrency=1, lease=LEASE)
    victim.wait_serving()
    job_id = block_job(fdb, harness, "end")
    wait_for(lambda: harness.reached(job_id, "end"), timeout=15, message=fdaemons.output)
    rescuer = fdaemons.start(concurrency=1, lease=LEASE)
    rescuer.wait_serving()
    proxy.hold_commit(after=COMPLETION, hold_seconds=30 if then_kill else 1.0)
    harness.go(job_id)
    wait_for(lambda: proxy.commits_held == 1, timeout=10, message=fdaemons.output)
    wait_for(lambda: state_owner(fdb, job_id)[0] == "succeeded", timeout=10, message="the server did not commit")
    if then_kill:
        kill(victim)
        proxy.reset()
    else:
        outcome = wait_for(lambda: next((line for line in victim.stderr().splitlines()
                                         if f"job={job_id} task=" in line and "outcome=" in line), None),
                           timeout=15, message=victim.stderr)
        assert outcome.endswith("outcome=succeeded"), victim.stderr()
    # A wrong decision would hand the job to a rescue; the server already marked it succeeded.
    row = job_row(fdb, job_id)
    assert (row.state, row.runs, row.owner.split(":")[1]) == ("succeeded", 1, str(victim.pid))
    drained_and_checked(fdb, harness, fdaemons)
    assert [r.job_id for r in work_effects(fdb)] == [job_id]
    assert len(harness.starts(job_id)) == 1
    no_tracebacks(fdaemons)
