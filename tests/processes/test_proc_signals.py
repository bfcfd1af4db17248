"""Daemons under real signals: SIGKILL, SIGTERM (once and twice), SIGSTOP/SIGCONT.

``proc.block`` blocks its first run (retries 0) until the flag file exists;
a later run (after a rescue, retries >= 1) does not block.  On the server
backends it writes its effect before blocking, so the test also shows that a
killed or paused worker's uncommitted writes never count.  On SQLite it
writes after blocking: an open write transaction holds SQLite's only write
lock and would stall every other worker.
"""

from __future__ import annotations

import signal
import time

from daemons import effect_count, effects, enqueue, first_start, job_row, jobs_left, pause, stopped
from helpers import wait_for

LEASE = 2.0


def block_job(db, backend) -> int:
    (job_id,) = enqueue(db, "proc.block", [{"write_first": backend != "sqlite"}])
    return job_id


def rerun_of(tasks, job_id, daemons, timeout):
    """The first run of ``job_id`` after a rescue (retries >= 1)."""
    return wait_for(lambda: next((r for r in tasks.executions() if r[0] == job_id and r[2] >= 1), None),
                    timeout=timeout, message=lambda: f"job {job_id} was not run again\n{daemons.output()}")


def assert_done_once_by(db, job_id, pid, daemons):
    wait_for(lambda: jobs_left(db) == 0, timeout=15, message=lambda: f"{job_row(db, job_id)}\n{daemons.output()}")
    rows = effects(db)
    assert [(r.job_id, r.pid) for r in rows] == [(job_id, pid)], rows
    done = job_row(db, job_id)  # succeeded once, by that worker's run
    assert (done.state, done.owner.split(":")[1]) == ("succeeded", str(pid))


def test_sigkill_mid_task_runs_the_job_again_after_the_lease(backend, db, tasks, daemons):
    pair = [daemons.start(lease=LEASE) for _ in range(2)]
    for daemon in pair:
        daemon.wait_serving()
    job_id = block_job(db, backend)
    run = first_start(tasks, job_id, daemons=daemons)
    victim = daemons.by_pid(run[1])
    (other,) = [d for d in pair if d is not victim]

    victim.send(signal.SIGKILL)
    killed_at = time.time()
    assert victim.wait(5) == -signal.SIGKILL

    again = rerun_of(tasks, job_id, daemons, timeout=LEASE + 10)
    delay = again[3] - killed_at
    print(f"\n[{backend}] SIGKILL mid-task (lease {LEASE:g}s): job ran again {delay:.2f}s after the kill")
    assert again[1] == other.pid
    assert delay < LEASE + 6
    assert_done_once_by(db, job_id, other.pid, daemons)
    assert len(tasks.executions()) == 2


def test_sigterm_lets_the_running_task_finish_and_exits_0(backend, db, tasks, daemons):
    daemon = daemons.start(lease=LEASE)
    daemon.wait_serving()
    (job_id,) = enqueue(db, "proc.sleep", [{"seconds": 3}])
    first_start(tasks, job_id, daemons=daemons)
    daemon.send(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert_done_once_by(db, job_id, daemon.pid, daemons)
    assert len(tasks.executions()) == 1
    assert "Traceback" not in daemon.stderr()


def test_second_sigterm_exits_at_once_and_the_job_is_redelivered(backend, db, tasks, daemons):
    daemon = daemons.start(lease=LEASE, grace=30)
    daemon.wait_serving()
    job_id = block_job(db, backend)
    first_start(tasks, job_id, daemons=daemons)

    daemon.send(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in daemon.stderr(), timeout=5, message=daemon.stderr)
    assert daemon.alive()  # the first signal waits for the task (grace 30 s)
    daemon.send(signal.SIGTERM)
    sent = time.monotonic()
    assert daemon.wait(5) != 0
    assert time.monotonic() - sent < 2
    exited_at = time.time()

    # The job is still running by the database's account; a new daemon gets it
    # once its lease has expired.
    assert job_row(db, job_id).state == "running"
    successor = daemons.start(lease=LEASE)
    again = rerun_of(tasks, job_id, daemons, timeout=LEASE + 20)
    print(f"\n[{backend}] second SIGTERM: job re-delivered {again[3] - exited_at:.2f}s after the exit")
    assert again[1] == successor.pid
    assert_done_once_by(db, job_id, successor.pid, daemons)


def test_sigstop_past_the_lease_then_sigcont_completes_nothing(backend, db, tasks, daemons):
    pair = [daemons.start(lease=LEASE) for _ in range(2)]
    for daemon in pair:
        daemon.wait_serving()
    job_id = block_job(db, backend)
    run = first_start(tasks, job_id, daemons=daemons)
    victim = daemons.by_pid(run[1])
    (other,) = [d for d in pair if d is not victim]

    pause(victim, db, job_id)
    again = rerun_of(tasks, job_id, daemons, timeout=LEASE + 10)
    assert again[1] == other.pid
    assert_done_once_by(db, job_id, other.pid, daemons)

    # The paused worker wakes up, finishes its run and tries to complete it.
    tasks.release()
    victim.send(signal.SIGCONT)
    wait_for(lambda: f"job={job_id} " in victim.stderr() and "outcome=lost" in victim.stderr(), timeout=15,
             message=victim.stderr)
    assert [(r.job_id, r.pid) for r in effects(db)] == [(job_id, other.pid)]
    assert effect_count(db) == 1

    for daemon in pair:
        daemon.send(signal.SIGTERM)
    for daemon in pair:
        assert daemon.wait(20) == 0
        assert "Traceback" not in daemon.stderr()
