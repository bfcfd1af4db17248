"""The dashboard's HTML: one function per page, taking what ``mqueue.admin`` returned.

Every value that comes from a row (queue and task names, arguments, tags,
errors, worker names) goes through ``h`` (``html.escape``) exactly once,
where it is written into the page; URLs are built with ``urlencode`` and
then escaped as attribute values.  Forms are left out entirely on a
read-only dashboard (``View.token`` is None).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from html import escape
from typing import Any, Iterable, Sequence
from urllib.parse import urlencode

from ..cli import format_seconds, format_time
from ..errors import headline
from ..history import BUCKETS
from ..schema import STATES
from .svg import histogram, sparkline

#: Jobs per page of a queue's listing.
PAGE_SIZE = 50

NAV = (("/", "Queues"), ("/failed", "Failed"), ("/tracked", "Tracked"), ("/tags", "Tags"),
       ("/workers", "Workers"), ("/crons", "Crons"), ("/stats", "Stats"))

#: What a finished action says on the page it returns to (``?done=KEY&n=COUNT``): fixed texts only.
DONE = {
    "retried": "Job retried: it is queued, due now.",
    "canceled": "Job cancelled.",
    "moved": "Job moved.",
    "canceled-cascade": "Job cancelled, with the jobs that depended on it.",
    "priority": "Priority changed.",
    "tagged": "Tags added.",
    "untagged": "Tag removed.",
    "tracked": "Job tracked: it now publishes an event at every change.",
    "untracked": "Job no longer tracked.",
    "paused": "Queue paused: workers claim none of its jobs until it is resumed.",
    "resumed": "Queue resumed.",
    "group-retried": "{n} failed job(s) retried.",
    "group-canceled": "{n} failed job(s) cancelled.",
}


def h(value: Any) -> str:
    """A value as HTML text (``-`` for None)."""
    return "-" if value is None else escape(str(value))


@dataclasses.dataclass(frozen=True)
class View:
    """What every page needs from the request: where the dashboard is mounted, the CSRF token
    (None: read-only, no forms), the auto-refresh interval asked for, and the status line."""

    base: str
    token: str | None
    refresh: int | None = None
    done: str | None = None
    database: str = ""

    def url(self, path: str, **params: Any) -> str:
        query = urlencode({key: value for key, value in params.items() if value is not None})
        return escape(self.base + path + (f"?{query}" if query else ""))

    def form(self, path: str, button: str, fields: dict[str, Any] | None = None, inputs: str = "",
             css: str = "", confirm: str | None = None) -> str:
        """A POST form to ``path`` with hidden ``fields``, extra ``inputs`` markup and a submit button."""
        if self.token is None:
            return ""
        hidden = "".join(f'<input type="hidden" name="{h(name)}" value="{h(value)}">'
                         for name, value in {"csrf_token": self.token, **(fields or {})}.items())
        ask = f' data-confirm="{h(confirm)}"' if confirm else ""
        return (f'<form method="post" action="{self.url(path)}" class="action {css}"{ask}>{hidden}{inputs}'
                f'<button type="submit">{h(button)}</button></form>')


def link(view: View, path: str, text: Any, **params: Any) -> str:
    return f'<a href="{view.url(path, **params)}">{h(text)}</a>'


def job_link(view: View, job_id: int) -> str:
    return link(view, f"/jobs/{job_id}", f"#{job_id}")


def layout(view: View, title: str, body: str, status: int = 200) -> str:
    refresh = f'<meta http-equiv="refresh" content="{view.refresh}">' if view.refresh else ""
    nav = "".join(f'<a href="{view.url(path)}">{h(text)}</a>' for path, text in NAV)
    done = f'<p class="done" role="status">{h(view.done)}</p>' if view.done else ""
    mode = " · read-only" if view.token is None else ""
    refreshing = (f'auto-refresh every {view.refresh}s' if view.refresh else "no auto-refresh (add ?refresh=5)")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{h(title)} · mqueue</title>{refresh}
<link rel="stylesheet" href="{view.url('/static/dashboard.css')}">
<script src="{view.url('/static/dashboard.js')}" defer></script></head>
<body><header><a class="brand" href="{view.url('/')}">mqueue</a><nav>{nav}</nav>
<form class="search" method="get" action="{view.url('/tags')}"><input name="tag" placeholder="search a tag" aria-label="tag"></form>
</header><main><h1>{h(title)}</h1>{done}{body}</main>
<footer>{h(view.database)}{mode} · {h(refreshing)} · times in UTC</footer></body></html>
"""


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str, css: str = "") -> str:
    """Cells are already HTML (each caller escapes its values)."""
    rows = list(rows)
    if not rows:
        return f'<p class="empty">{h(empty)}</p>'
    head = "".join(f"<th>{h(title)}</th>" for title in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def state_badge(state: str) -> str:
    return f'<span class="state state-{h(state) if state in STATES else "other"}">{h(state)}</span>'


def tag_list(view: View, tags: Sequence[str]) -> str:
    return " ".join(f'<a class="tag" href="{view.url("/tags", tag=tag)}">{h(tag)}</a>' for tag in tags) or "-"


def jobs_table(view: View, jobs: Sequence[Any], empty: str) -> str:
    return table(("Job", "Queue", "Task", "State", "Priority", "ETA (UTC)", "Retries", "Tags", "Last error"),
                 ((job_link(view, job.id), link(view, "/queue", job.queue, name=job.queue), h(job.name),
                   state_badge(job.state), h(job.priority), h(format_time(job.eta)), h(job.retries),
                   tag_list(view, job.tags), f'<span class="error">{h(job.error_summary or "")}</span>')
                  for job in jobs), empty, "jobs")


# -- pages ------------------------------------------------------------------------------

COUNT_COLUMNS = ("queued", "scheduled", "running", "waiting", "failed", "succeeded", "canceled", "expired")


def overview(view: View, queues: Sequence[Any], throughput: Any) -> str:
    """Queues with their counts, paused or not (with pause and resume), and jobs succeeded per minute
    over the last hour."""
    total = throughput.total()
    minutes = len(throughput.minutes)
    summary = (f'<section class="throughput"><h2>Jobs succeeded per minute, last {minutes} minutes</h2>'
               f'{sparkline(total, f"all queues: {sum(total)} jobs in {minutes} minutes", 360, 48)}'
               f' <span class="figure">{sum(total)} jobs</span></section>')
    rows = []
    for q in queues:
        counts = []
        for column in COUNT_COLUMNS:
            value = getattr(q, column)
            state = "queued" if column == "scheduled" else column
            counts.append(link(view, "/queue", value, name=q.queue, state=state) if value else "0")
        spark = throughput.per_queue.get(q.queue, (0,) * minutes)
        is_paused = q.paused
        control = (view.form("/queues/resume", "Resume", {"queue": q.queue}) if is_paused
                   else view.form("/queues/pause", "Pause", {"queue": q.queue},
                                  confirm=f"Pause queue {q.queue}? Workers will claim none of its jobs."))
        rows.append([link(view, "/queue", q.queue, name=q.queue),
                     '<span class="paused">paused</span>' if is_paused else "no",
                     *counts, h(format_seconds(q.oldest_due_seconds)),
                     sparkline(spark, f"{q.queue}: {sum(spark)} jobs in the last {minutes} minutes"),
                     f'<span class="row-actions">{link(view, "/stats", "stats", queue=q.queue)}{control}</span>'])
    headers = ("Queue", "Paused", *(c.capitalize() for c in COUNT_COLUMNS), "Oldest due", "Last hour", "")
    return summary + table(headers, rows, "no queues yet: enqueue a job", "queues")


def queue_page(view: View, name: str, state: str, page: int, jobs: Sequence[Any], counts: Any) -> str:
    """One queue's jobs in one state, newest page first, ``PAGE_SIZE`` per page."""
    tabs = []
    for each in STATES:
        number = 0 if counts is None else getattr(counts, each, 0) + (counts.scheduled if each == "queued" else 0)
        css = ' class="current"' if each == state else ""
        tabs.append(f'<a{css} href="{view.url("/queue", name=name, state=each)}">{h(each)} ({number})</a>')
    shown = jobs[:PAGE_SIZE]
    pager = []
    if page > 1:
        pager.append(link(view, "/queue", "← previous page", name=name, state=state, page=page - 1))
    if len(jobs) > PAGE_SIZE:
        pager.append(link(view, "/queue", "next page →", name=name, state=state, page=page + 1))
    extra = ""
    if state == "failed":
        extra = f'<p>{link(view, "/failed", "Failed jobs of this queue grouped by error", queue=name)}</p>'
    return (f'<nav class="tabs">{"".join(tabs)}</nav>{extra}'
            f'{jobs_table(view, shown, f"no {state} jobs in queue {name}")}'
            f'<p class="pager">page {page} {" ".join(pager)}</p>')


def job_page(view: View, job: Any) -> str:
    """Everything about one job: fields, arguments, tags, actions, history, every error."""
    fields = [("Queue", link(view, "/queue", job.queue, name=job.queue)), ("Task", h(job.name)),
              ("State", state_badge(job.state)), ("Priority", h(job.priority)),
              ("ETA", h(format_time(job.eta, " UTC"))),
              ("Retries", h(f"{job.retries} (max {'default' if job.max_retries is None else job.max_retries})")),
              ("Runs", h(job.runs)), ("Unique key", h(job.unique_key)), ("Worker", h(job.owner)),
              ("Created", h(format_time(job.created_at, " UTC"))),
              ("Started", h(format_time(job.started_at, " UTC"))),
              ("Finished", h(format_time(job.finished_at, " UTC"))),
              ("Waited", h(format_seconds(job.wait_seconds))), ("Ran", h(format_seconds(job.run_seconds))),
              ("Lease expires", h(format_time(job.lease_expires_at, " UTC"))),
              ("Expires", h(format_time(job.expires_at, " UTC"))),
              ("Tracked", "yes" if job.tracked else "no")]
    details = "".join(f"<dt>{h(label)}</dt><dd>{value}</dd>" for label, value in fields)
    path = f"/jobs/{job.id}"
    actions = []
    if not job.finished and job.state != "running":
        actions.append(view.form(f"{path}/retry", "Retry now"))
        cascade = ('<label><input type="checkbox" name="cascade" value="1"> with the '
                   f'{len(job.dependents)} job(s) that depend on it</label> ') if job.dependents else ""
        actions.append(view.form(f"{path}/cancel", "Cancel", inputs=cascade, confirm=f"Cancel job {job.id}?",
                                 css="danger"))
    if not job.finished:
        actions.append(view.form(f"{path}/move", "Move", inputs=(
            f'<input name="queue" required maxlength="100" value="{h(job.queue)}" aria-label="queue"> ')))
        actions.append(view.form(f"{path}/priority", "Set priority", inputs=(
            f'<input name="priority" type="number" required value="{h(job.priority)}" aria-label="priority"> ')))
    actions.append(view.form(f"{path}/untrack", "Untrack") if job.tracked else view.form(f"{path}/track", "Track"))
    tags = " ".join(f'<span class="tag-item">{tag_list(view, [tag])}'
                    f'{view.form(f"{path}/untag", "×", {"tag": tag}, css="inline")}</span>' for tag in job.tags) or "-"
    add_tag = view.form(f"{path}/tag", "Add tag",
                        inputs='<input name="tag" required maxlength="100" aria-label="new tag">', css="inline")
    return (f'<section class="job"><dl>{details}</dl>'
            f'<div class="actions">{"".join(actions)}</div></section>'
            f'<h2>Arguments</h2><pre class="args">{h(pretty_args(job.raw_args))}</pre>'
            f'<h2>Tags</h2><div class="tags">{tags} {add_tag}</div>'
            f'<h2>Dependencies</h2>{dependencies(view, job)}'
            f'<h2>History</h2>{timeline(job.history)}'
            f'<h2>Errors</h2>{errors(job)}')


def dependencies(view: View, job: Any) -> str:
    """The jobs this one waits for (with their states) and the jobs that wait for it."""
    if not job.depends_on and not job.dependents:
        return '<p class="empty">none</p>'
    waits = " ".join(f"{job_link(view, other)} {state_badge(state) if state else '(pruned)'}"
                     for other, state in zip(job.depends_on, job.dependency_states)) or "-"
    blocked = (f' <span class="error">blocked: {" ".join(f"#{other}" for other in job.blocked_by)} will not '
               f'succeed unless retried</span>') if job.blocked_by else ""
    dependents = " ".join(job_link(view, other) for other in job.dependents) or "-"
    return (f'<dl class="deps"><dt>Waits for</dt><dd>{waits}{blocked}</dd>'
            f'<dt>Waited for by</dt><dd>{dependents}</dd></dl>')


def pretty_args(raw: str) -> str:
    """The stored arguments as indented JSON (as stored, if they are not JSON)."""
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        return raw


def timeline(entries: Sequence[Any]) -> str:
    if not entries:
        return '<p class="empty">no history</p>'
    items = []
    for entry in entries:
        by = f" by {h(entry.worker)}" if entry.worker else ""
        detail = f' <span class="error">{h(headline(entry.detail))}</span>' if entry.detail else ""
        items.append(f'<li><time>{h(format_time(entry.at, precise=True))}</time> '
                     f'<strong>{h(entry.kind)}</strong>{by}{detail}</li>')
    return f'<ol class="timeline">{"".join(items)}</ol>'


def errors(job: Any) -> str:
    found = [(entry.kind, entry.at, entry.detail) for entry in job.errors]
    if not found and job.last_error:
        found = [("last", None, job.last_error)]
    if not found:
        return '<p class="empty">no errors</p>'
    return "".join(f'<article class="failure"><h3>#{number} {h(kind)}'
                   f'{f" at {h(format_time(at))} UTC" if at else ""}</h3><pre>{h(text)}</pre></article>'
                   for number, (kind, at, text) in enumerate(found, 1))


def failed_page(view: View, groups: Sequence[Any], queue: str | None) -> str:
    """Failed jobs grouped by queue and error type, each group with retry all / cancel all."""
    rows = []
    for group in groups:
        fields = {"queue": group.queue, "error": group.error}
        ids = " ".join(job_link(view, job_id) for job_id in group.job_ids[:10])
        more = f" and {group.count - 10} more" if group.count > 10 else ""
        rows.append([f'<span class="error">{h(group.error)}</span>', link(view, "/queue", group.queue,
                                                                          name=group.queue, state="failed"),
                     h(group.count), h(", ".join(group.names)), f'<span class="error">{h(group.example)}</span>',
                     ids + h(more),
                     view.form("/failed/retry", f"Retry all {group.count}", fields)
                     + view.form("/failed/cancel", f"Cancel all {group.count}", fields, css="danger",
                                 confirm=f"Cancel {group.count} failed job(s)?")])
    title = f'<p>Queue {h(queue)} · {link(view, "/failed", "all queues")}</p>' if queue else ""
    return title + table(("Error", "Queue", "Jobs", "Tasks", "Latest", "Some jobs", ""), rows,
                         "no failed jobs", "failed")


def tracked_page(view: View, jobs: Sequence[Any]) -> str:
    return jobs_table(view, jobs, "no tracked jobs (track one from its page)")


def tags_page(view: View, tag: str | None, jobs: Sequence[Any]) -> str:
    search = (f'<form method="get" action="{view.url("/tags")}" class="tag-search">'
              f'<input name="tag" value="{h(tag or "")}" required maxlength="100" aria-label="tag">'
              f'<button type="submit">Search</button></form>')
    if tag is None:
        return search
    return search + f"<h2>Jobs tagged {h(tag)}</h2>" + jobs_table(view, jobs, f"no job has tag {tag}")


def workers_page(view: View, workers: Sequence[Any]) -> str:
    """Live workers: where they run, what they serve, when last seen, the jobs they run now."""
    return table(("Worker", "Host", "PID", "Queues", "Started (UTC)", "Last seen (UTC)", "Lease", "Claiming",
                  "Running jobs"),
                 ((h(w.name), h(w.host), h(w.pid),
                   " ".join(link(view, "/queue", queue, name=queue) for queue in w.queues) or "-",
                   h(format_time(w.started_at)), h(format_time(w.last_seen)), h(format_seconds(w.lease_seconds)),
                   "yes" if w.claiming else '<span class="paused">stopped (SIGUSR2)</span>',
                   " ".join(job_link(view, job_id) for job_id in w.running) or "-") for w in workers),
                 "no live workers", "workers")


def crons_page(view: View, crons: Sequence[Any]) -> str:
    return table(("Name", "Queue", "Schedule", "Time zone", "Last run (UTC)", "Next run (UTC)", "Last job"),
                 ((h(c.name), link(view, "/queue", c.queue, name=c.queue), f"<code>{h(c.schedule)}</code>", h(c.tz),
                   h(format_time(c.last_run)), h(format_time(c.next_run)),
                   job_link(view, c.last_job_id) if c.last_job_id else "-") for c in crons),
                 "no crons (a worker registers its queues' crons when it starts)", "crons")


def stats_page(view: View, queues: Sequence[str], queue: str | None, day: dt.date | None, stats: Any) -> str:
    """One queue's day: counts, wait and run summaries, and both histograms."""
    options = "".join(f'<option{" selected" if name == queue else ""}>{h(name)}</option>' for name in queues)
    picker = (f'<form method="get" action="{view.url("/stats")}" class="stats-picker">'
              f'<label>Queue <select name="queue">{options}</select></label> '
              f'<label>Day <input type="date" name="day" value="{h(day.isoformat() if day else "")}"></label> '
              f'<button type="submit">Show</button></form>')
    if stats is None:
        return picker + '<p class="empty">no queues yet</p>'
    parts = [picker, f'<p class="counts">Queue {h(stats.queue)} on {h(stats.day.isoformat())} (UTC): '
                     f'<strong>{h(stats.failed)}</strong> failed, <strong>{h(stats.retried)}</strong> retried, '
                     f'<strong>{h(stats.expired)}</strong> expired</p>']
    for label, timing in (("Wait (eta to first start)", stats.wait), ("Run (start to finish)", stats.run)):
        summary = (f"{timing.count} job(s), mean {format_seconds(timing.mean)}, std {format_seconds(timing.std)}"
                   if timing.count else "no jobs succeeded")
        parts.append(f'<section class="timing"><h2>{h(label)}</h2><p>{h(summary)}</p>'
                     f'{histogram(timing.histogram, BUCKETS, f"{label}: jobs per duration")}</section>')
    return "".join(parts)


def message_page(view: View, text: str) -> str:
    """The body of an error page: one line, and the way back."""
    return f'<p class="problem">{h(text)}</p><p>{link(view, "/", "Back to the queues")}</p>'
