"""Events across real processes: ``mqueue events --follow`` hears another process within a
second and stops with exit 0 on SIGTERM or SIGINT; a completion that rolled back (a worker
SIGSTOPped past its lease) never shows up as ``succeeded``.

The daemons run the ``proctasks`` package written by ``daemons.write_tasks``.  The CLI
cannot enqueue a tracked job, so this process does, through stand-ins registered under the
same names and signatures (their bodies never run here).  Each follower's output lines are
stamped on arrival by a reader thread, and it runs without ``PYTHONUNBUFFERED``: a follower
must flush every line itself, or ``mqueue events --follow | grep`` would print nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemons import effects, first_start
from helpers import python_env, wait_for
from test_proc_signals import pause, rerun_of

import mqueue
from mqueue import admin
from mqueue.config import ENV_URL

LEASE = 2.0


@mqueue.task(name="proc.effect", queue="default")
def effect_job(n, sleep=0.0):
    """Stand-in: the daemons run ``proctasks``' own ``proc.effect``."""


@mqueue.task(name="proc.block", queue="default")
def block_job(write_first=False, seconds=30.0):
    """Stand-in: the daemons run ``proctasks``' own ``proc.block``."""


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT at its default, as for a command typed in a terminal
    (a test run started in the background inherits SIGINT ignored, and so would the child)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follower:
    """``python -m mqueue events --follow --json --since 0``; every line stamped as it arrives."""

    def __init__(self, url: str, root: Path, name: str) -> None:
        env = python_env()
        env.pop("PYTHONUNBUFFERED", None)
        env.pop(ENV_URL, None)
        self.err_path = root / f"{name}.err"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mqueue", "events", "--follow", "--json", "--since", "0", "--database", url],
            cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=self._err, text=True,
            preexec_fn=_ctrl_c_as_in_a_terminal)
        #: ``(monotonic, wall clock, line)`` of each line, in order.
        self.lines: list[tuple[float, float, str]] = []
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), time.time(), line))

    def events(self) -> list[tuple[float, float, dict]]:
        return [(mono, wall, json.loads(line)) for mono, wall, line in list(self.lines)]

    def seen(self, job_id: int, kind: str):
        """``(monotonic, wall clock, event)`` of the first such event printed, or None."""
        return next(((mono, wall, event) for mono, wall, event in self.events()
                     if event["job_id"] == job_id and event["kind"] == kind), None)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self, signum: int) -> int:
        os.kill(self.proc.pid, signum)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"follower still running 10s after {signum.name}:\n{self.stderr()}") from None
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        self.proc.stdout.close()
        self._err.close()


@pytest.fixture
def followers(database_url, tasks):
    """Starts followers; kills whatever is still running at the end."""
    started: list[Follower] = []

    def start(name: str) -> Follower:
        follower = Follower(database_url, tasks.root, name)
        started.append(follower)
        return follower

    yield start
    for follower in started:
        follower.close()


def test_events_follow_hears_another_process_within_a_second_and_stops_on_sigterm_and_sigint(
        backend, db, tasks, daemons, followers):
    daemon = daemons.start(lease=LEASE)
    by_signal = {signal.SIGTERM: followers("follow-term"), signal.SIGINT: followers("follow-int")}
    daemon.wait_serving()
    with db.session():
        first = effect_job.options(track=True).enqueue(n=1)
    for follower in by_signal.values():
        wait_for(lambda: follower.seen(first, "succeeded"), timeout=30,
                 message=lambda: f"{follower.lines}\n{follower.stderr()}\n{daemons.output()}")

    # Both followers are now waiting for news: this process puts a job, the daemon runs it.
    with db.session():
        second = effect_job.options(track=True).enqueue(n=2)
    committed = time.monotonic()
    for follower in by_signal.values():
        wait_for(lambda: follower.seen(second, "succeeded"), timeout=20,
                 message=lambda: f"{follower.lines}\n{follower.stderr()}\n{daemons.output()}")
    [completed_at] = [row.at for row in effects(db) if row.job_id == second]  # inside the completing transaction
    for follower in by_signal.values():
        put_arrived, _, _ = follower.seen(second, "put")
        _, done_arrived, _ = follower.seen(second, "succeeded")
        print(f"\n[{backend}] events --follow: put after {put_arrived - committed:.3f}s, "
              f"succeeded after {done_arrived - completed_at:.3f}s")
        assert put_arrived - committed < 1.0
        assert done_arrived - completed_at < 1.0
        mine = [event for _, _, event in follower.events() if event["job_id"] == second]
        assert [event["kind"] for event in mine] == ["put", "popped", "succeeded"]
        assert f":{daemon.pid}:" in mine[1]["worker"] and f":{daemon.pid}:" in mine[2]["worker"]
        assert all(event["queue"] == "default" and event["name"] == "proc.effect" for event in mine)
        assert isinstance(dt.datetime.fromisoformat(mine[0]["at"]), dt.datetime)

    for signum, follower in by_signal.items():
        assert follower.stop(signum) == 0, f"{signum.name}:\n{follower.stderr()}"
        assert "Traceback" not in follower.stderr()
    daemon.send(signal.SIGTERM)
    assert daemon.wait(20) == 0


def test_a_completion_rolled_back_under_sigstop_is_never_reported_as_succeeded(backend, db, tasks, daemons):
    pair = [daemons.start(lease=LEASE) for _ in range(2)]
    for daemon in pair:
        daemon.wait_serving()
    # On SQLite the task writes only after blocking: an open write transaction would stall everyone.
    with db.session():
        job_id = block_job.options(track=True).enqueue(write_first=backend != "sqlite")
    run = first_start(tasks, job_id, daemons=daemons)
    victim = daemons.by_pid(run[1])
    (other,) = [daemon for daemon in pair if daemon is not victim]

    pause(victim, db, job_id)  # past its lease: the other daemon rescues the job and runs it
    assert rerun_of(tasks, job_id, daemons, timeout=LEASE + 10)[1] == other.pid
    wait_for(lambda: admin.get_job(db, job_id).state == "succeeded", timeout=15,
             message=lambda: f"{admin.get_job(db, job_id)}\n{daemons.output()}")

    # The paused worker wakes up, ends its run and tries to complete it: refused.
    tasks.release()
    victim.send(signal.SIGCONT)
    wait_for(lambda: f"job={job_id} " in victim.stderr() and "outcome=lost" in victim.stderr(), timeout=15,
             message=victim.stderr)

    found = list(admin.events(db, job_id=job_id))
    assert [event.kind for event in found] == ["put", "popped", "stalled", "popped", "succeeded"]
    owners = [event.worker for event in found[1:]]
    assert [f":{pid}:" in owner for owner, pid in zip(owners, [victim.pid, victim.pid, other.pid, other.pid])] \
        == [True] * 4, owners
    assert [event.kind for event in admin.events(db)].count("succeeded") == 1
    assert [(row.job_id, row.pid) for row in effects(db)] == [(job_id, other.pid)]

    for daemon in pair:
        daemon.send(signal.SIGTERM)
    for daemon in pair:
        assert daemon.wait(20) == 0
        assert "Traceback" not in daemon.stderr()
