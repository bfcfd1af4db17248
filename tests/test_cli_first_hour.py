"""``python -m mqueue`` as a new user meets it (issue 11): enqueue from the wrong directory, URLs that
cannot work, a database file that is not there, and ``stats`` in one vocabulary.

Subprocesses where the cwd, the environment or a start-up matter; ``cli.main`` in-process elsewhere.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import server_user
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from test_cli import PASSWORD, fails, mq, succeeds

import mqueue
from mqueue import admin, cli
from mqueue.config import ENV_URL
from mqueue.schema import cron_table
from mqueue.session import safe_url


def write_tasks(root) -> None:
    (root / "tasks").mkdir()
    (root / "tasks" / "__init__.py").write_text("")
    (root / "tasks" / "mail.py").write_text(textwrap.dedent("""\
        import mqueue

        @mqueue.task
        def welcome(user_id):
            pass

        @mqueue.task(queue="mail")
        def send(to):
            pass
        """))


def one_line(capsys, argv: list[str], code: int) -> str:
    """``cli.main(argv)`` in-process: exit ``code``, nothing on stdout, one line on stderr; that line."""
    assert cli.main(argv) == code
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and PASSWORD not in err, (out, err)
    return err.strip()


# -- item 8: enqueue says when it cannot check, and names the wrong keyword ---------------------


@pytest.mark.backends("sqlite")
def test_enqueue_outside_the_app_directory_warns_in_one_line_and_still_stores(db, database_url, tmp_path):
    write_tasks(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = mq("enqueue", "tasks.mail.welcom", '{"user_id": 7}', "--database", database_url, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"mqueue: warning: no tasks package 'tasks' importable from {elsewhere}: task name "
                             f"'tasks.mail.welcom' and its arguments were stored unchecked (run from the "
                             f"application's directory or pass --tasks PACKAGE)\n")
    job = admin.get_job(db, int(result.stdout))
    assert (job.name, job.decoded_args()) == ("tasks.mail.welcom", {"user_id": 7})

    # From the application's directory the same typo is refused, and nothing is stored.
    fails(mq("enqueue", "tasks.mail.welcom", "--database", database_url, cwd=tmp_path), cli.EXIT_USAGE,
          "unknown task 'tasks.mail.welcom' (did you mean 'tasks.mail.welcome'?)")
    fails(mq("enqueue", "tasks.mail.welcome", '{"uid": 7}', "--database", database_url, cwd=tmp_path),
          cli.EXIT_USAGE, "tasks.mail.welcome: got an unexpected keyword argument 'uid' (did you mean 'user_id'?)")
    assert [j.id for j in admin.list_jobs(db)] == [job.id]


# -- item 9: URLs that cannot work say which URL and what to write ------------------------------


@pytest.mark.parametrize("scheme, advice", [("postgres", "use postgresql+psycopg://app:***@127.0.0.1:1/app"),
                                            ("mysql", "use mysql+pymysql://app:***@127.0.0.1:1/app")])
def test_a_bad_scheme_is_one_line_naming_the_url_and_the_scheme_to_use(capsys, scheme, advice):
    line = one_line(capsys, ["list", "--database", f"{scheme}://app:{PASSWORD}@127.0.0.1:1/app"], cli.EXIT_USAGE)
    assert line.startswith(f"mqueue: error: cannot use database URL {scheme}://app:***@127.0.0.1:1/app: ")
    assert line.endswith(advice)


@pytest.fixture
def refused_url(backend, database_url, db):
    """A URL the server refuses to log in with: a wrong password on MariaDB; on PostgreSQL, whose
    test server trusts every local login whatever the password, a user that does not exist."""
    if backend == "mariadb":
        with server_user(backend, database_url) as url:
            yield make_url(url).set(password=PASSWORD).render_as_string(hide_password=False)
    else:
        yield make_url(database_url).set(username="mq_nobody", password=PASSWORD).render_as_string(
            hide_password=False)


@pytest.mark.backends("mariadb", "postgresql")
def test_a_refused_login_is_one_line_and_start_does_not_wait_for_it(refused_url, capsys, tmp_path):
    expected = f"mqueue: error: database {safe_url(refused_url)} refused the login: "
    for command in ("list", "migrate"):
        line = one_line(capsys, [command, "--database", refused_url], cli.EXIT_DATABASE)
        assert line.startswith(expected) and line.endswith("; check the user name and password in the URL")
    # A daemon does not wait for a database that refuses it (it waits for one that is not up yet).
    write_tasks(tmp_path)
    line = fails(mq("start", "default", "--database", refused_url, cwd=tmp_path), cli.EXIT_DATABASE)
    assert line.startswith(expected)


@pytest.mark.backends("mariadb", "postgresql")
def test_a_refused_login_from_python_is_one_clear_error(refused_url):
    db = mqueue.Database(refused_url)
    try:
        for attempt in (db.check_schema, db.create_all, lambda: admin.list_jobs(db)):
            with pytest.raises(mqueue.AccessDeniedError) as caught:
                attempt()
            assert str(caught.value).startswith(f"database {safe_url(refused_url)} refused the login: ")
            assert PASSWORD not in str(caught.value)
    finally:
        db.dispose()


# -- item 10: commands that only look never create a database file --------------------------------


@pytest.mark.parametrize("argv", [["list"], ["show", "1"], ["stats"], ["crons"], ["cancel", "1"],
                                  ["retry", "1"], ["enqueue", "t.x"]])
def test_commands_on_a_missing_sqlite_file_create_nothing(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line(capsys, [*argv, "--database", "sqlite:///app.db"], cli.EXIT_DATABASE)
    assert line == (f"mqueue: error: database file {tmp_path / 'app.db'} does not exist; "
                    f"run: python -m mqueue migrate to create it")
    assert list(tmp_path.iterdir()) == []


def test_the_default_database_file_is_not_created_by_list(tmp_path):
    fails(mq("list", cwd=tmp_path, env={ENV_URL: ""}), cli.EXIT_DATABASE,
          f"database file {tmp_path / 'mqueue.db'} does not exist; run: python -m mqueue migrate to create it")
    assert list(tmp_path.iterdir()) == []
    succeeds(mq("migrate", cwd=tmp_path, env={ENV_URL: ""}))
    assert succeeds(mq("list", cwd=tmp_path, env={ENV_URL: ""})) == "no jobs\n"


# -- item 11: stats lists the known queues, headed by its JSON keys --------------------------------


@pytest.mark.backends("sqlite")
def test_stats_lists_known_queues_without_jobs_with_the_json_keys_as_headings(db, database_url, tmp_path):
    write_tasks(tmp_path)
    with db.engine.begin() as conn:
        conn.execute(insert(cron_table).values(name="tasks.nightly", queue="reports", schedule="0 3 * * *",
                                               tz="UTC"))
    admin.enqueue_by_name(db, "other.job", {}, queue="busy")
    url = ["--database", database_url]

    queues = json.loads(succeeds(mq("stats", "--json", *url, cwd=tmp_path)))
    assert [(q["queue"], q["queued"], q["scheduled"], q["running"], q["failed"]) for q in queues] == [
        ("busy", 1, 0, 0, 0), ("default", 0, 0, 0, 0), ("mail", 0, 0, 0, 0), ("reports", 0, 0, 0, 0)]
    lines = succeeds(mq("stats", *url, cwd=tmp_path)).splitlines()
    assert sorted(lines[0].split()) == sorted(key.upper() for key in queues[0])
    assert [line.split()[0] for line in lines[1:]] == ["busy", "default", "mail", "reports"]

    # Without a tasks package the crons' queues are still known.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    queues = json.loads(succeeds(mq("stats", "--json", *url, cwd=elsewhere)))
    assert [q["queue"] for q in queues] == ["busy", "reports"]
