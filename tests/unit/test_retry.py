"""The pure retry policy: backoff schedules and the retry-or-fail decision."""

from __future__ import annotations

import pytest

import mqueue
from mqueue.retry import (MAX_BACKOFF_SECONDS, Decision, backoff_seconds, check_backoff, decide,
                          default_backoff)

TWELVE_HOURS = 12 * 3600


def test_default_backoff_is_60_seconds_times_five_to_the_retry_minus_one():
    assert [default_backoff(n) for n in range(1, 7)] == [60, 300, 1500, 7500, 37500, TWELVE_HOURS]
    assert MAX_BACKOFF_SECONDS == TWELVE_HOURS


@pytest.mark.parametrize("retry_number", [6, 7, 10, 20, 21, 100, 10_000])
def test_default_backoff_is_capped_at_twelve_hours(retry_number):
    assert default_backoff(retry_number) == TWELVE_HOURS


def test_default_backoff_applies_when_no_backoff_is_given():
    assert [backoff_seconds(None, n) for n in (1, 2, 3)] == [60, 300, 1500]


def test_constant_backoff():
    backoff = check_backoff(5)
    assert [backoff_seconds(backoff, n) for n in (1, 2, 10)] == [5, 5, 5]
    assert backoff_seconds(check_backoff(0), 3) == 0


def test_sequence_backoff_gives_each_retry_in_turn_then_repeats_the_last():
    backoff = check_backoff([1, 10, 100])
    assert [backoff_seconds(backoff, n) for n in range(1, 6)] == [1, 10, 100, 100, 100]
    single = check_backoff((7,))
    assert [backoff_seconds(single, n) for n in (1, 2, 3)] == [7, 7, 7]


def test_callable_backoff_receives_the_retry_number():
    calls = []

    def backoff(retry_number):
        calls.append(retry_number)
        return retry_number * 2.5

    assert [backoff_seconds(check_backoff(backoff), n) for n in (1, 2, 3)] == [2.5, 5.0, 7.5]
    assert calls == [1, 2, 3]


def test_negative_callable_backoff_means_now():
    assert backoff_seconds(lambda n: -10, 1) == 0


@pytest.mark.parametrize("bad", [-1, [], [1, -1], ["1"], "60", True, [True], {"a": 1}])
def test_bad_backoff_is_refused(bad):
    with pytest.raises(ValueError, match="backoff"):
        check_backoff(bad)


def test_decide_retries_with_backoff_then_fails():
    error = RuntimeError("boom")
    assert decide(error, 0, 3, None) == Decision("retry", 60)
    assert decide(error, 1, 3, None) == Decision("retry", 300)
    assert decide(error, 2, 3, None) == Decision("retry", 1500)
    assert decide(error, 3, 3, None).action == "fail"


def test_decide_uses_the_task_backoff():
    error = ValueError("x")
    assert decide(error, 0, 5, check_backoff([2, 4])) == Decision("retry", 2)
    assert decide(error, 1, 5, check_backoff([2, 4])) == Decision("retry", 4)
    assert decide(error, 4, 5, check_backoff([2, 4])) == Decision("retry", 4)
    assert decide(error, 2, 5, lambda n: n * 100) == Decision("retry", 300)


@pytest.mark.parametrize("max_retries", [0, 1, 2, 10])
def test_a_job_runs_at_most_max_retries_plus_one_times(max_retries):
    retries = 0
    runs = 0
    while True:
        runs += 1
        outcome = decide(RuntimeError("always"), retries, max_retries, None)
        if outcome.action == "fail":
            break
        assert outcome.action == "retry"
        retries += 1
        assert runs < 1000
    assert runs == max_retries + 1


def test_max_retries_zero_fails_on_the_first_error():
    assert decide(RuntimeError(), 0, 0, None).action == "fail"


def test_retry_asks_for_its_own_delay():
    assert decide(mqueue.Retry(30), 0, 10, None) == Decision("retry", 30)
    assert decide(mqueue.Retry(0.5), 4, 10, [99]) == Decision("retry", 0.5)
    assert decide(mqueue.Retry(-5), 0, 10, None) == Decision("retry", 0)


def test_retry_without_a_delay_uses_the_backoff():
    assert decide(mqueue.Retry(), 1, 10, None) == Decision("retry", 300)


def test_retry_still_counts_against_max_retries():
    assert decide(mqueue.Retry(1), 2, 2, None).action == "fail"


def test_fail_fails_at_once_whatever_retries_remain():
    assert decide(mqueue.Fail("customer deleted"), 0, 10, None).action == "fail"
    assert str(mqueue.Fail("customer deleted")) == "customer deleted"


def test_a_broken_backoff_callable_does_not_lose_the_job():
    def broken(retry_number):
        raise ZeroDivisionError

    assert decide(RuntimeError(), 1, 5, broken) == Decision("retry", 300)


def test_retry_and_fail_are_exceptions_tasks_can_raise():
    assert issubclass(mqueue.Retry, Exception)
    assert issubclass(mqueue.Fail, Exception)
    retry = mqueue.Retry(12)
    assert retry.delay == 12
