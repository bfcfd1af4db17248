"""Shell commands as jobs (``mqueue start QUEUE --exec COMMAND [ARG...]``, PerfectQueue's ``--exec``).

A ``ShellCommand`` stands in for the registered task of every row of an
exec worker's queues, so a run is completed, failed, retried, recorded in
history and events by the executor's usual code paths.  One run: the
operator's command (never anything from the row) started without a shell,
in a process group of its own, the row's stored args JSON on stdin, the job
id as last argument, ``MQUEUE_JOB_ID``, ``MQUEUE_QUEUE`` and
``MQUEUE_RETRIES`` in its environment.  Exit status 0 returns (the job
completes); any other status, or death by a signal, raises
``CommandFailed`` with the status and stderr's last 4 KiB, which becomes
the failed run's stored error.

The command enforces its own ``--timeout`` (not the Python ``timeout=``
interruption, which cannot reach another process): SIGTERM to the group,
again every ``kill_interval``, SIGKILL after three, until the whole group
is gone.  The same sequence ends children still running when the worker's
shutdown grace is over (``abort``), and their jobs are handed back.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Sequence

from .config import ENV_URL
from .dialects.base import ClaimedRow
from .errors import LeaseLostError
from .registry import DEFAULT_MAX_RETRIES

log = logging.getLogger("mqueue.shell")

DEFAULT_KILL_INTERVAL_SECONDS = 5.0
#: SIGTERMs sent to a command's process group before SIGKILL.
TERM_TRIES = 3
#: The stored error keeps this much of the end of the command's stderr.
STDERR_TAIL_BYTES = 4096
#: A stdout line longer than this is logged cut (one log line stays readable).
MAX_LOGGED_LINE = 4000
#: How often the running command is checked for exit, deadline, shutdown and lost lease.
POLL_SECONDS = 0.02
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class CommandFailed(Exception):
    """The command exited with a status other than 0, or was killed by a signal.

    ``str()`` is the one-line headline (log lines, ``mqueue list``);
    ``stored_error()`` adds stderr's tail above it, for the job's row.
    """

    def __init__(self, headline: str, stderr_tail: str = "") -> None:
        super().__init__(headline)
        self.stderr_tail = stderr_tail

    def stored_error(self) -> str:
        text = self.stderr_tail.rstrip("\n")
        return f"{text}\n{type(self).__name__}: {self}\n" if text else f"{type(self).__name__}: {self}\n"


class CommandTimeout(CommandFailed):
    """The command ran past ``--timeout`` and was stopped by the kill sequence."""


class HandBack(Exception):
    """The worker's shutdown grace ended while the command ran: it was stopped, the job goes back unrun."""


class ShellCommand:
    """The operator's command for every job of an exec worker; shared by its executor threads.

    e.g.::

        command = ShellCommand(["./report.sh", "--fast"], timeout_seconds=600)
        command.check()                      # one clear error now, before any job is claimed
        Worker(db, queues=["reports"], command=command).run()
    """

    def __init__(self, argv: Sequence[str], timeout_seconds: float | None = None,
                 kill_interval_seconds: float = DEFAULT_KILL_INTERVAL_SECONDS) -> None:
        if not argv:
            raise ValueError("--exec needs a COMMAND")
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout_seconds!r}")
        if kill_interval_seconds <= 0:
            raise ValueError(f"kill interval must be > 0 seconds, got {kill_interval_seconds!r}")
        self.argv = list(argv)
        self.timeout_seconds = timeout_seconds
        self.kill_interval_seconds = float(kill_interval_seconds)
        self.executable: str | None = None
        #: Set by the worker when its shutdown grace is over: running commands are stopped.
        self.abort = threading.Event()

    def __repr__(self) -> str:
        return f"<ShellCommand {self.argv!r}>"

    def check(self) -> str:
        """Resolve the program as ``execvp`` would; ValueError in one line if it cannot be run."""
        program = self.argv[0]
        if os.sep in program:
            path = os.path.abspath(program)
            if not os.path.exists(path):
                raise ValueError(f"--exec command {program!r} not found (a relative path starts from {os.getcwd()})")
            if os.path.isdir(path) or not os.access(path, os.X_OK):
                raise ValueError(f"--exec command {program!r} is not an executable file (chmod +x?)")
        else:
            path = shutil.which(program)
            if path is None:
                raise ValueError(f"--exec command {program!r} not found on PATH (give its path, e.g. ./{program})")
        self.executable = path
        return path

    def kill_seconds(self) -> float:
        """How long the kill sequence may take, SIGKILL and a margin included."""
        return TERM_TRIES * self.kill_interval_seconds + 2.0

    def task_for(self, running) -> "CommandTask":
        """What the executor runs for one claimed job, in place of ``get_task(row.name)``."""
        return CommandTask(self, running)

    # -- one run ---------------------------------------------------------------
    def run(self, running) -> None:
        """Run the command for the job held in ``running``; return on exit 0, else raise."""
        row: ClaimedRow = running.row
        if self.executable is None:
            self.check()
        env = child_environment(row)
        try:
            child = subprocess.Popen([*self.argv, str(row.id)], executable=self.executable, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, close_fds=True, preexec_fn=_die_with_parent)
        except OSError as error:
            raise CommandFailed(f"{self.argv[0]} could not be started: {error}") from None
        stderr_tail: collections.deque[bytes] = collections.deque()
        threads = [threading.Thread(target=_feed, args=(child.stdin, _args_bytes(row.args)), daemon=True),
                   threading.Thread(target=_log_lines, args=(child.stdout, row.id), daemon=True),
                   threading.Thread(target=_keep_tail, args=(child.stderr, stderr_tail), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            stopped = self._wait(child, running)
        except BaseException:  # never leave the command running behind a job this worker gives up
            _kill_group(child)
            raise
        pipes_deadline = time.monotonic() + 1.0  # a grandchild still holding the pipes must not hold the job
        for thread in threads[1:]:
            thread.join(max(0.0, pipes_deadline - time.monotonic()))
        tail = b"".join(stderr_tail)[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")
        if stopped == "abort":
            raise HandBack(f"{self.argv[0]} stopped at shutdown ({_status(child.returncode)})")
        if stopped == "lost":
            raise LeaseLostError(f"job {row.id} lease lost: {self.argv[0]} was stopped")
        if stopped == "timeout":
            raise CommandTimeout(f"{self.argv[0]} ran past its timeout of {self.timeout_seconds:g} s and was "
                                 f"stopped ({_status(child.returncode)})", tail)
        if child.returncode != 0:
            raise CommandFailed(f"{self.argv[0]} {_status(child.returncode)}", tail)

    def _wait(self, child: subprocess.Popen, running) -> str | None:
        """Wait for exit; on timeout, shutdown or a lost lease stop the group and say which."""
        deadline = None if self.timeout_seconds is None else time.monotonic() + self.timeout_seconds
        while True:
            try:
                child.wait(POLL_SECONDS)
                return None
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                reason = "timeout"
            elif self.abort.is_set():
                reason = "abort"
            elif running.lost:
                reason = "lost"
            else:
                continue
            why = {"timeout": f"past its timeout of {self.timeout_seconds}s", "abort": "the shutdown grace is over",
                   "lost": "the job's lease was lost"}[reason]
            log.warning("job=%s stopping %s (pid %d, %s): SIGTERM to its process group", running.row.id,
                        self.argv[0], child.pid, why)
            self._stop_group(child)
            return reason

    def _stop_group(self, child: subprocess.Popen) -> None:
        """SIGTERM the group every ``kill_interval``; SIGKILL after ``TERM_TRIES``; until none is left."""
        for attempt in range(TERM_TRIES + 1):
            signum = signal.SIGTERM if attempt < TERM_TRIES else signal.SIGKILL
            if signum == signal.SIGKILL:
                log.warning("%s (pid %d) still running after %d SIGTERMs: SIGKILL", self.argv[0], child.pid,
                            TERM_TRIES)
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:
                break
            until = time.monotonic() + (self.kill_interval_seconds if attempt < TERM_TRIES else 5.0)
            while time.monotonic() < until:
                child.poll()  # reaps the leader, so only live members keep the group
                if not _group_alive(child.pid):
                    break
                time.sleep(POLL_SECONDS)
            else:
                continue
            break
        child.wait()


class CommandTask:
    """A registered task's face for one run of the command (what the executor asks of a task)."""

    def __init__(self, command: ShellCommand, running) -> None:
        self.name = f"exec:{command.argv[0]}"
        self.max_retries = DEFAULT_MAX_RETRIES
        self.backoff = None
        self.timeout = None  # the command enforces its own, by signals (no interruption of this thread)
        self._command = command
        self._running = running

    def call_arguments(self, named: dict) -> tuple[list, dict]:
        return [], {}  # the args reach the command on stdin, as stored

    def fn(self) -> None:
        self._command.run(self._running)


def _args_bytes(args) -> bytes:
    if args is None:
        return b"{}"
    if isinstance(args, bytes):
        return args
    if isinstance(args, str):
        return args.encode("utf-8")
    import json
    return json.dumps(args).encode("utf-8")  # a driver that hands back a decoded JSON column


def _feed(pipe, data: bytes) -> None:
    """Write stdin from a thread of its own: a command that never reads it must not block the wait."""
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError):
        pass  # the command exited or closed stdin without reading it all
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _log_lines(pipe, job_id: int) -> None:
    """Each stdout line of the command becomes one log line of the worker, with the job id."""
    with pipe:
        for raw in iter(pipe.readline, b""):
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) > MAX_LOGGED_LINE:
                line = line[:MAX_LOGGED_LINE] + " [...]"
            log.info("job=%s stdout: %s", job_id, line)


def _keep_tail(pipe, tail: "collections.deque[bytes]") -> None:
    """Read stderr to its end, keeping only about its last ``STDERR_TAIL_BYTES``."""
    kept = 0
    with pipe:
        for chunk in iter(lambda: pipe.read1(65536), b""):
            tail.append(chunk)
            kept += len(chunk)
            while tail and kept - len(tail[0]) >= STDERR_TAIL_BYTES:
                kept -= len(tail.popleft())


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _group_alive(pgid: int) -> bool:
    """Some process of the group is alive (zombies waiting for init's reaping do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc: a zombie counts as alive, and only costs more signals
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):  # state, ppid, pgrp
                return True
    return False


def _status(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _load_prctl():
    """``prctl`` from libc, resolved once in the parent (the child after fork must not load anything)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl() if os.uname().sysname == "Linux" else None
_SIGKILL = ctypes.c_ulong(int(signal.SIGKILL))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the worker dies, even by SIGKILL (Linux).

    Without it a command outlives a killed worker and runs on next to its
    own rerun after the lease.  (The signal follows the thread that started
    the command: an executor thread, which lives until its command ended.)
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)


def child_environment(row: ClaimedRow) -> dict[str, str]:
    """The worker's environment for a command, without the database URL (it may hold a password,
    and a command needs none to do its job), plus the job's id, queue and retries."""
    env = {key: value for key, value in os.environ.items() if key != ENV_URL}
    env.update(MQUEUE_JOB_ID=str(row.id), MQUEUE_QUEUE=row.queue, MQUEUE_RETRIES=str(row.retries))
    return env
