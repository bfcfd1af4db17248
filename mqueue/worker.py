"""The worker: claim loop, executor threads, heartbeats, rescue, shutdown.

One *producer* (the thread that calls ``run()``) claims due jobs in batches
no larger than the free capacity and hands them to ``concurrency`` executor
threads.  A *maintenance* thread extends the leases of every job this worker
holds, re-queues jobs whose worker died and runs periodic hooks (crons); a
*watchdog* thread enforces ``timeout=``.  A *completer* thread deletes, many
per transaction, the jobs whose task returned without touching its session
(a task that wrote is completed inside its own transaction by the executor).
Signal handlers only record the signal; the loops act.

e.g.::

    worker = mqueue.Worker(db, queues=["mail"], concurrency=4, lease=60)
    worker.run()                       # until SIGTERM/SIGINT or worker.stop()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue as queue_module
import signal
import socket
import threading
import time
from typing import Callable, Sequence

from sqlalchemy.exc import DBAPIError

from . import wakeup
from .errors import LeaseLostError
from .executor import DEFERRED, FAILED, LOST, RETRIED, SUCCEEDED, Executor, Running
from .jobs import Job
from .session import Database, as_database

log = logging.getLogger("mqueue.worker")

DEFAULT_LEASE_SECONDS = 60.0
#: Idle polling backs off up to this; 0.1 s keeps enqueue-to-start near
#: 50 ms for jobs enqueued by other processes at ~10 cheap queries/s.
DEFAULT_POLL_SECONDS = 0.1
DEFAULT_GRACE_SECONDS = 30.0
#: A dead worker's jobs are re-queued at most this long after their lease expires.
MAX_RESCUE_INTERVAL_SECONDS = 5.0
MAX_OUTAGE_BACKOFF_SECONDS = 5.0
#: At most this many jobs completed by one statement of the completer.
MAX_COMPLETION_BATCH = 500


@dataclasses.dataclass
class RunResult:
    """Counts returned by ``Worker.run_until_empty``."""

    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    lost: int = 0

    @property
    def total(self) -> int:
        return self.succeeded + self.retried + self.failed + self.lost


class Worker:
    """Serve ``queues`` (first named, first served) with ``concurrency`` threads."""

    def __init__(self, database: "Database | str", queues: Sequence[str] | str = ("default",),
                 concurrency: int = 1, lease: float = DEFAULT_LEASE_SECONDS,
                 poll_interval: float = DEFAULT_POLL_SECONDS, grace: float = DEFAULT_GRACE_SECONDS,
                 prefetch: int | None = None, heartbeat_interval: float | None = None) -> None:
        self.db = as_database(database)
        self.queues = [queues] if isinstance(queues, str) else list(queues)
        if not self.queues or not all(isinstance(q, str) and q for q in self.queues):
            raise ValueError(f"queues must be non-empty names, got {queues!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if lease <= 0 or poll_interval <= 0 or grace < 0:
            raise ValueError("lease and poll_interval must be > 0 and grace >= 0")
        self.concurrency = concurrency
        self.lease_seconds = float(lease)
        self.poll_seconds = float(poll_interval)
        self.grace_seconds = float(grace)
        # Jobs held beyond the running ones let a claim fetch a batch: one claim
        # transaction per job costs as much as the job's own completion.
        self.capacity = concurrency + (max(concurrency, 4) if prefetch is None else prefetch)
        self.batch = max(1, self.capacity // 2)
        self.heartbeat_seconds = heartbeat_interval or max(min(self.lease_seconds / 4, 15.0), 0.05)
        self.rescue_seconds = min(self.lease_seconds / 2, MAX_RESCUE_INTERVAL_SECONDS)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xffff:x}"
        self.executor = Executor(self.db, self.heartbeat_job, lambda: self._stop.is_set(), self.lease_seconds)
        #: callables run by the maintenance thread about once a second (crons)
        self.periodic: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ready: "queue_module.Queue[Running | None]" = queue_module.Queue()
        self._finished: "queue_module.Queue[Running | None]" = queue_module.Queue()  # for the completer
        self._held: dict[int, Running] = {}
        self._held_lock = threading.Lock()
        self._result = RunResult()
        self._signals = 0
        self._pending_signal: int | None = None
        self._until_empty = False
        self._scheduler_started = False

    # -- public ----------------------------------------------------------------
    def run(self) -> None:
        """Serve until ``stop()`` or SIGTERM/SIGINT; then finish or hand back held jobs."""
        self._serve(install_signals=True)

    def run_until_empty(self, timeout: float | None = None) -> RunResult:
        """Process every job due now (and any due while running), then return the counts."""
        self._until_empty = True
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self.stop)
            timer.daemon = True
            timer.start()
        try:
            self._serve(install_signals=False)
        finally:
            if timer is not None:
                timer.cancel()
        return self._result

    def stop(self) -> None:
        """Stop claiming; running jobs get the grace period to finish."""
        self._stop.set()
        self._wake.set()

    def heartbeat_job(self, job: Job) -> None:
        """Extend one job's lease now (``current_job().heartbeat()``)."""
        with self.db.engine.begin() as conn:
            lost = self.db.dialect.heartbeat_jobs(conn, [(job.id, job.token)], self.lease_seconds)
        if lost:
            raise LeaseLostError(f"job {job.id} is no longer owned by this worker")

    # -- main loop -------------------------------------------------------------
    def _serve(self, install_signals: bool) -> None:
        self.db.check_schema()
        self._start_scheduler()
        previous = self._install_signals() if install_signals else None
        wakeup.subscribe(self.queues, self._wake)
        threads = [threading.Thread(target=self._executor_loop, name=f"mqueue-exec-{n}", daemon=True)
                   for n in range(self.concurrency)]
        helpers = [threading.Thread(target=self._maintenance_loop, name="mqueue-maint", daemon=True),
                   threading.Thread(target=self._watchdog_loop, name="mqueue-watchdog", daemon=True)]
        completer = threading.Thread(target=self._completion_loop, name="mqueue-complete", daemon=True)
        for thread in threads + helpers + [completer]:
            thread.start()
        log.info("worker %s serving %s with %d thread(s), lease %.1fs", self.owner, ",".join(self.queues),
                 self.concurrency, self.lease_seconds)
        try:
            self._produce()
        finally:
            self._shutdown(threads, completer)
            wakeup.unsubscribe(self.queues, self._wake)
            if previous:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _start_scheduler(self) -> None:
        from .scheduler import Scheduler
        if self._scheduler_started:
            return
        self._scheduler_started = True
        scheduler = Scheduler(self.db, self.queues)  # ticks even with no crons: it deletes removed ones

        def tick() -> None:
            if scheduler.tick():
                self._wake.set()
        self.periodic.append(tick)

    def _produce(self) -> None:
        idle = min(0.005, self.poll_seconds)
        outage = 0
        while True:
            if self._pending_signal is not None:
                self._act_on_signal()
            if self._stop.is_set():
                break
            free = self.capacity - self._held_count()
            # Claim at once when threads may idle; otherwise wait for a batch.
            if free <= 0 or (free < self.batch and not self._ready.empty()):
                self._pause(self.poll_seconds)
                continue
            # Counted before claiming: a job still held may be about to be
            # retried with eta=now, so "empty" needs a claim that came after it.
            idle_before_claim = self._held_count() == 0
            try:
                claimed = self._claim(free)
                outage = 0
            except DBAPIError as error:
                outage += 1
                delay = min(0.25 * 2 ** (outage - 1), MAX_OUTAGE_BACKOFF_SECONDS)
                log.warning("database unavailable while claiming (attempt %d), retrying in %.2fs: %s",
                            outage, delay, _first_line(error))
                self._pause(delay, wake_early=False)
                continue
            if claimed:
                idle = min(0.005, self.poll_seconds)
                continue
            if self._until_empty and idle_before_claim:
                return
            self._pause(idle)
            idle = min(idle * 2, self.poll_seconds)

    def _pause(self, seconds: float, wake_early: bool = True) -> None:
        """Wait up to ``seconds``, in slices short enough to notice a signal soon."""
        deadline = time.monotonic() + seconds
        while self._pending_signal is None and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._wake.wait(min(left, 0.25)) and wake_early:
                self._wake.clear()
                return
            if not wake_early:
                self._wake.clear()

    def _claim(self, limit: int) -> int:
        """Claim up to ``limit`` jobs, queues in the order given; hand them to the threads."""
        total = 0
        for queue_name in self.queues:
            if total >= limit:
                break
            with self.db.engine.begin() as conn:
                rows = self.db.dialect.claim_jobs(conn, queue_name, limit - total, self.owner,
                                                  self.lease_seconds)
            for row in rows:
                running = Running(row)
                with self._held_lock:
                    self._held[row.id] = running
                self._ready.put(running)
            total += len(rows)
        return total

    def _held_count(self) -> int:
        with self._held_lock:
            return len(self._held)

    # -- executor threads --------------------------------------------------------
    def _executor_loop(self) -> None:
        while True:
            running = self._ready.get()
            if running is None:
                return
            if self._stop.is_set() and not self._until_empty:
                self._hand_back(running)
                continue
            try:
                outcome = self.executor.execute(running)
            except BaseException:  # never let a thread die silently
                log.exception("job=%s crashed the executor", running.row.id)
                outcome = LOST
            if outcome == DEFERRED:
                self._finished.put(running)  # still held (and heartbeated) until the completer writes it
                continue
            self._count(outcome)
            self._drop(running)
            self._wake.set()

    def _drop(self, running: Running) -> None:
        """Forget a job this worker no longer holds.

        Only this run's entry: after a lost lease the same id may have been
        claimed again by this worker, and that run must stay held (and
        heartbeated).
        """
        with self._held_lock:
            if self._held.get(running.row.id) is running:
                del self._held[running.row.id]

    def _count(self, outcome: str) -> None:
        with self._held_lock:
            if outcome == SUCCEEDED:
                self._result.succeeded += 1
            elif outcome == RETRIED:
                self._result.retried += 1
            elif outcome == FAILED:
                self._result.failed += 1
            elif outcome == LOST:
                self._result.lost += 1

    def _hand_back(self, running: Running) -> None:
        self._drop(running)
        if self.executor.release(running.row):
            log.info("job=%s task=%s queue=%s outcome=released", running.row.id, running.row.name,
                     running.row.queue)

    # -- maintenance thread --------------------------------------------------------
    def _maintenance_loop(self) -> None:
        next_heartbeat = next_rescue = next_periodic = 0.0
        while not self._stop.is_set() or self._held_count():
            now = time.monotonic()
            try:
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat_seconds
                    self._heartbeat_all()
                if now >= next_rescue and not self._stop.is_set():
                    next_rescue = now + self.rescue_seconds
                    self._rescue()
                if now >= next_periodic and not self._stop.is_set():
                    next_periodic = now + 1.0
                    for hook in self.periodic:
                        hook()
            except DBAPIError as error:
                log.warning("database unavailable in maintenance, retrying: %s", _first_line(error))
            except Exception:
                log.exception("maintenance step failed")
            time.sleep(min(0.05, self.heartbeat_seconds))

    def _heartbeat_all(self) -> None:
        with self._held_lock:
            pairs = [(r.row.id, r.row.token) for r in self._held.values() if not (r.lost or r.timed_out)]
        if not pairs:
            return
        began = time.monotonic()
        with self.db.engine.begin() as conn:
            lost = self.db.dialect.heartbeat_jobs(conn, pairs, self.lease_seconds)
        tokens = dict(pairs)
        with self._held_lock:
            for job_id, token in pairs:
                running = self._held.get(job_id)
                if running is not None and running.row.token == token and job_id not in lost:
                    running.mark_renewed(began)
        for job_id in lost:
            with self._held_lock:
                running = self._held.get(job_id)
            if running is None or running.timed_out or running.row.token != tokens[job_id]:
                continue  # finished meanwhile, or held again under a new claim
            running.mark_lost()
            # A job being finished may be gone because its own completion just
            # committed (the heartbeat waited on that row lock): its fenced
            # write says what happened, and logs a lost lease itself.
            if not running.finishing:
                log.warning("job=%s lease lost (another worker took it over)", job_id)

    def _watchdog_loop(self) -> None:
        """Enforce ``timeout=`` on a thread of its own.

        Never behind a database write: on SQLite a heartbeat waits for the
        write lock a running task holds, and that task may be the one to stop.
        """
        while not self._stop.is_set() or self._held_count():
            now = time.monotonic()
            with self._held_lock:
                overdue = [r for r in self._held.values() if r.timeout and r.started and not r.timed_out
                           and not r.lost and not r.finishing and now - r.started > r.timeout]
            for running in overdue:
                try:
                    self.executor.record_timeout(running)
                except Exception:
                    log.exception("job=%s timeout could not be recorded", running.row.id)
            time.sleep(0.05)

    # -- completer thread ----------------------------------------------------------
    def _completion_loop(self) -> None:
        """Complete jobs whose task wrote nothing: every one finished so far in one transaction.

        No waiting for a batch to fill: under load jobs finish while the
        previous batch commits, so batches grow by themselves; when idle a
        job is completed at once.  ``None`` (from shutdown) ends the loop
        after what came before it.
        """
        closing = False
        while not closing:
            batch = [self._finished.get()]
            while len(batch) < MAX_COMPLETION_BATCH:
                try:
                    batch.append(self._finished.get_nowait())
                except queue_module.Empty:
                    break
            closing = any(running is None for running in batch)
            batch = [running for running in batch if running is not None]
            if not batch:
                continue
            try:
                outcomes = self.executor.complete_deferred(batch)
            except Exception:  # never let the thread die silently; the leases expire
                log.exception("completing %d job(s) failed", len(batch))
                outcomes = [LOST] * len(batch)
            for running, outcome in zip(batch, outcomes):
                self._count(outcome)
                self._drop(running)
            self._wake.set()

    def _rescue(self) -> None:
        with self.db.engine.begin() as conn:
            count = self.db.dialect.rescue_expired(conn, self.queues)
        if count:
            log.warning("re-queued %d job(s) whose worker stopped heartbeating", count)
            self._wake.set()

    # -- shutdown ------------------------------------------------------------------
    def _shutdown(self, executor_threads: list[threading.Thread], completer: threading.Thread) -> None:
        self._stop.set()
        # Jobs claimed but not started go back at once.
        while True:
            try:
                running = self._ready.get_nowait()
            except queue_module.Empty:
                break
            if running is not None:
                self._hand_back(running)
        for _ in executor_threads:
            self._ready.put(None)
        deadline = time.monotonic() + self.grace_seconds
        for thread in executor_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._finished.put(None)  # the completer writes what the threads finished, then ends
        completer.join(max(5.0, deadline - time.monotonic()))
        with self._held_lock:
            unfinished = list(self._held.values())
        for running in unfinished:
            log.warning("job=%s still running after the %.0fs grace period: handing it back",
                        running.row.id, self.grace_seconds)
            self._hand_back(running)
        log.info("worker %s stopped", self.owner)

    def _install_signals(self) -> dict | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum, _frame) -> None:
        self._signals += 1
        if self._signals > 1 and os.environ.get("MQUEUE_SUPERVISED") == "1":
            return  # a repeat from the cgroup or the supervisor; it sends SIGKILL to force
        if self._signals > 1:
            os.write(2, b"mqueue: second signal, exiting at once (leases will expire)\n")
            os._exit(1)
        # Only record: the handler runs between two bytecodes of the producer,
        # which may be inside Event.set()/wait() holding that Event's
        # non-reentrant lock, so setting an Event here can deadlock (seen:
        # a SIGTERM that never stopped the worker).  The producer acts on it
        # within one poll interval.
        self._pending_signal = signum

    def _act_on_signal(self) -> None:
        signum, self._pending_signal = self._pending_signal, None
        log.info("received %s: finishing running jobs (grace %.0fs), send again to exit at once",
                 signal.Signals(signum).name, self.grace_seconds)
        self.stop()


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return text[0] if text else type(error).__name__


def start(queue: "str | Sequence[str]", database: "Database | str | None" = None, package: str | None = "tasks",
          **worker_options) -> None:
    """Discover ``package``'s tasks and run a worker until a signal (MQueue's ``mqueue.start``)."""
    from .config import default_url, settings
    from .registry import discover
    if package:
        discover(package)
    db = database if database is not None else (settings.database or default_url())
    Worker(db, queues=[queue] if isinstance(queue, str) else list(queue), **worker_options).run()
