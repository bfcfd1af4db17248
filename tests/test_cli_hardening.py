"""The command line against hostile input: level names in any case, huge numbers, deep JSON.

Every case ends in one line on stderr and a named exit code, never a
traceback (issue 10, item 12).  Most run in-process through ``cli.main``;
the package attribute ``mqueue.migrate`` needs a fresh interpreter, since
this one imported ``mqueue.migrate`` long ago.
"""

from __future__ import annotations

import json

import pytest
from helpers import run_python

import mqueue
from mqueue import admin, cli

HUGE = "9" * 30


def one_line_error(capsys, args, code: int, *fragments: str) -> str:
    """``cli.main(args)`` fails with ``code`` and one stderr line containing ``fragments``."""
    try:
        result = cli.main(args)
    except SystemExit as exited:  # argparse's own exit
        result = exited.code
    out, err = capsys.readouterr()
    assert result == code, (result, out, err)
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


@pytest.mark.parametrize("level", ["DEBUG", "Info", "warning", "ERROR"])
def test_log_level_names_in_any_case(level):
    args = cli.build_parser().parse_args(["start", "q", "--log-level", level])
    assert args.log_level == level.lower()
    args = cli.build_parser().parse_args(["--log-level", level, "stats"])
    assert args.log_level == level.lower()


def test_an_unknown_log_level_is_one_line(capsys):
    one_line_error(capsys, ["--log-level", "Verbose", "stats"], cli.EXIT_USAGE,
                   "argument --log-level: invalid choice: 'verbose'")


@pytest.mark.parametrize("args, fragment", [
    (["show", HUGE], f"argument ID: expected a positive integer up to {2 ** 63 - 1}, got '{HUGE}'"),
    (["cancel", HUGE], "argument ID: expected a positive integer up to"),
    (["retry", HUGE], "argument ID: expected a positive integer up to"),
    (["list", "--limit", str(10 ** 30)], "argument --limit: expected a positive integer up to"),
    (["list", "--limit", "1" * 5000], "argument --limit: expected a positive integer, got '111"),
    (["enqueue", "t.x", "--priority", str(10 ** 30)],
     "argument --priority: expected an integer from -2147483647 to 2147483647"),
    (["enqueue", "t.x", "--priority", str(-2 ** 31)], "argument --priority: expected an integer from"),
    (["enqueue", "t.x", "--delay", "1e300"], "argument --delay: expected a number of seconds >= 0 up to"),
    (["start", "q", "--concurrency", str(10 ** 30)], "argument --concurrency: expected a positive integer up to"),
    (["start", "q", "--processes", str(10 ** 30)], "argument --processes: expected a positive integer up to"),
    (["start", "q", "--lease", "1e400"], "argument --lease: expected a positive number of seconds up to"),
    (["start", "q", "--grace", "inf"], "argument --grace: expected a number of seconds >= 0 up to"),
])
def test_huge_numbers_are_one_line(args, fragment, capsys, database_url, db):
    line = one_line_error(capsys, [*args, "--database", database_url], cli.EXIT_USAGE, fragment)
    assert len(line) < 250


def test_the_largest_numbers_accepted_work_on_every_backend(capsys, database_url, db):
    one_line_error(capsys, ["show", str(2 ** 63 - 1), "--database", database_url], cli.EXIT_NOT_FOUND,
                   f"no job {2 ** 63 - 1}")
    for priority in (2 ** 31 - 1, -(2 ** 31 - 1)):
        assert cli.main(["enqueue", "t.x", "--priority", str(priority), "--database", database_url]) == 0
    assert cli.main(["list", "--limit", str(2 ** 63 - 1), "--database", database_url]) == 0
    out = capsys.readouterr().out
    assert [job.priority for job in admin.list_jobs(db)] == [2 ** 31 - 1, -(2 ** 31 - 1)]
    assert out.count("t.x") == 2


def nested(depth: int) -> str:
    return json.dumps({"a": json.loads("[" * (depth - 1) + "]" * (depth - 1))})


@pytest.mark.parametrize("depth", [cli.MAX_ARGUMENT_DEPTH + 1, 500, 50_000])
def test_deeply_nested_json_arguments_are_one_line(depth, capsys, tmp_path):
    text = nested(depth) if depth < 1000 else '{"a": ' + "[" * depth + "]" * depth + "}"
    untouched = tmp_path / "untouched.db"
    one_line_error(capsys, ["enqueue", "t.x", text, "--database", f"sqlite:///{untouched}"], cli.EXIT_USAGE,
                   f"invalid JSON for arguments: nested deeper than {cli.MAX_ARGUMENT_DEPTH} levels")
    assert not untouched.exists()


def test_arguments_nested_to_the_limit_are_stored(capsys, database_url, db):
    assert cli.main(["enqueue", "t.x", nested(cli.MAX_ARGUMENT_DEPTH), "--database", database_url]) == 0
    job_id = int(capsys.readouterr().out)
    assert admin.get_job(db, job_id).decoded_args() == json.loads(nested(cli.MAX_ARGUMENT_DEPTH))


@pytest.mark.parametrize("handle", ["url", "database"])
def test_migrate_is_an_attribute_of_the_package(handle, database_url):
    code = ("import sys, mqueue\n"
            "url = sys.argv[1]\n"
            f"mqueue.migrate.upgrade({'url' if handle == 'url' else 'mqueue.Database(url)'})\n"
            "mqueue.Database(url).check_schema()\n"
            "print(mqueue.admin.stats(url))\n")
    result = run_python(["-c", code, database_url])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    mqueue.Database(database_url).check_schema()
