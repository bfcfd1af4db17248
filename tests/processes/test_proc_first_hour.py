"""First-hour behaviour of real daemons (issue 11): outage logging, forcing a stuck job back,
and ``mqueue.start()`` logging to stderr by itself."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from daemons import effects, enqueue, first_start, job_row, pause
from helpers import attempts_possible, python_env, wait_for
from test_proc_outage import proxied, proxy  # noqa: F401 - ``proxy`` is a fixture


OUTAGE_SECONDS = 6.0
#: A cron that is never due during a test: its loop still reads ``mqueue_cron`` every second.
CRONS = '''
import mqueue


@mqueue.cron("0 0 1 1 *", name="proc.new_year")
def new_year():
    pass
'''


@pytest.mark.backends("mariadb", "postgresql")
def test_an_outage_is_one_warning_per_backoff_step_for_the_whole_worker(database_url, tasks, daemons, proxy):
    (tasks.root / "proctasks" / "crons.py").write_text(CRONS)
    daemon = daemons.start(url=proxied(database_url, proxy), lease=2)
    daemon.wait_serving()
    wait_for(lambda: "cron=proc.new_year" in daemon.stderr(), message=daemon.stderr)
    before = len(daemon.stderr().splitlines())

    proxy.refuse()
    proxy.reset()
    started = time.monotonic()
    time.sleep(OUTAGE_SECONDS)  # the outage itself: claiming, rescuing and the cron loop all fail meanwhile
    proxy.passthrough()
    elapsed = time.monotonic() - started
    wait_for(lambda: "database available again" in daemon.stderr(), timeout=15, message=daemon.stderr)
    daemon.send(signal.SIGTERM)
    assert daemon.wait(30) == 0

    lines = daemon.stderr().splitlines()[before:]
    warnings = [line for line in lines if " WARNING " in line]
    attempts = [int(re.search(r"\(attempt (\d+)\)", line).group(1)) for line in warnings]
    # Each step logged once, by whichever loop got there first: 1, 2, 3, ... never a step twice.
    assert attempts == list(range(1, len(warnings) + 1)), "\n".join(warnings)
    assert len(warnings) <= attempts_possible(elapsed) + 1, "\n".join(warnings)
    assert all("database unavailable while" in line for line in warnings)
    assert sum("database available again" in line for line in lines) == 1


# -- item 7: mqueue.start() from Python logs to stderr unless the application set up logging ------

START_SCRIPT = '''
import logging, sys
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(name)s %(message)s")
import mqueue
mqueue.start("default", sys.argv[1], package="proctasks", poll_interval=0.05, lease=2)
'''


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("logging_setup", ["none", "configured"])
def test_start_from_python_logs_to_stderr_unless_the_application_configured_logging(
        database_url, db, tasks, logging_setup):
    (job_id,) = enqueue(db, "proc.effect", [{"n": 1}])
    env = python_env(tasks.env())
    env["PYTHONPATH"] = f"{tasks.root}:{env['PYTHONPATH']}"
    err_path = tasks.root / "start.err"

    def output() -> str:
        return err_path.read_text()

    with open(err_path, "wb") as err:
        process = subprocess.Popen([sys.executable, "-c", START_SCRIPT, database_url, logging_setup],
                                   cwd=tasks.root, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: f"job={job_id} " in output() and "outcome=succeeded" in output(), timeout=30,
                     message=output)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    lines = output().splitlines()
    served = [line for line in lines if " serving default " in line]
    succeeded = [line for line in lines if f"job={job_id} " in line and "outcome=succeeded" in line]
    assert len(served) == 1 and len(succeeded) == 1, lines  # once: never twice through two handlers
    if logging_setup == "none":
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO mqueue\.executor: job=", succeeded[0])
    else:
        assert succeeded[0].startswith("APP INFO mqueue.executor job=")


# -- item 12: retry --force takes a job back from a frozen worker; the fence refuses its run ------

FORCE_LEASE = 10.0


def test_retry_force_runs_a_frozen_workers_job_once_elsewhere(backend, database_url, db, tasks, daemons):
    frozen = daemons.start(lease=FORCE_LEASE, name="frozen")
    frozen.wait_serving()
    # On the servers the first run writes its effect before it blocks (an open transaction that
    # must never commit); on SQLite that would hold the only write lock, so it writes after.
    (job_id,) = enqueue(db, "proc.block", [{"write_first": backend != "sqlite"}])
    first = first_start(tasks, job_id, daemons=daemons)
    assert first[1] == frozen.pid
    pause(frozen, db, job_id)
    frozen_at = time.time()

    forced = subprocess.run([sys.executable, "-m", "mqueue", "retry", str(job_id), "--force", "--database",
                             database_url], env=python_env(), capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and forced.stderr == "", forced.stderr
    assert forced.stdout.startswith(f"job {job_id} (proc.block) is queued, due ")
    assert job_row(db, job_id).state == "queued"

    tasks.release()  # the flag a blocked run waits for: the next run does not block
    other = daemons.start(lease=FORCE_LEASE, name="other")
    wait_for(lambda: [(r.job_id, r.pid) for r in effects(db)] == [(job_id, other.pid)], timeout=20,
             message=daemons.output)
    second = [run for run in tasks.executions() if run[1] == other.pid]
    assert len(second) == 1 and second[0][3] - frozen_at < FORCE_LEASE  # forced back, not rescued by lease
    wait_for(lambda: job_row(db, job_id) is None or job_row(db, job_id).state == "succeeded",
             message=daemons.output)

    # The frozen worker wakes up, finishes its run and tries to complete it: refused, rolled back.
    frozen.send(signal.SIGCONT)
    wait_for(lambda: f"job={job_id} " in frozen.stderr() and "outcome=lost" in frozen.stderr(), timeout=20,
             message=frozen.stderr)
    assert [(r.job_id, r.pid) for r in effects(db)] == [(job_id, other.pid)]
    assert [run[1] for run in tasks.executions()] == [frozen.pid, other.pid]

    for daemon in (frozen, other):
        daemon.send(signal.SIGTERM)
    for daemon in (frozen, other):
        assert daemon.wait(20) == 0
        assert "Traceback" not in daemon.stderr()
