"""Schedule math for crons: the schedule helpers, cron expressions in a time
zone, and the pure "which slot is due now" decision.

This module owns no database state and reads no clock: every function takes
the times it needs as arguments, so the scheduler (``mqueue.scheduler``)
and the tests drive it with whatever clock they like.  All times that go in
and come out are *naive UTC* datetimes, the form the database stores.  A
timezone-aware datetime is accepted too and converted to UTC first.

Cron expressions have exactly five fields (minute, hour, day of month,
month, day of week; day of week 0 or 7 is Sunday).  Six-field expressions
with seconds and ``@hourly``-style aliases are refused: a queue that polls
about once a second has no use for second-level schedules, and one accepted
syntax is easier to read in ``python -m mqueue crons``.  Field matching is
done by croniter; croniter is only ever given naive wall-clock times, and
the mapping between wall-clock time and UTC is done here with ``zoneinfo``.

DST policy
----------
Schedule times are wall-clock times in the schedule's time zone.

* When the hour field is restricted (``30 2 * * *``, ``0 3 * * *``,
  ``0 */2 * * *``), every matching local time runs exactly once.  A local
  time that does not exist because the clocks jump forward (02:30 on the
  last Sunday of March in Europe/Berlin) runs once, at the first instant
  after the gap (03:00 local, 01:00 UTC, that day).  A local time that
  happens twice because the clocks go back (02:30 on the last Sunday of
  October in Berlin) runs once, at its first occurrence.  Several
  nonexistent times of one gap, and a time right after the gap, all land on
  the same instant and so make a single run.
* When the hour field covers every hour (``0 * * * *``, ``*/15 * * * *``),
  the schedule follows real elapsed time instead: each real instant whose
  local time matches is a slot.  In the repeated hour both occurrences run
  (an hourly cron runs at 02:00 summer time and again at 02:00 winter
  time, one real hour apart), and the skipped hour simply has no slots (it
  never elapsed).  So every real hour, or quarter of an hour, gets exactly
  one slot.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import inspect
from typing import Any, Callable, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

__all__ = [
    "ScheduleHelper", "Minutely", "Hourly", "Daily", "Weekly", "Monthly", "Yearly",
    "Minutes", "Hours", "Days", "Months", "Weekday",
    "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY",
    "Schedule", "due_slot", "next_slot", "check_cron_function",
]

_UTC = dt.timezone.utc
_DAY_NAMES = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


# -- schedule helpers --------------------------------------------------------

def _check_range(helper: str, field: str, value: Any, low: int, high: int) -> None:
    """Refuse a helper argument outside ``low..high``.

    The check happens when the helper is built, which for ``@mqueue.cron``
    is decoration time, so a typo fails at import instead of silently
    producing a cron that never runs.  ``bool`` is refused although it is an
    ``int``: ``Hourly(True)`` is certainly a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{helper}: {field} must be an integer from {low} to {high}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ScheduleHelper:
    """Base of the readable schedule helpers (``Hourly(minute=15)`` ...).

    A helper is only a friendlier way to write a cron expression: its
    ``expression`` property is what gets stored and evaluated.  Instances
    are immutable and compare by value; ``repr()`` shows the call that
    builds them and ``str()`` says in words when they run.
    """

    #: (field name, lowest, highest) for each argument, checked on creation
    _ranges: ClassVar[tuple[tuple[str, int, int], ...]] = ()

    def __post_init__(self) -> None:
        for name, low, high in self._ranges:
            _check_range(type(self).__name__, name, getattr(self, name), low, high)

    @property
    def expression(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.describe()


def _at(hour: int, minute: int) -> str:
    return f"{hour:02d}:{minute:02d}"


@dataclasses.dataclass(frozen=True)
class Minutely(ScheduleHelper):
    """Every minute: ``* * * * *``."""

    @property
    def expression(self) -> str:
        return "* * * * *"

    def describe(self) -> str:
        return "every minute"


@dataclasses.dataclass(frozen=True)
class Hourly(ScheduleHelper):
    """Every hour at ``minute``: ``M * * * *``."""

    minute: int = 0
    _ranges: ClassVar = (("minute", 0, 59),)

    @property
    def expression(self) -> str:
        return f"{self.minute} * * * *"

    def describe(self) -> str:
        return f"every hour at minute {self.minute}"


@dataclasses.dataclass(frozen=True)
class Daily(ScheduleHelper):
    """Every day at ``hour:minute``: ``M H * * *``."""

    hour: int = 0
    minute: int = 0
    _ranges: ClassVar = (("hour", 0, 23), ("minute", 0, 59))

    @property
    def expression(self) -> str:
        return f"{self.minute} {self.hour} * * *"

    def describe(self) -> str:
        return f"every day at {_at(self.hour, self.minute)}"


@dataclasses.dataclass(frozen=True)
class Weekly(ScheduleHelper):
    """Every week on ``day`` (0 = Sunday, as in cron) at ``hour:minute``: ``M H * * D``."""

    day: int = 0
    hour: int = 0
    minute: int = 0
    _ranges: ClassVar = (("day", 0, 6), ("hour", 0, 23), ("minute", 0, 59))

    @property
    def expression(self) -> str:
        return f"{self.minute} {self.hour} * * {self.day}"

    def describe(self) -> str:
        return f"every {_DAY_NAMES[self.day]} at {_at(self.hour, self.minute)}"


@dataclasses.dataclass(frozen=True)
class Monthly(ScheduleHelper):
    """Every month on ``day`` at ``hour:minute``: ``M H D * *``.

    As in cron, a day the month does not have (the 31st in April) is not
    moved to the month's last day: that month has no run.
    """

    day: int = 1
    hour: int = 0
    minute: int = 0
    _ranges: ClassVar = (("day", 1, 31), ("hour", 0, 23), ("minute", 0, 59))

    @property
    def expression(self) -> str:
        return f"{self.minute} {self.hour} {self.day} * *"

    def describe(self) -> str:
        return f"on day {self.day} of every month at {_at(self.hour, self.minute)}"


@dataclasses.dataclass(frozen=True)
class Yearly(ScheduleHelper):
    """Every year on ``day`` of ``month`` at ``hour:minute``: ``M H D MON *``.

    The day must exist in the month (29 February is allowed and runs in
    leap years only), so a schedule that can never run is refused.
    """

    month: int = 1
    day: int = 1
    hour: int = 0
    minute: int = 0
    _ranges: ClassVar = (("month", 1, 12), ("hour", 0, 23), ("minute", 0, 59))

    def __post_init__(self) -> None:
        super().__post_init__()
        longest = 29 if self.month == 2 else calendar.monthrange(2001, self.month)[1]
        _check_range(f"Yearly (month {self.month})", "day", self.day, 1, longest)

    @property
    def expression(self) -> str:
        return f"{self.minute} {self.hour} {self.day} {self.month} *"

    def describe(self) -> str:
        return (f"every year on {self.day} {calendar.month_name[self.month]} "
                f"at {_at(self.hour, self.minute)}")


@dataclasses.dataclass(frozen=True)
class Minutes(ScheduleHelper):
    """Every ``n`` minutes: ``*/n * * * *``.

    As in cron the count restarts at each full hour, so an ``n`` that does
    not divide 60 gives one shorter interval per hour.
    """

    n: int = 1
    _ranges: ClassVar = (("n", 1, 59),)

    @property
    def expression(self) -> str:
        return f"*/{self.n} * * * *"

    def describe(self) -> str:
        return "every minute" if self.n == 1 else f"every {self.n} minutes"


@dataclasses.dataclass(frozen=True)
class Hours(ScheduleHelper):
    """Every ``n`` hours on the hour: ``0 */n * * *`` (restarting at midnight)."""

    n: int = 1
    _ranges: ClassVar = (("n", 1, 23),)

    @property
    def expression(self) -> str:
        return f"0 */{self.n} * * *"

    def describe(self) -> str:
        return "every hour" if self.n == 1 else f"every {self.n} hours"


@dataclasses.dataclass(frozen=True)
class Days(ScheduleHelper):
    """Every ``n`` days at midnight: ``0 0 */n * *`` (restarting on each month's 1st)."""

    n: int = 1
    _ranges: ClassVar = (("n", 1, 31),)

    @property
    def expression(self) -> str:
        return f"0 0 */{self.n} * *"

    def describe(self) -> str:
        return "every day at 00:00" if self.n == 1 else f"every {self.n} days at 00:00"


@dataclasses.dataclass(frozen=True)
class Months(ScheduleHelper):
    """Every ``n`` months, on the 1st at midnight: ``0 0 1 */n *`` (restarting in January)."""

    n: int = 1
    _ranges: ClassVar = (("n", 1, 12),)

    @property
    def expression(self) -> str:
        return f"0 0 1 */{self.n} *"

    def describe(self) -> str:
        every = "every month" if self.n == 1 else f"every {self.n} months"
        return f"{every} on day 1 at 00:00"


@dataclasses.dataclass(frozen=True)
class Weekday(ScheduleHelper):
    """Monday to Friday at ``hour:minute``: ``M H * * 1-5``."""

    hour: int = 0
    minute: int = 0
    _ranges: ClassVar = (("hour", 0, 23), ("minute", 0, 59))

    @property
    def expression(self) -> str:
        return f"{self.minute} {self.hour} * * 1-5"

    def describe(self) -> str:
        return f"every weekday (Monday to Friday) at {_at(self.hour, self.minute)}"


MINUTELY = Minutely()
HOURLY = Hourly()
DAILY = Daily()
WEEKLY = Weekly()
MONTHLY = Monthly()
YEARLY = Yearly()


# -- time conversions ------------------------------------------------------

def _naive_utc(value: dt.datetime) -> dt.datetime:
    """The naive-UTC form of ``value``: naive datetimes are taken as UTC already."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    if value.tzinfo is not None and value.utcoffset() is not None:
        value = value.astimezone(_UTC).replace(tzinfo=None)
    return value.replace(tzinfo=None, fold=0)


# -- Schedule ----------------------------------------------------------------

#: How far back ``latest_at_or_before`` looks.  The longest wait between two
#: runs of a valid five-field expression is 29 February across 2100 (eight
#: years), so anything valid has a slot in this window.
LOOKBACK = dt.timedelta(days=366 * 8 + 2)

#: Safety bound on candidate times examined by one search; a search needs
#: about as many candidates as the schedule has slots in one DST shift.
_MAX_CANDIDATES = 10_000


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A validated five-field cron expression evaluated in a time zone.

    Build one with :meth:`parse`.  Construction validates everything, so a
    ``Schedule`` that exists can always be evaluated.  ``expression`` is
    stored with single spaces between fields; ``tz`` is the IANA zone name.
    The DST policy is in this module's docstring.
    """

    expression: str
    tz: str = "UTC"
    _zone: ZoneInfo = dataclasses.field(init=False, repr=False, compare=False)
    _every_hour: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expression, every_hour = _validate_expression(self.expression)
        object.__setattr__(self, "expression", expression)
        object.__setattr__(self, "_every_hour", every_hour)
        object.__setattr__(self, "_zone", _zone(self.tz))

    @classmethod
    def parse(cls, spec: str | ScheduleHelper | type[ScheduleHelper],
              tz: str | ZoneInfo = "UTC") -> "Schedule":
        """A schedule from a cron expression, a helper instance or a helper class.

        A helper class passed uncalled (``Hourly``) means its defaults.
        Raises ``ValueError`` naming a bad expression or time zone, and
        ``TypeError`` for anything that is not a schedule at all.
        """
        if isinstance(spec, type) and issubclass(spec, ScheduleHelper) and spec is not ScheduleHelper:
            spec = spec()
        if isinstance(spec, ScheduleHelper):
            spec = spec.expression
        if not isinstance(spec, str):
            raise TypeError(f"a cron schedule must be a cron expression string or a schedule helper "
                            f"such as mqueue.Hourly(minute=5), got {spec!r}")
        if isinstance(tz, ZoneInfo):
            tz = tz.key
        return cls(spec, tz)

    # -- wall clock <-> UTC ------------------------------------------------
    def _wall(self, instant: dt.datetime) -> tuple[dt.datetime, int]:
        """Local wall-clock time of a naive-UTC instant, and its fold (1 = second occurrence)."""
        local = instant.replace(tzinfo=_UTC).astimezone(self._zone)
        return local.replace(tzinfo=None, fold=0), local.fold

    def _occurrences(self, wall: dt.datetime) -> tuple[dt.datetime, ...]:
        """The naive-UTC instants at which local time ``wall`` happens, earliest first.

        Empty inside a spring-forward gap, two in a fall-back overlap, one
        otherwise.  Both fold readings are converted and the result is
        checked by converting back, rather than trusting the offsets alone.
        """
        first = self._to_utc(wall, 0)
        second = self._to_utc(wall, 1)
        if first == second:
            return (first,)
        real = tuple(sorted(u for u in {first, second} if self._wall(u)[0] == wall))
        return real

    def _to_utc(self, wall: dt.datetime, fold: int) -> dt.datetime:
        local = wall.replace(tzinfo=self._zone, fold=fold)
        return (local.replace(tzinfo=None) - local.utcoffset()).replace(fold=0)

    def _gap_end(self, wall: dt.datetime) -> dt.datetime:
        """The first instant whose local time is at or after the nonexistent ``wall``.

        That is the moment the clocks jumped: found by bisection between
        the two fold readings of ``wall``, which straddle it.
        """
        low, high = sorted((self._to_utc(wall, 0), self._to_utc(wall, 1)))
        # invariant: local(low) < wall <= local(high); offsets are whole seconds
        lo, hi = 0, int((high - low).total_seconds())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._wall(low + dt.timedelta(seconds=mid))[0] >= wall:
                hi = mid
            else:
                lo = mid
        return low + dt.timedelta(seconds=hi)

    def _run_instant(self, wall: dt.datetime) -> dt.datetime:
        """When a matching local time runs under the once-per-local-time rule."""
        occurrences = self._occurrences(wall)
        return occurrences[0] if occurrences else self._gap_end(wall)

    def _fold_shift(self, wall: dt.datetime) -> dt.timedelta:
        """How long a repeated local time waits between its two occurrences (0 if not repeated)."""
        occurrences = self._occurrences(wall)
        return occurrences[-1] - occurrences[0] if len(occurrences) == 2 else dt.timedelta(0)

    # -- searches ----------------------------------------------------------
    def next_after(self, after: dt.datetime) -> dt.datetime:
        """The first scheduled time strictly after ``after`` (naive UTC in and out).

        Candidates are walked in local wall-clock order with croniter, each
        mapped to the real instant(s) it runs at under the DST policy.  That
        mapping is monotonic except for the second occurrence of a repeated
        hour, hence the small look-behind when ``after`` sits in the first
        occurrence, and the walk until no later candidate can be earlier.
        """
        after = _naive_utc(after)
        wall, fold = self._wall(after)
        start = wall
        if self._every_hour and fold == 0:
            # the second occurrences of earlier repeated times may still be ahead
            start = wall - self._fold_shift(wall)
        best: dt.datetime | None = None
        for candidate in self._walk(start, forward=True):
            if not self._every_hour:
                instant = self._run_instant(candidate)
                if instant > after:
                    return instant
                continue
            occurrences = self._occurrences(candidate)
            if not occurrences:
                continue  # never happened: skipped by the clocks
            if best is not None and occurrences[0] >= best:
                return best
            for instant in occurrences:
                if instant > after and (best is None or instant < best):
                    best = instant
            if best == occurrences[0]:
                return best
        raise ValueError(f"cron expression {self.expression!r}: no scheduled time found after {after}")

    def latest_at_or_before(self, now: dt.datetime) -> dt.datetime | None:
        """The most recent scheduled time at or before ``now`` (naive UTC), for catch-up.

        None when no slot falls within :data:`LOOKBACK` (about eight years)
        before ``now``, which for a validated expression only happens near
        the start of the calendar.  The mirror image of :meth:`next_after`.
        """
        now = _naive_utc(now)
        wall, fold = self._wall(now)
        start = wall
        if fold == 1:
            # in the second occurrence, later local times of the repeated hour already ran once
            start = wall + self._fold_shift(wall)
        limit = wall - LOOKBACK
        best: dt.datetime | None = None
        for candidate in self._walk(start, forward=False):
            if candidate < limit:
                return best
            if not self._every_hour:
                instant = self._run_instant(candidate)
                if instant <= now:
                    return instant
                continue
            occurrences = self._occurrences(candidate)
            if not occurrences:
                continue
            if best is not None and occurrences[-1] <= best:
                return best
            for instant in occurrences:
                if instant <= now and (best is None or instant > best):
                    best = instant
            if best == occurrences[-1]:
                return best
        return best

    def _walk(self, start: dt.datetime, *, forward: bool):
        """Matching local wall-clock times after ``start`` (or at/before it going back).

        croniter only ever sees naive wall-clock times here, where its
        arithmetic is plain calendar arithmetic with no DST involved.
        """
        if not forward:
            # croniter's get_prev is strict; one second past the whole minute makes it inclusive
            start = start.replace(second=0, microsecond=0) + dt.timedelta(seconds=1)
        try:
            iterator = croniter(self.expression, start)
            step = iterator.get_next if forward else iterator.get_prev
            for _ in range(_MAX_CANDIDATES):
                yield step(dt.datetime).replace(fold=0)
        except (CroniterBadDateError, OverflowError):
            return  # ran off the calendar: no more candidates


def _validate_expression(expression: Any) -> tuple[str, bool]:
    """Normalise and check a five-field expression; also say whether it runs every hour.

    "Every hour" means the hour field covers all 24 hours, which selects the
    real-elapsed-time half of the DST policy.
    """
    if not isinstance(expression, str):
        raise TypeError(f"a cron expression must be a string, got {expression!r}")
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expression!r}: expected 5 fields "
                         f"(minute hour day-of-month month day-of-week), got {len(fields)}")
    normalised = " ".join(fields)
    try:
        parsed = croniter(normalised, dt.datetime(2000, 1, 1))
    except Exception as error:  # croniter reports bad syntax with several exception types
        raise ValueError(f"invalid cron expression {expression!r}: {error}") from None
    try:
        parsed.get_next(dt.datetime)
    except CroniterBadDateError:
        raise ValueError(f"invalid cron expression {expression!r}: it never matches a date") from None
    hours = parsed.expanded[1]
    every_hour = hours == ["*"] or set(hours) == set(range(24))
    return normalised, every_hour


def _zone(name: Any) -> ZoneInfo:
    """The zone called ``name``, or ``ValueError`` naming it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}") from None


# -- the scheduling decision -----------------------------------------------

def due_slot(schedule: Schedule, last_slot: dt.datetime | None, now: dt.datetime) -> dt.datetime | None:
    """The slot to enqueue at ``now``, or None when nothing is due (naive UTC).

    ``last_slot`` is the scheduled time the cron last ran for.  After
    downtime only the latest due slot is returned: the cron runs once to
    catch up, not once per missed slot, because a burst of identical runs
    of a periodic task is rarely what anyone wants.

    A cron that never ran (``last_slot`` None) is not due: a new cron does
    not run at start-up.  The caller records ``schedule.next_after(now)``
    as its first slot and runs it when that time comes (passing ``now`` as
    ``last_slot`` has the same effect).
    """
    if last_slot is None:
        return None
    now = _naive_utc(now)
    upcoming = schedule.next_after(last_slot)
    if upcoming > now:
        return None
    latest = schedule.latest_at_or_before(now)
    return upcoming if latest is None or latest < upcoming else latest


def next_slot(schedule: Schedule, last_slot: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """The slot the cron's next run is for, for display ("next run").

    A slot that is due but not yet taken is returned as is (at or before
    ``now``: it runs on the next tick); otherwise the first slot after both
    ``last_slot`` and ``now``.  For a never-run cron that is
    ``next_after(now)``, its first slot.
    """
    now = _naive_utc(now)
    due = due_slot(schedule, last_slot, now)
    if due is not None:
        return due
    after = now if last_slot is None else max(_naive_utc(last_slot), now)
    return schedule.next_after(after)


# -- the decorated function ------------------------------------------------

def check_cron_function(fn: Callable[..., Any]) -> None:
    """Refuse a cron function that needs arguments: a cron job has none to give it.

    Parameters with defaults, ``*args`` and ``**kwargs`` are fine.  Checked
    at decoration time so the mistake surfaces at import, not as a failed
    job at the first slot.  A callable whose signature cannot be read is
    let through.
    """
    if not callable(fn):
        raise TypeError(f"a cron task must be a function, got {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    required = [p for p in signature.parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required:
        name = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', repr(fn))}"
        raise ValueError(f"cron task '{name}' must take no required arguments")
