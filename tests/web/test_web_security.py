"""Basic auth, security headers, the 503 page of a database outage (the application keeps
serving), and ``mqueue web`` as a real server process."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from conftest import Client, broken, enqueue, run_queue
from helpers import free_port, python_env, wait_for
from sqlalchemy.engine import make_url

import mqueue
from mqueue import admin
from mqueue.web import app
from mqueue.web.server import make_server


def test_basic_auth_guards_every_page_and_action(db, monkeypatch):
    job_id = enqueue(db, broken)
    run_queue(db)
    monkeypatch.setenv("MQUEUE_WEB_PASSWORD", "hunter2")
    dashboard = app(db)
    stranger = Client(dashboard)
    for target in ("/", f"/jobs/{job_id}", "/failed", "/metrics", "/static/dashboard.css", "/tags?tag=x"):
        result = stranger.get(target)
        assert result.status == 401, target
        assert result.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert stranger.request("POST", f"/jobs/{job_id}/retry").status == 401
    wrong = Client(dashboard, password="hunter3")
    assert wrong.get("/").status == 401
    assert stranger.get("/", HTTP_AUTHORIZATION="Basic !!!notbase64").status == 401
    operator = Client(dashboard, password="hunter2")
    assert operator.get("/").status == 200
    operator.get(f"/jobs/{job_id}")
    assert operator.post(f"/jobs/{job_id}/retry").status == 303
    assert admin.get_job(db, job_id).state == "queued"
    # The health check says only "ok": a load balancer needs no password.
    assert stranger.get("/healthz").status == 200


def test_security_headers_and_cookie_flags(db, client):
    page = client.get("/")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert " style=" not in page.text and "<script>" not in page.text  # nothing inline for the policy to block


def closed_port_url(database_url: str, backend: str, tmp_path) -> str:
    """A URL of ``backend`` that nothing answers: a closed port, or a SQLite file in a missing directory."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'missing-directory' / 'app.db'}"
    return make_url(database_url).set(port=free_port()).render_as_string(hide_password=False)


def test_database_outage_is_a_503_page_with_one_line(database_url, backend, tmp_path):
    db = mqueue.Database(closed_port_url(database_url, backend, tmp_path))
    try:
        client = Client(app(db))
        for target in ("/", "/jobs/1", "/failed", "/stats", "/metrics", "/crons", "/tracked", "/tags?tag=a"):
            page = client.get(target)
            assert page.status == 503, target
            problems = re.findall(r'<p class="problem">(.*?)</p>', page.text)
            assert len(problems) == 1 and problems[0].startswith("database unavailable: cannot reach database")
            assert "\n" not in problems[0] and "Traceback" not in page.text
        health = client.get("/healthz")
        assert health.status == 503 and health.text.count("\n") == 1
    finally:
        db.dispose()


def test_missing_tables_are_a_503_page_naming_the_fix(database_url):
    db = mqueue.Database(database_url)
    try:
        page = Client(app(db)).get("/")
        assert page.status == 503 and "run: python -m mqueue migrate" in page.text
    finally:
        db.dispose()


def test_the_threaded_server_keeps_serving_through_an_outage(db, database_url, backend, tmp_path):
    """One server, two dashboards: the one whose database is down answers 503 again and again, and
    the threaded server still serves the other."""
    down = mqueue.Database(closed_port_url(database_url, backend, tmp_path))

    def both(environ, start_response):
        target = app_down if environ["PATH_INFO"].startswith("/down") else app_up
        if environ["PATH_INFO"].startswith("/down"):
            environ["SCRIPT_NAME"], environ["PATH_INFO"] = "/down", environ["PATH_INFO"][len("/down"):] or "/"
        return target(environ, start_response)

    app_down, app_up = app(down), app(db)
    server = make_server(both, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(3):
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(f"{base}/down/", timeout=10)
            assert failed.value.code == 503
            with urllib.request.urlopen(f"{base}/", timeout=10) as answer:
                assert answer.status == 200
    finally:
        server.shutdown()
        server.server_close()
        down.dispose()


def test_mqueue_web_serves_until_sigterm(db, database_url):
    enqueue(db, broken, text="<script>")
    run_queue(db)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mqueue", "web", "--port", str(port), "--read-only",
                                "--database", database_url], env=python_env({"MQUEUE_WEB_PASSWORD": "pw"}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def answered():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            except OSError:
                return None
        assert wait_for(answered, timeout=30) == b"ok\n"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/failed", headers={
            "Authorization": "Basic " + base64.b64encode(b"me:pw").decode()})
        page = urllib.request.urlopen(request, timeout=10).read().decode()
        assert "RuntimeError" in page and "Retry all" not in page  # --read-only
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert refused.value.code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"on http://127.0.0.1:{port}/ (read-only)" in err
    assert "Traceback" not in err
    assert not re.search(r"://[^:/@\s]+:[^@*\s]+@", err)  # no password in the log


def test_mqueue_web_bad_options_are_one_line(tmp_path):
    for argv, expected in ((["--port", "70000"], "expected a TCP port"),
                           (["--database", f"sqlite:///{tmp_path / 'none.db'}"], "does not exist")):
        result = subprocess.run([sys.executable, "-m", "mqueue", "web", *argv], env=python_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
