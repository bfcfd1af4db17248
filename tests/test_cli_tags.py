"""``tag``, ``untag``, ``list --tag``, ``track``, ``untrack`` and ``events`` as real subprocesses.

The round trips run on every backend (the commands read and write tags and events through
each dialect); refusals of bad values happen before any database work and run on SQLite
only, while an unknown job id is looked up, so it runs everywhere.  Jobs are run by a
worker in this process; the commands only read and change them.
"""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest
from test_cli import column, db, fails, mq, succeeds  # noqa: F401 - db: the migrated database fixture

import mqueue
from mqueue import admin, cli
from mqueue.migrate import upgrade

QUEUE = "tct"
KINDS = ("put", "popped", "succeeded", "retried", "failed", "canceled", "expired", "moved", "stalled", "released")
#: ``ID TIME KIND job=JOB_ID queue=Q task=NAME [worker=W] [detail's first line]``; TIME may hold a space.
EVENT_LINE = re.compile(
    rf"^(?P<id>\d+) (?P<at>\d{{4}}-\d\d-\d\d.*?) (?P<kind>{'|'.join(KINDS)}) job=(?P<job>\d+) "
    r"queue=(?P<queue>\S+) task=(?P<task>\S+)(?: worker=(?P<worker>\S+))?(?: (?P<detail>.+))?$")


@mqueue.task(name="tct.send", queue=QUEUE)
def send(n: int) -> None:
    """Succeeds."""


@mqueue.task(name="tct.broken", queue=QUEUE, max_retries=0)
def broken() -> None:
    raise RuntimeError("smtp down")



def run_jobs(db) -> mqueue.Worker:
    w = mqueue.Worker(db, queues=[QUEUE], poll_interval=0.05, lease=10)
    w.run_until_empty(timeout=30)
    return w


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_tag_untag_and_list_by_tag(db, database_url, tmp_path):
    url = ("--database", database_url)
    with db.session():
        a = send.enqueue(1)
        b = send.options(tags=["account:42"]).enqueue(2)
        send.enqueue(3)

    out = succeeds(mq("tag", a, "account:42", "urgent", *url, cwd=tmp_path))
    assert {"account:42", "urgent"} <= set(re.split(r"[\s,]+", out))
    assert admin.get_job(db, a).tags == ("account:42", "urgent")
    out = succeeds(mq("untag", a, "urgent", *url, cwd=tmp_path))
    assert "account:42" in out and "urgent" not in out
    assert admin.get_job(db, a).tags == ("account:42",)

    lines = succeeds(mq("list", "--tag", "account:42", *url, cwd=tmp_path)).splitlines()
    assert sorted(column(lines, "ID")) == sorted([str(a), str(b)])
    listed = json.loads(succeeds(mq("list", "--tag", "account:42", "--json", *url, cwd=tmp_path)))
    assert sorted(job["id"] for job in listed) == [a, b]
    assert succeeds(mq("list", "--tag", "urgent", *url, cwd=tmp_path)).startswith("no jobs")


def test_track_untrack_and_events(db, database_url, tmp_path):
    url = ("--database", database_url)
    with db.session():
        a = send.enqueue(1)
        b = broken.options(track=True).enqueue()
        quiet = send.enqueue(2)
    succeeds(mq("track", a, *url, cwd=tmp_path))
    assert (admin.get_job(db, a).tracked, admin.get_job(db, quiet).tracked) == (True, False)
    w = run_jobs(db)
    succeeds(mq("untrack", a, *url, cwd=tmp_path))
    assert admin.get_job(db, a).tracked is False

    found = json_lines(succeeds(mq("events", "--json", *url, cwd=tmp_path)))
    assert {tuple(sorted(event)) for event in found} == {
        ("at", "detail", "id", "job_id", "kind", "name", "queue", "worker")}
    # ``a`` was tracked after its put, ``b`` from the start; the untracked job reports nothing.
    assert sorted((event["job_id"], event["kind"]) for event in found) == sorted(
        [(a, "popped"), (a, "succeeded"), (b, "put"), (b, "popped"), (b, "failed")])
    assert [event["id"] for event in found] == sorted({event["id"] for event in found})
    for event in found:
        assert event["queue"] == QUEUE and event["name"] == ("tct.send" if event["job_id"] == a else "tct.broken")
        assert isinstance(dt.datetime.fromisoformat(event["at"]), dt.datetime)
        if event["kind"] == "popped":
            assert event["worker"] == w.owner
    [failed] = [event for event in found if event["kind"] == "failed"]
    assert "RuntimeError: smtp down" in failed["detail"]

    lines = succeeds(mq("events", *url, cwd=tmp_path)).splitlines()
    assert len(lines) == len(found)  # one line per event, a traceback included
    for line, event in zip(lines, found):
        match = EVENT_LINE.match(line)
        assert match, line
        assert (int(match["id"]), match["kind"], int(match["job"]), match["queue"], match["task"]) == (
            event["id"], event["kind"], event["job_id"], event["queue"], event["name"])
        if event["kind"] == "popped":
            assert match["worker"] == w.owner

    only = json_lines(succeeds(mq("events", "--kind", "popped", "--job", a, "--json", *url, cwd=tmp_path)))
    assert [(event["kind"], event["job_id"]) for event in only] == [("popped", a)]
    after = json_lines(succeeds(mq("events", "--since", found[1]["id"], "--json", *url, cwd=tmp_path)))
    assert [event["id"] for event in after] == [event["id"] for event in found[2:]]


def test_an_unknown_job_exits_4_with_one_line(db, database_url, tmp_path):
    url = ("--database", database_url)
    for command in (("tag", 987654321, "urgent"), ("untag", 987654321, "urgent"), ("track", 987654321),
                    ("untrack", 987654321)):
        fails(mq(*command, *url, cwd=tmp_path), cli.EXIT_NOT_FOUND, "987654321")


@pytest.mark.backends("sqlite")
def test_bad_values_exit_2_with_one_line_and_change_nothing(db, database_url, tmp_path):
    url = ("--database", database_url)
    with db.session():
        job_id = send.enqueue(1)
    fails(mq("tag", job_id, "x" * 101, *url, cwd=tmp_path), cli.EXIT_USAGE, "100")
    fails(mq("tag", job_id, *(f"t{n}" for n in range(51)), *url, cwd=tmp_path), cli.EXIT_USAGE, "50")
    fails(mq("tag", job_id, "fine", "", *url, cwd=tmp_path), cli.EXIT_USAGE)
    fails(mq("tag", job_id, *url, cwd=tmp_path), cli.EXIT_USAGE)  # no tag at all
    fails(mq("events", "--kind", "nope", *url, cwd=tmp_path), cli.EXIT_USAGE, "nope")
    fails(mq("events", "--since", "yesterday", *url, cwd=tmp_path), cli.EXIT_USAGE, "yesterday")
    assert admin.get_job(db, job_id).tags == ()
