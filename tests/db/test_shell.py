"""``--exec`` in-process: the command line as parsed, and a Worker running a real command on every backend."""

from __future__ import annotations

from sqlalchemy import insert, select

import mqueue
from mqueue.cli import build_parser, split_exec, worker_argv
from mqueue.schema import task_table
from mqueue.shell import STDERR_TAIL_BYTES, ShellCommand


def parse(argv):
    argv, command = split_exec(argv)
    args = build_parser().parse_args(argv)
    if command is not None:
        args.exec = command
    return args


def test_the_commands_own_options_are_never_read_by_mqueue():
    args = parse(["start", "reports", "--concurrency", "2", "--timeout", "9", "--exec", "--",
                  "./report.sh", "--fast", "--timeout", "1", "--", "--exec", "x"])
    assert (args.queues, args.concurrency, args.timeout) == (["reports"], 2, 9.0)
    assert args.exec == ["./report.sh", "--fast", "--timeout", "1", "--", "--exec", "x"]
    assert parse(["start", "q", "--exec", "./r.sh", "-v"]).exec == ["./r.sh", "-v"]
    assert parse(["start", "q"]).exec is None
    # ``--exec`` as another command's data is just data
    assert parse(["enqueue", "--queue", "q", "name", '{"a": "--exec"}']).arguments == '{"a": "--exec"}'


def test_supervised_workers_get_the_same_command():
    """``--processes``: each child's command line carries the queues and the command apart."""
    args = parse(["start", "--kill-interval", "0.5", "--", "-q-", "other", "--exec", "--", "./r.sh", "--x"])
    args.log_level = "info"
    again = parse(worker_argv(args, "tasks"))
    assert (again.queues, again.exec, again.kill_interval, again.timeout, again.tasks, again.processes) == (
        ["-q-", "other"], ["./r.sh", "--x"], 0.5, None, None, 1)


def script(tmp_path, body: str) -> str:
    path = tmp_path / "command.sh"
    path.write_text(f"#!/bin/sh\nDIR='{tmp_path}'\n{body.strip()}\n")
    path.chmod(0o755)
    return str(path)


def add_job(db, args_text: str, max_retries: int | None = None) -> int:
    with db.engine.begin() as conn:
        return conn.execute(insert(task_table).values(queue="sh", name="any.label", args=args_text,
                                                      max_retries=max_retries)).inserted_primary_key[0]


def row(db, job_id):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).one()


def test_a_worker_runs_the_command_and_records_outcomes(db, tmp_path):
    command = ShellCommand([script(tmp_path, """
cat > "$DIR/stdin.$MQUEUE_JOB_ID"
if [ "$(cat "$DIR/stdin.$MQUEUE_JOB_ID")" = '{"fail": true}' ]; then
  head -c 10000 /dev/zero | tr '\\0' x >&2
  printf 'END OF STDERR' >&2
  exit 7
fi
""")])
    command.check()
    ok = add_job(db, '{"fine":  "ünïcode"}')
    bad = add_job(db, '{"fail": true}', max_retries=0)
    result = mqueue.Worker(db, queues=["sh"], lease=5, poll_interval=0.05, command=command).run_until_empty(timeout=30)
    assert (result.succeeded, result.failed, result.retried) == (1, 1, 0)
    assert (tmp_path / f"stdin.{ok}").read_text(encoding="utf-8") == '{"fine":  "ünïcode"}'
    assert row(db, ok).state == "succeeded"
    failed = row(db, bad)
    assert failed.state == "failed"
    *stderr, status = failed.last_error.rstrip("\n").split("\n")
    assert status == f"CommandFailed: {command.argv[0]} exited with status 7"
    assert stderr[-1].endswith("END OF STDERR")
    assert len("\n".join(stderr).encode()) == STDERR_TAIL_BYTES


def test_a_command_never_gets_the_database_url(monkeypatch):
    """The supervisor hands children the URL (with its password) in MQUEUE_DATABASE_URL; a command gets none."""
    from mqueue.config import ENV_URL
    from mqueue.dialects.base import ClaimedRow
    from mqueue.shell import child_environment
    monkeypatch.setenv(ENV_URL, "mysql+pymysql://app:s3cret@db/app")
    env = child_environment(ClaimedRow(7, "reports", "label", "{}", 2, None, 1, ()))
    assert ENV_URL not in env and "s3cret" not in " ".join(env.values())
    assert (env["MQUEUE_JOB_ID"], env["MQUEUE_QUEUE"], env["MQUEUE_RETRIES"]) == ("7", "reports", "2")
