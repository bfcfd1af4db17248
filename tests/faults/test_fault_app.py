"""Faults on the application side and under contention.

* an application SIGKILLed before its enqueue transaction commits leaves no job;
* processes enqueueing the same ``unique_key`` at once get one job per key;
* a long job that heartbeats is never rescued, even with a short lease;
* an enqueue + claim + cancel + retry storm that provokes deadlocks and lock
  waits (MariaDB with the application at READ COMMITTED and at REPEATABLE
  READ) loses nothing, runs nothing twice and fails no job because of them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from helpers import python_env, wait_for
from jobs import drained_and_checked, work_jobs, work_effects
from ledger import job_rows, log_problems

ACTORS = str(Path(__file__).resolve().parent / "actors.py")


def actor(harness, url, role, *extra, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, ACTORS, role, url, str(harness.root), *extra], env=python_env(),
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def no_tracebacks(daemons):
    for daemon in daemons.started:
        assert log_problems(daemon.stderr()) == [], daemon.stderr()[-3000:]


def test_application_killed_before_its_enqueue_commits_leaves_no_job(backend, database_url, fdb, harness,
                                                                     fdaemons):
    daemon = fdaemons.start(concurrency=2, lease=2)
    app = actor(harness, database_url, "enqueue-and-hang")
    try:
        wait_for(lambda: harness.flag("enqueued").exists() or app.poll() is not None, timeout=30)
        assert app.poll() is None, app.stderr.read()
        app.send_signal(signal.SIGKILL)
        assert app.wait(10) == -signal.SIGKILL
    finally:
        if app.poll() is None:
            app.kill()
    daemon.wait_serving()
    # A job enqueued afterwards runs: the daemon is live and would have run the others too.
    (marker,) = work_jobs(fdb, harness, 1)
    drained_and_checked(fdb, harness, fdaemons)
    assert [r.job_id for r in work_effects(fdb)] == [marker]
    assert {a[1] for a in harness.starts()} == {marker}
    assert [(r.id, r.state) for r in job_rows(fdb)] == [(marker, "succeeded")]
    no_tracebacks(fdaemons)


def test_concurrent_unique_key_enqueues_from_processes(backend, database_url, fdb, harness, fdaemons):
    keys = 20
    apps = [actor(harness, database_url, "unique", "--keys", str(keys)) for _ in range(4)]
    # Every process waits for the flag, so their enqueues overlap.
    wait_for(lambda: all(a.poll() is None for a in apps), timeout=5)
    harness.flag("go").touch()
    answers = []
    for app in apps:
        out, err = app.communicate(timeout=60)
        assert app.returncode == 0, err
        answers.append(dict(line.split("=") for line in out.split()))
    for key in range(keys):
        ids = {answer[f"key-{key}"] for answer in answers}
        assert len(ids) == 1, f"key-{key} got several jobs: {ids}"
    rows = job_rows(fdb)
    assert len(rows) == keys and len({r.unique_key for r in rows}) == keys
    harness.record("C", [r.id for r in rows])
    fdaemons.start(concurrency=2, lease=2)
    drained_and_checked(fdb, harness, fdaemons)
    assert len(work_effects(fdb)) == keys


def test_long_job_that_heartbeats_is_never_rescued(backend, fdb, harness, fdaemons):
    pair = [fdaemons.start(concurrency=1, lease=1.0) for _ in range(2)]
    for daemon in pair:
        daemon.wait_serving()
    (job_id,) = work_jobs(fdb, harness, 1, sleep=4.0)  # four leases long
    drained_and_checked(fdb, harness, fdaemons, timeout=20)
    assert len(harness.starts(job_id)) == 1
    assert [r.job_id for r in work_effects(fdb)] == [job_id]
    for daemon in pair:
        assert "re-queued" not in daemon.stderr() and "lease lost" not in daemon.stderr()
    no_tracebacks(fdaemons)


STORM_SECONDS = 5


def test_enqueue_claim_cancel_retry_storm(backend, database_url, fdb, harness, fdaemons):
    storm(backend, database_url, fdb, harness, fdaemons, None)


@pytest.mark.backends("mariadb")
def test_enqueue_claim_cancel_retry_storm_application_at_repeatable_read(backend, database_url, fdb, harness,
                                                                         fdaemons):
    """MariaDB's default isolation for the application; the worker keeps READ COMMITTED on its own engine."""
    storm(backend, database_url, fdb, harness, fdaemons, "REPEATABLE READ")


def storm(backend, database_url, fdb, harness, fdaemons, isolation):
    extra = ["--seconds", str(STORM_SECONDS)] + (["--isolation", isolation] if isolation else [])
    for n in range(2):
        fdaemons.start(concurrency=3, lease=2)
    for daemon in fdaemons.started:
        daemon.wait_serving()
    apps = [actor(harness, database_url, "enqueue", *extra, "--seed", str(n)) for n in range(3)]
    apps += [actor(harness, database_url, "cancel", *extra, "--seed", str(10 + n)) for n in range(2)]
    outputs = []
    for app in apps:
        out, err = app.communicate(timeout=STORM_SECONDS + 60)
        assert app.returncode == 0, err
        assert "Traceback" not in err, err
        outputs.append(out)
    report = drained_and_checked(fdb, harness, fdaemons, timeout=60)
    seen = Counter(line.split(": ", 1)[1][:40] for out in outputs for line in out.splitlines()
                   if line.startswith("database error"))
    print(f"\n[{backend} {isolation or 'default'}] storm: {report.committed} committed, {report.done} done, "
          f"application-side database errors: {dict(seen) or 'none'}")
    assert report.done > 30
    no_tracebacks(fdaemons)
