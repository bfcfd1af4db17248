"""Every page of the dashboard, read through the WSGI interface on every backend: what it shows,
that row values are escaped, and the 404 and 400 pages."""

from __future__ import annotations

import datetime as dt
import re

from conftest import CRON_QUEUE, OTHER_QUEUE, QUEUE, broken, enqueue, flaky, ok, run_queue, times_out

from mqueue import admin
from mqueue.history import BUCKETS
from mqueue.web import app
from mqueue.web.pages import PAGE_SIZE

SCRIPT = "<script>alert('x')</script>"


def test_overview_shows_counts_per_state_and_the_last_hour_of_successes(db, client):
    for n in range(3):
        enqueue(db, ok, n=n)
    enqueue(db, broken, text="a")
    run_queue(db)
    enqueue(db, ok, n=9, delay=600)
    enqueue(db, ok, n=10, queue=OTHER_QUEUE)

    page = client.get("/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    row = re.search(rf"<tr><td><a href=\"/queue\?name={QUEUE}\">{QUEUE}</a>.*?</tr>", page.text).group(0)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert [re.sub(r"<[^>]+>", "", cell) for cell in cells[2:10]] == ["0", "1", "0", "0", "1", "3", "0", "0"]
    assert f'href="/queue?name={QUEUE}&amp;state=failed"' in row
    assert f"{QUEUE}: 3 jobs in the last 60 minutes" in row  # the queue's sparkline
    assert '<svg class="spark"' in row and "<polyline" in row
    assert "all queues: 3 jobs in 60 minutes" in page.text
    assert f">{OTHER_QUEUE}</a>" in page.text
    assert '<meta http-equiv="refresh"' not in page.text  # only when asked


def test_auto_refresh_only_when_asked(db, client):
    assert '<meta http-equiv="refresh" content="5">' in client.get("/?refresh=5").text
    assert 'http-equiv="refresh"' not in client.get("/?refresh=0").text
    assert 'http-equiv="refresh"' not in client.get("/?refresh=junk").text


def test_queue_page_lists_one_state_with_paging(db, client):
    ids = [enqueue(db, ok, n=n) for n in range(PAGE_SIZE + 5)]
    ids.append(enqueue(db, broken))
    first = client.get(f"/queue?name={QUEUE}&state=queued")
    assert first.status == 200
    shown = [int(n) for n in re.findall(r'href="/jobs/(\d+)"', first.text)]
    assert shown == ids[:PAGE_SIZE]  # claim order: same priority and eta, lowest id first
    assert f"queued ({PAGE_SIZE + 6})" in first.text and "failed (0)" in first.text
    assert "next page" in first.text and "previous page" not in first.text
    second = client.get(f"/queue?name={QUEUE}&state=queued&page=2")
    assert [int(n) for n in re.findall(r'href="/jobs/(\d+)"', second.text)] == ids[PAGE_SIZE:]
    assert "previous page" in second.text and "next page" not in second.text
    assert "no failed jobs in queue" in client.get(f"/queue?name={QUEUE}&state=failed").text
    assert "no running jobs in queue" in client.get(f"/queue?name={QUEUE}&state=running").text


def test_job_page_shows_arguments_tags_history_and_every_error_escaped(db, client):
    job_id = enqueue(db, broken, text=SCRIPT, tags=["customer-42", "<b>bold</b>"])
    run_queue(db)
    page = client.get(f"/jobs/{job_id}")
    assert page.status == 200
    assert SCRIPT not in page.text and "<b>bold</b>" not in page.text
    escaped = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;"
    assert f"{{\n  &quot;text&quot;: &quot;{escaped}&quot;\n}}" in page.text  # pretty-printed, then escaped
    assert "&lt;b&gt;bold&lt;/b&gt;" in page.text
    assert 'href="/tags?tag=customer-42"' in page.text
    history = re.search(r'<ol class="timeline">(.*?)</ol>', page.text).group(1)
    assert [kind for kind in re.findall(r"<strong>(\w+)</strong>", history)] == ["put", "popped", "failed"]
    failure = re.search(r'<article class="failure">.*?<pre>(.*?)</pre>', page.text, re.S).group(1)
    assert failure.startswith("Traceback (most recent call last):")
    assert f"RuntimeError: smtp refused {escaped}" in failure
    assert "Retry now" in page.text and "Cancel" in page.text


def test_job_page_of_a_retried_job_shows_each_failed_run(db, client):
    job_id = enqueue(db, flaky)
    run_queue(db)
    admin.retry_job(db, job_id)
    run_queue(db)
    page = client.get(f"/jobs/{job_id}")
    assert page.text.count('<article class="failure">') == 2
    assert page.text.count("ConnectionError: payment service down") >= 2


def test_unknown_job_is_a_404_page(db, client):
    for target in ("/jobs/424242", f"/jobs/{2 ** 63}", "/jobs/0"):
        page = client.get(target)
        assert page.status == 404, target
        assert 'class="problem"' in page.text and "no job" in page.text
    assert client.get("/nothing-here").status == 404


def test_bad_parameters_are_a_400_page(db, client):
    for target in (f"/queue?name={QUEUE}&state=dead", f"/queue?name={QUEUE}&page=0", "/queue",
                   f"/queue?name={QUEUE}&page=x", "/stats?day=2030-13-01", "/tags?tag=" + "t" * 101):
        page = client.get(target)
        assert page.status == 400, target
        assert page.text.count('class="problem"') == 1


def test_failed_jobs_grouped_by_error_type(db, client):
    for text in ("a", "b", SCRIPT):
        enqueue(db, broken, text=text)
    enqueue(db, times_out)
    enqueue(db, broken, text="c", queue=OTHER_QUEUE)
    run_queue(db)
    run_queue(db, OTHER_QUEUE)
    page = client.get("/failed")
    assert page.status == 200
    rows = re.findall(r"<tr><td><span class=\"error\">(.*?)</span></td><td><a[^>]*>(.*?)</a></td><td>(\d+)</td>",
                      page.text)
    # Largest group first, then by queue and error.
    assert rows == [("RuntimeError", QUEUE, "3"), ("TimeoutError", QUEUE, "1"), ("RuntimeError", OTHER_QUEUE, "1")]
    assert SCRIPT not in page.text
    assert "Retry all 3" in page.text and "Cancel all 3" in page.text
    only = client.get(f"/failed?queue={OTHER_QUEUE}")
    assert "Retry all 1" in only.text and "Retry all 3" not in only.text


def test_tracked_jobs_and_tag_search(db, client):
    tracked = enqueue(db, ok, n=1, tags=["vip"])
    enqueue(db, ok, n=2, tags=["vip"])
    enqueue(db, ok, n=3)
    admin.track_job(db, tracked)
    page = client.get("/tracked")
    assert re.findall(r'href="/jobs/(\d+)"', page.text) == [str(tracked)]
    found = client.get("/tags?tag=vip")
    assert len(re.findall(r'href="/jobs/(\d+)"', found.text)) == 2
    assert "no job has tag nobody" in client.get("/tags?tag=nobody").text
    assert '<input name="tag"' in client.get("/tags").text


def test_crons_page_shows_last_and_next_run(db, client):
    from mqueue.scheduler import Scheduler
    assert "no crons" in client.get("/crons").text
    Scheduler(db, [CRON_QUEUE]).sync()
    page = client.get("/crons")
    assert page.status == 200
    row = re.search(r"<tr><td>tweb.report</td>.*?</tr>", page.text).group(0)
    cells = [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
    assert cells[:5] == ["tweb.report", CRON_QUEUE, "*/5 * * * *", "UTC", "-"]
    next_run = dt.datetime.strptime(cells[5], "%Y-%m-%d %H:%M:%S")
    assert next_run.minute % 5 == 0 and next_run.second == 0


def test_stats_page_draws_both_histograms(db, client):
    for n in range(4):
        enqueue(db, ok, n=n)
    enqueue(db, broken)
    run_queue(db)
    page = client.get(f"/stats?queue={QUEUE}")
    assert page.status == 200
    assert "<strong>1</strong> failed" in page.text
    assert page.text.count('<svg class="histogram"') == 2
    assert "4 job(s), mean" in page.text
    assert f"{BUCKETS[0]}: 4" in page.text  # every job waited and ran less than a second
    other_day = client.get(f"/stats?queue={QUEUE}&day=2001-01-01")
    assert "no jobs succeeded" in other_day.text and "2001-01-01" in other_day.text


def test_metrics_in_prometheus_text_format(db, client):
    enqueue(db, ok, n=1)
    enqueue(db, broken)
    run_queue(db)
    enqueue(db, ok, n=2)
    enqueue(db, ok, n=3, queue='say "hi"\\')
    page = client.get("/metrics")
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    lines = page.text.splitlines()
    assert f'mqueue_jobs{{queue="{QUEUE}",state="queued"}} 1' in lines
    assert f'mqueue_jobs{{queue="{QUEUE}",state="failed"}} 1' in lines
    assert f'mqueue_runs_total{{queue="{QUEUE}",outcome="succeeded"}} 1' in lines
    assert f'mqueue_runs_total{{queue="{QUEUE}",outcome="failed"}} 1' in lines
    assert 'mqueue_jobs{queue="say \\"hi\\"\\\\",state="queued"} 1' in lines
    assert any(line.startswith(f'mqueue_oldest_due_seconds{{queue="{QUEUE}"}} ') for line in lines)
    assert "# TYPE mqueue_runs_total counter" in lines and "# TYPE mqueue_jobs gauge" in lines
    for line in lines:
        assert line.startswith("#") or re.fullmatch(r'mqueue_\w+\{[^}]*\} [0-9.]+', line), line


def test_healthz_and_static_files(db, client):
    health = client.get("/healthz")
    assert (health.status, health.text) == (200, "ok\n")
    css = client.get("/static/dashboard.css")
    assert css.status == 200 and css.headers["Content-Type"].startswith("text/css")
    assert client.get("/static/dashboard.js").status == 200
    assert client.get("/static/../application.py").status == 404


def test_links_follow_the_mount_point(db):
    from conftest import Client
    enqueue(db, broken)
    run_queue(db)
    mounted = Client(app(db), script_name="/admin/queues")
    page = mounted.get("/")
    assert 'href="/admin/queues/static/dashboard.css"' in page.text
    assert f'href="/admin/queues/queue?name={QUEUE}"' in page.text
    assert "Path=/admin/queues;" in page.headers["Set-Cookie"]
    assert 'action="/admin/queues/failed/retry"' in mounted.get("/failed").text
    posted = mounted.post("/failed/retry", {"queue": QUEUE, "error": "RuntimeError"})
    assert posted.status == 303 and posted.headers["Location"].startswith("/admin/queues/failed?")


def test_head_requests_and_other_methods(db, client):
    head = client.request("HEAD", "/")
    assert head.status == 200 and head.text == ""
    assert client.request("DELETE", "/").status == 405


def test_workers_page_lists_live_workers_and_their_jobs(db, client):
    import threading

    import mqueue
    assert "no live workers" in client.get("/workers").text
    worker = mqueue.Worker(db, queues=[QUEUE, OTHER_QUEUE], poll_interval=0.05, lease=2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        from helpers import wait_for
        wait_for(lambda: admin.list_workers(db), timeout=20)
        page = client.get("/workers")
        row = re.search(r"<table class=\"workers\">.*?<tbody><tr>(.*?)</tr>", page.text, re.S).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        assert cells[0] == worker.owner
        assert f'href="/queue?name={QUEUE}"' in cells[3] and f'href="/queue?name={OTHER_QUEUE}"' in cells[3]
        assert cells[6] == "2.0s" and cells[7] == "yes"
    finally:
        worker.stop()
        thread.join(30)
    assert "no live workers" in client.get("/workers").text
