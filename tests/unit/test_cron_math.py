"""Schedule math of ``mqueue.cron``: helpers, validation, DST policy, due slots.

No database, no sleeping: every test uses fixed datetimes.  The DST tests
compare ``Schedule`` against a brute-force oracle that walks UTC minute by
minute, converts each minute to local time with zoneinfo and applies the
documented policy with its own small cron matcher (croniter is not used).
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import random
import time

import pytest
from zoneinfo import ZoneInfo

from mqueue.cron import (
    DAILY, HOURLY, MINUTELY, MONTHLY, WEEKLY, YEARLY, Daily, Days, Hourly, Hours, Minutely, Minutes,
    Monthly, Months, Schedule, ScheduleHelper, Weekday, Weekly, Yearly, check_cron_function, due_slot,
    next_slot,
)

D = dt.datetime
MINUTE = dt.timedelta(minutes=1)
UTC = dt.timezone.utc


# -- helpers -----------------------------------------------------------------

@pytest.mark.parametrize("helper, expression", [
    (Minutely(), "* * * * *"),
    (Hourly(), "0 * * * *"),
    (Hourly(minute=15), "15 * * * *"),
    (Hourly(45), "45 * * * *"),
    (Daily(), "0 0 * * *"),
    (Daily(hour=3), "0 3 * * *"),
    (Daily(hour=3, minute=30), "30 3 * * *"),
    (Weekly(), "0 0 * * 0"),
    (Weekly(day=1), "0 0 * * 1"),
    (Weekly(day=5, hour=17), "0 17 * * 5"),
    (Monthly(), "0 0 1 * *"),
    (Monthly(day=15), "0 0 15 * *"),
    (Monthly(day=31, hour=6), "0 6 31 * *"),
    (Yearly(), "0 0 1 1 *"),
    (Yearly(month=7), "0 0 1 7 *"),
    (Yearly(month=2, day=29), "0 0 29 2 *"),
    (Minutes(5), "*/5 * * * *"),
    (Minutes(n=15), "*/15 * * * *"),
    (Hours(6), "0 */6 * * *"),
    (Days(2), "0 0 */2 * *"),
    (Months(3), "0 0 1 */3 *"),
    (Weekday(), "0 0 * * 1-5"),
    (Weekday(hour=9), "0 9 * * 1-5"),
])
def test_helper_expressions(helper, expression):
    assert helper.expression == expression
    schedule = Schedule.parse(helper)
    assert schedule.expression == expression
    assert schedule.tz == "UTC"


@pytest.mark.parametrize("cls", [Minutely, Hourly, Daily, Weekly, Monthly, Yearly, Minutes, Hours, Days,
                                 Months, Weekday])
def test_helper_class_passed_uncalled_means_defaults(cls):
    assert Schedule.parse(cls) == Schedule.parse(cls())
    assert Schedule.parse(cls, tz="Europe/Berlin").tz == "Europe/Berlin"


def test_constants_are_the_defaults():
    assert (MINUTELY, HOURLY, DAILY, WEEKLY, MONTHLY, YEARLY) == (
        Minutely(), Hourly(), Daily(), Weekly(), Monthly(), Yearly())
    assert [c.expression for c in (MINUTELY, HOURLY, DAILY, WEEKLY, MONTHLY, YEARLY)] == [
        "* * * * *", "0 * * * *", "0 0 * * *", "0 0 * * 0", "0 0 1 * *", "0 0 1 1 *"]
    assert all(isinstance(c, ScheduleHelper) for c in (MINUTELY, HOURLY, DAILY, WEEKLY, MONTHLY, YEARLY))


def test_helpers_read_well():
    assert repr(Hourly(minute=5)) == "Hourly(minute=5)"
    assert repr(Minutes(5)) == "Minutes(n=5)"
    assert str(Hourly(minute=5)) == "every hour at minute 5"
    assert str(Daily(hour=3, minute=30)) == "every day at 03:30"
    assert str(Weekly(day=1, hour=9)) == "every Monday at 09:00"
    assert str(Weekly()) == "every Sunday at 00:00"
    assert str(Monthly(day=15)) == "on day 15 of every month at 00:00"
    assert str(Yearly(month=3, day=2)) == "every year on 2 March at 00:00"
    assert str(Minutes(5)) == "every 5 minutes"
    assert str(Hours(2)) == "every 2 hours"
    assert str(Days(3)) == "every 3 days at 00:00"
    assert str(Months(3)) == "every 3 months on day 1 at 00:00"
    assert str(Weekday(hour=8)) == "every weekday (Monday to Friday) at 08:00"
    assert str(MINUTELY) == "every minute"
    assert Hourly(5) == Hourly(minute=5) and hash(Hourly(5)) == hash(Hourly(minute=5))


@pytest.mark.parametrize("build, helper, value", [
    (lambda: Hourly(61), "Hourly", "61"),
    (lambda: Hourly(-1), "Hourly", "-1"),
    (lambda: Hourly(True), "Hourly", "True"),
    (lambda: Hourly("5"), "Hourly", "'5'"),
    (lambda: Daily(hour=24), "Daily", "24"),
    (lambda: Daily(minute=60), "Daily", "60"),
    (lambda: Weekly(day=7), "Weekly", "7"),
    (lambda: Weekly(hour=-3), "Weekly", "-3"),
    (lambda: Monthly(day=0), "Monthly", "0"),
    (lambda: Monthly(day=32), "Monthly", "32"),
    (lambda: Yearly(month=13), "Yearly", "13"),
    (lambda: Yearly(month=2, day=30), "Yearly", "30"),
    (lambda: Yearly(month=4, day=31), "Yearly", "31"),
    (lambda: Minutes(0), "Minutes", "0"),
    (lambda: Minutes(60), "Minutes", "60"),
    (lambda: Minutes(2.5), "Minutes", "2.5"),
    (lambda: Hours(0), "Hours", "0"),
    (lambda: Hours(24), "Hours", "24"),
    (lambda: Days(0), "Days", "0"),
    (lambda: Days(32), "Days", "32"),
    (lambda: Months(0), "Months", "0"),
    (lambda: Months(13), "Months", "13"),
    (lambda: Weekday(hour=25), "Weekday", "25"),
])
def test_out_of_range_helper_arguments_name_helper_and_value(build, helper, value):
    with pytest.raises(ValueError) as caught:
        build()
    message = str(caught.value)
    assert message.startswith(helper)
    assert f"got {value}" in message


# -- expressions and time zones -------------------------------------------

@pytest.mark.parametrize("expression, detail", [
    ("61 * * * *", "out of range"),
    ("* 24 * * *", ""),
    ("* * 32 * *", ""),
    ("* * * 13 *", ""),
    ("*/0 * * * *", ""),
    ("a b c d e", ""),
    ("* * * *", "expected 5 fields"),
    ("* * * * * *", "expected 5 fields"),
    ("0 0 1 1 * 2030", "expected 5 fields"),
    ("@hourly", "expected 5 fields"),
    ("", "expected 5 fields"),
    ("0 0 30 2 *", "never matches"),
    ("0 0 31 4 *", "never matches"),
])
def test_bad_expression_is_named(expression, detail):
    with pytest.raises(ValueError) as caught:
        Schedule.parse(expression)
    assert str(caught.value).startswith(f"invalid cron expression {expression!r}: ")
    assert detail in str(caught.value)


def test_expression_whitespace_is_normalised():
    assert Schedule.parse("  */5   *\t* * *  ").expression == "*/5 * * * *"
    assert Schedule.parse("*/5 * * * *") == Schedule.parse(" */5 * * * * ")


@pytest.mark.parametrize("tz", ["Mars/Olympus", "Europe", "", "../../etc/passwd", "/etc/localtime", None])
def test_bad_time_zone_is_named(tz):
    with pytest.raises(ValueError, match=r"^unknown time zone "):
        Schedule.parse("* * * * *", tz=tz)
    if tz:
        with pytest.raises(ValueError) as caught:
            Schedule.parse("* * * * *", tz=tz)
        assert str(caught.value) == f"unknown time zone {tz!r}"


def test_time_zone_attribute_and_zoneinfo_argument():
    assert Schedule.parse("0 3 * * *", tz="America/New_York").tz == "America/New_York"
    assert Schedule.parse("0 3 * * *", tz=ZoneInfo("Europe/Berlin")).tz == "Europe/Berlin"


def test_not_a_schedule_at_all():
    with pytest.raises(TypeError):
        Schedule.parse(5)
    with pytest.raises(TypeError):
        Schedule.parse(ScheduleHelper)


def test_next_after_is_strict_and_naive_utc():
    every_five = Schedule.parse(Minutes(5))
    assert every_five.next_after(D(2026, 5, 4, 10, 0)) == D(2026, 5, 4, 10, 5)
    assert every_five.next_after(D(2026, 5, 4, 10, 4, 59, 999999)) == D(2026, 5, 4, 10, 5)
    assert every_five.next_after(D(2026, 5, 4, 23, 57, 30)) == D(2026, 5, 5, 0, 0)
    assert every_five.next_after(D(2026, 5, 4, 10, 0)).tzinfo is None
    # an aware datetime is taken for the instant it is
    assert every_five.next_after(D(2026, 5, 4, 12, 1, tzinfo=ZoneInfo("Europe/Berlin"))) == D(2026, 5, 4, 10, 5)


def test_latest_at_or_before_is_inclusive():
    hourly = Schedule.parse(HOURLY)
    assert hourly.latest_at_or_before(D(2026, 5, 4, 10, 0)) == D(2026, 5, 4, 10, 0)
    assert hourly.latest_at_or_before(D(2026, 5, 4, 10, 59, 59)) == D(2026, 5, 4, 10, 0)
    assert hourly.latest_at_or_before(D(2026, 5, 4, 9, 59, 59, 999999)) == D(2026, 5, 4, 9, 0)
    leap = Schedule.parse(Yearly(month=2, day=29))
    assert leap.latest_at_or_before(D(2026, 5, 4)) == D(2024, 2, 29)
    assert leap.next_after(D(2026, 5, 4)) == D(2028, 2, 29)
    assert leap.latest_at_or_before(D(2103, 1, 1)) == D(2096, 2, 29)


def test_local_times_in_the_zone():
    berlin_daily = Schedule.parse(Daily(hour=3), tz="Europe/Berlin")
    assert berlin_daily.next_after(D(2026, 1, 10, 12)) == D(2026, 1, 11, 2, 0)   # CET, UTC+1
    assert berlin_daily.next_after(D(2026, 7, 10, 12)) == D(2026, 7, 11, 1, 0)   # CEST, UTC+2
    weekdays = Schedule.parse(Weekday(hour=9), tz="America/New_York")
    assert weekdays.next_after(D(2026, 1, 9, 15)) == D(2026, 1, 12, 14, 0)       # Friday -> Monday, EST


# -- DST: explicit cases -----------------------------------------------------

def chain(schedule, start, count):
    out, at = [], start
    for _ in range(count):
        at = schedule.next_after(at)
        out.append(at)
    return out


def test_nonexistent_local_time_runs_once_right_after_the_gap():
    # Berlin springs forward 2026-03-29 at 02:00 CET = 01:00 UTC to 03:00 CEST
    schedule = Schedule.parse("30 2 * * *", tz="Europe/Berlin")
    assert chain(schedule, D(2026, 3, 27, 12), 3) == [
        D(2026, 3, 28, 1, 30), D(2026, 3, 29, 1, 0), D(2026, 3, 30, 0, 30)]
    assert schedule.latest_at_or_before(D(2026, 3, 29, 1, 0)) == D(2026, 3, 29, 1, 0)
    assert schedule.latest_at_or_before(D(2026, 3, 29, 0, 59)) == D(2026, 3, 28, 1, 30)
    # New York springs forward 2026-03-08 at 02:00 EST = 07:00 UTC
    new_york = Schedule.parse("30 2 * * *", tz="America/New_York")
    assert chain(new_york, D(2026, 3, 6, 12), 3) == [
        D(2026, 3, 7, 7, 30), D(2026, 3, 8, 7, 0), D(2026, 3, 9, 6, 30)]


def test_every_time_in_the_gap_collapses_to_one_run():
    schedule = Schedule.parse("* 2 * * *", tz="Europe/Berlin")
    slots = chain(schedule, D(2026, 3, 28, 1, 58), 3)   # 02:58 CET
    assert slots == [D(2026, 3, 28, 1, 59), D(2026, 3, 29, 1, 0), D(2026, 3, 30, 0, 0)]


def test_repeated_local_time_runs_once_at_its_first_occurrence():
    # Berlin falls back 2026-10-25 at 03:00 CEST = 01:00 UTC to 02:00 CET
    schedule = Schedule.parse("30 2 * * *", tz="Europe/Berlin")
    assert chain(schedule, D(2026, 10, 23, 12), 3) == [
        D(2026, 10, 24, 0, 30), D(2026, 10, 25, 0, 30), D(2026, 10, 26, 1, 30)]
    # asked during the second occurrence of 02:xx, the next run is the next day's
    assert schedule.next_after(D(2026, 10, 25, 1, 15)) == D(2026, 10, 26, 1, 30)
    assert schedule.latest_at_or_before(D(2026, 10, 25, 1, 45)) == D(2026, 10, 25, 0, 30)
    new_york = Schedule.parse("30 1 * * *", tz="America/New_York")   # falls back 2026-11-01 06:00 UTC
    assert chain(new_york, D(2026, 10, 30, 12), 3) == [
        D(2026, 10, 31, 5, 30), D(2026, 11, 1, 5, 30), D(2026, 11, 2, 6, 30)]


def test_hourly_runs_in_both_occurrences_of_the_repeated_hour():
    schedule = Schedule.parse("0 * * * *", tz="Europe/Berlin")
    assert chain(schedule, D(2026, 10, 24, 22, 30), 5) == [
        D(2026, 10, 24, 23), D(2026, 10, 25, 0), D(2026, 10, 25, 1), D(2026, 10, 25, 2), D(2026, 10, 25, 3)]
    assert schedule.next_after(D(2026, 10, 25, 0, 0)) == D(2026, 10, 25, 1, 0)
    assert schedule.latest_at_or_before(D(2026, 10, 25, 1, 30)) == D(2026, 10, 25, 1, 0)
    # spring: 01:00 CET then 03:00 CEST, one real hour apart
    assert chain(schedule, D(2026, 3, 28, 23, 30), 2) == [D(2026, 3, 29, 0, 0), D(2026, 3, 29, 1, 0)]


def test_quarter_hours_in_the_repeated_hour_follow_real_time():
    schedule = Schedule.parse("*/15 * * * *", tz="Europe/Berlin")
    slots = chain(schedule, D(2026, 10, 24, 23, 50), 12)
    assert slots == [D(2026, 10, 25, 0, 0) + dt.timedelta(minutes=15 * i) for i in range(12)]
    # asked in the first occurrence, the next slot is 15 real minutes later
    assert schedule.next_after(D(2026, 10, 25, 0, 20)) == D(2026, 10, 25, 0, 30)
    assert schedule.latest_at_or_before(D(2026, 10, 25, 1, 20)) == D(2026, 10, 25, 1, 15)


def test_result_does_not_depend_on_the_process_time_zone(monkeypatch):
    expected = chain(Schedule.parse("30 2 * * *", tz="Europe/Berlin"), D(2026, 3, 27), 4)
    for process_tz in ("America/New_York", "Asia/Kolkata", "Europe/Berlin"):
        monkeypatch.setenv("TZ", process_tz)
        time.tzset()
        try:
            assert chain(Schedule.parse("30 2 * * *", tz="Europe/Berlin"), D(2026, 3, 27), 4) == expected
            assert chain(Schedule.parse("0 * * * *"), D(2026, 3, 8, 5), 4) == [
                D(2026, 3, 8, h) for h in (6, 7, 8, 9)]
        finally:
            monkeypatch.undo()
            time.tzset()


# -- DST: brute-force oracle -------------------------------------------------

def _field_values(spec: str, low: int, high: int) -> set[int]:
    values: set[int] = set()
    for part in spec.split(","):
        span, _, step = part.partition("/")
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (int(x) for x in span.split("-"))
        else:
            first = int(span)
            last = high if step else first
        values.update(range(first, last + 1, int(step or 1)))
    return values


@functools.lru_cache(maxsize=None)
def _matcher(expression: str):
    minute, hour, dom, month, dow = expression.split()
    minutes, hours = _field_values(minute, 0, 59), _field_values(hour, 0, 23)
    doms, months = _field_values(dom, 1, 31), _field_values(month, 1, 12)
    dows = {d % 7 for d in _field_values(dow, 0, 7)}
    restricted_dom, restricted_dow = dom != "*", dow != "*"

    def matches(wall: D) -> bool:
        if wall.minute not in minutes or wall.hour not in hours or wall.month not in months:
            return False
        in_dom, in_dow = wall.day in doms, (wall.weekday() + 1) % 7 in dows
        if restricted_dom and restricted_dow:
            return in_dom or in_dow
        return in_dom and in_dow

    return matches


@functools.lru_cache(maxsize=None)
def _walls(tz: str, start: D, end: D) -> list[tuple[D, D, int]]:
    """(utc minute, local wall time, fold) for every UTC minute in [start - 1 minute, end)."""
    zone = ZoneInfo(tz)
    out, at = [], start - MINUTE
    while at < end:
        local = at.replace(tzinfo=UTC).astimezone(zone)
        out.append((at, local.replace(tzinfo=None, fold=0), local.fold))
        at += MINUTE
    return out


@functools.lru_cache(maxsize=None)
def oracle_slots(expression: str, tz: str, start: D, end: D) -> list[D]:
    """The policy applied by brute force, minute by minute in UTC."""
    matches = _matcher(expression)
    every_hour = expression.split()[1] == "*"
    walls = _walls(tz, start, end)
    slots = []
    for (_, previous, _), (at, wall, fold) in zip(walls, walls[1:]):
        if every_hour:
            hit = matches(wall)                      # real instants: both occurrences count
        else:
            hit = matches(wall) and fold == 0        # a repeated time runs at its first occurrence
            skipped = previous + MINUTE
            while skipped < wall:                    # local times the clocks jumped over run now
                hit = hit or matches(skipped)
                skipped += MINUTE
        if hit:
            slots.append(at)
    return slots


# 2026 transitions: Berlin 03-29 01:00 UTC and 10-25 01:00 UTC; New York 03-08 07:00 UTC and 11-01 06:00 UTC
TRANSITIONS = {
    "Europe/Berlin": [D(2026, 3, 29, 1), D(2026, 10, 25, 1)],
    "America/New_York": [D(2026, 3, 8, 7), D(2026, 11, 1, 6)],
    "UTC": [D(2026, 3, 29, 1), D(2026, 10, 25, 1)],
}
EXPRESSIONS = ["30 2 * * *", "0 * * * *", "*/15 * * * *", "0 3 * * *", "0 0 * * 0", "30 1 * * *",
               "* 2 * * *", "0 */2 * * *"]
WINDOWS = [(tz, when) for tz, whens in TRANSITIONS.items() for when in whens]


def _window(when: D) -> tuple[D, D]:
    day = when.replace(hour=0, minute=0)
    return day - dt.timedelta(days=4), day + dt.timedelta(days=4)


def test_oracle_sees_the_transitions():
    """Guard the oracle itself: the transitions happen where the tests assume."""
    for tz, whens in TRANSITIONS.items():
        zone = ZoneInfo(tz)
        for when in whens:
            before = (when - MINUTE).replace(tzinfo=UTC).astimezone(zone).utcoffset()
            after = when.replace(tzinfo=UTC).astimezone(zone).utcoffset()
            assert (before != after) == (tz != "UTC")
    assert oracle_slots("30 2 * * *", "Europe/Berlin", *_window(D(2026, 3, 29)))[4] == D(2026, 3, 29, 1, 0)
    assert oracle_slots("0 * * * *", "Europe/Berlin", *_window(D(2026, 10, 25))).count(D(2026, 10, 25, 1)) == 1


@pytest.mark.parametrize("expression", EXPRESSIONS)
@pytest.mark.parametrize("tz, when", WINDOWS, ids=[f"{tz}-{when:%m-%d}" for tz, when in WINDOWS])
def test_next_after_chain_matches_oracle(expression, tz, when):
    start, end = _window(when)
    expected = oracle_slots(expression, tz, start, end)
    schedule = Schedule.parse(expression, tz=tz)
    got, at = [], schedule.next_after(start - dt.timedelta(seconds=1))
    while at < end:
        got.append(at)
        at = schedule.next_after(at)
    assert got == expected
    assert expected, "the window should hold slots"


@pytest.mark.parametrize("expression", EXPRESSIONS)
@pytest.mark.parametrize("tz, when", WINDOWS, ids=[f"{tz}-{when:%m-%d}" for tz, when in WINDOWS])
def test_searches_from_arbitrary_instants_match_oracle(expression, tz, when):
    """next_after / latest_at_or_before asked at odd instants, densely around the transition."""
    start, end = _window(when)
    expected = oracle_slots(expression, tz, start, end)
    schedule = Schedule.parse(expression, tz=tz)
    probes = [when + dt.timedelta(seconds=s) for s in range(-4 * 3600, 4 * 3600, 247)]
    probes += [start + dt.timedelta(seconds=s) for s in range(0, 8 * 86400, 7919)]
    probes += [when - MINUTE, when, when + MINUTE, when + dt.timedelta(hours=1)]
    for probe in probes:
        i = bisect.bisect_right(expected, probe)
        if i < len(expected):
            assert schedule.next_after(probe) == expected[i], probe
        if i > 0:
            assert schedule.latest_at_or_before(probe) == expected[i - 1], probe


# -- the scheduling decision -----------------------------------------------

def test_new_cron_is_not_due_at_start_up():
    schedule = Schedule.parse(MINUTELY)
    now = D(2026, 6, 1, 12, 0, 0)   # exactly on a slot, still not run at start-up
    assert due_slot(schedule, None, now) is None
    assert next_slot(schedule, None, now) == D(2026, 6, 1, 12, 1)


def test_nothing_due_before_the_next_slot():
    schedule = Schedule.parse(HOURLY)
    last = D(2026, 6, 1, 10, 0)
    assert due_slot(schedule, last, D(2026, 6, 1, 10, 0)) is None
    assert due_slot(schedule, last, D(2026, 6, 1, 10, 59, 59, 999999)) is None
    assert due_slot(schedule, last, D(2026, 6, 1, 11, 0)) == D(2026, 6, 1, 11, 0)
    assert due_slot(schedule, last, D(2026, 6, 1, 11, 0, 30)) == D(2026, 6, 1, 11, 0)
    assert next_slot(schedule, last, D(2026, 6, 1, 10, 20)) == D(2026, 6, 1, 11, 0)
    # a last slot in the future (clock skew between hosts) is never "due again"
    assert due_slot(schedule, D(2026, 6, 1, 12, 0), D(2026, 6, 1, 11, 30)) is None
    assert next_slot(schedule, D(2026, 6, 1, 12, 0), D(2026, 6, 1, 11, 30)) == D(2026, 6, 1, 13, 0)


def test_catch_up_after_downtime_is_one_run_for_the_latest_slot():
    schedule = Schedule.parse(MINUTELY)
    last = D(2026, 6, 1, 10, 0)
    now = D(2026, 6, 1, 13, 0, 30)   # three hours down: 180 slots missed
    slot = due_slot(schedule, last, now)
    assert slot == D(2026, 6, 1, 13, 0)
    assert next_slot(schedule, last, now) == slot   # due and waiting
    assert due_slot(schedule, slot, now) is None    # once taken, nothing more is due
    assert due_slot(schedule, slot, D(2026, 6, 1, 13, 0, 59)) is None
    assert due_slot(schedule, slot, D(2026, 6, 1, 13, 1)) == D(2026, 6, 1, 13, 1)
    assert next_slot(schedule, slot, now) == D(2026, 6, 1, 13, 1)


def test_catch_up_across_a_dst_change():
    schedule = Schedule.parse(Daily(hour=2, minute=30), tz="Europe/Berlin")
    # down from before the gap day until after it: one run, for the latest slot
    assert due_slot(schedule, D(2026, 3, 27, 1, 30), D(2026, 3, 29, 12)) == D(2026, 3, 29, 1, 0)
    assert due_slot(schedule, D(2026, 3, 29, 1, 0), D(2026, 3, 30, 0, 29)) is None
    assert due_slot(schedule, D(2026, 3, 29, 1, 0), D(2026, 3, 30, 0, 30)) == D(2026, 3, 30, 0, 30)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fake_clock_in_sub_minute_steps_gives_exactly_one_run_per_minute(seed):
    rng = random.Random(seed)
    schedule = Schedule.parse(MINUTELY)
    start = D(2026, 6, 1, 9, 59, 41)
    end = D(2026, 6, 1, 12, 0)   # steps under a minute: the clock visits every minute up to 11:59
    last = schedule.latest_at_or_before(start)   # the cron last ran for 09:59
    runs = []
    now = start
    while now < end:
        slot = due_slot(schedule, last, now)
        if slot is not None:
            assert slot <= now < slot + MINUTE
            runs.append(slot)
            last = slot
        now += dt.timedelta(seconds=rng.uniform(0.05, 59.9))
    assert len(runs) == 120
    assert runs == [D(2026, 6, 1, 10, 0) + i * MINUTE for i in range(120)]


def test_fake_clock_across_fall_back_runs_every_real_quarter_hour():
    rng = random.Random(7)
    schedule = Schedule.parse(Minutes(15), tz="Europe/Berlin")
    start, end = D(2026, 10, 24, 23, 50), D(2026, 10, 25, 3, 5)
    last = schedule.latest_at_or_before(start)
    runs, now = [], start
    while now < end:
        slot = due_slot(schedule, last, now)
        if slot is not None:
            runs.append(slot)
            last = slot
        now += dt.timedelta(seconds=rng.uniform(1, 200))
    assert runs == [D(2026, 10, 25, 0, 0) + i * dt.timedelta(minutes=15) for i in range(13)]


# -- the decorated function ------------------------------------------------

def no_arguments():
    pass


def only_defaults(a=1, *args, b=2, **kwargs):
    pass


def needs_one(a):
    pass


def needs_keyword(*, when):
    pass


class Holder:
    @staticmethod
    def nested(x, y=1):
        pass


@pytest.mark.parametrize("fn", [no_arguments, only_defaults, lambda: None, lambda *a, **k: None])
def test_cron_function_without_required_arguments_is_accepted(fn):
    check_cron_function(fn)


@pytest.mark.parametrize("fn, name", [
    (needs_one, f"{__name__}.needs_one"),
    (needs_keyword, f"{__name__}.needs_keyword"),
    (Holder.nested, f"{__name__}.Holder.nested"),
])
def test_cron_function_with_required_arguments_is_refused(fn, name):
    with pytest.raises(ValueError) as caught:
        check_cron_function(fn)
    assert str(caught.value) == f"cron task '{name}' must take no required arguments"


def test_cron_function_must_be_callable():
    with pytest.raises(TypeError):
        check_cron_function("not a function")
