"""Tags on every backend: set at enqueue or by hand, searched across every state, bounded,
kept on finished jobs until they are pruned, and free for a job that has none.

Jobs run in a real worker (``run_until_empty``); a job another worker holds is claimed
through the dialect, as a worker elsewhere would.  Pruning gets its clock injected
(``history.prune(db, now=...)``).  Tag rows are counted straight from ``mqueue_tag``
because "a job without tags costs nothing" is a claim about rows, not about the API.
"""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select, text

import mqueue
from mqueue import admin, history
from mqueue.errors import JobNotFoundError
from mqueue.schema import task_table

QUEUE = "ttag"
#: A queue no worker of these tests serves: its job is claimed by ``OTHER``.
HELD_QUEUE = "ttag-held"
#: The owner string of a worker elsewhere.
OTHER = "other-host:4242:beef"


@mqueue.task(name="ttag.ok", queue=QUEUE)
def ok(n: int) -> None:
    """Succeeds."""


@mqueue.task(name="ttag.broken", queue=QUEUE, max_retries=0)
def broken() -> None:
    raise RuntimeError("broken for good")


def worker(db) -> mqueue.Worker:
    return mqueue.Worker(db, queues=[QUEUE], poll_interval=0.05, lease=10)


def db_now(db) -> dt.datetime:
    with db.engine.connect() as conn:
        return db.dialect.db_now(conn)


def tag_rows(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(text("SELECT COUNT(*) FROM mqueue_tag")).scalar_one()


def job_rows(db) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(task_table)).scalar_one()


def tags_of(db, job_id) -> tuple[str, ...]:
    return admin.get_job(db, job_id).tags


def tagged(db, tag, **options) -> list[int]:
    return [job.id for job in admin.jobs_tagged(db, tag, **options)]


# -- round trip -------------------------------------------------------------------------


def test_tags_round_trip_through_enqueue_tag_untag_and_list(db):
    with db.session():
        a = ok.options(tags=["urgent", "account:42", "urgent"]).enqueue(1)  # the duplicate collapses
        b = ok.options(tags=["account:7"]).enqueue(2)
        c = ok.enqueue(3)
    assert tags_of(db, a) == ("account:42", "urgent")  # sorted
    assert tags_of(db, b) == ("account:7",)
    assert tags_of(db, c) == ()

    assert sorted(admin.tag_job(db, a, "vip", "urgent")) == ["account:42", "urgent", "vip"]
    assert tags_of(db, a) == ("account:42", "urgent", "vip")
    # A tag the job does not have is no error; the result is the job's tags after.
    assert sorted(admin.untag_job(db, a, "urgent", "never-had-it")) == ["account:42", "vip"]
    assert tags_of(db, a) == ("account:42", "vip")
    assert admin.tag_job(db, c, "account:42") == ["account:42"]

    # Every way of reading a job fills its tags.
    assert {job.id: job.tags for job in admin.list_jobs(db)} == {
        a: ("account:42", "vip"), b: ("account:7",), c: ("account:42",)}
    assert sorted(job.id for job in admin.list_jobs(db, tag="account:42")) == [a, c]
    assert sorted(job.id for job in admin.list_jobs(db, tag="account:42", queue=QUEUE)) == [a, c]
    assert admin.list_jobs(db, tag="account:42", queue="elsewhere") == []
    assert admin.list_jobs(db, tag="account:4") == []  # exact match, not a prefix
    assert [(job.id, job.tags) for job in admin.jobs_tagged(db, "account:42")] == [
        (c, ("account:42",)), (a, ("account:42", "vip"))]  # newest first
    assert tagged(db, "nobody") == []

    # Removing the last tags leaves no row behind.
    admin.untag_job(db, a, "account:42", "vip")
    admin.untag_job(db, b, "account:7")
    admin.untag_job(db, c, "account:42")
    assert [tags_of(db, job_id) for job_id in (a, b, c)] == [(), (), ()]
    assert tag_rows(db) == 0


def test_tags_are_exact_strings_on_every_backend(db):
    """Case and accents make another tag, as in Python (and qless): a database collation
    that folds them would merge tags or refuse one as a duplicate.  White space around a
    tag is refused (MySQL would compare "urgent " equal to "urgent")."""
    with pytest.raises(ValueError, match="white space"):
        ok.options(tags=["urgent "])
    variants = ["urgent", "Urgent", "URGENT", "urg\N{LATIN SMALL LETTER E WITH ACUTE}nt"]
    with db.session():
        alone = {tag: ok.options(tags=[tag]).enqueue(n) for n, tag in enumerate(variants)}
        every = ok.options(tags=variants).enqueue(99)
    assert tags_of(db, every) == tuple(sorted(variants))
    for tag, job_id in alone.items():
        assert tagged(db, tag) == [every, job_id], repr(tag)
        assert sorted(job.id for job in admin.list_jobs(db, tag=tag)) == [job_id, every], repr(tag)
    assert sorted(admin.untag_job(db, every, "urgent")) == sorted(variants[1:])


def test_enqueue_many_tags_every_job(db):
    with db.session():
        ids = ok.options(tags=["batch:1", "import"]).enqueue_many([dict(n=1), dict(n=2), dict(n=3)])
    assert [tags_of(db, job_id) for job_id in ids] == [("batch:1", "import")] * 3
    assert tagged(db, "batch:1") == ids[::-1]


def test_tag_and_untag_an_unknown_job(db):
    for action in (admin.tag_job, admin.untag_job):
        with pytest.raises(JobNotFoundError, match="123456789"):
            action(db, 123456789, "urgent")
    assert tag_rows(db) == 0


# -- search across states ---------------------------------------------------------------


def test_search_by_tag_covers_live_and_finished_jobs_newest_first(db):
    tag = "order:1001"
    with db.session():
        queued = ok.options(tags=[tag], delay=3600).enqueue(1)
        succeeded = ok.options(tags=[tag, "paid"]).enqueue(2)
        ok.options(tags=["order:1002"]).enqueue(3)  # another tag
        running = ok.options(tags=[tag], queue=HELD_QUEUE).enqueue(4)
        ok.enqueue(5)  # no tag
        failed = broken.options(tags=[tag]).enqueue()
        canceled = ok.options(tags=[tag], delay=3600).enqueue(6)
    with db.engine.begin() as conn:
        [claim] = db.dialect.claim_jobs(conn, HELD_QUEUE, 1, OTHER, 600)
    assert claim.id == running
    admin.cancel_job(db, canceled)
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.failed) == (3, 1)

    expected = [(canceled, "canceled"), (failed, "failed"), (running, "running"), (succeeded, "succeeded"),
                (queued, "queued")]
    assert [(job.id, job.state) for job in admin.jobs_tagged(db, tag)] == expected
    assert all(tag in job.tags for job in admin.jobs_tagged(db, tag))
    assert tagged(db, tag, limit=2) == [canceled, failed]
    assert tagged(db, tag, limit=1) == [canceled]
    assert tagged(db, "paid") == [succeeded]

    # list_jobs filters by tag within a state, finished states included.
    for job_id, state in expected:
        assert [job.id for job in admin.list_jobs(db, tag=tag, state=state)] == [job_id]
    assert sorted(job.id for job in admin.list_jobs(db, tag=tag)) == sorted(job_id for job_id, _ in expected)

    # A finished job takes and drops tags too.
    assert sorted(admin.tag_job(db, succeeded, "audited")) == ["audited", "order:1001", "paid"]
    assert tags_of(db, succeeded) == ("audited", "order:1001", "paid")
    assert tagged(db, "audited") == [succeeded]
    assert admin.untag_job(db, canceled, tag) == []
    assert tagged(db, tag) == [failed, running, succeeded, queued]


# -- limits -----------------------------------------------------------------------------


BAD_TAGS = {
    "101-characters": ["x" * 101],
    "51-tags": [f"t{number}" for number in range(51)],
    "empty": [""],
    "int": [42],
    "none": [None],
    "bytes": [b"urgent"],
    "good-and-bad": ["fine", "y" * 101],
}


@pytest.mark.parametrize("bad", list(BAD_TAGS.values()), ids=list(BAD_TAGS))
def test_bad_tags_raise_value_error_and_store_nothing(db, bad):
    with db.session():
        kept = ok.enqueue(0)
        with pytest.raises(ValueError) as caught:
            ok.options(tags=bad).enqueue(1)
        assert "\n" not in str(caught.value)
        with pytest.raises(ValueError):
            ok.options(tags=bad).enqueue_many([dict(n=2), dict(n=3)])
    with pytest.raises(ValueError) as caught:
        admin.tag_job(db, kept, *bad)
    assert "\n" not in str(caught.value)
    assert (job_rows(db), tag_rows(db)) == (1, 0)
    assert tags_of(db, kept) == ()


def test_the_limits_themselves_are_allowed(db):
    longest = "\N{LABEL}" * 100  # 100 characters, 400 bytes of UTF-8
    fifty = [f"tag-{number:02d}" for number in range(50)]
    with db.session():
        long_id = ok.options(tags=[longest, "x" * 100]).enqueue(1)
        full_id = ok.options(tags=fifty).enqueue(2)
    assert tags_of(db, long_id) == tuple(sorted([longest, "x" * 100]))
    assert tagged(db, longest) == [long_id]
    assert tags_of(db, full_id) == tuple(fifty)

    # A 51st tag by hand is refused and changes nothing; one the job has already is no new tag.
    with pytest.raises(ValueError):
        admin.tag_job(db, full_id, "one-too-many")
    assert tags_of(db, full_id) == tuple(fifty)
    assert sorted(admin.tag_job(db, full_id, "tag-07")) == fifty
    # Room made by untagging can be used again.
    admin.untag_job(db, full_id, "tag-00")
    assert "one-more" in admin.tag_job(db, full_id, "one-more")
    assert len(tags_of(db, full_id)) == 50


# -- finished jobs and pruning ------------------------------------------------------------


def test_tags_stay_on_finished_jobs_until_they_are_pruned_and_go_with_them(db):
    with db.session():
        done = ok.options(tags=["customer:9", "export"]).enqueue(1)
        live = ok.options(tags=["customer:9"], delay=3600).enqueue(2)
        failed = broken.options(tags=["customer:9"]).enqueue()
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.failed) == (1, 1)
    assert tags_of(db, done) == ("customer:9", "export")
    assert tagged(db, "customer:9") == [failed, live, done]

    # A prune that does not take the job leaves its tags alone.
    assert history.prune(db, now=db_now(db)).jobs == 0
    assert tagged(db, "export") == [done]

    assert history.prune(db, now=db_now(db) + dt.timedelta(days=400)).jobs == 1
    with pytest.raises(JobNotFoundError):
        admin.get_job(db, done)
    assert tagged(db, "export") == []
    assert tagged(db, "customer:9") == [failed, live]  # failed and live jobs are never pruned
    # The pruned job left no tag row behind: once the others drop theirs, none is left.
    admin.untag_job(db, live, "customer:9")
    admin.untag_job(db, failed, "customer:9")
    assert tag_rows(db) == 0


def test_a_job_without_tags_writes_no_tag_rows(db):
    with db.session():
        ok.enqueue(1)
        ok.options(priority=5, track=True).enqueue(2)
        ok.enqueue_many([dict(n=3), dict(n=4)])
        failed = broken.enqueue()
        canceled = ok.options(delay=3600).enqueue(5)
    admin.cancel_job(db, canceled)
    assert worker(db).run_until_empty(timeout=30).succeeded == 4
    admin.retry_job(db, failed)
    assert worker(db).run_until_empty(timeout=30).failed == 1
    assert tag_rows(db) == 0
    assert all(job.tags == () for job in admin.list_jobs(db))
    assert all(job.tags == () for job in admin.list_jobs(db, state="succeeded"))
