"""Wake-ups across processes: after the enqueuing commit, never after a rollback.

A child process listens for wake-ups of its database (``wakeup.listen``:
PostgreSQL ``LISTEN``, else a registered loopback port) and, each time it
is woken for the queue, counts that queue's jobs and prints the count.  A
wake-up sent before the commit, or for a rolled-back enqueue, would print a
count without the job.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading

import pytest
from helpers import python_env

import mqueue

LISTENER = r"""
import os, signal, sys, threading
from sqlalchemy import func, select
import mqueue
from mqueue import wakeup
from mqueue.schema import task_table as t

db = mqueue.Database(sys.argv[1])
key = wakeup.listen(db)
signal.signal(signal.SIGTERM, lambda *_: (wakeup.release(key), os._exit(0)))   # leaves no registration behind
woken = threading.Event()
wakeup.subscribe(["twake"], woken)
print("ready", flush=True)
reader = db.dialect.reader(db.engine)
while True:
    woken.wait()
    woken.clear()
    with reader.connect() as conn:
        count = conn.execute(select(func.count()).select_from(t).where(t.c.queue == "twake")).scalar_one()
    print(f"woken {count}", flush=True)
"""


@mqueue.task(name="twake.job", queue="twake")
def job(n: int = 0) -> None:
    pass


class Child:
    """The listening process; its output lines arrive in a queue."""

    def __init__(self, database_url: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LISTENER, database_url], env=python_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def child(database_url):
    db = mqueue.Database(database_url)
    db.create_all()
    db.dispose()
    listener = Child(database_url)
    try:
        assert listener.next_line(30) == "ready"
        yield listener
    finally:
        listener.close()


def test_a_wake_up_arrives_after_the_commit_and_never_after_a_rollback(backend, database_url, child):
    db = mqueue.Database(database_url)
    try:
        with pytest.raises(RuntimeError):
            with db.session():
                job.enqueue(n=1)
                raise RuntimeError("rolled back")
        # Nothing for the rollback...
        assert child.next_line(1.0) is None
        # ...and the committed job is there when the wake-up arrives.
        with db.session():
            job.enqueue(n=2)
        assert child.next_line(30) == "woken 1"
        with db.session():
            job.enqueue_many([{"n": 3}, {"n": 4}])
        assert child.next_line(30) == "woken 3"
        with db.session():
            job.options(unique_key="k").enqueue(n=5)
        assert child.next_line(30) == "woken 4"
        assert child.next_line(0.5) is None
    finally:
        db.dispose()
