"""The fault harness's books: effect ledger, execution log, enqueue ledger, invariants.

* **Effect ledger**: the table ``fault_effect`` (no unique constraint), one
  row per *committed* task run, written in the job's own session.  A run
  whose transaction rolled back leaves nothing.
* **Execution log**: a file outside the database, one ``O_APPEND`` line per
  attempt start (``S``) and end (``E``, with ``ok`` or ``raised``), so extra
  executions are counted even when their effects rolled back.
* **Enqueue ledger**: a file of job ids written only after the enqueue
  transaction's COMMIT returned (``C``), of ids whose COMMIT raised so the
  outcome is unknown (``U``), and of the ``n`` argument of every call whose
  transaction rolled back (``R``); ``Q`` marks quiet jobs (``kind="quiet"``:
  the task writes nothing, so the worker completes it in a batch), which are
  done when their row is ``succeeded`` after an attempt that ended ``ok``.

A job that succeeds stays in ``mqueue_task`` as ``succeeded`` and a
cancelled one as ``canceled``; ``prepare`` keeps every finished job for the
whole run (no pruning), so each committed job's row tells how it ended.
  Rolled-back calls are known by ``n``, not id: SQLite hands a rolled-back
  id out again.

``check(...)`` turns the three into counts: lost, duplicate effects,
phantom effects and jobs, rows that disagree with the books, executions per
job, jobs failed by a transient database error.  Tests assert them; ``scripts/torture.py`` prints them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

from helpers import whole_lines
from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, String, Table, func, select

import mqueue
from mqueue.migrate import upgrade
from mqueue import admin
from mqueue.schema import CANCELED, FAILED, QUEUED, RUNNING, SUCCEEDED, WAITING, task_table

PACKAGE = "faulttasks"
WORK = "fault.work"
BLOCK = "fault.block"
CRON = "fault.minutely"
#: Bytes only a completion sends (``UPDATE mqueue_task SET state=..., run_seconds=...``, one job or a
#: batch): ``Proxy.hold_commit(after=COMPLETION)`` holds the reply to a task's COMMIT.
COMPLETION = b"run_seconds="
#: States of a job that is still to be run (or running); ``failed`` is an end the books judge.
LIVE = (QUEUED, RUNNING, WAITING)

ledger_metadata = MetaData()
fault_effect = Table(
    "fault_effect", ledger_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("note", String(100), nullable=True),
    Column("at", Double, nullable=True),
)

_TASKS_SOURCE = '''
"""Tasks of the fault harness: every attempt logs its start and end; every
committed run leaves one ``fault_effect`` row (written in the job's session)."""

import os
import time

from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, String, Table, insert

import mqueue

fault_effect = Table(
    "fault_effect", MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("note", String(100), nullable=True),
    Column("at", Double, nullable=True),
)

LOG = os.environ["FAULT_EXEC_LOG"]
FLAG_DIR = os.environ["FAULT_FLAG_DIR"]


def _line(text):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\\n").encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)


def _effect(job, note):
    mqueue.current_session().execute(insert(fault_effect).values(
        job_id=job.id, pid=os.getpid(), retries=job.retries, note=note, at=time.time()))


class attempt:
    """Logs ``S`` on entry and ``E ok``/``E raised`` on exit."""

    def __enter__(self):
        self.job = mqueue.current_job()
        _line(f"S {self.job.id} {os.getpid()} {self.job.retries} {time.time():.6f}")
        return self.job

    def __exit__(self, kind, error, tb):
        outcome = "ok" if kind is None else "raised"
        _line(f"E {self.job.id} {os.getpid()} {self.job.retries} {time.time():.6f} {outcome}")
        return False


@mqueue.task(name="fault.work", backoff=0.2, max_retries=25)
def work(n, sleep=0.0, kind="ok"):
    """``kind``: ok; raise (raises on its first attempt, then succeeds); fail (``mqueue.Fail``);
    quiet (touches no database: no effect row)."""
    with attempt() as job:
        if sleep:
            time.sleep(sleep)
        if kind != "quiet":
            _effect(job, str(n))  # rolled back when the run raises
        if kind == "raise" and job.retries == 0:
            raise RuntimeError("raised by design")
        if kind == "fail":
            raise mqueue.Fail("failed by design")


def _wait_flag(name, seconds):
    deadline = time.monotonic() + seconds
    path = os.path.join(FLAG_DIR, name)
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def _touch(name):
    open(os.path.join(FLAG_DIR, name), "a").close()


@mqueue.task(name="fault.block", backoff=0.2, max_retries=25)
def block(point="start", seconds=60.0, write=True):
    """First attempt only: touch ``<id>.<point>`` then wait for ``<id>.go``.

    ``point`` is where it waits: ``start`` (before writing) or ``end`` (after
    writing, just before the worker commits).  Later attempts never wait.
    """
    with attempt() as job:
        first = job.retries == 0
        if first and point == "start":
            _touch(f"{job.id}.start")
            _wait_flag(f"{job.id}.go", seconds)
        if write:
            _effect(job, point)
        if first and point == "end":
            _touch(f"{job.id}.end")
            _wait_flag(f"{job.id}.go", seconds)


@mqueue.cron(mqueue.Minutely, name="fault.minutely", max_retries=25)
def minutely():
    with attempt() as job:
        _effect(job, "cron")
'''


def _write_once(path: Path, text: str) -> None:
    """Create ``path`` with ``text`` atomically unless it already holds it."""
    if path.exists() and path.read_text() == text:
        return
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(text)
    os.replace(scratch, path)


class Harness:
    """A tasks package, its execution log and flag directory, the enqueue ledger, in ``root``."""

    package = PACKAGE

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.log = self.root / "executions.log"
        self.flags = self.root / "flags"
        self.enqueued = self.root / "enqueued.ledger"
        pkg = self.root / PACKAGE
        pkg.mkdir(parents=True, exist_ok=True)
        self.flags.mkdir(exist_ok=True)
        # Every actor process opens the same root: rewriting the module while
        # another process imports it would hand that one a half-written file.
        _write_once(pkg / "__init__.py", "")
        _write_once(pkg / "jobs.py", textwrap.dedent(_TASKS_SOURCE).lstrip())

    def env(self) -> dict[str, str]:
        return {"FAULT_EXEC_LOG": str(self.log), "FAULT_FLAG_DIR": str(self.flags)}

    def activate(self) -> None:
        """Import the tasks package in this process (for enqueueing by the task objects)."""
        import sys
        os.environ.update(self.env())
        if str(self.root) not in sys.path:
            sys.path.insert(0, str(self.root))
        from mqueue.registry import discover
        discover(PACKAGE)

    # -- flags
    def flag(self, name: str) -> Path:
        return self.flags / name

    def go(self, job_id: int) -> None:
        self.flag(f"{job_id}.go").touch()

    def reached(self, job_id: int, point: str) -> bool:
        return self.flag(f"{job_id}.{point}").exists()

    # -- enqueue ledger
    def record(self, kind: str, ids) -> None:
        """``kind``: C committed (ids), U commit outcome unknown (ids), R rolled back (``n`` values),
        X maybe cancelled (ids), Q quiet (ids)."""
        if not ids:
            return
        text = "".join(f"{kind} {job_id}\n" for job_id in ids)
        fd = os.open(self.enqueued, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def ledger(self) -> dict[str, set[int]]:
        books: dict[str, set[int]] = {"C": set(), "R": set(), "U": set(), "X": set(), "Q": set()}
        for line in whole_lines(self.enqueued):
            kind, job_id = line.split()
            books[kind].add(int(job_id))
        return books

    # -- execution log
    def attempts(self) -> list[tuple]:
        """``(kind, job_id, pid, retries, unix_time, outcome)`` per line, in order."""
        rows = []
        for line in whole_lines(self.log):
            parts = line.split()
            if len(parts) < 5:
                continue  # a line cut by SIGKILL mid-write cannot happen (one write), but be safe
            rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), float(parts[4]),
                         parts[5] if len(parts) > 5 else None))
        return rows

    def starts(self, job_id: int | None = None) -> list[tuple]:
        return [a for a in self.attempts() if a[0] == "S" and (job_id is None or a[1] == job_id)]


def prepare(url: str) -> mqueue.Database:
    """Migrate mqueue's tables and create the effect ledger.

    Finished jobs are kept for the whole run (workers prune beyond
    ``jobs-history-count``), so the books can read how every job ended.
    """
    db = mqueue.Database(url)
    upgrade(db)
    ledger_metadata.create_all(db.engine)
    admin.set_config(db, "jobs-history-count", 10 ** 9)
    return db


def effects(db: mqueue.Database) -> list:
    with db.dialect.reader(db.engine).connect() as conn:
        return conn.execute(select(fault_effect).order_by(fault_effect.c.id)).all()


def effect_count(db: mqueue.Database) -> int:
    with db.dialect.reader(db.engine).connect() as conn:
        return conn.execute(select(func.count()).select_from(fault_effect)).scalar_one()


def job_rows(db: mqueue.Database) -> list:
    with db.dialect.reader(db.engine).connect() as conn:
        return conn.execute(select(task_table)).all()


def live_jobs(db: mqueue.Database) -> int:
    """Jobs still queued, waiting or running (finished and failed ones are not)."""
    with db.dialect.reader(db.engine).connect() as conn:
        return conn.execute(select(func.count()).select_from(task_table)
                            .where(task_table.c.state.in_(LIVE))).scalar_one()


def job_row(db: mqueue.Database, job_id: int):
    with db.dialect.reader(db.engine).connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).first()


# -- invariants -------------------------------------------------------------------

#: Words in a stored error that say a database hiccup, not the task, failed the run.
TRANSIENT_WORDS = re.compile(r"OperationalError|InterfaceError|deadlock|lock wait|database is locked|"
                             r"Lost connection|server has gone away|connection (was )?(closed|reset|killed)|"
                             r"terminating connection|could not serialize|Record has changed|"
                             r"server closed the connection|InternalError", re.I)


@dataclasses.dataclass
class Report:
    committed: int = 0
    rolled_back: int = 0
    unknown: int = 0
    done: int = 0
    failed_by_design: int = 0
    cron_jobs: int = 0
    lost: list = dataclasses.field(default_factory=list)
    duplicate_effects: int = 0
    phantom_effects: int = 0
    phantom_jobs: list = dataclasses.field(default_factory=list)
    mismatched: list = dataclasses.field(default_factory=list)
    transient_failures: list = dataclasses.field(default_factory=list)
    unexpected_failures: list = dataclasses.field(default_factory=list)
    executions_mean: float = 0.0
    executions_max: int = 0
    still_live: int = 0

    def violations(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"lost jobs: {sorted(self.lost)[:20]}")
        if self.duplicate_effects:
            out.append(f"duplicate effects: {self.duplicate_effects}")
        if self.phantom_effects:
            out.append(f"phantom effects: {self.phantom_effects}")
        if self.phantom_jobs:
            out.append(f"phantom jobs: {sorted(self.phantom_jobs)[:20]}")
        if self.mismatched:
            out.append(f"jobs whose row disagrees with the books (id, state): {sorted(self.mismatched)[:20]}")
        if self.transient_failures:
            out.append(f"jobs failed by a transient database error: {self.transient_failures[:5]}")
        if self.unexpected_failures:
            out.append(f"jobs failed that should have succeeded: {self.unexpected_failures[:5]}")
        if self.still_live:
            out.append(f"{self.still_live} job(s) still queued or running")
        return out


def check(db: mqueue.Database, harness: Harness, expect_fail: set[int] = frozenset(),
          cron_ids: set[int] = frozenset()) -> Report:
    """Count the invariants once everything has drained.

    A committed job ends ``succeeded`` with exactly one effect, or (failed
    by design) ``failed`` with no effect; a quiet one ``succeeded`` after an
    attempt that ended ``ok``; one the canceller picked may instead end
    ``canceled`` with no effect.  An effect of a job whose row did not
    succeed, a ``succeeded`` row without its effect (lost work) or a
    ``canceled`` one nobody cancelled disagree with the books.  An id from
    a rolled-back transaction must leave neither row nor effect.
    Unknown-outcome ids may go either way but never twice.  Effects of a
    job the books do not know are phantoms.
    """
    books = harness.ledger()
    committed, rolled, unknown = books["C"], books["R"], books["U"]
    cancelled = books["X"]  # may have been cancelled: no effect or one, never lost
    quiet = books["Q"]
    ended_ok = {a[1] for a in harness.attempts() if a[0] == "E" and a[5] == "ok"}
    rows = {row.id: row for row in job_rows(db)}
    per_job = Counter(row.job_id for row in effects(db))  # read before the rows: nothing moves now
    all_effects = effects(db)
    crons = set(cron_ids) | {job_id for job_id, row in rows.items() if row.name == CRON}
    crons |= {row.job_id for row in all_effects if row.note == "cron"}
    report = Report(committed=len(committed), rolled_back=len(rolled), unknown=len(unknown))
    report.duplicate_effects = sum(n - 1 for n in per_job.values() if n > 1)
    for job_id in committed | unknown:
        row = rows.get(job_id)
        state = None if row is None else row.state
        if state in LIVE:
            report.still_live += 1
            continue
        if job_id in expect_fail:
            if state == FAILED:
                report.failed_by_design += 1
            elif state is not None:
                report.mismatched.append((job_id, state))
            elif job_id in committed:
                report.lost.append(job_id)
            if per_job.get(job_id):
                report.phantom_effects += per_job[job_id]
            continue
        if state == SUCCEEDED:
            if per_job.get(job_id) or (job_id in quiet and job_id in ended_ok):
                report.done += 1
            else:
                report.lost.append(job_id)  # marked done, but the work it committed is missing
        elif per_job.get(job_id):
            report.mismatched.append((job_id, state))  # an effect commits only with the job's success
        elif state == CANCELED:
            if job_id not in cancelled:
                report.mismatched.append((job_id, state))
        elif state == FAILED:
            error = row.last_error or ""
            (report.transient_failures if TRANSIENT_WORDS.search(error) else report.unexpected_failures
             ).append((job_id, error.strip().splitlines()[-1][:200] if error.strip() else ""))
        elif state is not None:
            report.mismatched.append((job_id, state))  # expired, or a state mqueue does not know
        elif job_id in committed:
            report.lost.append(job_id)
    # ``rolled`` holds the ``n`` argument of every rolled-back call.
    for job_id, row in rows.items():
        if _n_of(row.args) in rolled:
            report.phantom_jobs.append(job_id)
    for row in all_effects:
        if row.note and row.note.isdigit() and int(row.note) in rolled:
            report.phantom_effects += 1
    known = committed | unknown
    for job_id, count in per_job.items():
        if job_id not in known and job_id not in crons:
            report.phantom_effects += count
    report.cron_jobs = len({j for j in per_job if j in crons})
    for job_id, row in rows.items():
        if job_id not in known and job_id not in crons:
            report.phantom_jobs.append(job_id)
    runs = Counter(a[1] for a in harness.attempts() if a[0] == "S" and a[1] in committed)
    if runs:
        report.executions_mean = statistics.fmean(runs.values())
        report.executions_max = max(runs.values())
    return report


def _n_of(args: str):
    try:
        return json.loads(args).get("n")
    except (ValueError, AttributeError):
        return None


# -- logs -----------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
DB_WARNING = re.compile(r" (WARNING|ERROR) mqueue[\w.]*: .*(database|transient|lease lost|commit did not|"
                        r"could not record|connection)", re.I)


def log_problems(text: str) -> list[str]:
    """Tracebacks and multi-line records in a daemon's stderr (each record must be one line)."""
    problems = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if "Traceback" in line:
            problems.append(line)
        elif not LOG_LINE.match(line) and not line.startswith("mqueue: second signal"):
            problems.append(line)
    return problems


def database_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if DB_WARNING.search(line)]


def percentile(values, fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def orphan_recoveries(harness: Harness, kills: list[tuple[float, int]]) -> list[float]:
    """Seconds from each SIGKILL to the next start of every job the killed process held in a run.

    ``kills``: ``(unix_time, pid)``.  A job counts when its last start before
    the kill was in that pid and had no end line.
    """
    attempts = harness.attempts()
    by_job: dict[int, list[tuple]] = defaultdict(list)
    for a in attempts:
        by_job[a[1]].append(a)
    delays = []
    for killed_at, pid in kills:
        for job_id, lines in by_job.items():
            before = [a for a in lines if a[4] <= killed_at]
            if not before or before[-1][0] != "S" or before[-1][2] != pid:
                continue
            later = [a for a in lines if a[0] == "S" and a[4] > killed_at]
            if later:
                delays.append(later[0][4] - killed_at)
            else:
                delays.append(float("inf"))
    return delays
