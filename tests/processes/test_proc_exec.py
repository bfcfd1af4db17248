"""``mqueue start QUEUE --exec COMMAND``: real daemons running real shell scripts, real signals.

Each script is written into ``tmp_path`` and records what it saw (stdin,
arguments, environment, the signals it got, its pids) in files next to it,
so the tests check the command's side of the contract, and the job rows
the queue's side.  Timeouts and kill intervals are fractions of a second.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from daemons import enqueue, job_row, pid_alive
from helpers import python_env, wait_for, whole_lines

import mqueue

QUEUE = "shell"
LEASE = 2.0


def script(tmp_path, name: str, body: str):
    """An executable ``/bin/sh`` script in ``tmp_path`` that runs with ``tmp_path`` as ``$DIR``."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nDIR='{tmp_path}'\n{body.strip()}\n")
    path.chmod(0o755)
    return path


def start(daemons, command, *options, **daemon_options):
    daemon = daemons.start([QUEUE], lease=LEASE, extra=[*options, "--exec", "--", *map(str, command)],
                           **daemon_options)
    if daemon_options.get("processes", 1) == 1:
        daemon.wait_serving()
    return daemon


def wait_row(db, job_id, predicate, daemons, timeout=10.0):
    return wait_for(lambda: (lambda row: row if row is not None and predicate(row) else None)(job_row(db, job_id)),
                    timeout=timeout, message=lambda: f"{job_row(db, job_id)}\n{daemons.output()}")


def lines(path) -> list[str]:
    return whole_lines(path)


def test_success_gets_args_on_stdin_id_last_and_environment(db, daemons, tmp_path):
    command = script(tmp_path, "ok.sh", """
cat > "$DIR/stdin.$MQUEUE_JOB_ID"
printf '%s\\n' "$@" > "$DIR/argv.$MQUEUE_JOB_ID"
echo "$MQUEUE_JOB_ID $MQUEUE_QUEUE $MQUEUE_RETRIES ${MQUEUE_DATABASE_URL:-no-url}" > "$DIR/env.$MQUEUE_JOB_ID"
echo "run $MQUEUE_JOB_ID" >> "$DIR/runs"
echo "hello from the report"
echo "second line"
""")
    stored = '{"n": 1,  "name": "report"}'   # as stored, spaces included: the child gets this text
    (job_id,) = enqueue(db, "reports.any_label", [{}], queue=QUEUE)
    with db.engine.begin() as conn:
        from sqlalchemy import update

        from mqueue.schema import task_table
        conn.execute(update(task_table).where(task_table.c.id == job_id).values(args=stored))
    daemon = start(daemons, [command, "--fast", "two words"])
    done = wait_row(db, job_id, lambda r: r.state == "succeeded", daemons)
    assert done.retries == 0
    assert (tmp_path / f"stdin.{job_id}").read_text() == stored
    assert lines(tmp_path / f"argv.{job_id}") == ["--fast", "two words", str(job_id)]
    assert lines(tmp_path / f"env.{job_id}") == [f"{job_id} {QUEUE} 0 no-url"]  # the URL (a password) is not passed on
    assert lines(tmp_path / "runs") == [f"run {job_id}"]
    log = wait_for(lambda: (lambda t: t if "second line" in t else None)(daemon.stderr()), timeout=5)
    assert f"job={job_id} stdout: hello from the report" in log
    assert f"job={job_id} stdout: second line" in log


def test_failure_keeps_status_and_stderr_tail_and_is_retried(db, daemons, tmp_path):
    command = script(tmp_path, "fail.sh", """
echo "run $MQUEUE_RETRIES" >> "$DIR/runs"
if [ "$MQUEUE_RETRIES" = 0 ]; then
  i=0; while [ $i -lt 200 ]; do echo "early noise line $i ............................"; i=$((i+1)); done >&2
  echo "could not reach the report server" >&2
  exit 3
fi
""")
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    start(daemons, [command])
    failed = wait_row(db, job_id, lambda r: r.retries == 1 and r.state == "queued", daemons)
    error = failed.last_error
    assert error.splitlines()[-1] == f"CommandFailed: {command} exited with status 3"
    assert "could not reach the report server" in error
    assert "early noise line 199" in error and "early noise line 0 " not in error  # only the tail
    assert len(error.encode()) < 4096 + 200
    mqueue.admin.retry_job(db, job_id)  # the backoff's first wait is a minute: due now
    done = wait_row(db, job_id, lambda r: r.state == "succeeded", daemons)
    assert done.retries == 1
    assert lines(tmp_path / "runs") == ["run 0", "run 1"]


def test_a_child_killed_by_a_signal_is_a_failed_run(db, daemons, tmp_path):
    command = script(tmp_path, "killed.sh", 'echo "dying" >&2\nkill -USR1 $$\nsleep 5')
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    start(daemons, [command])
    failed = wait_row(db, job_id, lambda r: r.retries == 1 and r.state == "queued", daemons)
    assert failed.last_error.splitlines()[-1] == f"CommandFailed: {command} was killed by SIGUSR1"
    assert "dying" in failed.last_error


TERM_LOGGER = """
trap 'echo "term $(date +%s.%N)" >> "$DIR/terms"' TERM
(trap '' TERM; exec sleep 60) &
echo $! > "$DIR/grandchild"
echo $$ > "$DIR/child"
echo "run $MQUEUE_RETRIES" >> "$DIR/runs"
while :; do sleep 0.05; done
"""


def test_timeout_terms_the_group_three_times_then_kills_it(db, daemons, tmp_path):
    command = script(tmp_path, "stubborn.sh", TERM_LOGGER)
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    started = time.monotonic()
    start(daemons, [command], "--timeout", "0.5", "--kill-interval", "0.3")
    failed = wait_row(db, job_id, lambda r: r.retries == 1 and r.state == "queued", daemons)
    assert time.monotonic() - started < 10
    assert failed.last_error.splitlines()[-1].startswith(
        f"CommandTimeout: {command} ran past its timeout of 0.5 s and was stopped (was killed by SIGKILL)")
    terms = [float(line.split()[1]) for line in lines(tmp_path / "terms")]
    assert len(terms) == 3, terms
    assert all(0.15 < b - a < 1.0 for a, b in zip(terms, terms[1:])), terms
    for name in ("child", "grandchild"):   # the whole group is gone, the child that ignores SIGTERM too
        pid = int((tmp_path / name).read_text())
        wait_for(lambda: not pid_alive(pid), timeout=5, message=f"{name} {pid} still alive")
    assert lines(tmp_path / "runs") == ["run 0"]


def test_sigterm_to_the_worker_gives_grace_then_kills_and_hands_back(db, daemons, tmp_path):
    command = script(tmp_path, "long.sh", TERM_LOGGER)
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    daemon = start(daemons, [command], "--kill-interval", "0.2", grace=0.8)
    wait_for(lambda: (tmp_path / "child").exists() and lines(tmp_path / "runs"), timeout=10,
             message=daemons.output)
    child = int((tmp_path / "child").read_text())
    signalled = time.time()
    daemon.send(signal.SIGTERM)
    assert daemon.wait(10) == 0
    terms = [float(line.split()[1]) for line in lines(tmp_path / "terms")]
    assert len(terms) == 3 and terms[0] - signalled >= 0.7, (terms, signalled)  # only after the grace
    assert not pid_alive(child)
    row = job_row(db, job_id)
    assert (row.state, row.retries, row.last_error) == ("queued", 0, None)  # handed back, not charged
    assert "handing it back" in daemon.stderr()


def test_a_worker_killed_by_sigkill_takes_its_child_along_and_the_job_runs_again_once(db, daemons, tmp_path):
    command = script(tmp_path, "once.sh", """
echo "run $MQUEUE_RETRIES" >> "$DIR/runs"
if [ "$MQUEUE_RETRIES" = 0 ]; then echo $$ > "$DIR/child"; while :; do sleep 0.05; done; fi
""")
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    victim = start(daemons, [command])
    wait_for(lambda: (tmp_path / "child").exists(), timeout=10, message=daemons.output)
    child = int((tmp_path / "child").read_text())
    victim.send(signal.SIGKILL)
    victim.wait(5)
    wait_for(lambda: not pid_alive(child), timeout=3, message=f"child {child} outlived its worker")
    start(daemons, [command])
    done = wait_row(db, job_id, lambda r: r.state == "succeeded", daemons, timeout=LEASE + 10)
    assert done.retries >= 1
    assert lines(tmp_path / "runs") == ["run 0", f"run {done.retries}"]


def test_a_row_cannot_change_the_command(db, daemons, tmp_path):
    command = script(tmp_path, "safe.sh", """
cat > "$DIR/stdin.$MQUEUE_JOB_ID"
printf '%s\\n' "$@" > "$DIR/argv.$MQUEUE_JOB_ID"
""")
    hostile = {"cmd": f"$(touch {tmp_path}/pwned1); `touch {tmp_path}/pwned2`",
               "q": "it's \"quoted\" | touch x; && ||\nnew line", "u": "café ✓ 日本"}
    text = json.dumps(hostile, ensure_ascii=False)
    (job_id,) = enqueue(db, f"; touch {tmp_path}/pwned3", [{}], queue=QUEUE)
    from sqlalchemy import update

    from mqueue.schema import task_table
    with db.engine.begin() as conn:
        conn.execute(update(task_table).where(task_table.c.id == job_id).values(args=text))
    start(daemons, [command], processes=2)
    wait_row(db, job_id, lambda r: r.state == "succeeded", daemons)
    assert (tmp_path / f"stdin.{job_id}").read_bytes() == text.encode("utf-8")
    assert lines(tmp_path / f"argv.{job_id}") == [str(job_id)]
    assert not any((tmp_path / name).exists() for name in ("pwned1", "pwned2", "pwned3", "x"))


@pytest.mark.parametrize("problem", ["missing", "not executable"])
def test_a_command_that_cannot_start_fails_at_start_up(db, database_url, tmp_path, problem):
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    path = tmp_path / "report.sh"
    if problem == "not executable":
        path.write_text("#!/bin/sh\n")
    for processes in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "mqueue", "start", QUEUE, "--database", database_url,
                               "--processes", processes, "--exec", "--", str(path), "--flag"],
                              capture_output=True, text=True, timeout=30, env=python_env(), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith("mqueue: error: --exec command ") and str(path) in line, line
    row = job_row(db, job_id)
    assert (row.state, row.retries, row.owner, row.started_at) == ("queued", 0, None, None)


def test_a_command_whose_job_was_taken_back_is_stopped(db, daemons, tmp_path):
    """``mqueue retry --force`` takes the running job back: the heartbeat finds the lease gone, the command is stopped."""
    command = script(tmp_path, "taken.sh", """
echo "run $$" >> "$DIR/runs"
if [ ! -e "$DIR/child" ]; then echo $$ > "$DIR/child"; while :; do sleep 0.05; done; fi
""")
    (job_id,) = enqueue(db, "reports.build", [{}], queue=QUEUE)
    daemon = start(daemons, [command], "--kill-interval", "0.2")
    wait_for(lambda: (tmp_path / "child").exists(), timeout=10, message=daemons.output)
    child = int((tmp_path / "child").read_text())
    mqueue.admin.retry_job(db, job_id, force=True)
    wait_for(lambda: not pid_alive(child), timeout=5, message=lambda: f"{child} still running\n{daemons.output()}")
    wait_row(db, job_id, lambda r: r.state == "succeeded", daemons)
    assert len(lines(tmp_path / "runs")) == 2
    assert "the job's lease was lost" in daemon.stderr()
