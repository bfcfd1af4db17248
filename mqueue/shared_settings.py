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


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: int
    parse: Callable[[str], int]
    meaning: str


KEYS = {key.name: key for key in (
    Key("jobs-history", 30 * 86400, _non_negative_int,
        "seconds a finished job (succeeded, canceled, expired) and the events of any job are kept"),
    Key("jobs-history-count", 50_000, _non_negative_int, "at most this many finished jobs are kept, the newest"),
    Key("stats-history", 30, _non_negative_int, "days of daily stats (mqueue stats QUEUE) kept"),
)}


def parse(name: str, value: Any) -> int:
    """A setting's value checked; ``ValueError`` with one line naming the key and what it takes."""
    key = KEYS.get(name)
    if key is None:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(KEYS)}")
    try:
        if isinstance(value, bool):
            raise ValueError
        return key.parse(str(value).strip())
    except ValueError:
        raise ValueError(f"setting {name} takes a whole number >= 0 ({key.meaning}), got {value!r}") from None


def read(dialect, conn) -> dict[str, int]:
    """Every known setting: stored values over defaults.  A stored value that does not parse
    (written by hand) is ignored in favour of the default, never fatal to a worker."""
    stored = dialect.read_settings(conn)
    values = {}
    for name, key in KEYS.items():
        try:
            values[name] = parse(name, stored[name]) if name in stored else key.default
        except ValueError:
            values[name] = key.default
    return values
