"""In-process wake-up: a worker in this process starts a job the moment the
enqueuing transaction commits, instead of waiting for its next poll."""

from __future__ import annotations

import threading
from typing import Iterable

from sqlalchemy import event
from sqlalchemy.orm import Session

_lock = threading.Lock()
_listeners: dict[str, set[threading.Event]] = {}
_INFO_KEY = "mqueue_wake_queues"


def subscribe(queues: Iterable[str], wake: threading.Event) -> None:
    with _lock:
        for queue in queues:
            _listeners.setdefault(queue, set()).add(wake)


def unsubscribe(queues: Iterable[str], wake: threading.Event) -> None:
    with _lock:
        for queue in queues:
            _listeners.get(queue, set()).discard(wake)


def notify(queues: Iterable[str]) -> None:
    with _lock:
        events = {wake for queue in queues for wake in _listeners.get(queue, ())}
    for wake in events:
        wake.set()


def notify_after_commit(session: Session, queue: str) -> None:
    """Wake local workers of ``queue`` once ``session`` commits (never on rollback)."""
    session.info.setdefault(_INFO_KEY, set()).add(queue)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    queues = session.info.pop(_INFO_KEY, None)
    if queues:
        notify(queues)


@event.listens_for(Session, "after_soft_rollback")
def _after_rollback(session: Session, _previous_transaction) -> None:
    if not session.in_transaction():
        session.info.pop(_INFO_KEY, None)
