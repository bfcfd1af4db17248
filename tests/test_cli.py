"""``python -m mqueue`` job commands, run as real subprocesses (cwd = tmp_path).

Every failure must be one line on stderr with a named exit code, never a
traceback, and never a database password.  Commands whose output does not
depend on the backend run on one backend each (a subprocess costs ~0.5 s);
list, show and stats run on all three.  Pure argument-parsing errors are
also checked in-process through ``cli.main`` for speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import python_env
from sqlalchemy import insert

import mqueue
from mqueue import admin, cli
from mqueue.config import ENV_URL
from mqueue.migrate import upgrade
from mqueue.schema import cron_table
from mqueue.session import safe_url

COMMANDS = ("start", "migrate", "enqueue", "list", "show", "cancel", "retry", "stats", "crons")
TRACEBACK = ('Traceback (most recent call last):\n  File "tasks.py", line 3, in send\n'
             '    raise ValueError("smtp down")\n'
             'ValueError: smtp down: the relay at mail.example.com refused the connection after 30 s\n')
SUMMARY = "ValueError: smtp down: the relay at mail.example.com refu..."  # the last line, cut to 60
PASSWORD = "s3cret"
UNREACHABLE_MYSQL = f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:1/x"
UNREACHABLE_POSTGRESQL = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/x"


def mq(*args, cwd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mqueue ARGS`` with the repository importable and no inherited database URL."""
    environment = python_env(env)
    if not env or ENV_URL not in env:
        environment.pop(ENV_URL, None)
    return subprocess.run([sys.executable, "-m", "mqueue", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=60)


def succeeds(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def enqueued_unchecked(result: subprocess.CompletedProcess[str]) -> int:
    """An enqueue with no tasks package to check against: the id on stdout, one warning on stderr."""
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "stored unchecked" in result.stderr, result.stderr
    return int(result.stdout)


def fails(result, code: int, *fragments: str) -> str:
    """Exit ``code``, nothing on stdout, exactly one line on stderr containing ``fragments``."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def db(database_url):
    database = mqueue.Database(database_url)
    upgrade(database)
    yield database
    database.dispose()


def claim(db, queue: str, owner: str = "web-1:77:aa"):
    with db.session() as session:
        [row] = db.dialect.claim_jobs(session, queue, 1, owner, 60)
    return row


def failed_job(db, name="cli_test.send", queue="bad", **kwargs) -> int:
    job_id = admin.enqueue_by_name(db, name, kwargs, queue=queue)
    row = claim(db, queue)
    with db.session() as session:
        assert db.dialect.fail_job(session, row.id, row.token, TRACEBACK)
    return job_id


def column(lines: list[str], title: str) -> list[str]:
    """The cells under ``title`` of an aligned table, left- or right-aligned ("" if empty).

    Cells are runs of text without double spaces; a cell belongs to the
    column whose title it overlaps.
    """
    cell = re.compile(r"\S+(?: \S+)*")
    start, end = {m.group(): m.span() for m in cell.finditer(lines[0])}[title]
    found = [[m.group() for m in cell.finditer(line) if m.start() < end and m.end() > start] for line in lines[1:]]
    assert all(len(cells) <= 1 for cells in found), found
    return [cells[0] if cells else "" for cells in found]


# -- the commands ----------------------------------------------------------------

def test_help_lists_every_command_and_the_default_database(tmp_path):
    text = succeeds(mq("--help", cwd=tmp_path))
    for command in COMMANDS:
        assert f"    {command} " in text
    parser = cli.build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) >= set(COMMANDS)
    for name, command in commands.choices.items():
        help_text = " ".join(command.format_help().split())
        assert f"${ENV_URL}, else sqlite:///mqueue.db" in help_text, name


def test_list_show_stats(db, database_url, tmp_path):
    scheduled = admin.enqueue_by_name(db, "cli_test.later", {}, delay=3600)
    queued = admin.enqueue_by_name(db, "cli_test.send", {"to": "a@example.com", "day": dt.date(2030, 1, 2)},
                                   priority=5)
    failed = failed_job(db, to="b@example.com")
    running = admin.enqueue_by_name(db, "cli_test.busy", {}, queue="busy")
    claim(db, "busy")

    lines = succeeds(mq("list", "--database", database_url, cwd=tmp_path)).splitlines()
    assert lines[0].split() == ["ID", "QUEUE", "TASK", "STATE", "PRIORITY", "ETA", "(UTC)", "RETRIES",
                                "LAST", "ERROR"]
    assert column(lines, "ID") == [str(i) for i in (running, queued, scheduled, failed)]
    assert column(lines, "TASK") == ["cli_test.busy", "cli_test.send", "cli_test.later", "cli_test.send"]
    assert column(lines, "STATE") == ["running", "queued", "queued", "failed"]
    assert column(lines, "PRIORITY") == ["0", "5", "0", "0"]
    assert column(lines, "RETRIES") == ["0", "0", "0", "1"]
    assert column(lines, "LAST ERROR") == ["", "", "", SUMMARY]
    assert "Traceback" not in "\n".join(lines)

    text = succeeds(mq("show", failed, "--database", database_url, cwd=tmp_path))
    assert text.startswith(f"job {failed}\n")
    for line in ("  task:          cli_test.send", "  queue:         bad", "  state:         failed",
                 "  retries:       1 (max default)", "    to = 'b@example.com'", *(
                     "    " + line.rstrip() for line in TRACEBACK.splitlines())):
        assert line + "\n" in text

    lines = succeeds(mq("stats", "--database", database_url, cwd=tmp_path)).splitlines()
    assert [line.split()[:5] for line in lines] == [
        ["QUEUE", "QUEUED", "SCHEDULED", "RUNNING", "FAILED"],
        ["bad", "0", "0", "0", "1"],
        ["busy", "0", "0", "1", "0"],
        ["default", "1", "1", "0", "0"]]
    assert re.fullmatch(r"\d+\.\d", lines[3].split()[-1]) and lines[1].endswith("-")


@pytest.mark.backends("sqlite")
def test_json_output_is_one_document(db, database_url, tmp_path):
    queued = admin.enqueue_by_name(db, "cli_test.send", {"day": dt.date(2030, 1, 2)})
    failed = failed_job(db)

    jobs = json.loads(succeeds(mq("list", "--json", "--state", "failed", "--database", database_url,
                                  cwd=tmp_path)))
    assert [(job["id"], job["state"], job["last_error"]) for job in jobs] == [(failed, "failed", TRACEBACK)]

    job = json.loads(succeeds(mq("show", queued, "--json", "--database", database_url, cwd=tmp_path)))
    assert job["args"] == {"day": {"$type": "date", "$value": "2030-01-02"}}
    assert job["eta"].endswith("+00:00") and job["name"] == "cli_test.send"

    queues = json.loads(succeeds(mq("stats", "--json", "--database", database_url, cwd=tmp_path)))
    assert [(q["queue"], q["queued"], q["failed"]) for q in queues] == [("bad", 0, 1), ("default", 1, 0)]
    assert queues[1]["oldest_due_seconds"] >= 0


@pytest.mark.backends("postgresql")
def test_enqueue_prints_only_the_new_id(db, database_url, tmp_path):
    result = mq("enqueue", "cli_test.report", '{"day": "2030-01-02", "n": [1, 2]}', "--delay", "60",
                "--priority", "-3", "--queue", "reports", "--database", database_url, cwd=tmp_path)
    out = str(enqueued_unchecked(result))
    assert result.stdout == out + "\n"
    job = admin.get_job(db, int(out))
    assert (job.name, job.queue, job.priority, job.decoded_args()) == (
        "cli_test.report", "reports", -3, {"day": "2030-01-02", "n": [1, 2]})
    with db.engine.connect() as conn:
        assert 30 < (job.eta - db.dialect.db_now(conn)).total_seconds() <= 60

    typed = '{"when": {"$type": "date", "$value": "2030-01-02"}}'
    job = admin.get_job(db, enqueued_unchecked(mq("enqueue", "cli_test.other", typed, "--database", database_url,
                                                  cwd=tmp_path)))
    assert (job.queue, job.priority, job.decoded_args()) == ("default", 0, {"when": dt.date(2030, 1, 2)})


@pytest.mark.backends("sqlite")
def test_enqueue_checks_names_and_arguments_against_the_tasks_package(db, database_url, tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "mail.py").write_text(textwrap.dedent("""\
        import mqueue

        @mqueue.task(queue="mail", priority=2)
        def send(to, subject="hi"):
            pass
        """))
    (tmp_path / "jobs.py").write_text(textwrap.dedent("""\
        import mqueue

        @mqueue.task(name="jobs.cleanup")
        def cleanup():
            pass
        """))
    url = ["--database", database_url]

    job = admin.get_job(db, int(succeeds(mq("enqueue", "tasks.mail.send", '{"to": "a"}', *url, cwd=tmp_path))))
    assert (job.name, job.queue, job.priority) == ("tasks.mail.send", "mail", 2)
    fails(mq("enqueue", "tasks.mail.sned", *url, cwd=tmp_path), cli.EXIT_USAGE,
          "unknown task 'tasks.mail.sned' (did you mean 'tasks.mail.send'?)")
    fails(mq("enqueue", "tasks.mail.send", '{"to": "a", "bcc": "b"}', *url, cwd=tmp_path), cli.EXIT_USAGE,
          "tasks.mail.send: got an unexpected keyword argument 'bcc'")
    fails(mq("enqueue", "jobs.clean", "--tasks", "jobs", *url, cwd=tmp_path), cli.EXIT_USAGE,
          "unknown task 'jobs.clean' (did you mean 'jobs.cleanup'?)")
    fails(mq("enqueue", "x.y", "--tasks", "nothere", *url, cwd=tmp_path), cli.EXIT_USAGE,
          "tasks package 'nothere' not found")

    broken = tmp_path / "broken"
    (broken / "tasks").mkdir(parents=True)
    (broken / "tasks" / "__init__.py").write_text("def oops(:\n")
    fails(mq("enqueue", "tasks.x", *url, cwd=broken), cli.EXIT_ERROR,
          "importing tasks package 'tasks' failed: SyntaxError")

    # No tasks package where it runs: stored unchecked, with a warning (tests/test_cli_first_hour.py).
    (tmp_path / "elsewhere").mkdir()
    job = admin.get_job(db, enqueued_unchecked(mq("enqueue", "tasks.mail.sned", *url, cwd=tmp_path / "elsewhere")))
    assert (job.name, job.queue) == ("tasks.mail.sned", "default")
    assert len(admin.list_jobs(db)) == 2


@pytest.mark.backends("mariadb")
def test_cancel_and_retry(db, database_url, tmp_path):
    url = ["--database", database_url]
    queued = admin.enqueue_by_name(db, "cli_test.x", {})
    out = succeeds(mq("cancel", queued, *url, cwd=tmp_path))
    assert out == f"cancelled job {queued} (cli_test.x, was queued)\n"
    assert [(j.id, j.state) for j in admin.list_jobs(db)] == [(queued, "canceled")]
    fails(mq("cancel", queued, *url, cwd=tmp_path), cli.EXIT_STATE,
          f"job {queued} has already finished (canceled) and cannot be cancelled")
    fails(mq("retry", queued, *url, cwd=tmp_path), cli.EXIT_STATE,
          f"job {queued} has already finished (canceled) and cannot be retried")
    assert admin.get_job(db, queued).state == "canceled"

    failed = failed_job(db)
    out = succeeds(mq("retry", failed, *url, cwd=tmp_path))
    assert out.startswith(f"job {failed} (cli_test.send) is queued, due ") and out.endswith(" UTC\n")
    job = admin.get_job(db, failed)
    assert (job.state, job.retries, job.last_error) == ("queued", 0, TRACEBACK)

    admin.cancel_job(db, failed)
    for queue in ("a", "a", "b"):
        failed_job(db, queue=queue)
    assert succeeds(mq("retry", "--all-failed", "--queue", "a", *url, cwd=tmp_path)) == \
        "retried 2 failed jobs in queue a\n"
    assert [j.queue for j in admin.list_jobs(db, state="failed")] == ["b"]
    assert succeeds(mq("retry", "--all-failed", *url, cwd=tmp_path)) == "retried 1 failed job\n"
    assert admin.list_jobs(db, state="failed") == []


@pytest.mark.backends("sqlite")
def test_crons(db, database_url, tmp_path):
    url = ["--database", database_url]
    assert succeeds(mq("crons", *url, cwd=tmp_path)).startswith("no crons")
    with db.engine.begin() as conn:
        conn.execute(insert(cron_table), [
            dict(name="tasks.nightly", queue="reports", schedule="0 3 * * *", tz="Europe/Berlin",
                 last_slot=dt.datetime(2030, 1, 1, 2, 0), next_slot=dt.datetime(2030, 1, 2, 2, 0), last_job_id=9),
            dict(name="tasks.poll", queue="default", schedule="*/5 * * * *", tz="UTC",
                 last_slot=None, next_slot=dt.datetime(2030, 1, 1, 0, 5), last_job_id=None)])
    lines = succeeds(mq("crons", *url, cwd=tmp_path)).splitlines()
    assert lines[0].split() == ["NAME", "QUEUE", "SCHEDULE", "TZ", "LAST", "RUN", "(UTC)", "NEXT", "RUN", "(UTC)"]
    assert column(lines, "NAME") == ["tasks.poll", "tasks.nightly"]
    assert column(lines, "SCHEDULE") == ["*/5 * * * *", "0 3 * * *"]
    assert column(lines, "TZ") == ["UTC", "Europe/Berlin"]
    assert column(lines, "LAST RUN (UTC)") == ["-", "2030-01-01 02:00:00"]
    assert column(lines, "NEXT RUN (UTC)") == ["2030-01-01 00:05:00", "2030-01-02 02:00:00"]
    crons = json.loads(succeeds(mq("crons", "--json", *url, cwd=tmp_path)))
    assert [(c["name"], c["last_run"], c["last_job_id"]) for c in crons] == [
        ("tasks.poll", None, None), ("tasks.nightly", "2030-01-01T02:00:00+00:00", 9)]


def test_default_database_is_sqlite_in_cwd_unless_the_environment_says(tmp_path):
    assert succeeds(mq("migrate", cwd=tmp_path)) == "mqueue tables are up to date in sqlite:///mqueue.db\n"
    job_id = enqueued_unchecked(mq("enqueue", "cli_test.x", cwd=tmp_path))
    assert [job["id"] for job in json.loads(succeeds(mq("list", "--json", cwd=tmp_path)))] == [job_id]
    assert (tmp_path / "mqueue.db").exists()
    fails(mq("stats", cwd=tmp_path, env={ENV_URL: "sqlite:///other.db"}), cli.EXIT_DATABASE,
          f"database file {tmp_path / 'other.db'} does not exist; run: python -m mqueue migrate to create it")
    assert not (tmp_path / "other.db").exists()


# -- bad input: one line, a named exit code, no traceback, no password -----------

@pytest.mark.backends("sqlite")
def test_bad_input_in_a_subprocess(db, database_url, tmp_path):
    url = ["--database", database_url]
    running = admin.enqueue_by_name(db, "cli_test.busy", {})
    claim(db, "default", owner="web-9:4321:ff")

    fails(mq("enqueue", "t.x", "{bad", *url, cwd=tmp_path), cli.EXIT_USAGE,
          "mqueue: error: invalid JSON for arguments: Expecting property name enclosed in double quotes")
    fails(mq("enqueue", "t.x", "[1, 2]", *url, cwd=tmp_path), cli.EXIT_USAGE,
          "arguments must be a JSON object of named arguments", "got an array")
    fails(mq("show", running + 1, *url, cwd=tmp_path), cli.EXIT_NOT_FOUND,
          f"no job {running + 1} (never existed, or finished and pruned after jobs-history)")
    fails(mq("cancel", running, *url, cwd=tmp_path), cli.EXIT_STATE,
          f"job {running} is running on worker web-9:4321:ff and cannot be cancelled safely")
    fails(mq("list", "--limit", "0", *url, cwd=tmp_path), cli.EXIT_USAGE,
          "mqueue list: error: argument --limit: expected a positive integer, got '0'")
    fails(mq("list", "--database", f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:notaport/x", cwd=tmp_path),
          cli.EXIT_USAGE, "cannot use database URL")
    assert admin.get_job(db, running).state == "running"


@pytest.mark.backends("postgresql")
def test_missing_tables(database_url, tmp_path):
    line = fails(mq("list", "--database", database_url, cwd=tmp_path), cli.EXIT_DATABASE)
    assert line == (f"mqueue: error: table mqueue_task missing in {safe_url(database_url)}; "
                    "run: python -m mqueue migrate")


@pytest.mark.parametrize("url", [UNREACHABLE_MYSQL, UNREACHABLE_POSTGRESQL, "sqlite:////nonexistent/dir/x.db"])
def test_unreachable_database(url, tmp_path):
    line = fails(mq("list", "--database", url, cwd=tmp_path), cli.EXIT_DATABASE, "cannot reach database")
    assert safe_url(url) in line


@pytest.mark.parametrize("args", [
    ["list"], ["show", "1"], ["cancel", "1"], ["retry", "1"], ["retry", "--all-failed"], ["stats"], ["crons"],
    ["enqueue", "t.x", "{}"], ["migrate"]])
def test_no_command_shows_the_password_of_an_unreachable_database(args, capsys):
    code = cli.main([*args, "--database", UNREACHABLE_MYSQL])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_DATABASE and out == ""
    assert err.splitlines() == [err.strip()]
    assert "cannot reach database mysql+pymysql://root:***@127.0.0.1:1/x" in err
    assert PASSWORD not in err


@pytest.mark.parametrize("args, fragment", [
    ([], "the following arguments are required: COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
    (["list", "--state", "done"], "argument --state: invalid choice: 'done'"),
    (["list", "--limit", "x"], "argument --limit: expected a positive integer, got 'x'"),
    (["show", "abc"], "argument ID: expected a positive integer, got 'abc'"),
    (["show"], "the following arguments are required: ID"),
    (["enqueue", "t.x", "--delay", "-5"], "argument --delay: expected a number of seconds >= 0, got '-5'"),
    (["enqueue", "t.x", "--priority", "high"], "argument --priority: expected an integer, got 'high'"),
    (["enqueue", "t.x", "--queue", ""], "argument --queue: expected a queue name of 1 to 100 characters"),
])
def test_bad_option_values(args, fragment, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    out, err = capsys.readouterr()
    assert exited.value.code == cli.EXIT_USAGE and out == ""
    assert len(err.splitlines()) == 1 and fragment in err and "--help" in err


@pytest.mark.parametrize("args, fragment", [
    (["retry"], "give a job ID or --all-failed"),
    (["retry", "1", "--all-failed"], "give a job ID or --all-failed"),
    (["retry", "1", "--queue", "a"], "--queue goes with --all-failed"),
    (["enqueue", "t.x", '{"a": NaN}'], "invalid JSON for arguments: NaN is not valid JSON"),
    (["enqueue", "t.x", '"text"'], "arguments must be a JSON object of named arguments"),
    (["enqueue", "t.x", '{"a": {"$type": "nope", "$value": 1}}'], "invalid arguments: args cannot be decoded"),
    (["list", "--database", "nonsense"], "cannot use database URL <unparsable database URL>"),
    (["list", "--database", f"oracle://scott:{PASSWORD}@db/x"], "cannot use database URL oracle://scott:***@db/x"),
])
def test_usage_errors_before_touching_the_database(args, fragment, capsys, tmp_path):
    untouched = tmp_path / "untouched.db"
    if "--database" not in args:
        args = [*args, "--database", f"sqlite:///{untouched}"]
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and out == ""
    assert len(err.splitlines()) == 1 and fragment in err and PASSWORD not in err
    assert not untouched.exists()


@pytest.mark.backends("sqlite")
def test_debug_log_level_adds_the_traceback(db, database_url, tmp_path):
    result = mq("--log-level", "debug", "show", "7", "--database", database_url, cwd=tmp_path)
    assert result.returncode == cli.EXIT_NOT_FOUND
    assert "Traceback" in result.stderr
    assert result.stderr.rstrip().endswith(
        "mqueue: error: no job 7 (never existed, or finished and pruned after jobs-history)")
