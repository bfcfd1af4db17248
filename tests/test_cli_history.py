"""``show``, ``list --state``, ``stats QUEUE`` and ``config`` for finished jobs, as real subprocesses.

Jobs are driven through the dialect's own transitions (claim, a failed run
retried, a completion) so the history is known exactly without a worker.
"""

from __future__ import annotations

import json

import pytest
from test_cli import db, fails, mq, succeeds  # noqa: F401 - db: the migrated database fixture

import mqueue
from mqueue import admin, cli
from mqueue.encoding import encode_args
from mqueue.migrate import upgrade

WORKER = "web-1:77:aa"



def add(db, queue: str = "hist") -> int:
    with db.session() as session:
        return db.dialect.insert_job(session.connection(), dict(queue=queue, name="hist.job",
                                                                args=encode_args({"n": 1})))


def claim(db, queue: str = "hist"):
    with db.session() as session:
        [row] = db.dialect.claim_jobs(session.connection(), queue, 1, WORKER, 60)
    return row


def failed_once_then_succeeded(db) -> int:
    job_id = add(db)
    row = claim(db)
    with db.session() as session:
        assert db.dialect.retry_job(session.connection(), row.id, row.token, 0, "Traceback...\nValueError: smtp down")
    row = claim(db)
    with db.session() as session:
        assert db.dialect.complete_job(session.connection(), row.id, row.token)
    return job_id


def test_show_lists_and_stats_cover_a_finished_job(db, tmp_path):
    job_id = failed_once_then_succeeded(db)
    url = str(db.engine.url.render_as_string(hide_password=False))

    shown = succeeds(mq("show", job_id, "--database", url, cwd=tmp_path))
    assert "state:         succeeded" in shown and "runs:          2" in shown
    history = shown[shown.index("  history:"):shown.index("  errors")].splitlines()[1:]
    assert [line.split()[2] for line in history] == ["put", "popped", "retried", "popped", "succeeded"]
    assert f"retried by {WORKER}: ValueError: smtp down" in shown
    assert "errors (1):" in shown and "    #1 retried at " in shown

    document = json.loads(succeeds(mq("show", job_id, "--json", "--database", url, cwd=tmp_path)))
    assert [entry["kind"] for entry in document["history"]] == ["put", "popped", "retried", "popped", "succeeded"]
    assert document["finished_at"] is not None and document["runs"] == 2

    listed = json.loads(succeeds(mq("list", "--state", "succeeded", "--json", "--database", url, cwd=tmp_path)))
    assert [job["id"] for job in listed] == [job_id]
    assert succeeds(mq("list", "--state", "queued", "--database", url, cwd=tmp_path)).startswith("no jobs")

    day = json.loads(succeeds(mq("stats", "hist", "--json", "--database", url, cwd=tmp_path)))
    assert (day["wait"]["count"], day["run"]["count"], day["retried"], day["failed"], day["expired"]) == (1, 1, 1, 0, 0)
    text = succeeds(mq("stats", "hist", "--day", day["day"], "--database", url, cwd=tmp_path))
    assert "wait: 1 job, mean " in text and "run: 1 job, mean " in text
    assert any(line.split()[:2] == ["0s", "1"] and line.endswith("#" * 40) for line in text.splitlines())
    empty = succeeds(mq("stats", "hist", "--day", "2001-01-01", "--database", url, cwd=tmp_path))
    assert "wait: no jobs succeeded" in empty


def test_cancel_keeps_the_job_and_finished_jobs_refuse_cancel_and_retry(db, tmp_path):
    job_id = add(db)
    url = str(db.engine.url.render_as_string(hide_password=False))
    assert "cancelled job" in succeeds(mq("cancel", job_id, "--database", url, cwd=tmp_path))
    job = admin.get_job(db, job_id)
    assert (job.state, job.finished_at is not None, [e.kind for e in job.history]) == \
        ("canceled", True, ["put", "canceled"])
    fails(mq("cancel", job_id, "--database", url, cwd=tmp_path), cli.EXIT_STATE, "already finished (canceled)")
    fails(mq("retry", job_id, "--database", url, cwd=tmp_path), cli.EXIT_STATE, "never runs again")
    assert admin.get_job(db, job_id).state == "canceled"


def test_config_lists_sets_and_refuses_bad_values(db, tmp_path):
    url = str(db.engine.url.render_as_string(hide_password=False))
    listed = json.loads(succeeds(mq("config", "--json", "--database", url, cwd=tmp_path)))
    assert listed == {"jobs-history": 30 * 86400, "jobs-history-count": 50_000, "stats-history": 30,
                      "heartbeat": 60}
    assert succeeds(mq("config", "jobs-history-count", "10", "--database", url, cwd=tmp_path)).startswith(
        "jobs-history-count = 10")
    assert succeeds(mq("config", "jobs-history-count", "--database", url, cwd=tmp_path)).strip() == "10"
    assert admin.get_config(db)["jobs-history-count"] == 10
    fails(mq("config", "jobs-history", "-1", "--database", url, cwd=tmp_path), cli.EXIT_USAGE,
          "jobs-history takes a whole number >= 0")
    fails(mq("config", "heartbeats", "5", "--database", url, cwd=tmp_path), cli.EXIT_USAGE,
          "unknown setting 'heartbeats'")
    succeeds(mq("config", "jobs-history-count", "default", "--database", url, cwd=tmp_path))
    assert admin.get_config(db)["jobs-history-count"] == 50_000
    with pytest.raises(ValueError, match="unknown setting"):
        admin.set_config(db, "nope", 1)
    with pytest.raises(ValueError, match="stats-history takes a whole number"):
        admin.set_config(db, "stats-history", "many")


def test_stats_day_needs_a_queue_and_a_real_day(tmp_path):
    fails(mq("stats", "--day", "2026-01-01", cwd=tmp_path), cli.EXIT_USAGE, "--day goes with a QUEUE")
    fails(mq("stats", "q", "--day", "2026-13-01", cwd=tmp_path), cli.EXIT_USAGE, "YYYY-MM-DD")
