"""``enqueue --depends-on``, ``show`` of dependencies, ``cancel [--cascade | --all-failed]``, ``move``,
``priority`` and ``retry --all-failed`` as real subprocesses, on every backend.

Jobs are put in their states by the dialect's own transitions (claim, fail),
as a worker would; the commands only read and change them.  Refusals of
bad command lines happen before any database work and run on SQLite only.
"""

from __future__ import annotations

import pytest
from test_cli import db, enqueued_unchecked, failed_job, fails, mq, succeeds  # noqa: F401 - db: fixture

from mqueue import admin, cli
from mqueue.schema import CANCELED, FAILED, QUEUED, WAITING


def test_dependencies_show_cancel_and_cascade(db, database_url, tmp_path):
    url = ("--database", database_url)
    base = failed_job(db, queue="cjc")
    middle = enqueued_unchecked(mq("enqueue", "cjc.next", "--depends-on", base, *url, cwd=tmp_path))
    top = enqueued_unchecked(mq("enqueue", "cjc.next", "--depends-on", middle, "--depends-on", 10 ** 9,
                                *url, cwd=tmp_path))
    assert [admin.get_job(db, job).state for job in (middle, top)] == [WAITING, WAITING]
    assert admin.get_job(db, top).depends_on == (middle,)  # the unknown id counts as done

    shown = succeeds(mq("show", middle, *url, cwd=tmp_path))
    assert f"depends on:    {base} (failed); blocked by {base} (retry it to go on)" in shown
    assert f"dependents:    {top}" in succeeds(mq("show", middle, *url, cwd=tmp_path))
    assert succeeds(mq("show", base, *url, cwd=tmp_path)).count(f"dependents:    {middle}") == 1

    fails(mq("cancel", base, *url, cwd=tmp_path), cli.EXIT_STATE,
          f"job {base} has 1 waiting dependent(s) ({middle})", f"mqueue cancel {base} --cascade")
    assert admin.get_job(db, base).state == FAILED
    out = succeeds(mq("cancel", base, "--cascade", *url, cwd=tmp_path))
    assert f"cancelled job {base}" in out
    assert [admin.get_job(db, job).state for job in (base, middle, top)] == [CANCELED] * 3


def test_move_and_priority(db, database_url, tmp_path):
    url = ("--database", database_url)
    job = admin.enqueue_by_name(db, "cjc.next", {}, queue="a")
    out = succeeds(mq("move", job, "b", *url, cwd=tmp_path))
    assert out == f"job {job} (cjc.next, queued) is in queue b\n"
    out = succeeds(mq("priority", job, "-3", *url, cwd=tmp_path))
    assert out == f"job {job} (cjc.next, queued) has priority -3\n"
    history = succeeds(mq("show", job, *url, cwd=tmp_path))
    assert "moved: from a to b" in history and "priority: from 0 to -3" in history
    admin.cancel_job(db, job)
    fails(mq("move", job, "c", *url, cwd=tmp_path), cli.EXIT_STATE, f"job {job} has already finished (canceled)")
    fails(mq("priority", job, "1", *url, cwd=tmp_path), cli.EXIT_STATE, "already finished")
    fails(mq("move", 10 ** 9, "c", *url, cwd=tmp_path), cli.EXIT_NOT_FOUND, f"no job {10 ** 9}")


def test_retry_and_cancel_all_failed(db, database_url, tmp_path):
    url = ("--database", database_url)
    a = [failed_job(db, queue="qa") for _ in range(3)]
    b = [failed_job(db, queue="qb") for _ in range(2)]
    assert succeeds(mq("cancel", "--all-failed", "--queue", "qa", *url, cwd=tmp_path)) == \
        "cancelled 3 failed jobs in queue qa\n"
    assert {admin.get_job(db, job).state for job in a} == {CANCELED}
    assert succeeds(mq("retry", "--all-failed", *url, cwd=tmp_path)) == "retried 2 failed jobs\n"
    assert {admin.get_job(db, job).state for job in b} == {QUEUED}
    assert succeeds(mq("cancel", "--all-failed", *url, cwd=tmp_path)) == "cancelled 0 failed jobs\n"


@pytest.mark.backends("sqlite")
def test_bad_command_lines(tmp_path, database_url):
    url = ("--database", database_url)
    for args, fragment in ((("cancel", *url), "give a job ID or --all-failed"),
                           (("cancel", "1", "--all-failed", *url), "give a job ID or --all-failed"),
                           (("cancel", "1", "--queue", "q", *url), "--queue goes with --all-failed"),
                           (("cancel", "--all-failed", "--cascade", *url), "--cascade goes with a job ID"),
                           (("move", "1", *url), "the following arguments are required: QUEUE"),
                           (("priority", "1", "high", *url), "expected an integer"),
                           (("enqueue", "x", "--depends-on", "0", *url), "--depends-on")):
        fails(mq(*args, cwd=tmp_path), cli.EXIT_USAGE, fragment)
