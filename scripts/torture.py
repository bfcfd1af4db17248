#!/usr/bin/env python3
"""A fixed-seed torture run of mqueue under faults, with the books checked at the end.

    python scripts/torture.py --backend {mariadb,postgresql,sqlite} [--ci] [--seed N]

Three worker daemons of three threads drain jobs of mixed length (some
raise once, some fail by design, some are duplicates by ``unique_key``, some
write nothing so the workers complete them in batches; 10% of the enqueue
transactions roll back on purpose) plus a ``Minutely`` cron,
while a chaos timeline kills workers (SIGKILL), pauses one past its lease
(SIGSTOP, then SIGCONT), resets and blackholes the workers' connections
through a TCP proxy, holds the reply to a task's COMMIT, and restarts and
crashes the database server.  MariaDB and PostgreSQL run as private
instances in a temporary directory (the machine's servers are never
touched); SQLite has no server or network, so those faults are skipped and
the table says so.

It prints one table (see ``tests/faults/ledger.py`` for how the books are
kept) and exits 1 if an invariant failed: lost jobs, duplicate or phantom
effects, a job row that disagrees with the books (finished jobs stay in
``mqueue_task``: a done job must be ``succeeded``), a job failed by a
transient database error, a recovery slower than lease + 5 s, a hung
thread, a traceback, or a daemon that did not stop cleanly.  ``--ci`` is the short variant (about a minute per backend).
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for sub in ("", "tests", "tests/processes", "tests/faults"):
    sys.path.insert(0, str(ROOT / sub))

from sqlalchemy.engine import make_url  # noqa: E402

import mqueue  # noqa: E402
from daemons import Daemon  # noqa: E402
from helpers import sqlite_write_lock_free  # noqa: E402
from ledger import (COMPLETION, Harness, check, database_warnings, effect_count, live_jobs,  # noqa: E402
                    log_problems, orphan_recoveries, percentile, prepare)
from proxy import Proxy  # noqa: E402
from servers import private_server  # noqa: E402

LEASE = 2.0
DAEMONS = 3
THREADS = 3
RECOVERY_BAR = LEASE + 5
HUNG_BAR = LEASE + 30
SERVER_FAULTS = {"reset", "blackhole", "hold", "restart", "crash"}

#: (seconds after start, action, argument); enqueueing stops at ``enqueue_until``.
FULL = dict(jobs=6000, enqueue_until=150, timeline=[
    (25, "kill", 1), (35, "stop", None), (48, "reset", None), (58, "kill", 1),
    (66, "blackhole", 4.0), (80, "hold", 3), (92, "restart", 2.0), (108, "kill", 2),
    (120, "crash", 2.0), (135, "kill", 1), (142, "reset", None)])
CI = dict(jobs=1500, enqueue_until=48, timeline=[
    (10, "kill", 1), (15, "stop", None), (23, "reset", None), (27, "blackhole", 3.0),
    (33, "hold", 2), (37, "restart", 1.5), (43, "crash", 1.5), (46, "kill", 1)])

log = logging.getLogger("torture")


class Run:
    def __init__(self, backend: str, ci: bool, seed: int, root: Path) -> None:
        self.backend, self.ci, self.root = backend, ci, root
        self.plan = CI if ci else FULL
        self.rng = random.Random(seed)
        self.server = None
        self.proxy = None
        if backend == "sqlite":
            self.app_url = self.worker_url = f"sqlite:///{root / 'torture.db'}"
        else:
            self.server = private_server(backend, root / "server").start()
            self.proxy = Proxy(("127.0.0.1", self.server.port)).start()
            self.app_url = self.server.url
            self.worker_url = make_url(self.app_url).set(port=self.proxy.port).render_as_string(
                hide_password=False)
        self.db = prepare(self.app_url)
        self.harness = Harness(root)
        self.harness.activate()
        from faulttasks.jobs import work  # noqa: F401  (registered by activate)
        self.work = work
        self.daemons: list[Daemon] = []
        self.killed: list[tuple[float, int]] = []
        self.killed_pids: set[int] = set()
        self.orphans: list[tuple[float, list[int]]] = []   # (kill time, jobs the dead worker held)
        self.rolled_on_purpose = 0
        self.rolled_by_fault = 0
        self.db_faults: list[tuple[str, float]] = []   # (kind, time the fault ended)
        self.events: list[str] = []
        self.kinds: dict[int, str] = {}
        self.expect_fail: set[int] = set()
        self.kinds_lock = threading.Lock()
        self.samples: list[tuple[float, int]] = []
        self.stop_enqueue = threading.Event()
        self.stop_monitor = threading.Event()
        self.enqueued_target = self.plan["jobs"]
        self.enqueue_count = 0
        self.serial = 0
        self.t0 = 0.0

    # -- daemons ------------------------------------------------------------------
    def start_daemon(self, number: int) -> Daemon:
        daemon = Daemon(self.harness, self.worker_url, concurrency=THREADS, lease=LEASE, poll_interval=0.05,
                        grace=20, name=f"daemon{number}-{len(self.daemons)}")
        self.daemons.append(daemon)
        return daemon

    def live_daemons(self) -> list[Daemon]:
        return [d for d in self.daemons if d.alive() and d.pid not in self.killed_pids]

    # -- enqueuers ------------------------------------------------------------------
    def enqueuer(self, number: int) -> None:
        rng = random.Random(self.rng.random() + number)
        db = mqueue.Database(self.app_url)
        # A quarter of the jobs at once (a backlog: the quiet window measures
        # the workers' throughput), the rest spread evenly up to enqueue_until
        # so jobs are flowing whenever a fault hits.
        burst = self.enqueued_target // 4
        per_second = (self.enqueued_target - burst) / (self.plan["enqueue_until"] - 2)
        started = time.monotonic()
        try:
            while not self.stop_enqueue.is_set():
                with self.kinds_lock:
                    done = self.enqueue_count
                if done >= self.enqueued_target:
                    return
                due = (done - burst) / per_second - (time.monotonic() - started)
                if due > 0:
                    self.stop_enqueue.wait(min(due, 0.25))
                    continue
                self.enqueue_batch(db, rng)
        finally:
            db.dispose()

    def enqueue_batch(self, db: mqueue.Database, rng: random.Random) -> None:
        rollback = rng.random() < 0.10
        calls = []
        for _ in range(rng.randint(1, 20)):
            with self.kinds_lock:
                self.serial += 1
                serial = self.serial
            r = rng.random()
            if r < 0.05:
                calls.append(("raise", {"n": serial, "kind": "raise"}, None))
            elif r < 0.09:
                calls.append(("fail", {"n": serial, "kind": "fail"}, None))
            elif r < 0.14:
                calls.append(("ok", {"n": serial, "sleep": rng.uniform(0.3, 1.0)}, None))
            elif r < 0.22:
                calls.append(("ok", {"n": serial}, f"key-{rng.randrange(40)}"))  # duplicates by unique_key
            elif r < 0.37:
                calls.append(("quiet", {"n": serial, "kind": "quiet"}, None))  # completed in batches
            else:
                calls.append(("ok", {"n": serial, "sleep": rng.uniform(0, 0.02)}, None))
        ids: list[int] = []
        session = db.Session()
        try:
            with mqueue.use_session(session):
                for kind, kwargs, key in calls:
                    task = self.work.options(unique_key=key) if key else self.work
                    ids.append(task.enqueue(**kwargs))
            if rollback:
                self.rolled_on_purpose += 1
                session.rollback()
                session.close()
                self.harness.record("R", [kwargs["n"] for _k, kwargs, _key in calls])
                return
        except Exception:  # noqa: BLE001 - a database fault before COMMIT: nothing was stored
            self.rolled_by_fault += 1
            session.rollback()
            session.close()
            self.harness.record("R", [kwargs["n"] for _k, kwargs, _key in calls])
            time.sleep(0.2)
            return
        quiet = {job_id for (kind, _kwargs, _key), job_id in zip(calls, ids) if kind == "quiet"}
        try:
            session.commit()
        except Exception:  # noqa: BLE001 - the COMMIT's outcome is unknown
            self.harness.record("Q", quiet)
            self.harness.record("U", set(ids))
            self.remember(calls, ids)
            time.sleep(0.2)
            return
        finally:
            session.close()
        self.harness.record("Q", quiet)
        self.harness.record("C", set(ids))
        self.remember(calls, ids)

    def remember(self, calls, ids) -> None:
        with self.kinds_lock:
            for (kind, _kwargs, _key), job_id in zip(calls, ids):
                self.kinds.setdefault(job_id, kind)
                if kind == "fail":
                    self.expect_fail.add(job_id)
            self.enqueue_count += len(ids)

    # -- monitor --------------------------------------------------------------------
    def monitor(self) -> None:
        while not self.stop_monitor.is_set():
            try:
                self.samples.append((time.time(), effect_count(self.db)))
            except Exception:  # noqa: BLE001 - the server is down right now
                pass
            self.stop_monitor.wait(0.25)

    def progress_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first sample showing a new effect."""
        base = None
        for at, count in self.samples:
            if at < moment:
                base = count
                continue
            if base is None:
                base = count
            elif count > base:
                return at - moment
        return None

    def throughput(self, start: float, end: float) -> float | None:
        inside = [(at, c) for at, c in self.samples if start <= at <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    # -- chaos ------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:6.1f}s {text}")

    def act(self, action: str, argument) -> None:
        if action in SERVER_FAULTS and self.server is None:
            self.note(f"{action}: skipped (sqlite: no server or network)")
            return
        if action == "kill":
            for _ in range(argument):
                # the busiest worker by the database's account, so the kill orphans work
                # (waiting a few seconds for one that holds a job: the queue is often empty)
                deadline = time.monotonic() + 5
                while True:
                    victims = self.live_daemons()
                    self.rng.shuffle(victims)
                    victim = max(victims, key=lambda d: len(self.held_by(d.pid)))
                    if self.held_by(victim.pid) or time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                victim.send(signal.SIGKILL)
                self.killed.append((time.time(), victim.pid))
                self.killed_pids.add(victim.pid)
                victim.wait(10)
                orphans = self.held_by(victim.pid)
                self.orphans.append((time.time(), orphans))
                self.note(f"SIGKILL daemon pid {victim.pid} holding {len(orphans)} job(s); started a replacement")
                self.start_daemon(len(self.daemons))
        elif action == "stop":
            victim = self.rng.choice(self.live_daemons())
            self.pause(victim)
            time.sleep(LEASE * 2 + 1)  # past the lease
            victim.send(signal.SIGCONT)
            self.note(f"SIGSTOP daemon pid {victim.pid} for {LEASE * 2 + 1:g}s (lease {LEASE:g}s), SIGCONT")
        elif action == "reset":
            count = self.proxy.reset()
            self.db_faults.append(("reset", time.time()))
            self.note(f"proxy: RST on {count} open worker connection(s)")
        elif action == "blackhole":
            self.proxy.blackhole()
            time.sleep(argument)
            self.proxy.reset()
            self.proxy.passthrough()
            self.db_faults.append(("blackhole", time.time()))
            self.note(f"proxy: blackhole {argument:g}s, then RST")
        elif action == "hold":
            before = self.proxy.commits_held
            self.proxy.hold_commit(after=COMPLETION, count=argument, hold_seconds=1.0)
            deadline = time.monotonic() + 8
            while self.proxy.commits_held < before + argument and time.monotonic() < deadline:
                time.sleep(0.05)
            self.proxy.hold_commit(count=0)
            held = self.proxy.commits_held - before
            self.db_faults.append(("hold", time.time()))
            self.note(f"proxy: held the reply to {held} task COMMIT(s) 1s, then RST")
        elif action == "restart":
            self.server.stop()
            time.sleep(argument)
            self.server.start()
            self.db_faults.append(("restart", time.time()))
            self.note(f"database: clean shutdown, down {argument:g}s, started")
        elif action == "crash":
            self.server.crash()
            time.sleep(argument)
            self.server.start()
            self.db_faults.append(("crash", time.time()))
            self.note(f"database: SIGKILL (crash), down {argument:g}s, started (crash recovery)")

    def held_by(self, pid: int) -> list[int]:
        """Jobs a (dead) worker process still holds by the database's account."""
        from sqlalchemy import select

        from mqueue.schema import task_table as t
        try:
            with self.db.engine.connect() as conn:
                return [r[0] for r in conn.execute(select(t.c.id).where(
                    t.c.state == "running", t.c.owner.like(f"%:{pid}:%")))]
        except Exception:  # noqa: BLE001 - the server is down right now
            return []

    def pause(self, daemon: Daemon) -> None:
        """SIGSTOP, retried until the daemon holds no SQLite write lock (servers: at once)."""
        for _ in range(20):
            daemon.send(signal.SIGSTOP)
            time.sleep(0.05)
            if self.server is not None or sqlite_write_lock_free(self.root / "torture.db"):
                return
            daemon.send(signal.SIGCONT)
            time.sleep(0.02)

    # -- the run ----------------------------------------------------------------------
    def run(self) -> int:
        for n in range(DAEMONS):
            self.start_daemon(n)
        deadline = time.monotonic() + 30
        while not all(d.serving() for d in self.daemons) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        threads = [threading.Thread(target=self.enqueuer, args=(n,), daemon=True) for n in range(2)]
        threads.append(threading.Thread(target=self.monitor, daemon=True))
        for thread in threads:
            thread.start()
        first_fault = None
        for at, action, argument in self.plan["timeline"]:
            wait = self.t0 + at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if first_fault is None:
                first_fault = time.time()
            self.act(action, argument)
        last_fault = time.time()
        for thread in threads[:2]:
            thread.join(self.plan["enqueue_until"] + 60)
        self.stop_enqueue.set()
        drain_deadline = time.monotonic() + (120 if self.ci else 240)
        while time.monotonic() < drain_deadline:
            try:
                if live_jobs(self.db) == 0 and self.enqueue_count >= self.enqueued_target:
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.25)
        drained = time.time()
        self.stop_monitor.set()
        threads[2].join(5)
        clean_exit = self.stop_all()
        return self.report(first_fault, last_fault, drained, clean_exit)

    def stop_all(self) -> list[str]:
        problems = []
        live = self.live_daemons()
        deadline = time.monotonic() + 30
        while not all(d.serving() or not d.alive() for d in live) and time.monotonic() < deadline:
            time.sleep(0.05)  # a replacement still importing has no signal handler yet
        for daemon in live:
            daemon.send(signal.SIGCONT)
            daemon.send(signal.SIGTERM)
        for daemon in live:
            try:
                code = daemon.proc.wait(40)
            except Exception:  # noqa: BLE001
                code = None
            if code != 0:
                problems.append(f"{daemon.name} exit code {code} after SIGTERM")
        return problems

    # -- the books ----------------------------------------------------------------------
    def report(self, first_fault: float, last_fault: float, drained: float, exit_problems) -> int:
        books = check(self.db, self.harness, expect_fail=self.expect_fail)
        logs = {d.name: d.stderr() for d in self.daemons}
        all_logs = "\n".join(logs.values())
        tracebacks = {name: log_problems(text) for name, text in logs.items()}
        tracebacks = {name: lines for name, lines in tracebacks.items() if lines}
        warnings = database_warnings(all_logs)
        surfaced = []
        surfaced_lines = []   # their log lines (with ``error=``), printed when the check fails
        for match in re.finditer(r"job=(\d+) task=fault\.work \S+ duration=\S+ outcome=(retried|failed).*",
                                 all_logs):
            job_id = int(match.group(1))
            kind = self.kinds.get(job_id)
            if kind in ("ok", "quiet") or (kind == "raise" and match.group(2) == "failed"):
                surfaced.append(job_id)
                surfaced_lines.append(match.group(0))
        kill_recovery = orphan_recoveries(self.harness, self.killed)  # runs cut short
        starts = self.harness.starts()
        for killed_at, job_ids in self.orphans:  # claimed or running when the worker died
            for job_id in job_ids:
                later = [a[4] for a in starts if a[1] == job_id and a[4] > killed_at]
                kill_recovery.append(min(later) - killed_at if later else float("inf"))
        kill_recovery = sorted(set(kill_recovery))
        db_recovery = [self.progress_after(at) for _kind, at in self.db_faults]
        db_recovery_known = [r for r in db_recovery if r is not None]
        # hung: a start with no end in a process that was never killed
        never_killed = {d.pid for d in self.daemons} - self.killed_pids
        open_runs: dict[tuple[int, int], float] = {}
        for kind, job_id, pid, _retries, at, _outcome in self.harness.attempts():
            if kind == "S":
                open_runs[(job_id, pid)] = at
            else:
                open_runs.pop((job_id, pid), None)
        hung = [key for key, at in open_runs.items() if key[1] in never_killed]
        cron_slots = Counter(m.group(1) for m in re.finditer(
            r"cron=fault\.minutely \S+ slot=(\S+ \S+) job=\d+ outcome=enqueued", all_logs))
        burst_done = next((at for at, count in self.samples if count >= 0.8 * (self.enqueued_target // 4)),
                          first_fault)
        quiet = self.throughput(self.wall0, min(burst_done, first_fault))
        faulty = self.throughput(first_fault, last_fault)
        runs = Counter(a[1] for a in self.harness.attempts() if a[0] == "S")

        def fmt(value, unit="s"):
            return "-" if value is None else (f"{value:.2f}{unit}" if value != float("inf") else "never")

        no_server = self.server is None
        rows = [
            ("backend", f"{self.backend} ({'--ci' if self.ci else 'full'}, {DAEMONS} daemons x {THREADS} threads, "
                        f"lease {LEASE:g}s)"),
            ("enqueued jobs: committed / rolled back / unknown", f"{books.committed} / {books.rolled_back} / "
                                                                 f"{books.unknown}"),
            ("enqueue transactions rolled back: on purpose / by a fault",
             f"{self.rolled_on_purpose} / {self.rolled_by_fault}"),
            ("done / failed by design", f"{books.done} / {books.failed_by_design}"),
            ("lost", str(len(books.lost))),
            ("duplicate effects", str(books.duplicate_effects)),
            ("phantom effects / phantom jobs", f"{books.phantom_effects} / {len(books.phantom_jobs)}"),
            ("job rows that disagree with the books", str(len(books.mismatched))),
            ("executions per job (mean, max)", f"{books.executions_mean:.3f}, {books.executions_max}"),
            ("worker SIGKILLs", str(len(self.killed))),
            ("recovery after worker kill (p50, max)",
             f"{fmt(percentile(kill_recovery, 0.5))}, {fmt(max(kill_recovery) if kill_recovery else None)} "
             f"({sum(len(j) for _t, j in self.orphans)} job(s) held by killed workers; bar {RECOVERY_BAR:g}s)"),
            ("recovery after database faults (p50, max)",
             "n/a (sqlite: no server or network)" if no_server else
             f"{fmt(percentile(db_recovery_known, 0.5))}, {fmt(max(db_recovery_known) if db_recovery_known else None)}"
             f" ({len(self.db_faults)} fault(s))"),
            ("transient errors seen / surfaced", f"{len(warnings)} / {len(surfaced) + len(books.transient_failures)}"),
            ("hung threads", str(len(hung))),
            ("tracebacks or multi-line log records", str(sum(len(v) for v in tracebacks.values()))),
            ("throughput: backlog, no faults / during the faults", f"{fmt(quiet, ' jobs/s')} / {fmt(faulty, ' jobs/s')}"),
            ("cron jobs per slot", ", ".join(f"{slot[11:16]}: {n}" for slot, n in sorted(cron_slots.items()))
             or "no slot in the run"),
            ("cron jobs run (distinct)", str(books.cron_jobs)),
            ("run time (start to drained)", f"{drained - self.wall0:.0f}s"),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"\nmqueue torture: {self.backend}")
        print("-" * (width + 50))
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        print("-" * (width + 50))
        print("timeline:")
        for event in self.events:
            print("  " + event)
        failures = books.violations()
        if surfaced:
            failures.append(f"jobs retried or failed by a database error: {sorted(set(surfaced))[:10]}")
            failures += [f"  {line[:600]}" for line in surfaced_lines[:5]]
            first = re.compile(rf"\bjobs?=[^ ]*\b{surfaced[0]}\b")   # what its worker logged about it
            failures += [f"  {line[:600]}" for line in all_logs.splitlines() if first.search(line)][:12]
        if any(r > RECOVERY_BAR for r in kill_recovery):
            failures.append(f"recovery after a worker kill over {RECOVERY_BAR:g}s: {max(kill_recovery):.2f}s")
        if hung:
            failures.append(f"hung runs: {hung[:10]}")
        if tracebacks:
            failures.append(f"tracebacks/multi-line records: {dict((k, v[:3]) for k, v in tracebacks.items())}")
        if any(n > 1 for n in cron_slots.values()):
            failures.append(f"a cron slot enqueued twice: {cron_slots}")
        failures += exit_problems
        if len(runs) and not books.done:
            failures.append("nothing was done")
        if failures:
            print("FAILED:")
            for failure in failures:
                print("  " + failure)
            return 1
        print("all invariants held")
        return 0

    def close(self) -> None:
        for daemon in self.daemons:
            try:
                daemon.close()
            except Exception:  # noqa: BLE001
                pass
        self.db.dispose()
        if self.proxy is not None:
            self.proxy.close()
        if self.server is not None:
            self.server.destroy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", required=True, choices=["mariadb", "postgresql", "sqlite"])
    parser.add_argument("--ci", action="store_true", help="the short variant (about a minute)")
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix=f"mqueue-torture-{args.backend}-"))
    run = None
    try:
        run = Run(args.backend, args.ci, args.seed, root)
        return run.run()
    finally:
        if run is not None:
            run.close()
        if args.keep:
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
