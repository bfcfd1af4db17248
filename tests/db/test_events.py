"""Events on every backend: what a tracked job reports, what every job reports when it fails
for good, and that no event exists for a change that rolled back.

Jobs run in a real worker (``run_until_empty``).  A lease is lost the way it is in
production: the worker running the job stops heartbeating, its lease runs out, the job is
rescued and another worker runs it while the first run is still inside its task; the first
run's completion must then roll back, and with it any ``succeeded`` event.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from helpers import db_now, note, note_metadata, notes, quick_worker, wait_for
from sqlalchemy import insert

import mqueue
from mqueue import admin, history
from mqueue.errors import JobNotFoundError

QUEUE = "tev"
FENCE_QUEUE = "tev-fence"

#: While set, ``flaky`` raises; a test clears it before retrying the job by hand.
flaky_breaks = threading.Event()
#: Lets the first run of ``held`` end.
gate = threading.Event()
#: ``retries`` at each start of ``held``.
held_starts: list[int] = []


def write_note(text: str) -> None:
    mqueue.current_session().execute(insert(note).values(text=text))


@mqueue.task(name="tev.ok", queue=QUEUE)
def ok(n: int) -> None:
    write_note(f"ok {n}")


@mqueue.task(name="tev.flaky", queue=QUEUE, max_retries=1, backoff=0)
def flaky() -> None:
    retries = mqueue.current_job().retries
    if flaky_breaks.is_set():
        raise RuntimeError(f"flaky run {retries} broke")
    write_note(f"flaky run {retries}")


@mqueue.task(name="tev.doomed", queue=QUEUE, max_retries=1, backoff=0)
def doomed() -> None:
    raise RuntimeError("doomed for good")


@mqueue.task(name="tev.held", queue=FENCE_QUEUE)
def held(write: bool) -> None:
    """The first run waits for ``gate``; ``write=False`` leaves the session untouched, so the
    worker's batch completer completes the run instead of the task's own transaction."""
    retries = mqueue.current_job().retries
    held_starts.append(retries)
    if retries == 0:
        gate.wait(30)
    if write:
        write_note(f"held run {retries}")


@pytest.fixture
def db(db):
    note_metadata.create_all(db.engine)
    flaky_breaks.set()
    gate.clear()
    held_starts.clear()
    yield db
    gate.set()


def worker(db, queues=(QUEUE,), **options) -> mqueue.Worker:
    return quick_worker(db, queues, **options)


def events(db, **filters) -> list:
    """Every event there is now (``follow=False``), in id order."""
    return list(admin.events(db, **filters))


def kinds(found) -> list[str]:
    return [event.kind for event in found]


def summary(found) -> list[tuple[int, str, int]]:
    """``(id, kind, job_id)`` of each event: events need not compare equal themselves."""
    return [(event.id, event.kind, event.job_id) for event in found]


# -- what is reported ----------------------------------------------------------------------


def test_a_tracked_job_reports_every_change_through_retry_failure_manual_retry_and_success(db):
    before = db_now(db)
    with db.session():
        job_id = flaky.options(track=True).enqueue()
    assert admin.get_job(db, job_id).tracked is True
    first = worker(db)
    result = first.run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (0, 1, 1)
    flaky_breaks.clear()
    assert admin.retry_job(db, job_id).state == "queued"
    second = worker(db)
    assert second.run_until_empty(timeout=30).succeeded == 1
    assert notes(db.engine) == ["flaky run 0"]  # the manual retry gave it its full budget back

    found = events(db, job_id=job_id)
    assert kinds(found) == ["put", "popped", "retried", "popped", "failed", "put", "popped", "succeeded"]
    assert {(event.job_id, event.queue, event.name) for event in found} == {(job_id, QUEUE, "tev.flaky")}
    assert [event.worker for event in found if event.kind == "popped"] == [first.owner, first.owner, second.owner]
    assert found[-1].worker == second.owner
    retried, failed = found[2], found[4]
    assert "RuntimeError: flaky run 0 broke" in retried.detail and "flaky run 1" not in retried.detail
    assert "RuntimeError: flaky run 1 broke" in failed.detail

    ids = [event.id for event in found]
    assert ids == sorted(set(ids))
    times = [event.at for event in found]
    assert all(isinstance(at, dt.datetime) and at.tzinfo is None for at in times)
    assert times == sorted(times)
    assert before - dt.timedelta(seconds=1) <= times[0] and times[-1] <= db_now(db) + dt.timedelta(seconds=1)
    assert summary(events(db)) == summary(found)  # nothing else reported anything


def test_an_untracked_job_reports_only_a_failure_for_good(db):
    with db.session():
        doomed_id = doomed.enqueue()
        ok.enqueue(1)
        canceled = ok.options(delay=3600).enqueue(2)
    admin.cancel_job(db, canceled)
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (1, 1, 1)
    assert admin.get_job(db, doomed_id).tracked is False

    [failed] = events(db)  # no put, popped, retried, succeeded or canceled
    assert (failed.kind, failed.job_id, failed.queue, failed.name) == ("failed", doomed_id, QUEUE, "tev.doomed")
    assert "RuntimeError: doomed for good" in failed.detail

    # Retried by hand it says nothing, until it fails for good again.
    admin.retry_job(db, doomed_id)
    assert summary(events(db)) == summary([failed])
    assert worker(db).run_until_empty(timeout=30).failed == 1
    assert [(event.kind, event.job_id) for event in events(db)] == [("failed", doomed_id)] * 2


def test_track_and_untrack_take_effect_from_the_next_change(db):
    with db.session():
        later = ok.options(delay=3600).enqueue(1)
        soon = ok.options(track=True).enqueue(2)
    tracked = admin.track_job(db, later)
    assert (tracked.id, tracked.tracked) == (later, True)
    assert admin.get_job(db, later).tracked is True
    untracked = admin.untrack_job(db, soon)
    assert (untracked.id, untracked.tracked) == (soon, False)
    assert {job.id: job.tracked for job in admin.list_jobs(db)} == {later: True, soon: False}

    admin.cancel_job(db, later)
    assert worker(db).run_until_empty(timeout=30).succeeded == 1
    # ``soon`` reported its put while tracked, then nothing; ``later`` only what followed tracking.
    assert [(event.kind, event.job_id) for event in events(db)] == [("put", soon), ("canceled", later)]

    # Finished jobs may be tracked and untracked; they never change again, so nothing follows.
    assert admin.track_job(db, soon).id == soon
    assert admin.untrack_job(db, later).id == later
    assert len(events(db)) == 2
    for action in (admin.track_job, admin.untrack_job):
        with pytest.raises(JobNotFoundError, match="123456789"):
            action(db, 123456789)


def test_events_resume_after_an_id_and_filter_by_kind_and_job(db):
    with db.session():
        a = ok.options(track=True).enqueue(1)
        b = doomed.options(track=True).enqueue()
    result = worker(db).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (1, 1, 1)

    every = events(db)
    assert len(every) == 2 + 2 + 4  # a: put popped succeeded; b: put popped retried popped failed
    assert [event.id for event in every] == sorted({event.id for event in every})
    assert summary(events(db, since=None)) == summary(every)
    for position, event in enumerate(every):
        assert summary(events(db, since=event.id)) == summary(every[position + 1:])
    assert events(db, since=every[-1].id + 1000) == []

    assert summary(events(db, kind="popped")) == summary([e for e in every if e.kind == "popped"])
    assert kinds(events(db, job_id=a)) == ["put", "popped", "succeeded"]
    assert kinds(events(db, job_id=b)) == ["put", "popped", "retried", "popped", "failed"]
    assert [(e.kind, e.job_id) for e in events(db, kind="failed", job_id=b, since=every[0].id)] == [("failed", b)]
    assert events(db, kind="succeeded", job_id=b) == []
    assert events(db, job_id=123456789) == []
    with pytest.raises(ValueError, match="nope"):
        events(db, kind="nope")


# -- a completion that rolls back ----------------------------------------------------------


@pytest.mark.parametrize("write", [True, False], ids=["writes", "quiet"])
def test_a_completion_refused_for_a_lost_lease_reports_no_success(db, write):
    with db.session():
        job_id = held.options(track=True).enqueue(write=write)
    # The first worker never renews its 1 s lease (as if paused) and runs one job at a time.
    first = worker(db, queues=[FENCE_QUEUE], lease=1, heartbeat_interval=60)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(first=first.run_until_empty(timeout=30)),
                              name="tev-first-worker")
    thread.start()
    try:
        wait_for(lambda: held_starts == [0], timeout=10, message=lambda: f"runs: {held_starts}")
        # The lease runs out and the job is rescued while the first run is still in its task.
        wait_for(lambda: (job := admin.get_job(db, job_id)).state == "queued" and job.retries == 1,
                 timeout=10, message=lambda: f"not rescued: {admin.get_job(db, job_id)}")
        second = worker(db, queues=[FENCE_QUEUE])
        assert second.run_until_empty(timeout=30).succeeded == 1
    finally:
        gate.set()
        thread.join(30)
    assert not thread.is_alive()
    assert (outcome["first"].succeeded, outcome["first"].lost) == (0, 1)
    assert notes(db.engine) == (["held run 1"] if write else [])
    assert admin.get_job(db, job_id).state == "succeeded"

    found = events(db, job_id=job_id)
    assert kinds(found) == ["put", "popped", "stalled", "popped", "succeeded"]
    # Popped by the first worker, stalled there, popped and completed by the second: one success.
    assert [event.worker for event in found[1:]] == [first.owner, first.owner, second.owner, second.owner]
    assert summary(events(db)) == summary(found)


def test_a_tracked_job_handed_back_at_shutdown_reports_released(db):
    with db.session():
        job_id = held.options(track=True).enqueue(write=True)
    w = worker(db, queues=[FENCE_QUEUE], grace=0.2)
    thread = threading.Thread(target=w.run, name="tev-stopping-worker")
    thread.start()
    try:
        wait_for(lambda: held_starts == [0], timeout=10, message=lambda: f"runs: {held_starts}")
        w.stop()  # the run outlasts the grace period: the job is handed back
        thread.join(10)
        assert not thread.is_alive()
    finally:
        gate.set()
    assert admin.get_job(db, job_id).state == "queued"
    found = events(db, job_id=job_id)
    assert kinds(found) == ["put", "popped", "released"]
    assert [event.worker for event in found[1:]] == [w.owner, w.owner]


# -- following -------------------------------------------------------------------------------


def follow_lag(db, database_url, **options) -> float:
    """Seconds from the commit of an event on another connection to its arrival in a follower.

    The follower first receives an event that was there before it started: after that it
    is surely waiting for news when the second one commits.  It then stops iterating and
    closes the generator, which must end cleanly and give back its connection.
    """
    producer = mqueue.Database(database_url)
    received, errors = [], []

    def follow() -> None:
        stream = admin.events(db, follow=True, since=0, **options)
        try:
            for event in stream:
                received.append((time.monotonic(), event))
                if len(received) == 2:
                    break
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            stream.close()

    try:
        with producer.session():
            first = ok.options(track=True, delay=3600).enqueue(1)
        thread = threading.Thread(target=follow, name="tev-follower", daemon=True)
        thread.start()
        wait_for(lambda: received or errors, timeout=10, message="the follower saw nothing")
        with producer.session():
            second = ok.options(track=True, delay=3600).enqueue(2)
        committed = time.monotonic()
        wait_for(lambda: len(received) == 2 or errors, timeout=options.get("poll_interval", 0.5) + 5,
                 message=lambda: f"the follower did not see job {second}'s put: {received}")
        thread.join(5)
    finally:
        producer.dispose()
    assert errors == []
    assert not thread.is_alive(), "the follower did not stop"
    (_, put_first), (arrived, put_second) = received
    assert [(put_first.kind, put_first.job_id), (put_second.kind, put_second.job_id)] == [
        ("put", first), ("put", second)]
    assert db.engine.pool.checkedout() == 0  # the closed generator gave its connection back
    return arrived - committed


def test_follow_sees_an_event_committed_elsewhere_within_a_second(db, database_url, backend):
    lag = follow_lag(db, database_url)
    print(f"\n[{backend}] events(follow=True): an event arrived {lag:.3f}s after its commit")
    assert lag < 1.0


@pytest.mark.backends("postgresql")
def test_on_postgresql_a_notify_wakes_the_follower_long_before_its_next_poll(db, database_url):
    lag = follow_lag(db, database_url, poll_interval=10)
    assert lag < 1.0


def test_follow_waits_for_news_when_there_is_none_yet(db):
    assert events(db) == []  # without follow, an empty log ends the read at once
    received = []

    def follow_until_one() -> None:
        stream = admin.events(db, follow=True, poll_interval=0.05)
        try:
            for event in stream:
                received.append(event)
                break
        finally:
            stream.close()

    thread = threading.Thread(target=follow_until_one, name="tev-idle-follower", daemon=True)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and received == []  # follow never ends on its own
    with db.session():
        job_id = ok.options(track=True, delay=3600).enqueue(1)
    thread.join(5)
    assert not thread.is_alive()
    assert [(event.kind, event.job_id) for event in received] == [("put", job_id)]


# -- pruning -----------------------------------------------------------------------------------


def test_pruned_jobs_take_their_events_with_them(db):
    with db.session():
        done = ok.options(track=True).enqueue(1)
        live = ok.options(track=True, delay=3600).enqueue(2)
    assert worker(db).run_until_empty(timeout=30).succeeded == 1
    assert kinds(events(db, job_id=done)) == ["put", "popped", "succeeded"]

    # Pruned by count (no finished job kept): its events go, a live job's stay.
    admin.set_config(db, "jobs-history-count", 0)
    assert history.prune(db).jobs == 1
    assert events(db, job_id=done) == []
    assert kinds(events(db)) == ["put"] and events(db)[0].job_id == live

    # Pruned by age, 400 days on: once finished, the other job goes the same way.
    admin.set_config(db, "jobs-history-count", None)
    admin.retry_job(db, live)  # due now
    assert worker(db).run_until_empty(timeout=30).succeeded == 1
    assert kinds(events(db, job_id=live))[-2:] == ["popped", "succeeded"]
    assert history.prune(db, now=db_now(db) + dt.timedelta(days=400)).jobs == 1
    assert events(db) == []
