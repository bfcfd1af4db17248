"""Private MariaDB and PostgreSQL servers for tests that stop or crash the server.

Each server lives in its own temporary directory on a free loopback port,
so a test may shut it down, SIGKILL it and start it again without touching
the machine's shared services.  Durability settings are relaxed
(``fsync=off``, ``innodb_flush_log_at_trx_commit=2``): that survives a
killed *process*, which is the crash these tests inject, not a power cut.

    server = private_server("postgresql", tmp_dir).start()
    server.url                  # SQLAlchemy URL of its empty database
    server.stop()               # clean shutdown
    server.crash()              # SIGKILL, no shutdown at all
    server.start()              # again, same port and data (crash recovery)
    server.destroy()            # kill and remove the directory
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import free_port
from server_ports import port_open

MARIADBD = "/usr/sbin/mariadbd"
MARIADB_INSTALL_DB = "/usr/bin/mariadb-install-db"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "mqueue_faults"
START_TIMEOUT = 60.0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class PrivateServer:
    """Base: a server process in ``root`` listening on ``port``."""

    backend = ""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()  # below the ephemeral range: free again when the server restarts
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    @property
    def url(self) -> str:
        raise NotImplementedError

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def crash(self) -> None:
        """SIGKILL the server: no shutdown, no flush beyond what the OS holds."""
        pid = self.server_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)
        _wait(lambda: not port_open(self.port), 30, f"{self.backend} to stop listening")

    def server_pid(self) -> int | None:
        return self.proc.pid if self.running() else None

    def destroy(self) -> None:
        if self.running():
            try:
                self.crash()
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()


class PrivateMariaDB(PrivateServer):
    backend = "mariadb"

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{DATABASE}?charset=utf8mb4"

    def _argv(self) -> list[str]:
        return [MARIADBD, "--no-defaults", f"--datadir={self.root / 'data'}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--socket={self.root / 'mysqld.sock'}",
                f"--pid-file={self.root / 'mysqld.pid'}", "--user=root", "--skip-grant-tables",
                "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=48M", "--innodb-flush-log-at-trx-commit=2",
                "--innodb-lock-wait-timeout=5", "--max-connections=300",
                f"--log-error={self.log_path}"]

    def start(self) -> "PrivateMariaDB":
        self.root.mkdir(parents=True, exist_ok=True)
        fresh = not (self.root / "data").exists()
        if fresh:
            subprocess.run([MARIADB_INSTALL_DB, "--no-defaults", f"--datadir={self.root / 'data'}",
                            "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"],
                           check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: port_open(self.port) or not self.running(), START_TIMEOUT, "mariadbd to listen")
        if not self.running():
            raise RuntimeError(f"mariadbd exited at start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
        if fresh:
            import pymysql
            conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4")
            conn.close()
        return self

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: mariadbd finishes its shutdown, then exits)."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        _wait(lambda: not port_open(self.port), 30, "mariadbd to stop listening")


class PrivatePostgreSQL(PrivateServer):
    """Runs as the ``postgres`` user (PostgreSQL refuses to run as root)."""

    backend = "postgresql"

    def __init__(self, root: Path) -> None:
        # The postgres user must reach the data directory: pytest's tmp_path
        # (mode 0700, owned by root) will not do, so use a directory of our own.
        super().__init__(Path(tempfile.mkdtemp(prefix="mqueue-pg-", dir=_world_readable_tmp())))
        self.log_path = self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _user(self) -> dict:
        return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    def start(self) -> "PrivatePostgreSQL":
        data = self.root / "data"
        fresh = not data.exists()
        if fresh:
            self.root.mkdir(parents=True, exist_ok=True)
            self.root.chmod(0o755)
            if os.geteuid() == 0:
                shutil.chown(self.root, "postgres", "postgres")
            subprocess.run([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                            "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120,
                           cwd=str(self.root), **self._user())
        # The postmaster is our own child (not daemonized by pg_ctl), so a
        # crashed one is reaped here and never lingers as a zombie that
        # makes the next start refuse its stale postmaster.pid.
        argv = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.root),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=300", "-c", "shared_buffers=32MB"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=str(self.root), **self._user())
        log.close()
        _wait(lambda: self._accepting() or not self.running(), START_TIMEOUT, "postgres to accept connections")
        if not self.running():
            raise RuntimeError(f"postgres exited at start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
        if fresh:
            import psycopg
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DATABASE}")
        return self

    def _accepting(self) -> bool:
        import psycopg
        try:
            psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                            connect_timeout=2).close()
            return True
        except psycopg.Error:
            return False

    def crash(self) -> None:
        """SIGKILL the postmaster and every backend of this instance at once."""
        if self.running():
            for victim in [self.proc.pid, *_children(self.proc.pid)]:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(30)
        _wait(lambda: not port_open(self.port), 30, "postgres to stop listening")

    def stop(self) -> None:
        """Clean shutdown (SIGINT is PostgreSQL's "fast" mode: sessions ended, data flushed)."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
        _wait(lambda: not port_open(self.port), 30, "postgres to stop listening")


def _world_readable_tmp() -> str:
    base = Path(tempfile.gettempdir())
    return str(base)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(parent: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                kids.append(int(entry))
    return kids


def private_server(backend: str, root: Path) -> PrivateServer:
    if backend == "mariadb":
        return PrivateMariaDB(root)
    if backend == "postgresql":
        return PrivatePostgreSQL(root)
    raise ValueError(f"no private server for {backend!r}")
