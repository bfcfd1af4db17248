"""Many worker processes drain one queue: every job's effect exactly once; the supervisor."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from daemons import effect_count, effects, enqueue, job_states, jobs_left, pid_alive
from helpers import wait_for

JOBS = 3000
QUIET = 1000  # of JOBS: tasks that write nothing, completed in batches


def test_four_processes_of_four_threads_drain_3000_jobs_exactly_once(backend, db, tasks, daemons):
    if backend == "mariadb":
        # One supervisor with four worker processes...
        supervisor = daemons.start(processes=4, concurrency=4, lease=5)
        workers = wait_for(lambda: len(supervisor.children()) == 4 and supervisor.children(), timeout=20)
        for pid in workers:
            supervisor.wait_serving(pid=pid)
        stoppers = [supervisor]
    else:
        # ... or four separate daemons.
        stoppers = [daemons.start(concurrency=4, lease=5) for _ in range(4)]
        for daemon in stoppers:
            daemon.wait_serving()
        workers = [d.pid for d in stoppers]

    started = time.monotonic()
    ids = enqueue(db, "proc.effect", [{"n": n} for n in range(JOBS - QUIET)])
    quiet = enqueue(db, "proc.quiet", [{"n": n} for n in range(QUIET)])
    wait_for(lambda: jobs_left(db) == 0, timeout=180, interval=0.25,
             message=lambda: f"{jobs_left(db)} jobs left, {effect_count(db)} effects\n{daemons.output()}")
    elapsed = time.monotonic() - started
    print(f"\n[{backend}] {JOBS} jobs drained by 4 processes x 4 threads in {elapsed:.1f}s "
          f"({JOBS / elapsed:.0f} jobs/s)")

    rows = effects(db)
    per_job = Counter(row.job_id for row in rows)
    assert sorted(per_job) == sorted(ids)
    assert [job for job, count in per_job.items() if count != 1] == []
    runs = tasks.executions()
    assert len(runs) == JOBS, Counter(Counter(r[0] for r in runs).values())
    assert {r[0] for r in runs} == set(ids) | set(quiet)
    assert job_states(db) == {"succeeded": JOBS}  # each one finished once, none left to run again
    assert {row.pid for row in rows} == set(workers), "every worker process served jobs"

    for daemon in stoppers:
        daemon.send(signal.SIGTERM)
    for daemon in stoppers:
        assert daemon.wait(30) == 0
        assert "Traceback" not in daemon.stderr()


def test_supervisor_restarts_a_killed_worker_process_and_stops_cleanly(db, tasks, daemons):
    supervisor = daemons.start(processes=2, lease=2)
    first = wait_for(lambda: len(supervisor.children()) == 2 and supervisor.children(), timeout=20)
    for pid in first:
        supervisor.wait_serving(pid=pid)

    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: (lambda now: len(now) == 2 and victim not in now and now)(supervisor.children()),
                        timeout=20, message=lambda: f"children {supervisor.children()}\n{supervisor.stderr()}")
    assert survivor in replaced
    (newcomer,) = set(replaced) - {survivor}
    supervisor.wait_serving(pid=newcomer)

    # Each process holds only the job it runs (no prefetch), so the
    # newcomer must take part in draining these.
    ids = enqueue(db, "proc.effect", [{"n": n, "sleep": 0.05} for n in range(40)])
    wait_for(lambda: jobs_left(db) == 0, timeout=60, message=lambda: supervisor.stderr())
    served = Counter(row.pid for row in effects(db) if row.job_id in set(ids))
    assert served[newcomer] > 0, served
    assert sum(served.values()) == 40
    assert job_states(db) == {"succeeded": 40}

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait(40) == 0
    wait_for(lambda: not any(pid_alive(pid) for pid in replaced), timeout=10)
    log = supervisor.stderr()
    for pid in replaced:
        assert any(f":{pid}:" in line and line.endswith(" stopped") for line in log.splitlines()), log
    assert "Traceback" not in log
