#!/usr/bin/env python3
"""mqueue's benchmarks: what an enqueue costs, how fast daemons drain, how soon a job starts.

    python scripts/bench.py {enqueue,drain,latency,scheduled,prune,galera,all} [--backend sqlite|mariadb|postgresql|all]
                            [--runs N] [--mariadb-url URL] [--postgresql-url URL]
    python scripts/bench.py profile [--backend ...] [--profile-clock wall|cpu] [--profile-task noop|write]

Sizes can be changed (``--enqueue-jobs --many-jobs --drain-jobs --raw-seconds
--latency-jobs --latency-gap --scheduled-jobs --profile-jobs``); ``--keep`` keeps the
temporary directory with the daemons' logs.

It prints figures and judges them against the project's targets (PASS/MISS);
it asserts nothing and the test suite never runs it.

Each backend gets a fresh database: a SQLite file in a temporary directory,
or ``mqueue_bench_<pid>`` created on the MariaDB / PostgreSQL server named by
``--mariadb-url`` / ``--postgresql-url`` (the database part of those URLs is
replaced) and dropped at the end.  It is migrated with
``mqueue.migrate.upgrade``; tables are emptied between runs.  The daemons run
tasks from a throwaway package written to the same temporary directory.

enqueue
    jobs/s of ``task.enqueue()`` with one ``db.session()`` commit per job,
    against the floor: a plain SQLAlchemy insert of the same row into a
    scratch table with the same columns and indexes, one Session commit per
    row.  The two are interleaved in blocks so drift hits both alike.  Then
    ``enqueue_many`` of one large batch in one transaction, and its per-job
    speed-up over single enqueues.
drain
    no-op jobs enqueued beforehand, drained by ``python -m mqueue start``
    daemons at 1x1, 1x4 and 2x4 (processes x threads); then at 2x4 jobs whose
    task inserts one row in its session.  A no-op task leaves no transaction
    to join, so the worker completes such jobs many per statement; a task that
    wrote commits alone with its completion, so ``write`` shows the cost of
    the transactional path.  ``wall`` counts from
    starting the daemon (interpreter start-up included) until every job has
    finished (succeeded jobs stay in the table, as history); ``steady`` from
    the first poll that sees a job finished until all are (the count of
    unfinished jobs is polled every 50 ms); targets are judged on ``steady``.
    ``raw`` is the backend's commit rate over the same number of
    connections in the same run: P processes x C threads, each looping
    single-row INSERT + COMMIT for a few seconds through SQLAlchemy Core on an
    engine configured by mqueue (so SQLite also pays BEGIN IMMEDIATE).
latency
    one idle daemon at default settings; jobs enqueued one at a time, a fixed
    gap apart, each in its own ``db.session()``.  Latency runs from the
    enqueue call (so it includes the enqueuing INSERT and COMMIT) to the
    task's first line, which stamps ``time.time()`` into an effect table in
    the job's own session; "from commit" runs from the enqueue's
    ``db.session()`` block returning (after its COMMIT) to that line.  Then
    the same with a ``mqueue.Worker`` running in a thread of this process.
scheduled
    idle poll and claim with 100,000 scheduled jobs: that many jobs due in a
    day (priorities 0 and 5) and nothing due; the median time of one idle
    poll (``claim_jobs`` finding nothing, in its own transaction), then of
    one claim of one job among 100 due ones.  Each is shown for the claim
    mqueue runs (a walk over priority levels) and for one scan over all
    levels ordered by ``(neg_priority, eta, id)`` (the claim before issue
    10, item 15), which reads every future row of the levels it passes.
prune
    100,000 succeeded jobs finished 40 days ago (and an event per 50) are
    pruned by ``mqueue.history.prune`` while a 1x4 daemon drains 20,000
    no-op jobs; prints the seconds pruning took and the drain's rate during
    it against the same drain alone just before.
galera
    a three-node MariaDB Galera cluster on loopback (``scripts/galera_cluster.py``,
    the rig of ``tests/galera``) drains ``--galera-jobs`` jobs with three
    daemons (1 process x ``--galera-threads`` threads each) on the three nodes,
    then with the same three daemons all on node 1, in the same run; no-op jobs
    and jobs that write.  Prints steady jobs/s of each, the ratio (target: three
    nodes at least 0.9 of one node) and the claim conflicts per 1,000 jobs the
    daemons reported (lost races, retried at once).  Not part of ``all``.
profile
    one 1x1 drain daemon under cProfile, every thread profiled (a hook in the
    throwaway tasks package, switched on by ``MQUEUE_BENCH_PROFILE``); prints
    mqueue's functions by cumulative time and the heaviest functions by own
    time.  ``--profile-clock cpu`` counts each thread's CPU time instead of
    wall time (higher overhead, so compare shares, not absolute figures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sqlalchemy import (BigInteger, Column, Index, Integer, MetaData, String, Table, create_engine,  # noqa: E402
                        event, func, insert, select, text)
from sqlalchemy.engine import URL, make_url  # noqa: E402

import mqueue  # noqa: E402
from mqueue.encoding import encode_args  # noqa: E402
from mqueue.migrate import upgrade  # noqa: E402
from mqueue.worker import worker_database  # noqa: E402
from mqueue import admin, history  # noqa: E402
from mqueue.schema import FINISHED, NAMING_CONVENTION, event_table, stats_table, task_table  # noqa: E402

BACKENDS = ("sqlite", "mariadb", "postgresql")
DEFAULT_URLS = {
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/?charset=utf8mb4",
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
}
TASKS_PACKAGE = "mqueue_benchtasks"
DRAIN_QUEUE = "bench"
LATENCY_QUEUE = "bench_latency"
#: (processes, threads per process, task): "noop" returns at once (its job is
#: completed in a batch with others); "write" inserts one row in the job's
#: session, so each job commits alone with its completion.  The last noop
#: configuration is judged against the targets.
DRAIN_CONFIGS = ((1, 1, "noop"), (1, 4, "noop"), (2, 4, "noop"), (2, 4, "write"))
JUDGED_DRAIN = (2, 4, "noop")
POLL_SECONDS = 0.05
#: How long an idle worker's statements are counted (latency benchmark).
IDLE_SECONDS = 3.0

TARGETS = {
    "enqueue_ratio": 1.3,        # enqueue cost / plain insert cost, at most
    "enqueue_vs_raw": {"sqlite": 0.8, "mariadb": 0.5, "postgresql": 0.5},  # enqueue/s / raw commits/s, at least
    "many_rate": {"mariadb": 40_000.0, "postgresql": 40_000.0},   # enqueue_many jobs/s, at least
    "noop_1x4_vs_raw_1x1": 1.5,  # no-op drain 1x4 / raw single-connection commits/s, at least (servers)
    "write_vs_raw": 0.5,         # write drain 2x4 / raw 2x4, at least (servers)
    "latency_daemon_p50_by_backend": {"sqlite": 0.005, "mariadb": 0.005, "postgresql": 0.002},
    "latency_daemon_p99_by_backend": {"postgresql": 0.010},
    "many_speedup": 20.0,        # enqueue_many per-job speed-up over enqueue, at least
    "drain_rate": 2000.0,        # jobs/s at 2x4, at least (every backend)
    "drain_vs_raw": 0.35,        # drain / raw commit rate at 2x4, at least (servers only)
    "latency_daemon_p50": 0.100,
    "latency_inprocess_p50": 0.010,
    "galera_ratio": 0.9,          # drain with daemons on 3 nodes / on 1 node, at least
}

# The scratch tables the bench writes to directly.
scratch = MetaData(naming_convention=NAMING_CONVENTION)
#: Same columns, defaults and indexes as mqueue_task: the floor for one enqueue.
plain_table = Table("bench_plain", scratch, *[column._copy() for column in task_table.columns],
                    Index(None, "queue", "state", "neg_priority", "eta", "id"), sqlite_autoincrement=True)
#: A minimal row for the raw commit rate.
raw_table = Table("bench_raw", scratch,
                  Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                         autoincrement=True),
                  Column("payload", String(100), nullable=False))

TASKS_SOURCE = '''\
"""Tasks for scripts/bench.py; written to a temporary directory for one bench run."""

import os
import time

import mqueue
from sqlalchemy import BigInteger, Column, Double, MetaData, Table, insert

metadata = MetaData()
started = Table("bench_started", metadata,
                Column("job_id", BigInteger, primary_key=True, autoincrement=False),
                Column("started", Double, nullable=False))
written = Table("bench_written", metadata,
                Column("job_id", BigInteger, primary_key=True, autoincrement=False))


@mqueue.task(name="bench.noop", queue="bench")
def noop(n: int = 0) -> None:
    pass


@mqueue.task(name="bench.write", queue="bench")
def write(n: int = 0) -> None:
    mqueue.current_session().execute(insert(written).values(job_id=mqueue.current_job().id))


@mqueue.task(name="bench.stamp", queue="bench_latency")
def stamp() -> None:
    now = time.time()
    mqueue.current_session().execute(insert(started).values(job_id=mqueue.current_job().id, started=now))


def _profile_every_thread(prefix: str, clock: str) -> None:
    """cProfile follows one thread only: give every thread of this daemon its own profiler.

    ``clock`` "wall" counts time waiting on the database too; "cpu" counts
    each thread's own CPU time only (time.thread_time).
    """
    import atexit
    import cProfile
    import threading

    timer = time.thread_time if clock == "cpu" else time.perf_counter
    profiles = []
    main = cProfile.Profile(timer)
    profiles.append(("main", main))
    run = threading.Thread.run

    def profiled_run(self):
        profiler = cProfile.Profile(timer)
        profiles.append((self.name, profiler))
        profiler.enable()
        try:
            run(self)
        finally:
            profiler.disable()

    def dump():
        main.disable()
        for number, (name, profiler) in enumerate(list(profiles)):
            try:
                profiler.dump_stats(f"{prefix}.{os.getpid()}.{number}.{name}")
            except Exception:
                pass

    threading.Thread.run = profiled_run
    atexit.register(dump)
    main.enable()


if os.environ.get("MQUEUE_BENCH_PROFILE"):
    _profile_every_thread(os.environ["MQUEUE_BENCH_PROFILE"], os.environ.get("MQUEUE_BENCH_PROFILE_CLOCK", "wall"))
'''


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def rate(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def at_least(value: float, target: float) -> bool | None:
    return None if value is None or math.isnan(value) else value >= target


def at_most(value: float, target: float) -> bool | None:
    return None if value is None or math.isnan(value) else value <= target


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """Right-aligned columns (the first left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(cell).rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return indent + "  ".join(out).rstrip()
    return "\n".join([line(headers)] + [line(row) for row in rows])


def say(message: str = "") -> None:
    print(message, flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = POLL_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------
class BenchDatabase:
    """A fresh, migrated database of one backend, dropped by ``close()``."""

    def __init__(self, backend: str, server_url: str | None, workdir: Path) -> None:
        self.backend = backend
        self.name = f"mqueue_bench_{os.getpid()}"
        self._admin = None
        if backend == "sqlite":
            self.url: URL = make_url(f"sqlite:///{workdir / 'bench.db'}")
        else:
            server = make_url(server_url or DEFAULT_URLS[backend])
            admin_url = server.set(database="postgres") if backend == "postgresql" else server.set(database=None)
            self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
            with self._admin.connect() as conn:
                if backend == "postgresql":
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
                    conn.execute(text(f'CREATE DATABASE "{self.name}"'))
                else:
                    conn.execute(text(f"DROP DATABASE IF EXISTS `{self.name}`"))
                    conn.execute(text(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4"))
            self.url = server.set(database=self.name)
        self.url_text = self.url.render_as_string(hide_password=False)
        self.db = mqueue.Database(self.url_text)
        upgrade(self.db)
        # Reads for the bench's own bookkeeping: autocommit, no mqueue hooks
        # (on SQLite the mqueue engine would take the write lock to count rows).
        self.monitor = create_engine(self.url_text, isolation_level="AUTOCOMMIT")

    def create_scratch(self, tasks_metadata: MetaData) -> None:
        scratch.create_all(self.db.engine)
        tasks_metadata.create_all(self.db.engine)

    def count(self, table: Table = task_table, *where) -> int:
        with self.monitor.connect() as conn:
            return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()

    def unfinished(self) -> int:
        """Jobs not finished yet: a job that succeeded stays in ``mqueue_task`` as ``succeeded``."""
        return self.count(task_table, task_table.c.state.not_in(FINISHED))

    def clean(self, *tables: Table) -> None:
        """Empty the given tables (TRUNCATE on servers: no dead rows carried into the next run)."""
        with self.db.engine.begin() as conn:
            for one in tables:
                if self.backend == "sqlite":
                    conn.execute(one.delete())
                else:
                    conn.execute(text(f"TRUNCATE TABLE {one.name}"))

    def close(self) -> None:
        self.db.dispose()
        self.monitor.dispose()
        if self._admin is not None:
            with self._admin.connect() as conn:
                if self.backend == "postgresql":
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
                else:
                    conn.execute(text(f"DROP DATABASE IF EXISTS `{self.name}`"))
            self._admin.dispose()


class Daemon:
    """``python -m mqueue start ...`` in the background, its output in a log file."""

    def __init__(self, bench: "Bench", queue: str, log_name: str, processes: int = 1, concurrency: int = 1,
                 poll_interval: float | None = None, extra_env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "mqueue", "start", queue, "--tasks", TASKS_PACKAGE]
        if processes != 1:
            argv += ["--processes", str(processes)]
        if concurrency != 1:
            argv += ["--concurrency", str(concurrency)]
        if poll_interval is not None:
            argv += ["--poll-interval", str(poll_interval)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(bench.tasks_dir), str(REPO), env.get("PYTHONPATH", "")])
        env["MQUEUE_DATABASE_URL"] = bench.database.url_text   # not on the command line: no password in ps
        env.update(extra_env or {})
        self.log_path = bench.workdir / log_name
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(argv, cwd=bench.tasks_dir, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"daemon exited with {code}: " + " | ".join(tail))

    def stop(self, timeout: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# ---------------------------------------------------------------------------
# The benchmarks of one backend
# ---------------------------------------------------------------------------
class Bench:
    def __init__(self, backend: str, args, workdir: Path, tasks_dir: Path, tasks) -> None:
        self.backend = backend
        self.args = args
        self.workdir = workdir
        self.tasks_dir = tasks_dir
        self.tasks = tasks
        server_url = {"mariadb": args.mariadb_url, "postgresql": args.postgresql_url}.get(backend)
        self.database = BenchDatabase(backend, server_url, workdir)
        self.database.create_scratch(tasks.metadata)
        self.db = self.database.db
        self.all_tables = (task_table, event_table, stats_table, plain_table, raw_table, tasks.started, tasks.written)

    def close(self) -> None:
        self.database.close()

    def clean(self) -> None:
        self.database.clean(*self.all_tables)

    # -- enqueue ----------------------------------------------------------------
    def enqueue(self) -> dict[str, float]:
        jobs, batch = self.args.enqueue_jobs, self.args.many_jobs
        noop = self.tasks.noop
        db = self.db
        plain_insert = insert(plain_table)

        def enqueue_one(n: int) -> None:
            with db.session():
                noop.enqueue(n=n)

        raw_engine = create_engine(self.database.url_text)   # SQLAlchemy's defaults, no mqueue hooks
        raw_conn = raw_engine.connect()

        def raw_one(n: int) -> None:
            # the same row, one held connection: INSERT + COMMIT and nothing else
            values = {"queue": DRAIN_QUEUE, "name": noop.name, "args": encode_args({"n": n}),
                      "priority": 0, "max_retries": noop.max_retries}
            raw_conn.execute(plain_insert, values)
            raw_conn.commit()

        def insert_one(n: int) -> None:
            # the row enqueue builds: same columns, same JSON text
            values = {"queue": DRAIN_QUEUE, "name": noop.name, "args": encode_args({"n": n}),
                      "priority": 0, "max_retries": noop.max_retries}
            with db.Session() as session:
                session.execute(plain_insert.values(**values)).inserted_primary_key[0]
                session.commit()

        self.clean()
        for n in range(50):   # warm-up: connections, statement caches
            enqueue_one(n)
            insert_one(n)
            raw_one(n)
        self.clean()
        enqueue_seconds = plain_seconds = raw_seconds = 0.0
        block = 250
        for first in range(0, jobs, block):
            numbers = range(first, min(first + block, jobs))
            started = time.perf_counter()
            for n in numbers:
                raw_one(n)
            raw_seconds += time.perf_counter() - started
            started = time.perf_counter()
            for n in numbers:
                insert_one(n)
            plain_seconds += time.perf_counter() - started
            started = time.perf_counter()
            for n in numbers:
                enqueue_one(n)
            enqueue_seconds += time.perf_counter() - started
        raw_conn.close()
        raw_engine.dispose()
        self.clean()
        calls = [{"n": n} for n in range(batch)]
        started = time.perf_counter()
        with db.session():
            ids = noop.enqueue_many(calls)
        many_seconds = time.perf_counter() - started
        if len(ids) != batch:
            raise RuntimeError(f"enqueue_many returned {len(ids)} ids for {batch} jobs")
        self.clean()
        enqueue_rate = jobs / enqueue_seconds
        plain_rate = jobs / plain_seconds
        many_rate = batch / many_seconds
        raw_rate = jobs / raw_seconds
        return {"enqueue": enqueue_rate, "plain": plain_rate, "ratio": plain_rate / enqueue_rate,
                "raw": raw_rate, "vs_raw": enqueue_rate / raw_rate,
                "many": many_rate, "speedup": many_rate / enqueue_rate}

    # -- drain ------------------------------------------------------------------
    def drain(self, run: int) -> dict[tuple[int, int], dict[str, float]]:
        results = {}
        raws: dict[tuple[int, int], float] = {}
        for processes, threads, task in DRAIN_CONFIGS:
            self.clean()
            if (processes, threads) not in raws:
                raws[(processes, threads)] = self.raw_commit_rate(processes, threads, self.args.raw_seconds)
                self.clean()
            results[(processes, threads, task)] = dict(raw=raws[(processes, threads)], raw1=raws[(1, 1)],
                                                       **self.drain_once(processes, threads, run, task=task))
        results["claim"] = self.claim_round_trip()
        self.clean()
        return results

    def claim_round_trip(self, claims: int = 500, size: int = 4) -> float:
        """Median wall seconds of one claim of ``size`` jobs, sent back to back as a busy producer sends them.

        A worker holds no more jobs than it has free threads (no prefetch), so
        a 1 x ``size`` drain runs at most ``size`` jobs per claim, and claims
        follow one another: ``size / this`` jobs/s bounds it, however fast
        the jobs and their (batched) completions are.
        """
        self.clean()
        with self.db.session():
            self.tasks.noop.enqueue_many([{"n": n} for n in range(claims * size)])
        claimer = worker_database(self.database.url_text, size, 60.0)
        times = []
        try:
            for _ in range(claims):
                started = time.perf_counter()
                claimer.dialect.claim(claimer.engine, DRAIN_QUEUE, size, "bench:claims", 60.0)
                times.append(time.perf_counter() - started)
        finally:
            claimer.dispose()
        self.clean()
        return median(times)

    def raw_commit_rate(self, processes: int, threads: int, seconds: float) -> float:
        """Commits/s of P processes x C threads looping single-row INSERT + COMMIT."""
        start_at = time.time() + 3.0 + 0.5 * processes    # all connected before anyone starts
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   MQUEUE_DATABASE_URL=self.database.url_text)
        children = [subprocess.Popen([sys.executable, __file__, "_raw", "--threads", str(threads),
                                      "--seconds", str(seconds), "--start-at", repr(start_at)],
                                     env=env, stdout=subprocess.PIPE, text=True)
                    for _ in range(processes)]
        commits = 0
        for child in children:
            out, _ = child.communicate(timeout=seconds + 120)
            if child.returncode != 0:
                raise RuntimeError(f"raw commit loop exited with {child.returncode}")
            commits += json.loads(out.strip().splitlines()[-1])["commits"]
        return commits / seconds

    def drain_once(self, processes: int, threads: int, run: int, jobs: int | None = None,
                   extra_env: dict[str, str] | None = None, log_name: str | None = None,
                   task: str = "noop", urls: list[str] | None = None) -> dict[str, float]:
        """Drain ``jobs`` jobs with one daemon, or one daemon per URL of ``urls`` (each on its own URL)."""
        jobs = jobs or self.args.drain_jobs
        with self.db.session():
            getattr(self.tasks, task).enqueue_many([{"n": n} for n in range(jobs)])
        if self.database.unfinished() != jobs:
            raise RuntimeError("enqueue_many did not store every job")
        started = time.monotonic()
        log_name = log_name or f"drain-{self.backend}-{processes}x{threads}-{task}-{run}.log"
        daemons = [Daemon(self, DRAIN_QUEUE, log_name if urls is None else f"{n}-{log_name}", processes=processes,
                          concurrency=threads, poll_interval=POLL_SECONDS,
                          extra_env={**(extra_env or {}), **({} if url is None else {"MQUEUE_DATABASE_URL": url})})
                   for n, url in enumerate(urls or [None])]
        first_finished = None
        meter = CpuMeter(self.backend, self.database.url, daemons)
        try:
            tick = started
            while True:
                left = self.database.unfinished()
                now = time.monotonic()
                if first_finished is None and left < jobs:
                    first_finished, left_then, cpu_then = now, left, meter.sample()
                if left == 0:
                    finished = now
                    daemon_cpu, server_cpu = meter.since(cpu_then, meter.sample())
                    break
                for daemon in daemons:
                    daemon.check_alive()
                if now - started > self.args.drain_timeout:
                    raise RuntimeError(f"{left} of {jobs} jobs left after {self.args.drain_timeout:.0f}s")
                tick += POLL_SECONDS
                time.sleep(max(0.0, tick - time.monotonic()))
        finally:
            for daemon in daemons:
                daemon.stop()
        steady = max(finished - first_finished, POLL_SECONDS)
        conflicts = sum(claim_conflicts(daemon.log_path) for daemon in daemons)
        # CPU per job over the steady part (the daemons' start-up left out): the jobs left at its start.
        return {"wall": jobs / (finished - started), "steady": jobs / steady, "seconds": finished - started,
                "conflicts": 1000 * conflicts / jobs, "daemon_cpu": daemon_cpu / max(left_then, 1),
                "server_cpu": server_cpu / max(left_then, 1)}

    # -- latency ----------------------------------------------------------------
    def latency(self, run: int) -> dict[str, float]:
        self.clean()
        daemon = Daemon(self, LATENCY_QUEUE, f"latency-{self.backend}-{run}.log")
        try:
            self._warm_up(daemon.check_alive)
            daemon_latencies, _, daemon_after_commit = self._measure_latency(daemon.check_alive)
        finally:
            daemon.stop()
        self.clean()
        worker = mqueue.Worker(self.db, queues=[LATENCY_QUEUE])
        statements = [0]

        def count(*_args) -> None:
            statements[0] += 1
        event.listen(worker.db.engine, "before_cursor_execute", count)
        thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
        thread.start()

        def alive() -> None:
            if not thread.is_alive():
                raise RuntimeError("in-process worker thread died")
        try:
            self._warm_up(alive)
            before, began = statements[0], time.monotonic()
            time.sleep(IDLE_SECONDS)
            idle_queries = (statements[0] - before) / (time.monotonic() - began)
            local_latencies, enqueue_seconds, _ = self._measure_latency(alive)
        finally:
            worker.stop()
            thread.join(60)
        self.clean()
        return {"daemon_p50": percentile(daemon_latencies, 0.50), "daemon_p99": percentile(daemon_latencies, 0.99),
                "commit_p50": percentile(daemon_after_commit, 0.50),
                "commit_p99": percentile(daemon_after_commit, 0.99),
                "local_p50": percentile(local_latencies, 0.50), "local_p99": percentile(local_latencies, 0.99),
                "enqueue_p50": percentile(enqueue_seconds, 0.50), "idle_queries": idle_queries}

    def _warm_up(self, alive: Callable[[], None]) -> None:
        """One job end to end: the worker is up and idle when this returns."""
        with self.db.session():
            self.tasks.stamp.enqueue()

        def done() -> bool:
            alive()
            return self.database.count(self.tasks.started) == 1
        wait_until(done, 60, "the warm-up job")
        time.sleep(0.5)   # let the idle poll back off to its longest interval (0.2 s)
        self.database.clean(self.tasks.started)

    def _measure_latency(self, alive: Callable[[], None]) -> tuple[list[float], list[float], list[float]]:
        """Enqueue-to-start latencies, how long each enqueue call itself took, and commit-to-start latencies."""
        jobs, gap = self.args.latency_jobs, self.args.latency_gap
        stamp = self.tasks.stamp
        called_at: dict[int, float] = {}
        committed_at: dict[int, float] = {}
        enqueue_seconds = []
        tick = time.monotonic()
        for _ in range(jobs):
            called = time.time()
            with self.db.session():
                job_id = stamp.enqueue()
            committed = time.time()
            enqueue_seconds.append(committed - called)
            called_at[job_id], committed_at[job_id] = called, committed
            tick += gap
            time.sleep(max(0.0, tick - time.monotonic()))

        def done() -> bool:
            alive()
            return self.database.count(self.tasks.started) >= jobs
        wait_until(done, 60, f"{jobs} latency jobs")
        with self.database.monitor.connect() as conn:
            rows = conn.execute(select(self.tasks.started.c.job_id, self.tasks.started.c.started)).all()
        return ([started - called_at[job_id] for job_id, started in rows], enqueue_seconds,
                [started - committed_at[job_id] for job_id, started in rows])


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------
def scheduled_claims(bench: "Bench", jobs: int, polls: int = 200) -> dict[str, float]:
    """Median seconds of an idle poll and of a one-job claim, level walk vs one scan (see ``scheduled``)."""
    db, queue, dialect = bench.db, "bench_scheduled", bench.db.dialect
    bench.clean()
    with db.engine.begin() as conn:
        now = dialect.db_now(conn)
    rows = [dict(queue=queue, name="bench.scheduled", args="{}", priority=5 * (n % 2),
                 eta=now + dt.timedelta(days=1, seconds=n)) for n in range(jobs)]
    with db.engine.begin() as conn:
        for start in range(0, jobs, 10_000):
            conn.execute(insert(task_table), rows[start:start + 10_000])
    if bench.backend != "sqlite":
        with db.engine.begin() as conn:
            conn.execute(text("ANALYZE TABLE mqueue_task" if bench.backend == "mariadb" else "ANALYZE mqueue_task"))

    def walk(conn, limit):
        return dialect.claim_jobs(conn, queue, limit, "bench:1", 60)

    def scan(conn, limit):
        return dialect.claim_at_level(conn, queue, None, limit, "bench:1", 60)

    def timed(claim) -> float:
        times = []
        for _ in range(polls):
            started = time.perf_counter()
            with db.engine.begin() as conn:
                claim(conn, 1)
            times.append(time.perf_counter() - started)
        return median(times)

    result = {"idle walk": timed(walk), "idle scan": timed(scan)}
    with db.engine.begin() as conn:
        conn.execute(insert(task_table), [dict(queue=queue, name="bench.scheduled", args="{}", priority=n % 3,
                                               eta=now - dt.timedelta(seconds=n)) for n in range(2 * polls + 10)])
    result["claim walk"] = timed(walk)
    result["claim scan"] = timed(scan)
    bench.clean()
    return result


def prune_while_draining(bench: "Bench", finished: int, drain_jobs: int) -> dict[str, float]:
    """Seconds to prune ``finished`` old succeeded jobs while a 1x4 daemon drains ``drain_jobs`` no-op jobs,
    and that drain's rate against the same drain alone just before (the ratio is what pruning costs it)."""
    db = bench.db
    alone = bench.drain_once(1, 4, 0, jobs=drain_jobs, log_name=f"prune-alone-{bench.backend}.log")
    bench.clean()
    db.engine.dispose()
    with db.engine.begin() as conn:
        now = bench.db.dialect.db_now(conn)
    old = now - dt.timedelta(days=40)
    with db.engine.begin() as conn:
        for start in range(0, finished, 10_000):
            conn.execute(insert(task_table), [
                dict(queue="bench_old", name="bench.old", args="{}", state="succeeded", eta=old, created_at=old,
                     started_at=old, finished_at=old + dt.timedelta(microseconds=n), runs=1,
                     wait_seconds=(n % 90) / 10, run_seconds=(n % 7) / 100, owner="bench:1")
                for n in range(start, min(finished, start + 10_000))])
        conn.execute(insert(event_table), [dict(job_id=n, at=old, kind="retried", queue="bench_old",
                                                name="bench.old", detail="ValueError: old")
                                           for n in range(1, finished + 1, 50)])
    outcome: dict[str, Any] = {}

    def drain() -> None:
        outcome.update(bench.drain_once(1, 4, 0, jobs=drain_jobs, log_name=f"prune-during-{bench.backend}.log"))

    thread = threading.Thread(target=drain, name="bench-drain")
    admin.set_config(db, "stats-history", 365)  # keep the folded day, to check it
    thread.start()
    time.sleep(1.0)  # the daemon started and is draining
    try:
        started = time.perf_counter()
        result = history.prune(db, batch=history.PRUNE_BATCH)
        seconds = time.perf_counter() - started
    finally:
        thread.join()
        admin.set_config(db, "stats-history", None)
    if result.jobs != finished:
        raise RuntimeError(f"pruned {result.jobs} of {finished} finished jobs")
    with db.engine.begin() as conn:
        folded = conn.execute(select(stats_table.c.wait_count).where(stats_table.c.queue == "bench_old")).scalar()
    if folded != finished:
        raise RuntimeError(f"stats folded {folded} of {finished} jobs")
    bench.clean()
    return {"prune seconds": seconds, "pruned/s": finished / seconds, "drain alone/s": alone["steady"],
            "drain during/s": outcome["steady"], "ratio": outcome["steady"] / alone["steady"]}


def claim_conflicts(log_path: Path) -> int:
    """Claim conflicts a daemon reported in its last stop summary ("... N claim conflicts ..."); 0 if none."""
    import re
    found = re.findall(r" totals: .* (\d+) claim conflicts", log_path.read_text(errors="replace"))
    return int(found[-1]) if found else 0


#: The server's process name, by backend (its CPU is read from /proc when it runs on this machine).
SERVER_PROCESS = {"mariadb": "mariadbd", "postgresql": "postgres"}


def _stat(pid: int | str) -> tuple[str, list[str]] | None:
    """A process's name and the fields of ``/proc/PID/stat`` after it; None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            head, tail = stat.read().rsplit(")", 1)
        return head.split("(", 1)[1], tail.split()
    except (OSError, IndexError, ValueError):
        return None


def _process_table() -> list[tuple[int, int, str]]:
    """(pid, parent pid, name) of every process, from /proc (empty where there is none)."""
    table = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (stat := _stat(entry)) is not None:
            name, fields = stat
            table.append((int(entry), int(fields[1]), name))
    return table


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far; None once it has exited."""
    stat = _stat(pid)
    return None if stat is None else (int(stat[1][11]) + int(stat[1][12])) / os.sysconf("SC_CLK_TCK")


def _cpu_by_pid(pids) -> dict[int, float]:
    """CPU seconds so far of each of ``pids`` still running."""
    return {pid: cpu for pid in pids if (cpu := _cpu_seconds(pid)) is not None}


class CpuMeter:
    """CPU seconds spent by the daemons (their process trees) and by a local database server.

    ``sample()`` reads both; ``since(earlier, later)`` gives what each group spent
    in between, counting processes started meanwhile from zero (a server
    forks a backend per connection).  The server is counted only when it
    runs on this machine (``--mariadb-url``/``--postgresql-url`` on
    loopback, or the default): otherwise its figure is NaN.
    """

    def __init__(self, backend: str, url: URL, daemons: list["Daemon"]) -> None:
        local = url.host in (None, "", "127.0.0.1", "localhost", "::1")
        self.server_name = SERVER_PROCESS.get(backend) if local else None
        self.roots = {daemon.process.pid for daemon in daemons}

    def sample(self) -> tuple[dict[int, float], dict[int, float]]:
        table = _process_table()
        children: dict[int, list[int]] = {}
        for pid, parent, _name in table:
            children.setdefault(parent, []).append(pid)
        daemon_pids, stack = set(), list(self.roots)
        while stack:
            pid = stack.pop()
            if pid not in daemon_pids:
                daemon_pids.add(pid)
                stack += children.get(pid, [])
        server_pids = {pid for pid, _parent, name in table if name == self.server_name}
        return _cpu_by_pid(daemon_pids), _cpu_by_pid(server_pids)

    def since(self, earlier, later) -> tuple[float, float]:
        """(daemons, server) CPU seconds from sample ``earlier`` to sample ``later``."""
        spent = [sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
                 for before, after in zip(earlier, later)]
        return spent[0], (spent[1] if self.server_name else float("nan"))


#: (threads per daemon, task) of the Galera drains; three daemons each time.
GALERA_CONFIGS = (("noop",), ("write",))


def galera_drains(bench: "Bench", urls: list[str], run: int) -> dict[str, dict[str, float]]:
    """Three daemons on three nodes, then three daemons on node 1, for each task (see ``galera``)."""
    results = {}
    threads, jobs = bench.args.galera_threads, bench.args.galera_jobs
    for (task,) in GALERA_CONFIGS:
        for layout, where in (("3 nodes", urls), ("1 node", [urls[0]] * len(urls))):
            bench.clean()
            results[(task, layout)] = bench.drain_once(1, threads, run, jobs=jobs, task=task, urls=where,
                                                       log_name=f"galera-{task}-{layout[0]}-{run}.log")
    bench.clean()
    return results


def report_galera(args, runs: list[dict]) -> dict:
    say(f"  galera: {args.galera_jobs:,} jobs drained by 3 daemons (1x{args.galera_threads} each) on 3 nodes, "
        f"then on node 1 only; conflicts = claim races lost (retried at once) per 1,000 jobs")
    rows, medians = [], {}
    for (task,) in GALERA_CONFIGS:
        for number, r in enumerate(runs, 1):
            three, one = r[(task, "3 nodes")], r[(task, "1 node")]
            ratio = three["steady"] / one["steady"]
            rows.append([str(number), task, rate(one["steady"]), f"{one['conflicts']:.1f}", rate(three["steady"]),
                         f"{three['conflicts']:.1f}", f"{ratio:.2f}",
                         verdict(at_least(ratio, TARGETS["galera_ratio"]))])
        med = {"one": median([r[(task, "1 node")]["steady"] for r in runs]),
               "three": median([r[(task, "3 nodes")]["steady"] for r in runs]),
               "conflicts": median([r[(task, "3 nodes")]["conflicts"] for r in runs]),
               "ratio": median([r[(task, "3 nodes")]["steady"] / r[(task, "1 node")]["steady"] for r in runs])}
        medians[task] = med
        rows.append(["median", task, rate(med["one"]), "", rate(med["three"]), f"{med['conflicts']:.1f}",
                     f"{med['ratio']:.2f}", verdict(at_least(med["ratio"], TARGETS["galera_ratio"]))])
    say(table(["run", "task", "1 node/s", "conflicts", "3 nodes/s", "conflicts",
               f"3/1 (>={TARGETS['galera_ratio']})", ""], rows))
    return medians


def report_prune(args, runs: list[dict]) -> dict:
    say(f"\npruning {args.prune_jobs:,} finished jobs (batches of {history.PRUNE_BATCH}) while a 1x4 daemon drains "
        f"{args.prune_drain_jobs:,} no-op jobs")
    keys = ["prune seconds", "pruned/s", "drain alone/s", "drain during/s", "ratio"]
    rows = [[f"run {n}"] + [f"{r[k]:,.2f}" if k in ("prune seconds", "ratio") else rate(r[k]) for k in keys]
            for n, r in enumerate(runs, 1)]
    med = {k: median([r[k] for r in runs]) for k in keys}
    rows.append(["median"] + [f"{med[k]:,.2f}" if k in ("prune seconds", "ratio") else rate(med[k]) for k in keys])
    say(table(["", "prune s", "pruned jobs/s", "drain alone jobs/s", "drain while pruning", "ratio"], rows))
    return med


def report_scheduled(args, runs: list[dict]) -> dict:
    say(f"\nidle poll and claim with {args.scheduled_jobs:,} scheduled jobs (median ms per statement group)")
    keys = ["idle walk", "idle scan", "claim walk", "claim scan"]
    rows = [[f"run {n}"] + [_ms(r[k]) for k in keys] for n, r in enumerate(runs, 1)]
    say(table(["", "idle: level walk", "idle: one scan", "claim 1: level walk", "claim 1: one scan"], rows))
    return {k: median([r[k] for r in runs]) for k in keys}


def report_enqueue(backend: str, args, runs: list[dict]) -> dict:
    say(f"  enqueue: {args.enqueue_jobs:,} single enqueues (one db.session() commit each) vs the same rows "
        f"by plain Session insert and by raw INSERT + COMMIT on one held connection (SQLAlchemy defaults); "
        f"enqueue_many of {args.many_jobs:,} in one transaction")
    rows = []
    for number, r in enumerate(runs, 1):
        rows.append(_enqueue_row(backend, str(number), r))
    med = {key: median([r[key] for r in runs]) for key in runs[0]}
    rows.append(_enqueue_row(backend, "median", med))
    vs_raw = TARGETS["enqueue_vs_raw"][backend]
    many = TARGETS["many_rate"].get(backend)
    say(table(["run", "enqueue/s", "raw/s", f"enqueue/raw (>={vs_raw})", "", "plain/s",
               f"plain/enqueue cost (<={TARGETS['enqueue_ratio']})", "",
               f"many/s{f' (>={many:,.0f})' if many else ''}", "", "speed-up"], rows))
    return med


def _enqueue_row(backend: str, label: str, r: dict) -> list[str]:
    many = TARGETS["many_rate"].get(backend)
    return [label, rate(r["enqueue"]), rate(r["raw"]), f"{r['vs_raw']:.2f}",
            verdict(at_least(r["vs_raw"], TARGETS["enqueue_vs_raw"][backend])),
            rate(r["plain"]), f"{r['ratio']:.2f}", verdict(at_most(r["ratio"], TARGETS["enqueue_ratio"])),
            rate(r["many"]), verdict(at_least(r["many"], many) if many else None), f"{r['speedup']:.1f}x"]


def report_drain(backend: str, args, runs: list[dict]) -> dict:
    say(f"  drain: {args.drain_jobs:,} jobs (noop: returns at once; write: inserts one row in its session), "
        f"daemons with --poll-interval {POLL_SECONDS}; "
        f"raw = single-row INSERT+COMMIT over PxC connections for {args.raw_seconds:.0f}s (raw1: 1x1); "
        "targets on steady")
    rows = []
    medians: dict = {}
    for config in DRAIN_CONFIGS:
        for number, r in enumerate(runs, 1):
            rows.append(_drain_row(backend, str(number), config, r[config]))
        med = {key: median([r[config][key] for r in runs]) for key in runs[0][config]}
        med["ratio"] = median([_per(r[config]["steady"], r[config]["raw"]) for r in runs])
        med["ratio1"] = median([_per(r[config]["steady"], r[config]["raw1"]) for r in runs])
        medians[config] = med
        rows.append(_drain_row(backend, "median", config, med))
    say(table(["run", "PxC task", "raw/s", "wall/s", f"steady/s (2x4 noop >={TARGETS['drain_rate']:,.0f})", "",
               f"steady/raw (2x4 noop >={TARGETS['drain_vs_raw']}, 2x4 write >={TARGETS['write_vs_raw']})", "",
               f"steady/raw1 (1x4 noop >={TARGETS['noop_1x4_vs_raw_1x1']})", "",
               "CPU us/job daemons / server"], rows))
    medians["claim"] = median([r["claim"] for r in runs])
    medians["bounds"] = bounds = drain_bounds(medians)
    one_by_four, write = medians[(1, 4, "noop")], medians[(2, 4, "write")]
    raw1 = one_by_four["raw1"]
    say(f"  claim of 4 jobs, back to back: {medians['claim'] * 1000:.2f} ms (median) -> a 1x4 drain runs at most "
        f"{rate(bounds['claim'])} jobs/s = {_per(bounds['claim'], raw1):.2f} x raw1 (no prefetch: 4 jobs per "
        f"claim); the 1x4 drain reached {_per(one_by_four['steady'], bounds['claim']):.2f} of that")
    if "cores" in bounds:
        say(f"  1x4 no-op CPU per job: daemon {one_by_four['daemon_cpu'] * 1e6:,.0f} us + server "
            f"{one_by_four['server_cpu'] * 1e6:,.0f} us -> {CORES} cores run at most {rate(bounds['cores'])} jobs/s "
            f"= {_per(bounds['cores'], raw1):.2f} x raw1; its one process runs Python one thread at a time: at most "
            f"{rate(bounds['process'])} jobs/s = {_per(bounds['process'], raw1):.2f} x raw1")
        say(f"  2x4 write CPU per job: daemons {write['daemon_cpu'] * 1e6:,.0f} us + server "
            f"{write['server_cpu'] * 1e6:,.0f} us -> {CORES} cores run at most {rate(bounds['write cores'])} "
            f"jobs/s = {_per(bounds['write cores'], write['raw']):.2f} x raw 2x4")
    return medians


#: The cores this machine has: what the daemons and a local server share.
CORES = os.cpu_count() or 1


def drain_bounds(medians: dict) -> dict[str, float]:
    """Jobs/s no drain can pass on this machine, from what the same run measured.

    ``claim``: a 1x4 worker holds no more jobs than free threads, so it
    runs at most 4 jobs per claim round trip.  With a local server's CPU
    known: ``cores``, the cores over the daemon's and the server's CPU per
    1x4 job; ``process``, one daemon process's Python runs one thread at a
    time (its CPU per job bounds it); ``write cores``, the same as
    ``cores`` for the 2x4 write drain.
    """
    one_by_four, write = medians[(1, 4, "noop")], medians[(2, 4, "write")]
    bounds = {"claim": 4 / medians["claim"]}
    if not math.isnan(one_by_four["server_cpu"]):
        bounds["cores"] = CORES / (one_by_four["daemon_cpu"] + one_by_four["server_cpu"])
        bounds["process"] = 1 / one_by_four["daemon_cpu"]
        bounds["write cores"] = CORES / (write["daemon_cpu"] + write["server_cpu"])
    return bounds


def _per(value: float, base: float) -> float:
    """``value / base``, NaN when the base could not be measured."""
    return value / base if base else float("nan")


def _drain_row(backend: str, label: str, config: tuple[int, int, str], r: dict) -> list[str]:
    judged = config == JUDGED_DRAIN
    server = backend != "sqlite"
    ratio = r.get("ratio", _per(r["steady"], r["raw"]))
    ratio1 = r.get("ratio1", _per(r["steady"], r["raw1"]))
    rate_ok = at_least(r["steady"], TARGETS["drain_rate"]) if judged else None
    ratio_ok = None
    if judged and server:
        ratio_ok = at_least(ratio, TARGETS["drain_vs_raw"])
    elif config == (2, 4, "write") and server:
        ratio_ok = at_least(ratio, TARGETS["write_vs_raw"])
    ratio1_ok = at_least(ratio1, TARGETS["noop_1x4_vs_raw_1x1"]) if config == (1, 4, "noop") and server else None
    return [label, f"{config[0]}x{config[1]} {config[2]}", rate(r["raw"]), rate(r["wall"]), rate(r["steady"]),
            verdict(rate_ok), f"{ratio:.2f}", verdict(ratio_ok), f"{ratio1:.2f}", verdict(ratio1_ok),
            f"{rate(r['daemon_cpu'] * 1e6)} / {rate(r['server_cpu'] * 1e6)}"]


def report_latency(backend: str, args, runs: list[dict]) -> dict:
    say(f"  latency: {args.latency_jobs} jobs {args.latency_gap * 1000:.0f} ms apart, enqueue call -> task "
        "start (and from the enqueue's COMMIT returning -> task start); daemon at default settings, then a "
        "Worker in a thread of this process (and the statements it runs per second while idle, counted "
        f"over {IDLE_SECONDS:.0f}s)")
    rows = []
    for number, r in enumerate(runs, 1):
        rows.append(_latency_row(backend, str(number), r))
    med = {key: median([r[key] for r in runs]) for key in runs[0]}
    rows.append(_latency_row(backend, "median", med))
    p50 = TARGETS["latency_daemon_p50_by_backend"][backend]
    p99 = TARGETS["latency_daemon_p99_by_backend"].get(backend)
    say(table(["run", f"daemon p50 (<={p50 * 1000:.0f}ms)", "", f"daemon p99{f' (<={p99 * 1000:.0f}ms)' if p99 else ''}",
               "", "from commit p50", "p99", f"in-process p50 (<{TARGETS['latency_inprocess_p50'] * 1000:.0f}ms)",
               "", "in-process p99", "enqueue call p50", "idle worker queries/s"], rows))
    return med


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


def _latency_row(backend: str, label: str, r: dict) -> list[str]:
    p50 = TARGETS["latency_daemon_p50_by_backend"][backend]
    p99 = TARGETS["latency_daemon_p99_by_backend"].get(backend)
    return [label, _ms(r["daemon_p50"]), verdict(at_most(r["daemon_p50"], p50)),
            _ms(r["daemon_p99"]), verdict(at_most(r["daemon_p99"], p99) if p99 else None),
            _ms(r["commit_p50"]), _ms(r["commit_p99"]), _ms(r["local_p50"]), verdict(r["local_p50"] < TARGETS["latency_inprocess_p50"]),
            _ms(r["local_p99"]), _ms(r["enqueue_p50"]), f"{r['idle_queries']:.1f}"]


def report_summary(summary: dict[str, dict[str, Any]]) -> None:
    say("\n== summary (medians) " + "=" * 58)
    rows = []
    for backend, parts in summary.items():
        if "enqueue" in parts:
            e = parts["enqueue"]
            rows.append([backend, "enqueue cost / plain insert", f"{e['ratio']:.2f}",
                         f"<= {TARGETS['enqueue_ratio']}", verdict(at_most(e["ratio"], TARGETS["enqueue_ratio"]))])
            vs_raw = TARGETS["enqueue_vs_raw"][backend]
            rows.append([backend, "single enqueue / raw commit (1 conn)", f"{e['vs_raw']:.2f}",
                         f">= {vs_raw}", verdict(at_least(e["vs_raw"], vs_raw))])
            many = TARGETS["many_rate"].get(backend)
            rows.append([backend, "enqueue_many jobs/s (10,000 in one batch)", rate(e["many"]),
                         f">= {many:,.0f}" if many else "-", verdict(at_least(e["many"], many)) if many else ""])
            rows.append([backend, "enqueue_many speed-up", f"{e['speedup']:.1f}x",
                         f">= {TARGETS['many_speedup']:.0f}x",
                         verdict(at_least(e["speedup"], TARGETS["many_speedup"]))])
        if "drain" in parts:
            d = parts["drain"][JUDGED_DRAIN]
            rows.append([backend, "drain 2x4 noop steady jobs/s", rate(d["steady"]),
                         f">= {TARGETS['drain_rate']:,.0f}", verdict(at_least(d["steady"], TARGETS["drain_rate"]))])
            rows.append([backend, "drain 2x4 noop steady / raw", f"{d['ratio']:.2f}",
                         "-" if backend == "sqlite" else f">= {TARGETS['drain_vs_raw']}",
                         "" if backend == "sqlite" else verdict(at_least(d["ratio"], TARGETS["drain_vs_raw"]))])
            server = backend != "sqlite"
            n = parts["drain"][(1, 4, "noop")]
            rows.append([backend, "drain 1x4 noop steady / raw 1x1", f"{n['ratio1']:.2f} ({rate(n['steady'])})",
                         f">= {TARGETS['noop_1x4_vs_raw_1x1']}" if server else "-",
                         verdict(at_least(n["ratio1"], TARGETS["noop_1x4_vs_raw_1x1"])) if server else ""])
            bounds = parts["drain"]["bounds"]
            rows.append([backend, "  its bound: 4 jobs per claim round trip / raw 1x1",
                         f"{_per(bounds['claim'], n['raw1']):.2f} ({rate(bounds['claim'])})", "-", ""])
            if "cores" in bounds:
                rows.append([backend, f"  its bound: {CORES} cores / CPU per job (daemon+server) / raw 1x1",
                             f"{_per(bounds['cores'], n['raw1']):.2f} ({rate(bounds['cores'])})", "-", ""])
                rows.append([backend, "  its bound: 1 process / its CPU per job / raw 1x1",
                             f"{_per(bounds['process'], n['raw1']):.2f} ({rate(bounds['process'])})", "-", ""])
            w = parts["drain"][(2, 4, "write")]
            rows.append([backend, "drain 2x4 write steady / raw 2x4", f"{w['ratio']:.2f} ({rate(w['steady'])})",
                         f">= {TARGETS['write_vs_raw']}" if server else "-",
                         verdict(at_least(w["ratio"], TARGETS["write_vs_raw"])) if server else ""])
            if "write cores" in bounds:
                rows.append([backend, f"  its bound: {CORES} cores / CPU per job (daemons+server) / raw 2x4",
                             f"{_per(bounds['write cores'], w['raw']):.2f} ({rate(bounds['write cores'])})", "-", ""])
        if "latency" in parts:
            lat = parts["latency"]
            p50 = TARGETS["latency_daemon_p50_by_backend"][backend]
            p99 = TARGETS["latency_daemon_p99_by_backend"].get(backend)
            rows.append([backend, "latency daemon p50", _ms(lat["daemon_p50"]), f"<= {p50 * 1000:.0f}ms",
                         verdict(at_most(lat["daemon_p50"], p50))])
            rows.append([backend, "latency daemon p99", _ms(lat["daemon_p99"]),
                         f"<= {p99 * 1000:.0f}ms" if p99 else "-", verdict(at_most(lat["daemon_p99"], p99)) if p99 else ""])
            rows.append([backend, "idle worker statements/s", f"{lat['idle_queries']:.1f}", "-", ""])
            rows.append([backend, "latency in-process p50", _ms(lat["local_p50"]),
                         f"< {TARGETS['latency_inprocess_p50'] * 1000:.0f}ms",
                         verdict(lat["local_p50"] < TARGETS["latency_inprocess_p50"])])
        if "galera" in parts:
            for task, g in parts["galera"].items():
                rows.append([backend, f"galera {task}: 3 nodes / 1 node (conflicts/1000)",
                             f"{g['ratio']:.2f} ({g['conflicts']:.1f})", f">= {TARGETS['galera_ratio']}",
                             verdict(at_least(g["ratio"], TARGETS["galera_ratio"]))])
        if "scheduled" in parts:
            sch = parts["scheduled"]
            rows.append([backend, "idle poll / claim 1, 100k scheduled", f"{_ms(sch['idle walk'])} / "
                         f"{_ms(sch['claim walk'])}", "-", ""])
    say(table(["backend", "figure", "median", "target", ""], rows))


# ---------------------------------------------------------------------------
# Profile of one 1x1 drain daemon
# ---------------------------------------------------------------------------
def profile(bench: Bench, jobs: int, clock: str, task: str = "noop") -> None:
    import pstats
    prefix = bench.workdir / f"profile-{bench.backend}"
    bench.clean()
    result = bench.drain_once(1, 1, 0, jobs=jobs, extra_env={"MQUEUE_BENCH_PROFILE": str(prefix),
                                                                 "MQUEUE_BENCH_PROFILE_CLOCK": clock},
                              log_name=f"profile-{bench.backend}.log", task=task)
    files = sorted(str(p) for p in bench.workdir.glob(f"profile-{bench.backend}.*") if not str(p).endswith(".log"))
    if not files:
        say("  no profile written")
        return
    stats = pstats.Stats(files[0])
    for name in files[1:]:
        stats.add(name)
    table_ = stats.stats  # {(file, line, func): (cc, nc, tt, ct, callers)}

    def find(suffix: str, function: str) -> float:
        return sum(v[3] for k, v in table_.items() if k[0].endswith(suffix) and k[2] == function)

    work = find("mqueue/executor.py", "execute") + find("mqueue/worker.py", "_claim") \
        + find("mqueue/worker.py", "_heartbeat_step") + find("mqueue/worker.py", "_rescue_step")
    say(f"  {jobs:,} {task} jobs drained at 1x1 under cProfile ({clock} clock): {result['steady']:,.0f} jobs/s steady "
        f"({result['seconds']:.1f}s wall); work = Executor.execute + Worker._claim + heartbeats + rescue "
        f"= {work:.2f}s of profiled time" + (f"; CPU of all threads {stats.total_tt:.2f}s = "
                                              f"{1e6 * stats.total_tt / jobs:,.0f} us/job" if clock == "cpu" else ""))
    mine = [(k, v) for k, v in table_.items() if "/mqueue/" in k[0] and "benchtasks" not in k[0]]
    mine.sort(key=lambda kv: kv[1][3], reverse=True)
    rows = []
    skip = {"_serve", "run", "_execute_step", "_complete_step", "main", "cmd_start", "<module>", "start"}
    for (path, line, function), (_cc, calls, tottime, cumtime, _callers) in mine:
        if function in skip:
            continue
        rel = path.split("/mqueue/", 1)[1]
        rows.append([f"{rel}:{line} {function}", f"{calls:,}", f"{cumtime:.3f}", f"{100 * cumtime / work:.1f}%",
                     f"{tottime:.3f}"])
        if len(rows) == 22:
            break
    say(table(["mqueue function", "calls", "cum s", "cum/work", "own s"], rows))
    waits = ("acquire", "sleep", "wait", "select", "poll")   # idle threads, not work
    idle_reads = ("<method 'recv' of '_socket.socket' objects>",)   # the wake-up listener waiting for a datagram
    leaves = [(k, v) for k, v in table_.items()
              if not (k[0] == "~" and (any(w in k[2] for w in waits) or k[2] in idle_reads))]
    leaves.sort(key=lambda kv: kv[1][2], reverse=True)
    rows = []
    for (path, line, function), (_cc, calls, tottime, cumtime, _callers) in leaves[:15]:
        where = path.replace(str(REPO) + "/", "")
        where = where.split("site-packages/", 1)[-1].split("python3.11/", 1)[-1]
        rows.append([f"{where}:{line} {function}"[-80:], f"{calls:,}", f"{tottime:.3f}",
                     f"{100 * tottime / work:.1f}%"])
    say("  heaviest own time (thread waits left out):")
    say(table(["function", "calls", "own s", "own/work"], rows))


# ---------------------------------------------------------------------------
# The raw commit loop (a child process of the drain benchmark)
# ---------------------------------------------------------------------------
def raw_child(threads: int, seconds: float, start_at: float) -> None:
    url = os.environ["MQUEUE_DATABASE_URL"]
    options = {} if url.startswith("sqlite") else {"pool_size": threads + 1}
    db = mqueue.Database(url, **options)
    statement = insert(raw_table)
    counts = [0] * threads
    end_at = start_at + seconds

    def loop(slot: int) -> None:
        with db.engine.connect() as conn:
            with conn.begin():
                conn.execute(statement, {"payload": "warm-up"})
            time.sleep(max(0.0, start_at - time.time()))
            done = 0
            while time.time() < end_at:
                with conn.begin():
                    conn.execute(statement, {"payload": "x"})
                done += 1
            counts[slot] = done

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    db.dispose()
    print(json.dumps({"commits": sum(counts)}))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["enqueue", "drain", "latency", "scheduled", "prune", "galera", "all",
                                              "profile", "_raw"])
    parser.add_argument("--backend", default="all", choices=[*BACKENDS, "all"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mariadb-url", default=None,
                        help=f"MariaDB server (default {DEFAULT_URLS['mariadb']}); the database part is replaced")
    parser.add_argument("--postgresql-url", default=None,
                        help=f"PostgreSQL server (default {DEFAULT_URLS['postgresql']})")
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--enqueue-jobs", type=int, default=2000)
    sizes.add_argument("--many-jobs", type=int, default=10000)
    sizes.add_argument("--drain-jobs", type=int, default=10000)
    sizes.add_argument("--raw-seconds", type=float, default=3.0)
    sizes.add_argument("--drain-timeout", type=float, default=180.0)
    sizes.add_argument("--latency-jobs", type=int, default=200)
    sizes.add_argument("--latency-gap", type=float, default=0.05)
    sizes.add_argument("--profile-jobs", type=int, default=3000)
    sizes.add_argument("--scheduled-jobs", type=int, default=100_000)
    sizes.add_argument("--prune-jobs", type=int, default=100_000)
    sizes.add_argument("--prune-drain-jobs", type=int, default=20_000)
    sizes.add_argument("--galera-jobs", type=int, default=3000)
    sizes.add_argument("--galera-threads", type=int, default=4)
    parser.add_argument("--profile-clock", choices=["wall", "cpu"], default="wall",
                        help="profile: wall time (waits included) or each thread's CPU time")
    parser.add_argument("--profile-task", choices=["noop", "write"], default="noop",
                        help="profile: the task of the profiled jobs (write: inserts one row in its session)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon logs)")
    # the raw commit loop's own options
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def tasks_package(workdir: Path) -> Iterator[tuple[Path, Any]]:
    tasks_dir = workdir / "tasks"
    (tasks_dir / TASKS_PACKAGE).mkdir(parents=True)
    (tasks_dir / TASKS_PACKAGE / "__init__.py").write_text(TASKS_SOURCE)
    sys.path.insert(0, str(tasks_dir))
    try:
        import importlib
        yield tasks_dir, importlib.import_module(TASKS_PACKAGE)
    finally:
        sys.path.remove(str(tasks_dir))


def _interrupted(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT even when started in the background) unwind through
    # the finally blocks: daemons stopped, bench databases dropped.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    if args.benchmark == "_raw":
        raw_child(args.threads, args.seconds, args.start_at)
        return 0
    chosen = ["enqueue", "drain", "latency", "scheduled", "prune"] if args.benchmark == "all" else [args.benchmark]
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    if args.benchmark == "galera":
        backends = ("mariadb",)   # the cluster's nodes are MariaDB servers
    began = time.monotonic()
    summary: dict[str, dict[str, Any]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="mqueue-bench-"))
    runs = "" if args.benchmark == "profile" else f", {args.runs} run(s)"
    say(f"mqueue bench: {', '.join(chosen)} on {', '.join(backends)}{runs}; "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    try:
        with tasks_package(workdir) as (tasks_dir, tasks):
            for backend in backends:
                say(f"\n== {backend} " + "=" * (76 - len(backend)))
                cluster = None
                if args.benchmark == "galera":
                    from galera_cluster import GaleraCluster
                    say("  starting a three-node Galera cluster on loopback")
                    cluster = GaleraCluster().start()
                    args.mariadb_url = cluster.urls[0]
                try:
                    bench = Bench(backend, args, workdir, tasks_dir, tasks)
                except BaseException:
                    if cluster is not None:
                        cluster.destroy()
                    raise
                summary[backend] = {}
                try:
                    if cluster is not None:
                        urls = [url.replace(f"/{make_url(url).database}?", f"/{bench.database.name}?")
                                for url in cluster.urls]
                        runs = [galera_drains(bench, urls, run) for run in range(1, args.runs + 1)]
                        summary[backend]["galera"] = report_galera(args, runs)
                        continue
                    if args.benchmark == "profile":
                        profile(bench, args.profile_jobs, args.profile_clock, args.profile_task)
                        continue
                    if "enqueue" in chosen:
                        runs = [bench.enqueue() for _ in range(args.runs)]
                        summary[backend]["enqueue"] = report_enqueue(backend, args, runs)
                    if "drain" in chosen:
                        runs = [bench.drain(run) for run in range(1, args.runs + 1)]
                        summary[backend]["drain"] = report_drain(backend, args, runs)
                    if "latency" in chosen:
                        runs = [bench.latency(run) for run in range(1, args.runs + 1)]
                        summary[backend]["latency"] = report_latency(backend, args, runs)
                    if "scheduled" in chosen:
                        runs = [scheduled_claims(bench, args.scheduled_jobs) for _ in range(args.runs)]
                        summary[backend]["scheduled"] = report_scheduled(args, runs)
                    if "prune" in chosen:
                        runs = [prune_while_draining(bench, args.prune_jobs, args.prune_drain_jobs)
                                for _ in range(args.runs)]
                        summary[backend]["prune"] = report_prune(args, runs)
                finally:
                    bench.close()
                    if cluster is not None:
                        cluster.destroy()
        if args.benchmark != "profile" and len(chosen) + len(backends) > 2:
            report_summary(summary)
    finally:
        if args.keep:
            say(f"\ndaemon logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(f"\ntotal {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
