"""``--processes N``: one supervisor, N worker processes, each restarted if it dies.

Children are fresh interpreters (``python -m mqueue start ... --processes 1``)
rather than forks, so no pooled connection or lock is ever shared across a
``fork()``.  Each child gets its own session (process group): a Ctrl-C in the
terminal reaches the supervisor only, which forwards one SIGTERM to each
child.  A second signal kills the children at once.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("mqueue.supervisor")

#: Set in each child's environment.  A supervised worker treats every signal
#: after the first as a repeat (systemd's default KillMode signals the whole
#: control group, then the supervisor forwards its own): the supervisor, not
#: the child, decides when to kill at once.
SUPERVISED_ENV = "MQUEUE_SUPERVISED"

#: A child that dies sooner than this after starting is restarted with backoff.
FAST_DEATH_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 30.0


class Supervisor:
    def __init__(self, child_argv: list[str], processes: int) -> None:
        self.child_argv = child_argv
        self.processes = processes
        self.children: dict[int, subprocess.Popen] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.signals: list[int] = []

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda s, _f: self.signals.append(s))
        for slot in range(self.processes):
            self._spawn(slot)
        stopping = False
        while self.children:
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
                lived = time.monotonic() - self.started_at[slot]
                self.failures[slot] = self.failures.get(slot, 0) + 1 if lived < FAST_DEATH_SECONDS else 0
                delay = min(0.5 * 2 ** max(self.failures[slot] - 1, 0), MAX_RESTART_DELAY_SECONDS) \
                    if self.failures[slot] else 0.0
                log.warning("worker process %d exited with %s; restarting in %.1fs", child.pid, code, delay)
                self._sleep(delay)
                if not self.signals:
                    self._spawn(slot)
            time.sleep(0.05)
        return 0

    def _spawn(self, slot: int) -> None:
        env = dict(os.environ, **{SUPERVISED_ENV: "1"})
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
    """The command line of one child: the same arguments with ``--processes 1``."""
    return [sys.executable, "-m", "mqueue", *argv, "--processes", "1"]
