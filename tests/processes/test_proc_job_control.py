"""Job control with real daemons: fan-in, moving a running job, bulk retry while workers drain.

Each run start is a line in the tasks' execution log and each success of
``proc.effect`` one row in ``effect`` (written in the job's own
transaction), so a test counts runs and effects separately: "exactly once"
means one effect per job, whatever the number of runs.
"""

from __future__ import annotations

import collections
import json
import signal

from daemons import effects, enqueue, first_start, job_row, jobs_left, pause
from helpers import wait_for
from sqlalchemy import insert

from mqueue import admin
from mqueue.schema import FAILED, QUEUED, SUCCEEDED, WAITING, task_table

LEASE = 2.0


def wait_drained(db, daemons, timeout: float) -> None:
    wait_for(lambda: jobs_left(db) == 0, timeout=timeout,
             message=lambda: f"{jobs_left(db)} job(s) left\n{daemons.output()}")


def stop_all(daemons) -> None:
    for daemon in daemons.started:
        if daemon.alive():
            daemon.send(signal.SIGTERM)
    for daemon in daemons.started:
        assert daemon.wait(30) == 0, daemon.stderr()[-3000:]
        assert "Traceback" not in daemon.stderr()


def test_fan_in_of_1000_runs_the_last_job_once(tasks, db, daemons):
    """Three daemons of four threads complete the 1,000 dependencies, many at the same moment."""
    quiet = enqueue(db, "proc.quiet", [{"n": n} for n in range(500)])      # completed in batches
    writing = enqueue(db, "proc.effect", [{"n": n} for n in range(500, 1000)])  # completed in the task's transaction
    last = admin.enqueue_by_name(db, "proc.effect", {"n": -1}, depends_on=quiet + writing)
    assert (job_row(db, last).state, job_row(db, last).pending_deps) == (WAITING, 1000)
    for _ in range(3):
        daemons.start(concurrency=4, lease=10)
    wait_drained(db, daemons, timeout=90)
    stop_all(daemons)

    runs = collections.Counter(run[0] for run in tasks.executions())
    assert runs[last] == 1
    assert set(runs) == set(quiet + writing + [last])
    assert [e.job_id for e in effects(db)].count(last) == 1
    final = job_row(db, last)
    assert (final.state, final.runs, final.pending_deps) == (SUCCEEDED, 1, 0)
    started = {run[0]: run[3] for run in tasks.executions()}
    assert started[last] >= max(at for job_id, at in started.items() if job_id != last)


def test_move_of_a_running_job(tasks, db, daemons, backend):
    """A paused worker's job is moved; a worker of the new queue runs it; the old run's completion is refused."""
    (job_id,) = enqueue(db, "proc.block", [{"write_first": backend != "sqlite"}], queue="old")
    old = daemons.start(("old",), lease=LEASE)
    run = first_start(tasks, job_id, daemons=daemons)
    assert run[1] == old.pid
    pause(old, db, job_id)

    moved = admin.move_job(db, job_id, "new")
    assert (moved.state, moved.queue) == (QUEUED, "new")
    tasks.release()  # the next run does not block
    new = daemons.start(("new",), lease=LEASE)
    wait_for(lambda: job_row(db, job_id).state == SUCCEEDED, timeout=20, message=daemons.output)
    assert [(e.job_id, e.pid) for e in effects(db)] == [(job_id, new.pid)]

    old.send(signal.SIGCONT)
    wait_for(lambda: f"job={job_id} " in old.stderr() and "outcome=lost" in old.stderr(), timeout=20,
             message=old.stderr)
    stop_all(daemons)
    assert [(e.job_id, e.pid) for e in effects(db)] == [(job_id, new.pid)]
    assert [run[1] for run in tasks.executions()] == [old.pid, new.pid]
    job = admin.get_job(db, job_id)
    assert (job.queue, job.runs) == ("new", 2)
    assert ("moved", "from old to new") in [(e.kind, e.detail) for e in job.history]


def test_bulk_retry_of_5000_failed_jobs_while_two_workers_drain(tasks, db, daemons):
    rows = [dict(queue="default", name="proc.effect", args=json.dumps({"n": n}), state=FAILED, retries=1,
                 last_error="RuntimeError: down") for n in range(5000)]
    with db.engine.begin() as conn:
        for start in range(0, len(rows), 500):
            conn.execute(insert(task_table), rows[start:start + 500])
    pair = [daemons.start(concurrency=4, lease=10) for _ in range(2)]
    for daemon in pair:
        daemon.wait_serving()

    assert admin.retry_failed(db) == 5000  # batch by batch, while the daemons claim the first ones
    wait_drained(db, daemons, timeout=100)
    stop_all(daemons)

    done = collections.Counter(e.job_id for e in effects(db))
    assert len(done) == 5000 and set(done.values()) == {1}
    runs = collections.Counter(run[0] for run in tasks.executions())
    assert set(runs) == set(done) and set(runs.values()) == {1}
    assert {run[1] for run in tasks.executions()} == {daemon.pid for daemon in pair}
