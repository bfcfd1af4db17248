"""The worker: small loops of one shape around one executor.

* the *producer* (the thread that calls ``run()``) claims due jobs, never
  more than there are free executor threads (River's producer): a job a
  worker holds is a job it is running, so a crash charges no job that never
  started and a busy worker never sits on work another worker could run;
* ``concurrency`` *executor* loops run one job each (``executor.py``);
* the *completer* completes, many per statement, the jobs whose task
  returned without touching its session; on SQLite the producer's next
  claim completes them in its own transaction (one turn of the write lock
  for both), and the completer writes only those it leaves.  A task that
  wrote is completed inside its own transaction by the executor;
* the *heartbeat* loop extends the leases of every job this worker holds,
  on a thread of its own so no rescue, cron tick or slow statement delays it;
* the *rescuer* re-queues jobs whose worker died; the *scheduler* enqueues
  due crons; the *watchdog* enforces ``timeout=`` (no database wait before it);
  the *pruner* deletes finished jobs past ``jobs-history`` (``history.py``).

Each is a ``loops.Loop``: start, stop, one step.  Signal handlers only
record the signal; the producer acts on it.

Worker control (``mqueue pause``, ``mqueue workers``, ``mqueue config``):
a paused queue has no claimable job (the claim's first read of a queue
checks ``mqueue_queue`` by primary key: no statement of its own, and every
worker stops at its next claim); the heartbeat loop writes this worker's row of ``mqueue_worker`` (queues,
running job ids, claiming or not), deletes the rows of dead workers and
reads the shared settings (the ``heartbeat`` leases) again.  SIGUSR2 stops
claiming and logs every thread's stack; SIGCONT resumes claiming.

e.g.::

    worker = mqueue.Worker(db, queues=["mail"], concurrency=4, lease=60)
    worker.run()                       # until SIGTERM/SIGINT or worker.stop()
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue as queue_module
import random
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Sequence

from sqlalchemy.exc import DBAPIError

from . import history, shared_settings, wakeup
from .errors import LeaseLostError, first_line
from .executor import (DEFERRED, FAILED, LOST, RELEASED, RETRIED, SUCCEEDED, Executor, Outcome, Running,
                       log_outcome)
from .jobs import Job
from .loops import Loop, OutageLog, jitter
from .session import Database, as_database
from .shell import ShellCommand
from .startup import wait_for_database

log = logging.getLogger("mqueue.worker")

DEFAULT_LEASE_SECONDS = 60.0
#: Idle polling backs off up to this; 0.1 s keeps enqueue-to-start near
#: 50 ms for jobs enqueued by other processes at ~10 cheap queries/s.
DEFAULT_POLL_SECONDS = 0.1
DEFAULT_GRACE_SECONDS = 30.0
#: A dead worker's jobs are re-queued at most this long after their lease expires.
MAX_RESCUE_INTERVAL_SECONDS = 5.0
#: At most this many jobs completed by one statement of the completer.
MAX_COMPLETION_BATCH = 500
#: How long a job whose task returned without writing waits for the producer's next claim to
#: complete it in the claim's transaction before the completer writes it alone.  The producer
#: claims as soon as a thread frees up, so it takes them first unless it is not claiming.
COMPLETION_HANDOFF_SECONDS = 0.02
#: How often the watchdog looks for runs past their ``timeout=``.
WATCHDOG_SECONDS = 0.05
CRON_TICK_SECONDS = 1.0
#: How long the producer waits for more threads to free up before claiming
#: fewer than ``claim_batch`` (all threads) jobs: short next to any real task.
CLAIM_LINGER_SECONDS = 0.003
#: After a job was handed back because its run could not get a connection.
RELEASE_PAUSE_SECONDS = 0.5
#: Threads of a worker that use a connection besides the executors: producer,
#: completer, heartbeat, rescuer, scheduler, pruner, and the watchdog's timeout write.
SERVICE_CONNECTIONS = 7
#: Jobs past their expiry marked ``expired`` per rescue turn (one short transaction).
EXPIRE_BATCH = 100
#: Seconds between two of a worker's sweeps for expired jobs (sooner while a sweep finds a full batch).
EXPIRE_SECONDS = 30.0
#: Each worker prunes about this often (randomised, so many workers spread out;
#: two at once are harmless), first a random part of it after starting.
PRUNE_SECONDS = 60.0
#: Batches (``history.PRUNE_BATCH`` rows each) per turn; a turn that hits it goes on soon after.
PRUNE_BATCHES_PER_TURN = 20
#: ``order=``: first named, first served (default); or the queues in turn.
PRIORITY, ROUND_ROBIN = "priority", "round-robin"
ORDERS = (PRIORITY, ROUND_ROBIN)
#: The heartbeat loop never sleeps longer than this, so the worker's row and
#: the shared settings are refreshed at least this often (well within a minute).
MAX_HEARTBEAT_SECONDS = 15.0
#: A claim that lost a race (Galera: two nodes claimed the same rows, one commit failed
#: certification) is retried at once, up to this many times in one step, each from another window.
CLAIM_RACE_ATTEMPTS = 8
#: Windows of due jobs (``claim_batch`` each, whatever the claim's size, so that two workers'
#: windows never overlap) a worker that lost a claim race draws its own from, and how long it
#: keeps claiming there before going back to the head of the queue.
CLAIM_WINDOWS = 8
CLAIM_WINDOW_SECONDS = 10.0
#: How often a serving worker logs what it did (one info line, only when it did something).
SUMMARY_SECONDS = 60.0


class FinishedJobs:
    """Held jobs whose task returned without writing, until a transaction completes them.

    Where the dialect ``completes_with_claim`` (SQLite), the producer takes
    every one into its next claim (``claim_and_complete``: one transaction
    for both), and the completer takes those the producer left for
    ``COMPLETION_HANDOFF_SECONDS`` (a worker that is not claiming: paused,
    at ``max_runs``, in an outage).  Elsewhere, and once the producer has
    ended, the completer takes them all at once, as it does those handed to
    it ``apart``: a batch whose claim failed.
    """

    def __init__(self) -> None:
        self._jobs: "collections.deque[tuple[float, Running]]" = collections.deque()
        self._apart: "collections.deque[Running]" = collections.deque()
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._jobs) + len(self._apart)

    def put(self, running: Running) -> None:
        with self._changed:
            self._jobs.append((time.monotonic(), running))
            self._changed.notify()

    def put_apart(self, batch: list[Running]) -> None:
        """For the completer alone, at once."""
        with self._changed:
            self._apart.extend(batch)
            self._changed.notify()

    def take(self, limit: int, waited: float = 0.0, apart: bool = False) -> list[Running]:
        """Up to ``limit`` jobs, oldest first, if the oldest has waited ``waited`` seconds
        (``apart``: those handed apart first, whatever their wait)."""
        with self._changed:
            batch = [self._apart.popleft() for _ in range(min(limit, len(self._apart)))] if apart else []
            if self._jobs and time.monotonic() - self._jobs[0][0] >= waited:
                batch += [self._jobs.popleft()[1] for _ in range(min(limit - len(batch), len(self._jobs)))]
            return batch

    def wait(self, waited: float, timeout: float) -> float:
        """Seconds until a ``take(waited=waited, apart=True)`` can return a job; waits ``timeout`` for one if none."""
        with self._changed:
            if not self._jobs and not self._apart:
                self._changed.wait(timeout)
            if self._apart or not self._jobs:
                return 0.0
            return max(0.0, self._jobs[0][0] + waited - time.monotonic())


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
    """Serve ``queues`` with ``concurrency`` threads: first named, first served, or in turn
    (``order="round-robin"``).

    ``lease``: the lease of every job this worker claims.  Left out (None),
    each queue's lease is the shared setting ``heartbeat:QUEUE``, else
    ``heartbeat`` (``mqueue config``), else 60 s, read again while running.
    """

    def __init__(self, database: "Database | str", queues: Sequence[str] | str = ("default",),
                 concurrency: int = 1, lease: float | None = None,
                 poll_interval: float = DEFAULT_POLL_SECONDS, grace: float = DEFAULT_GRACE_SECONDS,
                 heartbeat_interval: float | None = None, command: "ShellCommand | None" = None,
                 order: str = PRIORITY) -> None:
        self.queues = [queues] if isinstance(queues, str) else list(queues)
        if not self.queues or not all(isinstance(q, str) and q for q in self.queues):
            raise ValueError(f"queues must be non-empty names, got {queues!r}")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if (lease is not None and lease <= 0) or poll_interval <= 0 or grace < 0:
            raise ValueError("lease and poll_interval must be > 0 and grace >= 0")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.concurrency = concurrency
        self.order = order
        #: A lease given by the caller is kept; otherwise the shared settings decide (``_apply_settings``).
        self._lease_given = lease is not None
        self.lease_seconds = float(lease) if lease is not None else DEFAULT_LEASE_SECONDS
        #: Each queue's lease for new claims and heartbeats.
        self.queue_leases = {queue: self.lease_seconds for queue in self.queues}
        self.poll_seconds = float(poll_interval)
        self.grace_seconds = float(grace)
        self.claim_batch = concurrency
        self.db = worker_database(database, concurrency, self.lease_seconds)
        self._owns_db = self.db is not database   # built here: its pool is closed after each run
        self._heartbeat_given = heartbeat_interval
        self._set_intervals()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xffff:x}"
        #: ``--exec``: every job of these queues runs this command, not its registered task.
        self.command = command
        self.executor = Executor(self.db, self.heartbeat_job, lambda: self._stop.is_set(), self.lease_seconds,
                                 command=command)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._held: dict[int, Running] = {}
        self._held_lock = threading.Lock()
        self._signals = 0
        self._pending_signal: int | None = None
        #: SIGUSR2/SIGCONT recorded by the handler, acted on by the producer (``list.append`` is atomic).
        self._control_signals: list[int] = []
        self._beat_wake = threading.Event()
        self._reset()

    def _set_intervals(self) -> None:
        """Heartbeat and rescue intervals from the shortest lease (given, or the queues' from settings)."""
        shortest = min(self.queue_leases.values())
        self.heartbeat_seconds = self._heartbeat_given or max(min(shortest / 4, MAX_HEARTBEAT_SECONDS), 0.05)
        self.rescue_seconds = min(shortest / 2, MAX_RESCUE_INTERVAL_SECONDS)

    def _reset(self) -> None:
        """Fresh per-run state: ``run_until_empty`` may be called again on the same worker."""
        self._stop.clear()
        if self.command is not None:
            self.command.abort.clear()
        self._ready: "queue_module.Queue[Running]" = queue_module.Queue()
        self._finished = FinishedJobs()   # for the producer's next claim, else the completer
        self._completing = 0   # held jobs whose task returned, waiting in ``_finished``
        self._producer_completes = False   # while the producer runs: it completes them with its claims
        self._result = RunResult()
        self._until_empty = False
        self._with_scheduled = False
        self._max_runs: int | None = None
        self._claimed = 0      # jobs claimed by this run (``max_runs``)
        self._idle_seconds = min(0.005, self.poll_seconds)
        self._linger_until: float | None = None
        self._claim_pause_until = 0.0
        self._prune_started = False
        self._expire_after = 0.0
        self._turn = 0                        # round-robin: the queue that goes first next
        self.claiming = True                  # False between SIGUSR2 and SIGCONT
        self._paused: set[str] | None = None  # paused queues as the registry last read them (for the log)
        self._claim_conflicts = 0  # claim races lost (and retried at once) in this run
        self._claim_raced = False  # the last claim step lost every attempt
        self._window = 0           # the window of due jobs claimed from (0: the head)
        self._window_until = 0.0
        self._loops: list[Loop] = []
        self._summarized: tuple = ()
        self._summarized_at = time.monotonic()

    # -- public ----------------------------------------------------------------
    def run(self) -> None:
        """Serve until ``stop()`` or SIGTERM/SIGINT; then finish or hand back held jobs."""
        self._reset()
        self._serve(install_signals=True)

    def run_until_empty(self, timeout: float | None = None, *, with_scheduled: bool = False,
                        max_runs: int | None = None) -> RunResult:
        """Process every job due now (and any due while running), then return the counts.

        e.g.::

            result = worker.run_until_empty(timeout=30, with_scheduled=True, max_runs=100)
            assert (result.succeeded, result.failed) == (3, 0)

        A job that waits for a later eta is not due: a delayed job, or a
        failed run's retry waiting out its backoff (so with ``backoff=1`` it
        returns after the first failed run).  ``with_scheduled=True`` runs
        those too, at once (Oban's ``drain_queue(with_scheduled: true)``):
        when nothing is due, the jobs with the earliest eta are made due now,
        until none is left.  A task that always retries then runs until it
        fails for good, one that enqueues itself forever until ``max_runs``:
        at most that many jobs are claimed, and the ones running finish.

        A due job that another transaction holds locked (a claim passes over
        it) is waited for: "empty" is a plain read that finds no due job.
        """
        if max_runs is not None and (not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs < 1):
            raise ValueError(f"max_runs must be an integer >= 1, got {max_runs!r}")
        self._reset()
        self._until_empty = True
        self._with_scheduled = with_scheduled
        self._max_runs = max_runs
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

    def run_job(self, job_id: int) -> "tuple[Outcome, Running] | None":
        """Claim the queued job ``job_id``, due or not, and run it in the calling thread; None if it is not queued.

        What a worker does for one job, heartbeats and ``timeout=`` included,
        without serving a queue: for ``mqueue.testing.perform_job``.  Returns
        the outcome and the ``Running`` (its ``error`` and ``value``).
        """
        self._reset()
        try:
            self.db.check_schema()
            with self.db.engine.begin() as conn:
                row = self.db.dialect.claim_job(conn, job_id, self.owner, self.lease_seconds)
            if row is None or row.expired:
                return None
            running = Running(row)
            with self._held_lock:
                self._held[row.id] = running
            outages = OutageLog(self._describe_outage)
            loops = [Loop("heartbeating", self._heartbeat_step, outages=outages).start("mqueue-heartbeat"),
                     Loop("enforcing timeouts", self._watchdog_step, outages=outages).start("mqueue-watchdog")]
            outcome = LOST
            try:
                outcome = self.executor.execute(running)
                if outcome == DEFERRED:
                    [outcome] = self.executor.complete_deferred([running])
            finally:
                for loop in loops:
                    loop.stop()
                self._finish(running, outcome)
            return outcome, running
        finally:
            if self._owns_db:
                self.db.dispose()

    def stop(self) -> None:
        """Stop claiming; running jobs get the grace period to finish."""
        self._stop.set()
        self._wake.set()

    def heartbeat_job(self, job: Job) -> None:
        """Extend one job's lease now (``current_job().heartbeat()``)."""
        with self.db.engine.begin() as conn:
            lost = self.db.dialect.heartbeat_jobs(conn, [(job.id, job.token)],
                                                  self.queue_leases.get(job.queue, self.lease_seconds))
        if lost:
            raise LeaseLostError(f"job {job.id} is no longer owned by this worker")

    # -- the loops -----------------------------------------------------------------
    def _serve(self, install_signals: bool) -> None:
        """Run the loops until the producer ends; ``run()`` first waits for a database not up yet."""
        previous = self._install_signals() if install_signals else None
        try:
            if not install_signals:
                self.db.check_schema()  # run_until_empty: a clear error beats waiting in a script
                self._run_loops()
            elif wait_for_database(self.db, lambda: self._pending_signal is not None or self._stop.is_set()):
                self._run_loops()
            else:
                log.info("worker %s stopped while waiting for its database", self.owner)
        finally:
            for signum, handler in (previous or {}).items():
                signal.signal(signum, handler)
            if self._owns_db:
                self.db.dispose()

    def _run_loops(self) -> None:
        # The shared leases before the first claim, by a plain read: the registry row is the
        # heartbeat loop's first write (on SQLite a write here would wait behind a running task).
        self._read_settings()
        wakeup.subscribe(self.queues, self._wake)
        wake_key = wakeup.listen(self.db)   # enqueues of other processes wake the producer
        from .scheduler import Scheduler
        scheduler = Scheduler(self.db, self.queues)  # ticks even with no crons: it deletes removed ones
        outages = OutageLog(self._describe_outage)
        race = self.db.dialect.is_conflict  # a lost race is retried at once, not backed off as an outage
        executors = [Loop("running a job", self._execute_step, outages=outages).start(f"mqueue-exec-{n}")
                     for n in range(self.concurrency)]
        completer = Loop("completing jobs", self._complete_step, outages=outages).start("mqueue-complete")
        heartbeat = Loop("heartbeating", self._heartbeat_step, wake=self._beat_wake, outages=outages,
                         conflict=race).start("mqueue-heartbeat")
        watchdog = Loop("enforcing timeouts", self._watchdog_step, outages=outages).start("mqueue-watchdog")
        rescuer = Loop("rescuing expired jobs", self._rescue_step, outages=outages,
                       conflict=race).start("mqueue-rescue")
        crons = Loop("scheduling crons", lambda: self._cron_step(scheduler), outages=outages,
                     conflict=race).start("mqueue-cron")
        pruner = Loop("pruning history", self._prune_step, outages=outages, conflict=race).start("mqueue-prune")
        self._producer = Loop("claiming", self._claim_step, wake=self._wake, outages=outages,
                              interrupted=lambda: self._pending_signal is not None or bool(self._control_signals),
                              conflict=race)
        self._loops = [heartbeat, rescuer, crons, pruner, self._producer]
        summary = Loop("summarizing", lambda: self._summary_step(scheduler)).start("mqueue-summary")
        log.info("worker %s serving %s with %d thread(s), lease %s%s%s", self.owner, ",".join(self.queues),
                 self.concurrency, self._describe_leases(), "" if self.order == PRIORITY else ", in turn",
                 "" if self.command is None else f", running {self.command.argv[0]} for every job")
        self._producer_completes = self.db.dialect.completes_with_claim
        try:
            self._producer.run()
        finally:
            self._producer_completes = False
            self._stop.set()
            for loop in (rescuer, crons, pruner, summary):
                loop.stop()
            self._shutdown(executors, completer)
            for loop in (heartbeat, watchdog):
                loop.stop()
            wakeup.unsubscribe(self.queues, self._wake)
            wakeup.release(wake_key)
            self._unregister()
            log.info("worker %s totals: %s", self.owner, self._describe(self._counts(scheduler)))
            log.info("worker %s stopped", self.owner)

    def _claim_step(self) -> float:
        """Claim up to the number of free executor threads; the seconds to wait before the next claim."""
        if self._pending_signal is not None:
            self._act_on_signal()
        while self._control_signals:
            self._act_on_control(self._control_signals.pop(0))
        if self._stop.is_set():
            self._producer.stop()
            return 0.0
        if not self.claiming:
            return self.poll_seconds
        with self._held_lock:
            held = len(self._held)
            free = self.concurrency - (held - self._completing)
        if self._max_runs is not None:
            if self._claimed >= self._max_runs:
                if held == 0:
                    self._producer.stop()
                return 0.0 if held == 0 else self.poll_seconds
            free = min(free, self._max_runs - self._claimed)
        if free <= 0:
            return self.poll_seconds  # a thread that frees up wakes the producer
        pause = self._claim_pause_until - time.monotonic()
        if pause > 0:
            return pause
        # While other threads are still busy, wait a moment for a few more to
        # free up: one claim transaction then serves several jobs (a claim
        # costs as much as a batched completion of many).
        if free < self.claim_batch and held > 0:
            now = time.monotonic()
            if self._linger_until is None:
                self._linger_until = now + CLAIM_LINGER_SECONDS
            if now < self._linger_until:
                return self._linger_until - now
        self._linger_until = None
        # Counted before claiming: a job still held may be about to be
        # retried with eta=now, so "empty" needs a claim that came after it.
        if self._claim(free):
            self._idle_seconds = min(0.005, self.poll_seconds)
            return 0.0
        if self._claim_raced:
            return jitter()  # every attempt lost a race: there are due jobs, try again soon
        if self._until_empty and held == 0:
            if self._due_but_locked():
                return jitter()  # held by another transaction for now: not empty yet
            if self._with_scheduled and self._hasten():
                return 0.0
            self._producer.stop()
            return 0.0
        delay, self._idle_seconds = self._idle_seconds, min(self._idle_seconds * 2, self.poll_seconds)
        return delay

    def _claim(self, limit: int) -> int:
        """Claim up to ``limit`` jobs from the queues (paused ones give none); hand them to the threads.

        ``priority``: the queues in the order given, each while jobs are
        due.  ``round-robin``: each round starts one queue further, and each
        queue first gets its share of ``limit``; what a queue leaves unused
        goes to those that filled theirs, in the same order.
        """
        self._claim_raced = False
        queues = self._claim_order()
        claims: list[int] = []
        for position in range(len(queues)):
            if sum(claims) >= limit:
                break
            claims.append(self._claim_from(queues[position], self._share(queues, position, limit - sum(claims))))
        if self.order == ROUND_ROBIN:
            # Shares a queue left unused go to the queues that filled theirs (they may have more).
            for position, claimed in enumerate(list(claims)):
                if sum(claims) >= limit:
                    break
                if claimed and claimed == self._share(queues, position, limit - sum(claims[:position])):
                    claims.append(self._claim_from(queues[position], limit - sum(claims)))
        total = sum(claims)
        self._claimed += total
        return total

    def _claim_order(self) -> list[str]:
        """The queues to claim from this round, in order: as named, or rotated for round-robin.

        Paused queues stay in: the claim itself finds nothing in them
        (``dialects.base.NOT_PAUSED``), so a pause costs no statement.
        """
        queues = list(self.queues)
        if self.order == ROUND_ROBIN and queues:
            start = self._turn % len(queues)
            self._turn = start + 1
            queues = queues[start:] + queues[:start]
        return queues

    def _share(self, queues: list[str], position: int, left: int) -> int:
        """How many of ``left`` jobs the queue at ``position`` is asked for: all (priority), or its
        part of what is left among it and the queues after it (round-robin, rounded up)."""
        if self.order != ROUND_ROBIN:
            return left
        return -(-left // (len(queues) - position))

    def _claim_from(self, queue_name: str, limit: int) -> int:
        """Claim up to ``limit`` jobs of one queue with its lease; hand them to the threads once committed.

        A lost race is retried at once from a window of the worker's own.
        Where row locks are local to one node (Galera), workers on two nodes
        pick the same head-of-queue rows and one commit fails certification
        (1213).  That is a lost race, not an outage: the loser counts it,
        draws a window of due jobs a few batches past the head (for
        ``CLAIM_WINDOW_SECONDS``, so workers spread out instead of colliding
        again) and claims again after a few milliseconds.
        """
        lease = self.queue_leases.get(queue_name, self.lease_seconds)
        for _ in range(CLAIM_RACE_ATTEMPTS):
            if self._window and time.monotonic() > self._window_until:
                self._window = 0
            try:
                return self._claim_completing(queue_name, limit, lease, skip=self._window * self.claim_batch)
            except DBAPIError as error:
                if not self.db.dialect.is_conflict(error):
                    raise
                self._claim_conflicts += 1
                self._window = random.randrange(1, CLAIM_WINDOWS)
                self._window_until = time.monotonic() + CLAIM_WINDOW_SECONDS
                log.debug("claim of queue %s lost a race (%d so far), claiming again from window %d: %s",
                          queue_name, self._claim_conflicts, self._window, first_line(error))
                time.sleep(jitter())
        self._claim_raced = True
        return 0

    def _claim_completing(self, queue_name: str, limit: int, lease: float, skip: int) -> int:
        """Claim, completing the jobs finished since the last claim in the same transaction; hand over.

        Where the dialect ``completes_with_claim`` (SQLite: one transaction
        holds the write lock where two took turns for it).  The completion
        is written as the completer would write it, and each job's outcome
        logged once the claimed rows are handed over.  If the claim fails,
        the batch goes to the completer (``put_apart``), marked: its COMMIT
        may have landed.
        """
        finished = self._finished.take(MAX_COMPLETION_BATCH) if self._producer_completes else []
        if not finished:
            return self._hand_over(self.db.dialect.claim(self.db.engine, queue_name, limit, self.owner, lease,
                                                         skip=skip), lease)
        try:
            rows, lost = self.db.dialect.claim_and_complete(
                self.db.engine, queue_name, limit, self.owner, lease, [(r.row.id, r.row.token) for r in finished],
                [r.row.id for r in finished if r.row.tracked], skip=skip)
        except BaseException:
            for running in finished:
                running.completion_tried = True
            self._finished.put_apart(finished)
            raise
        claimed = self._hand_over(rows, lease)
        self._completed(finished, self.executor.settle_deferred(finished, lost))
        return claimed

    def _hand_over(self, rows, lease: float) -> int:
        """Give claimed rows to the executor threads: only after the claim committed.

        A task started earlier would write its completion against the row as
        it was before the claim (on PostgreSQL its fenced UPDATE skips the
        queued version, zero rows: a lost lease that never was).  Rows the
        claim found past their expiry are now ``expired``: skipped, but
        counted (the queue was not empty).
        """
        for row in rows:
            if row.expired:
                continue
            running = Running(row)
            running.lease_seconds = lease
            with self._held_lock:
                self._held[row.id] = running
            self._ready.put(running)
        return len(rows)

    def _counts(self, scheduler) -> tuple[int, int, int, int, int, int]:
        """Succeeded, retried, failed, lost; claim conflicts; other lost races (crons, heartbeats, rescue)."""
        with self._held_lock:
            result = self._result
            ran = (result.succeeded, result.retried, result.failed, result.lost)
        others = sum(loop.conflicts for loop in self._loops if loop is not self._producer) + scheduler.conflicts
        return ran + (self._claim_conflicts + self._producer.conflicts, others)

    @staticmethod
    def _describe(counts: tuple) -> str:
        succeeded, retried, failed, lost, claims, others = counts
        return (f"{succeeded} succeeded, {retried} retried, {failed} failed, {lost} lost; "
                f"{claims} claim conflicts and {others} other lost races (retried at once)")

    def _summary_step(self, scheduler) -> float:
        """Every ``SUMMARY_SECONDS``: one info line of what changed since the last, if anything did."""
        counts = self._counts(scheduler)
        now = time.monotonic()
        if self._summarized and counts != self._summarized:
            delta = tuple(new - old for new, old in zip(counts, self._summarized))
            log.info("worker %s in the last %.0fs: %s", self.owner, now - self._summarized_at,
                     self._describe(delta))
        self._summarized, self._summarized_at = counts, now
        return SUMMARY_SECONDS

    def _due_but_locked(self) -> bool:
        """``run_until_empty`` after a claim that got nothing: are due jobs still there, locked by others?"""
        with self.db.engine.connect() as conn:
            return self.db.dialect.has_due_jobs(conn, self.queues)

    def _hasten(self) -> int:
        """``with_scheduled``: make the next scheduled jobs of these queues due now; how many."""
        with self.db.engine.begin() as conn:
            return self.db.dialect.hasten_scheduled(conn, self.queues)

    def _execute_step(self) -> float:
        try:
            running = self._ready.get(timeout=0.25)
        except queue_module.Empty:
            return 0.0
        if self._stop.is_set() and not self._until_empty:
            self._hand_back(running)
            return 0.0
        if running.lost:  # its lease was lost while it waited for this thread: it may run elsewhere
            log.warning("job=%s lease lost before it started: not run here", running.row.id)
            self._finish(running, LOST)
            return 0.0
        try:
            outcome = self.executor.execute(running)
        except BaseException:  # noqa: B902 - e.g. SystemExit from a task: the thread must go on
            log.exception("job=%s task=%s crashed its executor thread; its lease will expire and "
                          "it is rescued", running.row.id, running.row.name)
            running.mark_lost()  # no more heartbeats: another worker (or this one) rescues it
            outcome = LOST
        if outcome == DEFERRED:
            with self._held_lock:
                self._completing += 1   # still held (and heartbeated) until the completer writes it
            self._finished.put(running)
            self._wake.set()            # its thread is free: the producer may claim again
        else:
            self._finish(running, outcome)
        return 0.0

    def _complete_step(self) -> float:
        """Complete the jobs whose task wrote nothing that no claim took: all of them in one transaction.

        Where the producer's next claim completes them (a thread that frees
        up wakes it), this writes those it left for
        ``COMPLETION_HANDOFF_SECONDS`` and those handed apart.  No waiting
        for a batch to fill: batches grow by themselves under load.
        """
        waited = COMPLETION_HANDOFF_SECONDS if self._producer_completes else 0.0
        batch = self._finished.take(MAX_COMPLETION_BATCH, waited, apart=True)
        if not batch:
            return self._finished.wait(waited, timeout=0.25)
        try:
            outcomes = self.executor.complete_deferred(batch)
        except Exception:  # the leases expire and the jobs are rescued
            log.exception("completing %d job(s) failed", len(batch))
            outcomes = [LOST] * len(batch)
        self._completed(batch, outcomes)
        return 0.0

    def _completed(self, batch: list[Running], outcomes) -> None:
        """Forget a batch of deferred jobs whose completion was written (or given up)."""
        with self._held_lock:
            self._completing -= len(batch)
        for running, outcome in zip(batch, outcomes):
            self._finish(running, outcome)

    def _finish(self, running: Running, outcome) -> None:
        """Count an outcome and forget the job: only this run's entry.

        After a lost lease the same id may have been claimed again by this
        worker, and that run must stay held (and heartbeated).
        """
        with self._held_lock:
            if self._held.get(running.row.id) is running:
                del self._held[running.row.id]
            if outcome == SUCCEEDED:
                self._result.succeeded += 1
            elif outcome == RETRIED:
                self._result.retried += 1
            elif outcome == FAILED:
                self._result.failed += 1
            elif outcome == LOST:
                self._result.lost += 1
            elif outcome == RELEASED:
                # Handed back uncharged (no connection to be had): claim again
                # after a pause, not at once in a loop.
                self._claim_pause_until = time.monotonic() + RELEASE_PAUSE_SECONDS
        self._wake.set()

    def _hand_back(self, running: Running) -> None:
        self._finish(running, None)
        if self.executor.release(running.row):
            log_outcome(running.row, running.run_seconds(), RELEASED)

    def _heartbeat_step(self) -> float:
        """Extend the leases of held jobs, each by its queue's lease now, then write this worker's row."""
        with self._held_lock:
            held = [r for r in self._held.values() if not (r.lost or r.timed_out)]
        by_lease: dict[float, list[tuple[int, int]]] = {}
        for running in held:
            lease = self.queue_leases.get(running.row.queue, self.lease_seconds)
            by_lease.setdefault(lease, []).append((running.row.id, running.row.token))
        pairs = [(pair, lease) for lease, group in by_lease.items() for pair in group]
        if not pairs:
            self._register()
            return self.heartbeat_seconds
        began = time.monotonic()
        lost: set[int] = set()
        with self.db.engine.begin() as conn:
            for lease, group in by_lease.items():
                lost.update(self.db.dialect.heartbeat_jobs(conn, group, lease))
        with self._held_lock:
            for (job_id, token), lease in pairs:
                running = self._held.get(job_id)
                if running is None or running.row.token != token:
                    continue  # finished meanwhile, or held again under a new claim
                if job_id not in lost:
                    running.mark_renewed(began)
                    running.lease_seconds = lease  # the executor's deadline follows the lease now held
                elif not running.timed_out:
                    running.mark_lost()
                    # A job being finished may be gone because its own completion
                    # just committed (the heartbeat waited on that row lock): its
                    # fenced write says what happened, and logs a lost lease itself.
                    if not running.finishing:
                        log.warning("job=%s lease lost (another worker took it over)", job_id)
        self._register()
        return self.heartbeat_seconds

    # -- the registry and the shared settings -----------------------------------------
    def _register(self) -> None:
        """Write this worker's row, delete dead workers' rows, and apply the shared leases: one transaction.

        On the heartbeat loop, so at least every ``MAX_HEARTBEAT_SECONDS``.
        """
        with self._held_lock:
            running = sorted(self._held)
        try:
            with self.db.engine.begin() as conn:
                self.db.dialect.register_worker(
                    conn, self.owner, socket.gethostname(), os.getpid(), json.dumps(self.queues),
                    min(self.queue_leases.values()), json.dumps(running), self.claiming)
                self.db.dialect.delete_stale_workers(conn)
                settings = None if self._lease_given else shared_settings.read(self.db.dialect, conn)
                paused = self.db.dialect.paused_queues(conn) & set(self.queues)
        except DBAPIError as error:
            # The next beat writes it again: a deadlock or an outage here must
            # neither stop a starting worker nor delay its jobs' heartbeats
            # (the loop would back off as after a failed job heartbeat).
            level = logging.INFO if self.db.dialect.is_transient(error) else logging.WARNING
            log.log(level, "worker %s: writing its registry row failed, the next heartbeat tries again: %s",
                    self.owner, first_line(error))
            return
        if settings is not None:
            self._apply_settings(settings)
        self._log_paused(paused)

    def _log_paused(self, paused: set[str]) -> None:
        """Say which queues are paused at the start and when that changes (the claim itself obeys at once)."""
        before = set() if self._paused is None else self._paused
        for queue in sorted(paused - before):
            log.info("queue %s is paused: claiming nothing from it until resumed", queue)
        for queue in sorted(before - paused):
            log.info("queue %s is resumed", queue)
        self._paused = paused

    def _read_settings(self) -> None:
        """Apply the shared leases now (a read; a failure leaves the defaults to the first heartbeat)."""
        if self._lease_given:
            return
        try:
            with self.db.dialect.reader(self.db.engine).connect() as conn:
                settings = shared_settings.read(self.db.dialect, conn)
        except DBAPIError as error:
            log.info("worker %s: reading the shared settings failed, the first heartbeat tries again: %s",
                     self.owner, first_line(error))
            return
        self._apply_settings(settings)

    def _unregister(self) -> None:
        """Delete this worker's row on a clean stop (a failure only leaves it to go stale)."""
        try:
            with self.db.engine.begin() as conn:
                self.db.dialect.unregister_worker(conn, self.owner)
        except Exception as error:  # noqa: BLE001 - stopping must not fail on it
            log.warning("could not delete worker %s from the registry: %s", self.owner, first_line(error))

    def _apply_settings(self, values: dict) -> None:
        """Each queue's lease from the shared settings, for the next claims and heartbeats."""
        leases = {queue: shared_settings.lease_for(values, queue) for queue in self.queues}
        if leases == self.queue_leases:
            return
        self.queue_leases = leases
        self.lease_seconds = values["heartbeat"]
        self.executor.lease_seconds = min(leases.values())
        self._set_intervals()
        log.info("worker %s lease now %s (shared setting heartbeat)", self.owner, self._describe_leases())

    def _describe_leases(self) -> str:
        """``60.0s``, or ``mail=5.0s,reports=900.0s`` when the queues' leases differ."""
        if len(set(self.queue_leases.values())) == 1:
            return f"{next(iter(self.queue_leases.values())):.1f}s"
        return ",".join(f"{queue}={lease:.1f}s" for queue, lease in self.queue_leases.items())

    def _watchdog_step(self) -> float:
        """Enforce ``timeout=`` on a thread of its own.

        Never behind a database write: on SQLite a heartbeat waits for the
        write lock a running task holds, and that task may be the one to stop.
        """
        now = time.monotonic()
        with self._held_lock:
            overdue = [r for r in self._held.values() if r.timeout and r.started and not r.timed_out
                       and not r.lost and not r.finishing and now - r.started > r.timeout]
        for running in overdue:
            self.executor.record_timeout(running)
        return WATCHDOG_SECONDS

    def _rescue_step(self) -> float:
        with self.db.engine.begin() as conn:
            count = self.db.dialect.rescue_expired(conn, self.queues)
        if count:
            log.warning("re-queued %d job(s) whose worker stopped heartbeating", count)
            self._wake.set()
        # Jobs past their ``expires=`` that no claim reached (a busy or paused queue, waiting jobs).
        # The scan reads every queued row of the queues (no index on expires_at): not every turn.
        if time.monotonic() >= self._expire_after:
            with self.db.engine.begin() as conn:
                count = self.db.dialect.expire_jobs(conn, self.queues, EXPIRE_BATCH)
            if count:
                log.info("%d job(s) expired before they started", count)
            self._expire_after = time.monotonic() + (0.0 if count == EXPIRE_BATCH else EXPIRE_SECONDS)
        return self.rescue_seconds

    def _prune_step(self) -> float:
        """One turn of pruning, then the seconds until the next (the first turn waits too)."""
        if self._prune_started:
            result = history.prune(self.db, max_batches=PRUNE_BATCHES_PER_TURN)
            if result.jobs + result.events >= PRUNE_BATCHES_PER_TURN * history.PRUNE_BATCH:
                return 1.0  # more to do: go on soon, in short transactions
        self._prune_started = True
        return PRUNE_SECONDS * random.uniform(0.5, 1.5)

    def _describe_outage(self, error: BaseException) -> str | None:
        """A missing table in the words of ``SchemaMissingError`` (what to run); None for an outage."""
        if self.db.dialect.is_missing_table(error):
            return str(self.db.translate(error))
        return None

    def _cron_step(self, scheduler) -> float:
        if scheduler.tick():
            self._wake.set()
        return CRON_TICK_SECONDS

    # -- shutdown ------------------------------------------------------------------
    def _shutdown(self, executors: list[Loop], completer: Loop) -> None:
        # Jobs claimed but not started go back at once.
        while True:
            try:
                self._hand_back(self._ready.get_nowait())
            except queue_module.Empty:
                break
        for loop in executors:
            loop.stop()
        deadline = time.monotonic() + self.grace_seconds
        for loop in executors:
            loop.join(max(0.0, deadline - time.monotonic()))
        if self.command is not None and not all(loop.join(0) for loop in executors):
            # Commands still running after the grace: their kill sequence, then their jobs go back.
            self.command.abort.set()
            kill_deadline = time.monotonic() + self.command.kill_seconds()
            for loop in executors:
                loop.join(max(0.0, kill_deadline - time.monotonic()))
        # The completer writes what the executors finished, then ends.
        completer.stop()
        completer.join(max(5.0, deadline - time.monotonic()))
        while self._finished:
            self._complete_step()
        with self._held_lock:
            unfinished = list(self._held.values())
        for running in unfinished:
            log.warning("job=%s still running after the %.0fs grace period: handing it back",
                        running.row.id, self.grace_seconds)
            self._hand_back(running)

    # -- signals -------------------------------------------------------------------
    def _install_signals(self) -> dict | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        for signum in CONTROL_SIGNALS:
            previous[signum] = signal.signal(signum, self._on_control_signal)
        return previous

    def _on_control_signal(self, signum, _frame) -> None:
        """SIGUSR2/SIGCONT: only recorded, for the reason given in ``_on_signal``."""
        self._control_signals.append(signum)

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
        # within one wait slice.
        self._pending_signal = signum

    def _act_on_signal(self) -> None:
        signum, self._pending_signal = self._pending_signal, None
        log.info("received %s: finishing running jobs (grace %.0fs), send again to exit at once",
                 signal.Signals(signum).name, self.grace_seconds)
        self.stop()

    def _act_on_control(self, signum: int) -> None:
        """SIGUSR2: stop claiming (running jobs go on) and log every thread's stack; SIGCONT: claim again.

        The heartbeat loop is woken so the registry shows the change at once.
        SIGCONT also arrives after a SIGSTOP: if claiming was not stopped it changes nothing.
        """
        if signum == signal.SIGUSR2:
            self.claiming = False
            log.warning("received SIGUSR2: claiming stopped until SIGCONT; running jobs go on. %s",
                        thread_stacks())
        elif not self.claiming:
            self.claiming = True
            log.info("received SIGCONT: claiming again")
        self._beat_wake.set()


#: Recorded by a worker's handlers (``_on_control_signal``) and forwarded by the supervisor.
CONTROL_SIGNALS = (signal.SIGUSR2, signal.SIGCONT)


def thread_stacks() -> str:
    """Every thread's stack, each under a line with its name: what a stuck worker is doing."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    frames = sys._current_frames()
    parts = [f"Stacks of {len(frames)} thread(s):"]
    for ident, frame in sorted(frames.items(), key=lambda item: names.get(item[0], "")):
        parts.append(f"--- thread {names.get(ident, '?')} (id {ident}):")
        parts.append("".join(traceback.format_stack(frame)).rstrip())
    return "\n".join(parts)


def worker_database(database: "Database | str", concurrency: int, lease_seconds: float) -> Database:
    """The Database a worker uses: the daemon's engine options on the caller's database.

    Those options size the pool from ``concurrency`` (measured: the default
    5 + 10 under ``concurrency=16`` ended in a pool TimeoutError), skip the
    ping on checkout and bound lock waits below the lease.  A URL, or a
    Database built from one, gets a worker engine of its own on that URL
    with the caller's engine options kept (TLS ``connect_args`` and the
    like); sessions of the two still join (``db.session()`` compares
    databases, not engines).  The application's own engine (``Database(engine)``)
    and an in-memory SQLite database cannot be rebuilt: they are used as
    they are if their pool is large enough.
    """
    if not isinstance(database, Database):
        database = as_database(database)
        database.dispose()  # only its URL and options are wanted
    options = database.dialect.worker_engine_options(concurrency, lease_seconds)
    if not database.adopted and database.dialect.database_identity(database.engine.url) is not None:
        return Database(database.engine.url, **{**database.engine_kwargs, **options})
    pool = database.engine.pool
    size, overflow = getattr(pool, "size", None), getattr(pool, "_max_overflow", None)
    needed = 2 * concurrency + SERVICE_CONNECTIONS
    if callable(size) and overflow is not None and overflow >= 0 and size() + overflow < needed:
        raise ValueError(f"the engine's pool holds {size() + overflow} connections; a worker with "
                         f"{concurrency} thread(s) needs {needed}: create the engine with "
                         f"pool_size={needed} (or pass the URL)")
    return database


#: One layout for mqueue's log lines: ``python -m mqueue`` and ``mqueue.start()`` use it.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_stderr_handler: logging.Handler | None = None


def log_to_stderr() -> None:
    """Send mqueue's log lines (info and up) to stderr, unless the application set up logging.

    Only when the root logger has no handler, and once per process: an
    application that configures logging (before ``start``) keeps its own
    handlers, format and levels, and mqueue adds nothing.  The handler sits
    on the ``mqueue`` logger, so other libraries' logging is left alone.
    """
    global _stderr_handler
    if _stderr_handler is not None or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package = logging.getLogger("mqueue")
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    _stderr_handler = handler


def start(queue: "str | Sequence[str]", database: "Database | str | None" = None, package: str | None = "tasks",
          **worker_options) -> None:
    """Discover ``package``'s tasks and run a worker until a signal (MQueue's ``mqueue.start``).

    Its log lines go to stderr unless the application configured logging (``log_to_stderr``).
    """
    from .config import default_url, settings
    from .registry import discover
    log_to_stderr()
    if package:
        discover(package)
    db = database if database is not None else (settings.database or default_url())
    Worker(db, queues=[queue] if isinstance(queue, str) else list(queue), **worker_options).run()
