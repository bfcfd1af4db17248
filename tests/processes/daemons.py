"""Helpers for tests that run real ``python -m mqueue start`` daemons.

``write_tasks(tmp_path)`` writes an importable tasks package whose tasks
append one line per run start to a log file (to count executions) and
insert one row into the ``effect`` table (no unique constraint, to count
effects) in the job's own session.  ``Daemon`` starts a worker process with
its output in files, sends signals and collects the output.  The checks
(``effects``, ``executions``, ``jobs_left``, ``job_states``) read the
database and the log.  A job that succeeded stays in ``mqueue_task`` as
``succeeded`` (until pruned), so "jobs left" counts jobs not yet finished.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import python_env, sqlite_write_lock_free, wait_for, whole_lines
from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, String, Table, func, insert, select

import mqueue
from mqueue.migrate import upgrade
from mqueue.schema import FINISHED, task_table

TASKS_PACKAGE = "proctasks"

effect_metadata = MetaData()
effect = Table(
    "effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("note", String(100), nullable=True),
    Column("at", Double, nullable=True),  # time.time(): MySQL FLOAT would round it to ~2 minutes
)

_TASKS_SOURCE = '''
"""Tasks for process tests: one log line per run start, one effect row per success."""

import os
import time

from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, String, Table, insert

import mqueue

effect = Table(
    "effect", MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("retries", Integer, nullable=False),
    Column("note", String(100), nullable=True),
    Column("at", Double, nullable=True),  # time.time(): MySQL FLOAT would round it to ~2 minutes
)

LOG = os.environ["PROC_TASKS_LOG"]
FLAG = os.environ["PROC_TASKS_FLAG"]


def log_start():
    job = mqueue.current_job()
    line = f"{job.id} {os.getpid()} {job.retries} {time.time():.6f}\\n"
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)
    return job


def write_effect(job, note=None):
    mqueue.current_session().execute(insert(effect).values(
        job_id=job.id, pid=os.getpid(), retries=job.retries, note=note, at=time.time()))


@mqueue.task(name="proc.effect")
def effect_task(n, sleep=0.0):
    job = log_start()
    if sleep:
        time.sleep(sleep)
    write_effect(job, str(n))


@mqueue.task(name="proc.quiet")
def quiet_task(n, sleep=0.0):
    """Touches no database: the worker completes it in a batch with others."""
    log_start()
    if sleep:
        time.sleep(sleep)


@mqueue.task(name="proc.block")
def block(write_first=False, seconds=30.0):
    """First run: blocks until the flag file exists (or ``seconds``); later runs do not block."""
    job = log_start()
    if write_first:
        write_effect(job, "first")
    if job.retries == 0:
        deadline = time.monotonic() + seconds
        while not os.path.exists(FLAG) and time.monotonic() < deadline:
            time.sleep(0.02)
    if not write_first:
        write_effect(job, "after")


@mqueue.task(name="proc.sleep")
def sleep_task(seconds):
    job = log_start()
    time.sleep(seconds)
    write_effect(job, "slept")
'''


class Tasks:
    """The tasks package on disk plus its log and flag files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "executions.log"
        self.flag = root / "release.flag"

    def env(self) -> dict[str, str]:
        return {"PROC_TASKS_LOG": str(self.log), "PROC_TASKS_FLAG": str(self.flag)}

    def release(self) -> None:
        self.flag.touch()

    def executions(self) -> list[tuple[int, int, int, float]]:
        """``(job_id, pid, retries, unix_time)`` of every run start, in order."""
        runs = []
        for line in whole_lines(self.log):
            job_id, pid, retries, at = line.split()
            runs.append((int(job_id), int(pid), int(retries), float(at)))
        return runs


def write_tasks(tmp_path: Path) -> Tasks:
    package = tmp_path / TASKS_PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text(textwrap.dedent(_TASKS_SOURCE).lstrip())
    return Tasks(tmp_path)


def prepare_database(url: str) -> mqueue.Database:
    """Migrate mqueue's tables and create ``effect``; return a handle for checks."""
    db = mqueue.Database(url)
    upgrade(db)
    effect_metadata.create_all(db.engine)
    return db


# -- jobs and checks ------------------------------------------------------------


def enqueue(db: mqueue.Database, name: str, calls: list[dict], queue: str = "default") -> list[int]:
    """Insert jobs by hand (a row with queue, name and JSON args is a valid job); ids in order."""
    rows = [dict(queue=queue, name=name, args=json.dumps(kwargs)) for kwargs in calls]
    with db.engine.begin() as conn:
        before = conn.execute(select(func.coalesce(func.max(task_table.c.id), 0))).scalar_one()
        for start in range(0, len(rows), 500):
            conn.execute(insert(task_table), rows[start:start + 500])
        ids = [r[0] for r in conn.execute(select(task_table.c.id).where(task_table.c.id > before)
                                          .order_by(task_table.c.id))]
    assert len(ids) == len(rows)
    return ids


def jobs_left(db: mqueue.Database) -> int:
    """Jobs not finished yet: queued, running, failed (or in any state but succeeded/canceled/expired)."""
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(task_table)
                            .where(task_table.c.state.not_in(FINISHED))).scalar_one()


def job_states(db: mqueue.Database) -> dict[str, int]:
    """How many jobs are in each state, finished ones included."""
    with db.engine.connect() as conn:
        return dict(conn.execute(select(task_table.c.state, func.count()).group_by(task_table.c.state)).all())


def job_row(db: mqueue.Database, job_id: int):
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.id == job_id)).first()


def effects(db: mqueue.Database) -> list:
    """Every effect row, oldest first."""
    with db.engine.connect() as conn:
        return conn.execute(select(effect).order_by(effect.c.id)).all()


def effect_count(db: mqueue.Database) -> int:
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(effect)).scalar_one()


def lock_job_row_nowait(db: mqueue.Database, job_id: int) -> bool:
    """True if nobody holds a lock that would make other workers skip or wait on the job.

    SQLite: the database-wide write lock is free.  Servers: the job's row can
    be locked at once (the rescue's SKIP LOCKED would otherwise skip it).
    """
    if db.engine.dialect.name == "sqlite":
        return sqlite_write_lock_free(db.engine.url.database)
    from sqlalchemy.exc import DBAPIError
    try:
        with db.engine.connect() as conn:
            with conn.begin():
                conn.execute(select(task_table.c.id).where(task_table.c.id == job_id)
                             .with_for_update(nowait=True))
                conn.rollback()
        return True
    except DBAPIError:
        return False


# -- processes -------------------------------------------------------------------


class Daemon:
    """One ``python -m mqueue start`` process; stdout/stderr go to files."""

    def __init__(self, tasks: Tasks, url: str, queues=("default",), *, concurrency: int = 1,
                 processes: int = 1, lease: float | None = 2.0, poll_interval: float = 0.05,
                 grace: float | None = None, name: str = "daemon", extra: list[str] | None = None) -> None:
        self.tasks = tasks
        self.name = name
        self.out_path = tasks.root / f"{name}.out"
        self.err_path = tasks.root / f"{name}.err"
        argv = [sys.executable, "-m", "mqueue", "start", *queues, "--database", url,
                "--tasks", getattr(tasks, "package", TASKS_PACKAGE), "--concurrency", str(concurrency), "--processes", str(processes),
                "--poll-interval", str(poll_interval)]
        if lease is not None:  # None: the shared setting heartbeat decides
            argv += ["--lease", str(lease)]
        if grace is not None:
            argv += ["--grace", str(grace)]
        argv += extra or []
        env = python_env(tasks.env())
        env["PYTHONPATH"] = os.pathsep.join([str(tasks.root), env["PYTHONPATH"]])
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=str(tasks.root), env=env, stdout=self._out, stderr=self._err)
        self.pid = self.proc.pid

    def __repr__(self) -> str:
        return f"<Daemon {self.name} pid={self.pid} rc={self.proc.poll()}>"

    # -- output
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def serving(self, pid: int | None = None) -> bool:
        """The worker process (``pid``, default this one) has logged that it serves its queues."""
        pid = self.pid if pid is None else pid
        return any(f":{pid}:" in line and " serving " in line for line in self.stderr().splitlines())

    def wait_serving(self, timeout: float = 20.0, pid: int | None = None) -> None:
        wait_for(lambda: self.serving(pid) or self.proc.poll() is not None, timeout=timeout,
                 message=lambda: f"{self} did not start serving:\n{self.stderr()[-3000:]}")
        assert self.proc.poll() is None, f"{self} exited at start:\n{self.stderr()[-3000:]}"

    # -- signals and exit
    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self} still running after {timeout:g}s:\n{self.stderr()[-3000:]}") from None

    def children(self) -> list[int]:
        return child_pids(self.pid)

    def close(self) -> None:
        """Kill this daemon and any worker process it started (test clean-up)."""
        kids = self.children()
        if self.proc.poll() is None:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(self.pid, signum)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)
        for pid in kids:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        self._out.close()
        self._err.close()


def child_pids(parent: int) -> list[int]:
    """Live child processes of ``parent`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            kids.append(int(entry))
    return sorted(kids)


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state (R, S, T, Z...) or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state != "Z"


class Daemons:
    """Starts daemons for one test and kills whatever is left at its end."""

    def __init__(self, tasks: Tasks, url: str) -> None:
        self.tasks = tasks
        self.url = url
        self.started: list[Daemon] = []

    def start(self, queues=("default",), **options) -> Daemon:
        options.setdefault("name", f"daemon{len(self.started)}")
        daemon = Daemon(self.tasks, options.pop("url", self.url), queues, **options)
        self.started.append(daemon)
        return daemon

    def by_pid(self, pid: int) -> Daemon:
        return next(d for d in self.started if d.pid == pid)

    def close(self) -> None:
        for daemon in self.started:
            daemon.close()

    def output(self) -> str:
        return "\n".join(f"--- {d.name} (pid {d.pid}, rc {d.proc.poll()}):\n{d.stderr()[-4000:]}"
                         for d in self.started)


def first_start(tasks: Tasks, job_id: int, timeout: float = 20.0, daemons: Daemons | None = None):
    """Wait for the first run of ``job_id`` to start; return its log entry."""
    return wait_for(lambda: next((r for r in tasks.executions() if r[0] == job_id), None), timeout=timeout,
                    message=lambda: f"job {job_id} never started\n{daemons.output() if daemons else ''}")


def stopped(pid: int) -> bool:
    return process_state(pid) == "T"


def pause(daemon, db, job_id, attempts=30) -> None:
    """SIGSTOP ``daemon`` at a moment it holds no database lock others need.

    A worker stopped inside one of its few-millisecond transactions (a claim
    or heartbeat) would keep its locks while stopped, which is a different
    test; retry the stop until it lands between transactions.
    """
    for _ in range(attempts):
        daemon.send(signal.SIGSTOP)
        wait_for(lambda: stopped(daemon.pid), timeout=5)
        if lock_job_row_nowait(db, job_id):
            return
        daemon.send(signal.SIGCONT)
        wait_for(lambda: not stopped(daemon.pid), timeout=5)
        time.sleep(random.uniform(0.0, 0.02))  # land elsewhere in the worker's cycle next time
    raise AssertionError(f"could not pause {daemon} outside a transaction in {attempts} attempts")
