"""``/metrics``: Prometheus text exposition format (version 0.0.4), read through ``mqueue.admin``.

* ``mqueue_jobs{queue,state}`` (gauge): jobs per queue and state; ``queued``
  is due now, ``scheduled`` waits for a later eta.
* ``mqueue_oldest_due_seconds{queue}`` (gauge): how long the oldest due job
  has waited past its eta (0 when none is due).
* ``mqueue_queue_paused{queue}`` (gauge): 1 while the queue is paused.
* ``mqueue_runs_total{queue,outcome}`` (counter): today's (UTC) runs from the
  daily stats: ``succeeded``, ``retried`` (failed and retried, lost leases
  included), ``failed`` (for good), ``expired``.  It starts again from 0 at
  midnight UTC, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

from .. import admin
from ..session import Database

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("queued", "scheduled", "running", "waiting", "failed", "succeeded", "canceled", "expired", "other")


def label(value: str) -> str:
    """A label value in the exposition format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def render(db: Database) -> str:
    queues = admin.stats(db)
    lines = ["# HELP mqueue_jobs Jobs per queue and state (queued: due now; scheduled: waiting for a later eta).",
             "# TYPE mqueue_jobs gauge"]
    for q in queues:
        for state in STATES:
            lines.append(f'mqueue_jobs{{queue="{label(q.queue)}",state="{state}"}} {getattr(q, state)}')
    lines += ["# HELP mqueue_oldest_due_seconds Seconds the oldest due job of the queue has waited past its eta.",
              "# TYPE mqueue_oldest_due_seconds gauge"]
    for q in queues:
        lines.append(f'mqueue_oldest_due_seconds{{queue="{label(q.queue)}"}} {q.oldest_due_seconds or 0:.3f}')
    lines += ["# HELP mqueue_queue_paused 1 while workers claim no job of the queue (mqueue pause).",
              "# TYPE mqueue_queue_paused gauge"]
    for q in queues:
        lines.append(f'mqueue_queue_paused{{queue="{label(q.queue)}"}} {int(q.paused)}')
    lines += ["# HELP mqueue_runs_total Runs today (UTC) by outcome, from the daily stats; resets at midnight UTC.",
              "# TYPE mqueue_runs_total counter"]
    for q in queues:
        day = admin.queue_stats(db, q.queue)
        for outcome, count in (("succeeded", day.run.count), ("retried", day.retried), ("failed", day.failed),
                               ("expired", day.expired)):
            lines.append(f'mqueue_runs_total{{queue="{label(q.queue)}",outcome="{outcome}"}} {count}')
    return "\n".join(lines) + "\n"
