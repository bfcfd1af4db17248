"""Mail tasks.  They write to the outbox in the job's own session, so a mail
row commits exactly once, in the same transaction that completes the job.
(A mail relay would deliver the outbox rows; delivery is at least once.)"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select

import mqueue
from models import Outbox, User, utcnow


@mqueue.task(max_retries=5)
def welcome(user_id: int) -> None:
    session = mqueue.current_session()
    user = session.get(User, user_id)
    if user is None:
        raise mqueue.Fail(f"user {user_id} does not exist")
    session.add(Outbox(user_id=user.id, job_id=mqueue.current_job().id,
                       to_address=user.email, subject="Welcome!",
                       body=f"Hello {user.email}, thanks for signing up."))


@mqueue.cron(mqueue.HOURLY)
def digest() -> None:
    """Every hour, on the hour: tell the team how many users signed up."""
    session = mqueue.current_session()
    since = utcnow() - dt.timedelta(hours=1)
    count = session.scalar(select(func.count(User.id)).where(User.created_at >= since))
    session.add(Outbox(job_id=mqueue.current_job().id, to_address="team@example.com",
                       subject=f"{count} signup(s) in the last hour",
                       body=f"{count} user(s) signed up since {since:%Y-%m-%d %H:%M} UTC."))
