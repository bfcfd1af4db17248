"""``--processes N``: one supervisor, N worker processes, each restarted if it dies.

Children are fresh interpreters (``python -m mqueue start ... --processes 1``)
rather than forks, so no pooled connection or lock is ever shared across a
``fork()``.  Each child gets its own session (process group): a Ctrl-C in the
terminal reaches the supervisor only, which forwards one SIGTERM to each
child.  A second signal kills the children at once.  SIGUSR2 (stop claiming,
log stacks) and SIGCONT (claim again) are passed on to every child as they are.

The database URL reaches a child through its environment, never its command
line (``ps`` shows command lines, with any password in them, to every user).
A child that exits with a status a restart cannot fix (bad usage, missing
tables) is not restarted: the supervisor stops the others and exits with it.
A child whose supervisor dies, however it died, stops on its own
(``follow_supervisor``): otherwise a restarted supervisor would run twice
the workers, next to orphans nobody can signal as a group.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Collection, Mapping

log = logging.getLogger("mqueue.supervisor")

#: Set in each child's environment.  A supervised worker treats every signal
#: after the first as a repeat (systemd's default KillMode signals the whole
#: control group, then the supervisor forwards its own): the supervisor, not
#: the child, decides when to kill at once.
SUPERVISED_ENV = "MQUEUE_SUPERVISED"
#: The supervisor's pid, in each child's environment: the child stops when its
#: parent is no longer that process.
SUPERVISOR_PID_ENV = "MQUEUE_SUPERVISOR_PID"

#: A child that dies sooner than this after starting is restarted with backoff.
FAST_DEATH_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 30.0
#: How often a child compares its parent with its supervisor, where no
#: parent-death signal exists (not Linux) or it was missed.
PARENT_CHECK_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Supervisor:
    """Run ``processes`` copies of ``child_argv`` with ``env`` added to their environment.

    A child exiting with one of ``final_exit_codes`` ends the supervisor,
    which then returns that code; any other exit is followed by a restart.
    """

    def __init__(self, child_argv: list[str], processes: int, env: Mapping[str, str] | None = None,
                 final_exit_codes: Collection[int] = ()) -> None:
        self.child_argv = child_argv
        self.processes = processes
        self.env = dict(env or {})
        self.final_exit_codes = frozenset(final_exit_codes)
        self.children: dict[int, subprocess.Popen] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.signals: list[int] = []
        #: SIGUSR2/SIGCONT received, to pass on to the children (recorded by the handler only).
        self.to_forward: list[int] = []

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, _f: self.signals.append(s))
        for signum in (signal.SIGUSR2, signal.SIGCONT):
            signal.signal(signum, lambda s, _f: self.to_forward.append(s))
        for slot in range(self.processes):
            self._spawn(slot)
        stopping = False
        exit_code = 0
        while self.children:
            while self.to_forward:
                signum = self.to_forward.pop(0)
                log.info("passing %s on to %d worker process(es)", signal.Signals(signum).name, len(self.children))
                self._forward(signum)
            if self.signals and not stopping:
                stopping = True
                self.signals.clear()
                log.info("supervisor stopping %d worker process(es)", len(self.children))
                self._forward(signal.SIGTERM)
            elif self.signals and stopping:
                log.warning("second signal: killing worker processes")
                self._forward(signal.SIGKILL)
                self.signals.clear()
            for slot, child in list(self.children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self.children[slot]
                if stopping:
                    continue
                if code in self.final_exit_codes:
                    log.error("worker process %d exited with status %d, which a restart does not fix: "
                              "stopping %d worker process(es)", child.pid, code, len(self.children))
                    stopping, exit_code = True, code
                    self._forward(signal.SIGTERM)
                    continue
                lived = time.monotonic() - self.started_at[slot]
                self.failures[slot] = self.failures.get(slot, 0) + 1 if lived < FAST_DEATH_SECONDS else 0
                delay = min(0.5 * 2 ** max(self.failures[slot] - 1, 0), MAX_RESTART_DELAY_SECONDS) \
                    if self.failures[slot] else 0.0
                log.warning("worker process %d exited with %s; restarting in %.1fs", child.pid, code, delay)
                self._sleep(delay)
                if not self.signals:
                    self._spawn(slot)
            time.sleep(0.05)
        return exit_code

    def _spawn(self, slot: int) -> None:
        env = dict(os.environ, **self.env, **{SUPERVISED_ENV: "1", SUPERVISOR_PID_ENV: str(os.getpid())})
        child = subprocess.Popen(self.child_argv, start_new_session=True, env=env)
        self.children[slot] = child
        self.started_at[slot] = time.monotonic()
        log.info("started worker process %d", child.pid)

    def _forward(self, signum: int) -> None:
        for child in self.children.values():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.signals:
            time.sleep(0.05)


def child_command(argv: list[str]) -> list[str]:
    """The command line of one child: this interpreter running ``python -m mqueue`` with ``argv``."""
    return [sys.executable, "-m", "mqueue", *argv]


def follow_supervisor() -> None:
    """In a worker process started by a supervisor: SIGTERM ourselves when the supervisor dies.

    The worker's usual SIGTERM handling then hands back its jobs and exits.
    Linux sends the signal itself (``PR_SET_PDEATHSIG``, at once); a thread
    that watches ``os.getppid()`` covers other systems and a supervisor that
    died before this call.  Outside a supervised process it does nothing.
    """
    supervisor = os.environ.pop(SUPERVISOR_PID_ENV, None)  # not for the task's own subprocesses
    if not supervisor or not supervisor.isdigit():
        return
    _set_parent_death_signal(signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(int(supervisor),), name="mqueue-supervisor-watch",
                     daemon=True).start()


def _watch_parent(supervisor: int) -> None:
    while os.getppid() == supervisor:
        time.sleep(PARENT_CHECK_SECONDS)
    log.warning("supervisor (pid %d) is gone: stopping", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` when our parent exits; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
