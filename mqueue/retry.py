"""Pure retry policy: from a failed run to the next state (a ``Decision``), no I/O.

Units are seconds throughout.  The default backoff is MQueue's:
60 s x 5^(n-1) for retry n, capped at 12 hours (60 s, 5 min, 25 min, ...).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Sequence, Union

from .errors import Fail, Retry

MAX_BACKOFF_SECONDS = 12 * 3600
Backoff = Union[None, float, Sequence[float], Callable[[int], float]]


def default_backoff(retry_number: int) -> float:
    """Seconds before retry ``retry_number`` (1 for the first retry)."""
    if retry_number > 20:  # 5**20 overflows any sensible delay long before
        return MAX_BACKOFF_SECONDS
    return min(60.0 * 5 ** max(retry_number - 1, 0), MAX_BACKOFF_SECONDS)


def check_backoff(backoff: Backoff) -> Backoff:
    """Validate a task's ``backoff=`` at decoration time."""
    if backoff is None or callable(backoff):
        return backoff
    if isinstance(backoff, numbers.Real) and not isinstance(backoff, bool) and backoff >= 0:
        return float(backoff)
    if isinstance(backoff, (list, tuple)) and backoff and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) and x >= 0 for x in backoff):
        return tuple(float(x) for x in backoff)
    raise ValueError(f"backoff must be seconds, a non-empty sequence of seconds or a callable, got {backoff!r}")


def backoff_seconds(backoff: Backoff, retry_number: int) -> float:
    """Delay before retry ``retry_number`` under a task's policy.

    A sequence gives the delay of each retry in turn and repeats its last
    element; a callable receives the retry number.
    """
    if backoff is None:
        return default_backoff(retry_number)
    if callable(backoff):
        return max(0.0, float(backoff(retry_number)))
    if isinstance(backoff, tuple):
        return backoff[min(retry_number, len(backoff)) - 1]
    return float(backoff)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the executor writes after a failed run: ``action`` is 'retry' or 'fail'."""

    action: str
    delay_seconds: float = 0.0


def decide(error: BaseException, retries_before: int, max_retries: int, backoff: Backoff) -> Decision:
    """Retry with backoff, or fail for good.

    A job runs at most ``max_retries + 1`` times: after run number
    ``retries_before + 1`` fails, it retries only while
    ``retries_before < max_retries``.
    """
    if isinstance(error, Fail):
        return Decision("fail")
    retry_number = retries_before + 1
    if retry_number > max_retries:
        return Decision("fail")
    if isinstance(error, Retry) and error.delay is not None:
        return Decision("retry", max(0.0, float(error.delay)))
    try:
        delay = backoff_seconds(backoff, retry_number)
    except Exception:  # a broken backoff callable must not lose the job
        delay = default_backoff(retry_number)
    return Decision("retry", delay)


__all__ = ["Decision", "decide", "default_backoff", "backoff_seconds", "check_backoff"]
