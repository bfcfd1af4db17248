"""Settings shared by every worker, stored in ``mqueue_setting`` (``mqueue config``).

Unlike command-line options they change for all workers on all hosts at
once, without a restart: workers read them again about once a minute.  A
key that is not stored has its default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


#: A lease beyond this (about 31 years) overflows datetime arithmetic and thread timeouts.
MAX_LEASE_SECONDS = 1e9


def _lease_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_LEASE_SECONDS:  # NaN fails this too
        raise ValueError
    return int(value) if value == int(value) else value


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: float
    parse: Callable[[str], float]
    meaning: str
    expects: str = "a whole number >= 0"


KEYS = {key.name: key for key in (
    Key("jobs-history", 30 * 86400, _non_negative_int,
        "seconds a finished job (succeeded, canceled, expired) and the events of any job are kept"),
    Key("jobs-history-count", 50_000, _non_negative_int, "at most this many finished jobs are kept, the newest"),
    Key("stats-history", 30, _non_negative_int, "days of daily stats (mqueue stats QUEUE) kept"),
    Key("heartbeat", 60, _lease_seconds,
        "lease in seconds of a claimed job, renewed by heartbeats, for workers started without --lease",
        "a number of seconds > 0"),
)}
#: ``heartbeat:QUEUE``: the lease of one queue's jobs, over ``heartbeat``.
QUEUE_LEASE_PREFIX = "heartbeat:"
MAX_QUEUE_LENGTH = 100


def key_for(name: str) -> Key:
    """The ``Key`` a setting name stands for (``heartbeat:QUEUE`` is ``heartbeat`` for one queue)."""
    key = KEYS.get(name)
    if key is None and name.startswith(QUEUE_LEASE_PREFIX) and 0 < len(name) - len(QUEUE_LEASE_PREFIX) \
            <= MAX_QUEUE_LENGTH:
        return dataclasses.replace(KEYS["heartbeat"], name=name,
                                   meaning=f"lease in seconds of a claimed job of queue "
                                           f"{name[len(QUEUE_LEASE_PREFIX):]!r}, over heartbeat")
    if key is None:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(KEYS)}, heartbeat:QUEUE")
    return key


def parse(name: str, value: Any) -> float:
    """A setting's value checked; ``ValueError`` with one line naming the key and what it takes."""
    key = key_for(name)
    try:
        if isinstance(value, bool):
            raise ValueError
        return key.parse(str(value).strip())
    except (ValueError, OverflowError):
        raise ValueError(f"setting {name} takes {key.expects} ({key.meaning}), got {value!r}") from None


def read(dialect, conn) -> dict[str, float]:
    """Every known setting, stored values over defaults, and every stored ``heartbeat:QUEUE``.

    A stored value that does not parse (written by hand) is ignored in
    favour of the default, never fatal to a worker.
    """
    stored = dialect.read_settings(conn)
    values: dict[str, float] = {}
    for name, key in KEYS.items():
        try:
            values[name] = parse(name, stored[name]) if name in stored else key.default
        except ValueError:
            values[name] = key.default
    for name in sorted(stored):
        if name.startswith(QUEUE_LEASE_PREFIX):
            try:
                values[name] = parse(name, stored[name])
            except ValueError:
                pass
    return values


def lease_for(values: dict[str, float], queue: str) -> float:
    """The lease of ``queue``'s jobs from settings ``read``: ``heartbeat:QUEUE``, else ``heartbeat``."""
    return float(values.get(QUEUE_LEASE_PREFIX + queue, values["heartbeat"]))
