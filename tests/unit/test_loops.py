"""``mqueue.loops.Loop``: a lost race is retried within milliseconds and counted; an outage backs off."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.exc import OperationalError

from helpers import wait_for

from mqueue.loops import CONFLICT_JITTER_SECONDS, Loop, OutageLog, outage_delay


def failing_step(errors: int, error: Exception, calls: list[float], done: threading.Event):
    def step() -> float:
        calls.append(time.monotonic())
        if len(calls) <= errors:
            raise error
        done.set()
        return 60.0
    return step


def lost_race() -> OperationalError:
    return OperationalError("COMMIT", {}, Exception(1213, "Deadlock found when trying to get lock"))


def test_a_lost_race_is_retried_at_once_counted_and_not_logged_as_an_outage(caplog):
    calls: list[float] = []
    done = threading.Event()
    loop = Loop("claiming", failing_step(5, lost_race(), calls, done),
                conflict=lambda error: error.orig.args[0] == 1213)
    with caplog.at_level(logging.DEBUG, logger="mqueue.worker"):
        loop.start("test-loop")
        assert done.wait(5)
        loop.stop()
        assert loop.join(5)
    assert loop.conflicts == 5
    # Five outage backoffs would take 0.25 + 0.5 + 1 + 2 + 4 s; five jitters take milliseconds.
    assert calls[-1] - calls[0] < sum(outage_delay(n) for n in range(1, 6)) / 4
    assert CONFLICT_JITTER_SECONDS < outage_delay(1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("lost a race" in r.getMessage() for r in caplog.records) == 5


def test_the_same_error_without_a_conflict_rule_is_an_outage(caplog):
    calls: list[float] = []
    done = threading.Event()
    loop = Loop("claiming", failing_step(1, lost_race(), calls, done))
    with caplog.at_level(logging.INFO, logger="mqueue.worker"):
        loop.start("test-loop")
        assert done.wait(5)
        loop.stop()
        assert loop.join(5)
    assert loop.conflicts == 0
    assert calls[1] - calls[0] >= outage_delay(1) - 0.01
    assert any("database unavailable while claiming" in r.getMessage() for r in caplog.records)


def test_a_loop_that_sees_the_database_back_ends_the_backoff_of_the_others(caplog):
    """The claiming loop, deep in its backoff, claims as soon as the heartbeat finds the database back."""
    up = threading.Event()
    claims: list[float] = []
    beat_wake = threading.Event()

    def claim() -> float:
        claims.append(time.monotonic())
        if not up.is_set():
            raise lost_race()
        return 60.0

    def beat() -> float:
        if not up.is_set():
            raise lost_race()
        return 60.0

    outages = OutageLog()
    claiming = Loop("claiming", claim, outages=outages)
    heartbeating = Loop("heartbeating", beat, wake=beat_wake, outages=outages)
    with caplog.at_level(logging.INFO, logger="mqueue.worker"):
        claiming.start("test-claim")
        heartbeating.start("test-beat")
        wait_for(lambda: len(claims) == 4, timeout=5)   # now sleeping outage_delay(4) = 2 s
        up.set()
        back = time.monotonic()
        beat_wake.set()                                  # the heartbeat's next step succeeds
        wait_for(lambda: len(claims) == 5, timeout=5)
        for loop in (claiming, heartbeating):
            loop.stop()
            assert loop.join(5)
    assert outage_delay(4) == 2.0
    assert claims[4] - back < 0.5, claims[4] - back
    assert sum("database available again (heartbeating)" in r.getMessage() for r in caplog.records) == 1
