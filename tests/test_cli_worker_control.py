"""``pause``, ``resume``, ``workers``, ``config heartbeat`` and ``start --order`` as real subprocesses."""

from __future__ import annotations

import json

from test_cli import db, fails, mq, succeeds  # noqa: F401 - db: the migrated database fixture

from mqueue import admin, cli
from mqueue.encoding import encode_args


def add(db, queue: str) -> int:
    with db.session() as session:
        return db.dialect.insert_job(session.connection(), dict(queue=queue, name="ctl.job",
                                                                args=encode_args({"n": 1})))


def test_pause_and_resume_show_in_stats_and_list(db, database_url, tmp_path):
    add(db, "mail")
    add(db, "reports")
    out = succeeds(mq("pause", "mail", "reports", "--database", database_url, cwd=tmp_path))
    assert out == "paused mail, reports; paused now: mail, reports (workers see it within one poll interval)\n"
    assert admin.paused_queues(db) == {"mail", "reports"}
    out = succeeds(mq("resume", "reports", "--database", database_url, cwd=tmp_path))
    assert "resumed reports; paused now: mail" in out

    lines = succeeds(mq("stats", "--database", database_url, cwd=tmp_path)).splitlines()
    header = lines[0].split()
    paused = {line.split()[0]: line.split()[header.index("PAUSED")] for line in lines[1:]}
    assert paused == {"mail": "yes", "reports": "no"}
    queues = json.loads(succeeds(mq("stats", "--json", "--database", database_url, cwd=tmp_path)))
    assert {q["queue"]: q["paused"] for q in queues} == {"mail": True, "reports": False}

    listing = succeeds(mq("list", "--database", database_url, cwd=tmp_path))
    assert listing.splitlines()[-1] == "paused (workers claim nothing from it until 'mqueue resume'): mail"
    assert "paused" not in succeeds(mq("list", "--queue", "reports", "--database", database_url, cwd=tmp_path))
    jobs = json.loads(succeeds(mq("list", "--json", "--database", database_url, cwd=tmp_path)))
    assert len(jobs) == 2  # --json stays one document

    succeeds(mq("resume", "mail", "--database", database_url, cwd=tmp_path))
    assert admin.paused_queues(db) == set()


def test_pause_refuses_bad_input_in_one_line(db, database_url, tmp_path):
    fails(mq("pause", "--database", database_url, cwd=tmp_path), cli.EXIT_USAGE, "required: QUEUE")
    fails(mq("resume", "q" * 101, "--database", database_url, cwd=tmp_path), cli.EXIT_USAGE,
          "expected a queue name of 1 to 100 characters")
    fails(mq("pause", "mail", "--database", "sqlite:///" + str(tmp_path / "absent.db"), cwd=tmp_path),
          cli.EXIT_DATABASE, "absent.db")


def test_workers_lists_the_registry(db, database_url, tmp_path):
    assert succeeds(mq("workers", "--database", database_url, cwd=tmp_path)) == "no live workers\n"
    assert json.loads(succeeds(mq("workers", "--json", "--database", database_url, cwd=tmp_path))) == []
    with db.engine.begin() as conn:
        db.dialect.register_worker(conn, "web-1:4242:a5d0", "web-1", 4242, '["mail", "default"]', 60,
                                   "[8812, 8815]", True)
        db.dialect.register_worker(conn, "web-2:77:1b0c", "web-2", 77, '["mail"]', 30, "[]", False)
    lines = succeeds(mq("workers", "--database", database_url, cwd=tmp_path)).splitlines()
    assert lines[0].split() == ["WORKER", "HOST", "PID", "QUEUES", "STARTED", "(UTC)", "LAST", "SEEN", "(UTC)",
                                "LEASE", "CLAIMING", "RUNNING"]
    first, second = (line.split() for line in lines[1:])
    assert first[:4] == ["web-1:4242:a5d0", "web-1", "4242", "mail,default"] and first[-4:] == [
        "1m00s", "yes", "8812", "8815"]
    assert second[:4] == ["web-2:77:1b0c", "web-2", "77", "mail"] and second[-3:] == ["30s", "no", "-"]
    rows = json.loads(succeeds(mq("workers", "--json", "--database", database_url, cwd=tmp_path)))
    assert [(w["name"], w["queues"], w["running"], w["claiming"], w["lease_seconds"]) for w in rows] == [
        ("web-1:4242:a5d0", ["mail", "default"], [8812, 8815], True, 60.0),
        ("web-2:77:1b0c", ["mail"], [], False, 30.0)]
    assert rows[0]["started_at"].endswith("+00:00") and rows[0]["pid"] == 4242


def test_config_heartbeat_and_per_queue_heartbeat(db, database_url, tmp_path):
    def config(*args):
        return mq("config", *args, "--database", database_url, cwd=tmp_path)

    assert json.loads(succeeds(config("--json")))["heartbeat"] == 60
    assert succeeds(config("heartbeat", "90")).startswith("heartbeat = 90 ")
    assert succeeds(config("heartbeat:reports", "2.5")).startswith("heartbeat:reports = 2.5 ")
    assert succeeds(config("heartbeat:reports")) == "2.5\n"
    assert succeeds(config("heartbeat:mail")) == "90\n"  # not set: the queue follows heartbeat
    listing = succeeds(config()).splitlines()
    assert [line.split()[:2] for line in listing if line.startswith("heartbeat")] == [
        ["heartbeat", "90"], ["heartbeat:reports", "2.5"]]
    assert json.loads(succeeds(config("--json"))) == {
        "jobs-history": 30 * 86400, "jobs-history-count": 50_000, "stats-history": 30, "heartbeat": 90,
        "heartbeat:reports": 2.5}
    assert "heartbeat:reports removed" in succeeds(config("heartbeat:reports", "default"))
    assert "heartbeat:reports" not in admin.get_config(db)
    assert succeeds(config("heartbeat", "default")).startswith("heartbeat = 60 ")

    for args, fragment in ((("heartbeat", "0"), "heartbeat takes a number of seconds > 0"),
                           (("heartbeat", "-5"), "got '-5'"),
                           (("heartbeat", "soon"), "got 'soon'"),
                           (("heartbeat", "inf"), "got 'inf'"),
                           (("heartbeat:mail", "nan"), "heartbeat:mail takes a number of seconds > 0"),
                           (("heartbeat:", "5"), "unknown setting 'heartbeat:'"),
                           (("heartbeat-mail", "5"), "known: jobs-history, jobs-history-count, stats-history, "
                                                     "heartbeat, heartbeat:QUEUE")):
        fails(config(*args), cli.EXIT_USAGE, fragment)
    assert admin.get_config(db)["heartbeat"] == 60


def test_start_refuses_an_unknown_order(tmp_path):
    fails(mq("start", "a", "b", "--order", "fifo", cwd=tmp_path), cli.EXIT_USAGE,
          "argument --order: invalid choice: 'fifo'")


def test_supervised_workers_get_the_order_and_the_lease_only_when_given():
    args = cli.build_parser().parse_args(["start", "a", "b", "--order", "round-robin", "--processes", "2"])
    args.log_level = "info"
    argv = cli.worker_argv(args, "tasks")
    assert argv[argv.index("--order") + 1] == "round-robin" and "--lease" not in argv
    args = cli.build_parser().parse_args(["start", "a", "--lease", "7", "--processes", "2"])
    args.log_level = "info"
    argv = cli.worker_argv(args, "tasks")
    assert argv[argv.index("--lease") + 1] == "7.0" and argv[argv.index("--order") + 1] == "priority"
