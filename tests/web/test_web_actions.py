"""The dashboard's actions through the WSGI interface on every backend: each POST form changes
what it says and redirects back; a missing or wrong CSRF token, a read-only dashboard or a
refused action changes nothing."""

from __future__ import annotations

import re

import pytest
from conftest import OTHER_QUEUE, QUEUE, Client, broken, enqueue, flaky, ok, run_queue, times_out

from mqueue import admin
from mqueue.web import app


def follow(client: Client, result) -> str:
    """The page a 303 after an action leads to."""
    assert result.status == 303, (result.status, result.text)
    location = result.headers["Location"]
    return client.get(location).text


def test_retry_from_the_job_page_then_a_worker_runs_it(db, client):
    job_id = enqueue(db, flaky)
    run_queue(db)
    assert admin.get_job(db, job_id).state == "failed"
    client.get(f"/jobs/{job_id}")
    page = follow(client, client.post(f"/jobs/{job_id}/retry"))
    assert "Job retried" in page and 'state-queued">queued' in page
    FLAKY_OK(db, job_id)


def FLAKY_OK(db, job_id):
    from conftest import FLAKY
    FLAKY["fail"] = False
    run_queue(db)
    job = admin.get_job(db, job_id)
    assert (job.state, job.retries) == ("succeeded", 0)


def test_cancel_tag_untag_track_untrack(db, client):
    job_id = enqueue(db, ok, n=1, delay=600)
    client.get(f"/jobs/{job_id}")
    page = follow(client, client.post(f"/jobs/{job_id}/tag", {"tag": " <i>x</i> y "}))
    assert "Tags added" in page and "&lt;i&gt;x&lt;/i&gt; y" in page and "<i>x</i>" not in page
    follow(client, client.post(f"/jobs/{job_id}/tag", {"tag": "vip"}))
    assert admin.get_job(db, job_id).tags == ("<i>x</i> y", "vip")
    follow(client, client.post(f"/jobs/{job_id}/untag", {"tag": "vip"}))
    assert admin.get_job(db, job_id).tags == ("<i>x</i> y",)
    assert "Job tracked" in follow(client, client.post(f"/jobs/{job_id}/track"))
    assert admin.get_job(db, job_id).tracked
    follow(client, client.post(f"/jobs/{job_id}/untrack"))
    assert not admin.get_job(db, job_id).tracked
    page = follow(client, client.post(f"/jobs/{job_id}/cancel"))
    assert "Job cancelled" in page and admin.get_job(db, job_id).state == "canceled"
    assert "Retry now" not in page  # a finished job offers no retry or cancel


def test_retry_all_and_cancel_all_of_one_error_group(db, client):
    runtime = [enqueue(db, broken, text=str(n)) for n in range(3)]
    timeout = enqueue(db, times_out)
    elsewhere = enqueue(db, broken, text="x", queue=OTHER_QUEUE)
    run_queue(db)
    run_queue(db, OTHER_QUEUE)
    client.get("/failed")
    page = follow(client, client.post("/failed/retry", {"queue": QUEUE, "error": "RuntimeError"}))
    assert "3 failed job(s) retried." in page
    assert [admin.get_job(db, i).state for i in runtime] == ["queued"] * 3
    assert admin.get_job(db, timeout).state == admin.get_job(db, elsewhere).state == "failed"
    page = follow(client, client.post("/failed/cancel", {"queue": QUEUE, "error": "TimeoutError"}))
    assert "1 failed job(s) cancelled." in page
    assert admin.get_job(db, timeout).state == "canceled"
    assert admin.get_job(db, elsewhere).state == "failed"
    assert "Retry all 1" in page and "TimeoutError" not in re.sub(r"<footer>.*", "", page)


def test_a_refused_action_is_a_409_page_and_changes_nothing(db, client):
    job_id = enqueue(db, ok, n=1)
    run_queue(db)
    client.get(f"/jobs/{job_id}")
    for action in ("retry", "cancel"):
        result = client.post(f"/jobs/{job_id}/{action}")
        assert result.status == 409
        assert "already finished" in result.text
    assert admin.get_job(db, job_id).state == "succeeded"
    too_long = client.post(f"/jobs/{job_id}/tag", {"tag": "t" * 101})
    assert too_long.status == 400 and admin.get_job(db, job_id).tags == ()
    assert client.post(f"/jobs/{job_id}/tag", {"tag": "  "}).status == 400
    assert client.post("/jobs/424242/retry").status == 404
    assert client.post(f"/jobs/{job_id}/explode").status == 404


@pytest.mark.parametrize("token", [None, "", "0" * 64, "wrong"])
def test_missing_or_wrong_csrf_token_is_403_and_changes_nothing(db, client, token):
    job_id = enqueue(db, broken)
    run_queue(db)
    client.get(f"/jobs/{job_id}")
    data = {} if token is None else {"csrf_token": token}
    for target in (f"/jobs/{job_id}/retry", f"/jobs/{job_id}/cancel", f"/jobs/{job_id}/track",
                   "/failed/retry"):
        result = client.post(target, dict(data, queue=QUEUE, error="RuntimeError"), token=False)
        assert result.status == 403, target
        assert "CSRF" in result.text
    job = admin.get_job(db, job_id)
    assert (job.state, job.tracked) == ("failed", False)


def test_a_token_belongs_to_its_cookie(db):
    """Another browser's token (or this token without its cookie) is refused."""
    job_id = enqueue(db, broken)
    run_queue(db)
    dashboard = app(db)
    mine, theirs = Client(dashboard), Client(dashboard)
    mine.get(f"/jobs/{job_id}")
    theirs.get(f"/jobs/{job_id}")
    assert mine.token != theirs.token
    assert mine.post(f"/jobs/{job_id}/track", {"csrf_token": theirs.token}, token=False).status == 403
    mine.cookies.clear()
    assert mine.post(f"/jobs/{job_id}/track").status == 403
    assert not admin.get_job(db, job_id).tracked
    # Another process of the same dashboard: the same secret accepts the token.
    shared = Client(app(db, secret="s3cret"))
    shared.get(f"/jobs/{job_id}")
    other_process = Client(app(db, secret="s3cret"))
    other_process.cookies = dict(shared.cookies)
    assert other_process.post(f"/jobs/{job_id}/track", {"csrf_token": shared.token}, token=False).status == 303
    assert admin.get_job(db, job_id).tracked


def test_read_only_shows_no_forms_and_refuses_every_post(db):
    job_id = enqueue(db, broken)
    run_queue(db)
    writer = Client(app(db))
    writer.get(f"/jobs/{job_id}")
    reader = Client(app(db, read_only=True))
    for target in ("/", f"/jobs/{job_id}", "/failed", f"/queue?name={QUEUE}&state=failed", "/tracked"):
        page = reader.get(target)
        assert page.status == 200 and "<form method=\"post\"" not in page.text, target
    assert "read-only" in reader.get("/").text
    reader.cookies = dict(writer.cookies)  # even with a valid cookie and token
    for target in (f"/jobs/{job_id}/retry", f"/jobs/{job_id}/cancel", "/failed/retry", "/failed/cancel"):
        result = reader.post(target, {"csrf_token": writer.token, "queue": QUEUE, "error": "RuntimeError"},
                             token=False)
        assert result.status == 403 and "read-only" in result.text
    assert admin.get_job(db, job_id).state == "failed"


def test_move_and_set_priority_from_the_job_page(db, client):
    job_id = enqueue(db, ok, n=1, delay=600)
    page = client.get(f"/jobs/{job_id}")
    assert ">Move</button>" in page.text and ">Set priority</button>" in page.text
    assert "Job moved." in follow(client, client.post(f"/jobs/{job_id}/move", {"queue": OTHER_QUEUE}))
    assert "Priority changed." in follow(client, client.post(f"/jobs/{job_id}/priority", {"priority": "-7"}))
    job = admin.get_job(db, job_id)
    assert (job.queue, job.priority) == (OTHER_QUEUE, -7)
    kinds = [entry.kind for entry in job.history]
    assert "moved" in kinds and "priority" in kinds
    for bad in ("high", str(2 ** 31), ""):
        assert client.post(f"/jobs/{job_id}/priority", {"priority": bad}).status == 400
    assert client.post(f"/jobs/{job_id}/move", {"queue": "q" * 101}).status == 400
    assert admin.get_job(db, job_id).priority == -7


def test_cancel_a_job_others_depend_on_needs_the_cascade_box(db, client):
    first = enqueue(db, ok, n=1, delay=600)
    with db.session():
        second = ok.options(depends_on=[first]).enqueue(n=2)
    page = client.get(f"/jobs/{first}")
    assert 'name="cascade"' in page.text and "1 job(s) that depend on it" in page.text
    deps = re.search(r'<dl class="deps">(.*?)</dl>', page.text).group(1)
    assert f'href="/jobs/{second}"' in deps
    dependent = client.get(f"/jobs/{second}").text
    waits = re.search(r"<dt>Waits for</dt><dd>(.*?)</dd>", dependent).group(1)
    assert f'href="/jobs/{first}"' in waits and "queued" in waits
    refused = client.post(f"/jobs/{first}/cancel")
    assert refused.status == 409 and "depend" in refused.text
    assert admin.get_job(db, first).state == "queued" and admin.get_job(db, second).state == "waiting"
    page = follow(client, client.post(f"/jobs/{first}/cancel", {"cascade": "1"}))
    assert "with the jobs that depended on it" in page
    assert admin.get_job(db, first).state == admin.get_job(db, second).state == "canceled"


def test_pause_and_resume_a_queue_from_the_overview(db, client):
    job_id = enqueue(db, ok, n=1)
    page = client.get("/")
    assert f'<input type="hidden" name="queue" value="{QUEUE}">' in page.text and ">Pause</button>" in page.text
    page = follow(client, client.post("/queues/pause", {"queue": QUEUE}))
    assert "Queue paused" in page and '<span class="paused">paused</span>' in page and ">Resume</button>" in page
    assert admin.paused_queues(db) == {QUEUE}
    assert run_queue(db).total == 0 and admin.get_job(db, job_id).state == "queued"
    lines = client.get("/metrics").text.splitlines()
    assert f'mqueue_queue_paused{{queue="{QUEUE}"}} 1' in lines
    page = follow(client, client.post("/queues/resume", {"queue": QUEUE}))
    assert "Queue resumed" in page and admin.paused_queues(db) == set()
    assert run_queue(db).succeeded == 1
    assert client.post("/queues/pause", {"queue": ""}).status == 400
    assert admin.paused_queues(db) == set()
