"""``start --processes N`` under real signals: what the supervisor restarts, shows and leaves behind.

Items 10, 16 and 17 of issue 10: a child that can only fail again is not
restarted; no child's command line (``ps``) shows the database password;
children of a supervisor killed with SIGKILL hand their jobs back and exit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from daemons import first_start, enqueue, job_row, pid_alive
from helpers import server_user, wait_for

from mqueue import cli


def serving_children(supervisor, count: int) -> list[int]:
    kids = wait_for(lambda: len(supervisor.children()) == count and supervisor.children(), timeout=20,
                    message=supervisor.stderr)
    for pid in kids:
        supervisor.wait_serving(pid=pid)
    return kids


def kill_all(pids) -> None:
    """Test clean-up: children outlive a SIGKILLed supervisor when the code under test is wrong."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_child_that_exits_with_a_usage_status_is_not_restarted(db, tasks, daemons):
    supervisor = daemons.start(processes=2, lease=2)
    first, second = serving_children(supervisor, 2)
    # A deploy removed the tasks package: a new worker process can only fail ("not found", status 2).
    (tasks.root / "proctasks").rename(tasks.root / "proctasks-gone")
    os.kill(first, signal.SIGKILL)
    try:
        assert supervisor.wait(15) == cli.EXIT_USAGE
        wait_for(lambda: not pid_alive(second), timeout=10, message=supervisor.stderr)
    finally:
        kill_all([second])
    log = supervisor.stderr()
    assert log.count("started worker process") == 3, log
    assert "which a restart does not fix" in log
    assert "tasks package 'proctasks' not found" in log
    assert "Traceback" not in log


@pytest.mark.backends("mariadb", "postgresql")
def test_no_child_shows_the_database_password_on_its_command_line(backend, database_url, db, tasks, daemons):
    with server_user(backend, database_url) as url:
        password = url.split(":")[2].split("@")[0]
        assert len(password) > 8 and password in url
        supervisor = daemons.start(url=url, processes=2, lease=2)
        kids = serving_children(supervisor, 2)
        for pid in kids:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert password not in command_line
            assert "--database" not in command_line.split("\0")
        (job_id,) = enqueue(db, "proc.effect", [{"n": 1}])
        wait_for(lambda: job_row(db, job_id).state == "succeeded", timeout=20, message=supervisor.stderr)
        supervisor.send(signal.SIGTERM)
        assert supervisor.wait(20) == 0
        assert password not in supervisor.stderr()


def test_children_of_a_killed_supervisor_hand_back_their_jobs_and_exit(backend, db, tasks, daemons):
    supervisor = daemons.start(processes=2, lease=30, grace=0.5)
    kids = serving_children(supervisor, 2)
    (job_id,) = enqueue(db, "proc.block", [{"write_first": False}])
    run = first_start(tasks, job_id, daemons=daemons)
    assert run[1] in kids
    try:
        supervisor.send(signal.SIGKILL)
        assert supervisor.wait(5) == -signal.SIGKILL
        wait_for(lambda: not any(pid_alive(pid) for pid in kids), timeout=5,
                 message=lambda: f"still running: {[pid for pid in kids if pid_alive(pid)]}")
    finally:
        kill_all(kids)
    row = job_row(db, job_id)
    assert row.state == "queued", row  # handed back at once, not left to a 30 s lease, not failed
    assert row.retries == 0
    assert [r[0] for r in tasks.executions()] == [job_id]
