"""``run_transaction``: an application transaction run again, whole, when it loses a race.

On a multi-primary cluster (MariaDB Galera) two transactions on two nodes
that write the same row, or the same ``unique_key``, both succeed locally;
at COMMIT one fails certification with error 1213 and is rolled back, all of
it (the application's own writes too).  Retrying the COMMIT alone cannot
work: the transaction is gone.  What works is running the same code again in
a new transaction, where an ``enqueue`` with that ``unique_key`` now finds
the winner's job and returns its id.  A single server gives the same error
for a deadlock, PostgreSQL a serialization failure; both are retried alike.

e.g.::

    def sign_up(session):
        session.add(User(email=email))
        return welcome.options(unique_key=f"welcome:{email}").enqueue(email=email)

    job_id = mqueue.run_transaction(db, sign_up)
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .errors import first_line
from .session import Database, as_database, peek_session

log = logging.getLogger("mqueue.session")

T = TypeVar("T")

#: First wait before another attempt (random up to this), doubled at each attempt.
FIRST_RETRY_SECONDS = 0.02


def run_transaction(database: "Database | str", work: Callable[[Session], T], *, attempts: int = 5) -> T:
    """Run ``work(session)`` in a new ``database.session()`` and commit; on a lost race run it again.

    A lost race is what the database reports as a deadlock, a lock wait
    timeout, a Galera certification failure or a serialization failure
    (``dialect.is_conflict``), at any statement or at COMMIT.  Each attempt
    is a fresh transaction, so ``work`` must do all of its writes through
    the session it is given (or the current session) and nothing it cannot
    repeat (no mail sent from inside it).  After ``attempts`` lost races
    the last error is raised.  Inside a session already open there is no
    transaction of its own to run again: ``RuntimeError``.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts!r}")
    if peek_session() is not None:
        raise RuntimeError("run_transaction needs to own its transaction: call it outside any db.session()")
    database = as_database(database)
    for attempt in range(1, attempts + 1):
        try:
            with database.session() as session:
                return work(session)
        except DBAPIError as error:
            if attempt == attempts or not database.dialect.is_conflict(error):
                raise
            delay = random.uniform(0.0, FIRST_RETRY_SECONDS * 2 ** (attempt - 1))
            log.debug("transaction lost a race (attempt %d of %d), running it again in %.3fs: %s",
                      attempt, attempts, delay, first_line(error))
            time.sleep(delay)
    raise AssertionError("unreachable")
