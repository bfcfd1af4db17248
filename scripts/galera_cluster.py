"""A three-node MariaDB Galera cluster on loopback, for tests and ``scripts/bench.py``.

Each node is a ``mariadbd`` of the Debian packages (``mariadb-server``,
``galera-4``, ``rsync``) with its own data directory under one temporary
directory, its own client, group-communication, IST and SST ports, running
as ``user=mysql`` (rsync SST runs as that user).  The first node bootstraps
the cluster (``--wsrep-new-cluster``), the others join by SST.  Nothing of
the machine's own MariaDB (its port, datadir or settings) is touched.

Failure detection is shortened (``evs.suspect_timeout`` 2 s instead of 5 s):
a node killed with SIGKILL stalls commits on every node until the others
declare it gone, which with the defaults is about 6 s and with these about
3 s.  A worker's lease must outlast that stall plus one heartbeat interval
(see README "Running on a Galera cluster").

e.g.::

    with GaleraCluster() as cluster:          # started, then torn down
        cluster.urls[0]                       # SQLAlchemy URL of node 1's database
        cluster.kill(2)                       # SIGKILL node 3 (index 2)
        cluster.restart(2)                    # recovered position, then IST
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from server_ports import port_free, port_open, unused_port

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
PROVIDER = "/usr/lib/galera/libgalera_smm.so"
DATABASE = "mqueue_galera"
NODES = 3
START_TIMEOUT = 90.0
#: Failure detection of the test cluster (Galera's defaults: PT5S, PT15S, PT1S, PT1S).
EVS_OPTIONS = ("evs.suspect_timeout=PT2S; evs.inactive_timeout=PT4S; evs.keepalive_period=PT0.5S; "
               "evs.inactive_check_period=PT0.5S; evs.install_timeout=PT4S")
#: Preferred ports (client, group communication, IST, SST) of node 1; nodes 2 and 3 add 1 and 2.
#: Below the ephemeral range (``server_ports``): no outgoing connection takes one while the cluster starts.
BASE_PORTS = (23306, 24567, 24577, 24587)


def missing_packages() -> list[str]:
    """Debian packages the cluster needs that are not installed."""
    wanted = {"mariadb-server": MARIADBD, "galera-4": PROVIDER, "rsync": "/usr/bin/rsync"}
    return [name for name, path in wanted.items() if not os.path.exists(path)]


def _wait(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Node:
    """One ``mariadbd`` of the cluster."""

    def __init__(self, cluster: "GaleraCluster", index: int, ports: tuple[int, int, int, int]) -> None:
        self.cluster = cluster
        self.index = index
        self.port, self.gcomm_port, self.ist_port, self.sst_port = ports
        self.root = cluster.root / f"node{index + 1}"
        self.datadir = self.root / "data"
        self.log_path = self.root / "mariadbd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return f"node{self.index + 1}"

    @property
    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{DATABASE}?charset=utf8mb4"

    def argv(self, *extra: str) -> list[str]:
        provider_options = (f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}; "
                            f"ist.recv_addr=127.0.0.1:{self.ist_port}; gcache.size=128M; {EVS_OPTIONS}")
        return [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
                "--bind-address=127.0.0.1", f"--socket={self.root / 'mysqld.sock'}",
                f"--pid-file={self.root / 'mysqld.pid'}", "--user=mysql", "--skip-name-resolve",
                f"--log-error={self.log_path}", "--binlog-format=ROW", "--default-storage-engine=InnoDB",
                "--innodb-autoinc-lock-mode=2", "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M", "--max-connections=400",
                "--innodb-lock-wait-timeout=10",
                "--wsrep-on=ON", f"--wsrep-provider={PROVIDER}",
                f"--wsrep-cluster-address={self.cluster.gcomm_address}", "--wsrep-cluster-name=mqueue_test",
                f"--wsrep-node-name={self.name}", f"--wsrep-node-address=127.0.0.1:{self.gcomm_port}",
                f"--wsrep-node-incoming-address=127.0.0.1:{self.port}",
                "--wsrep-sst-method=rsync", f"--wsrep-sst-receive-address=127.0.0.1:{self.sst_port}",
                f"--wsrep-provider-options={provider_options}", "--wsrep-slave-threads=2", *extra]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *extra: str) -> None:
        self.proc = subprocess.Popen(self.argv(*extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def recovered_position(self) -> str | None:
        """``uuid:seqno`` from ``--wsrep-recover`` after a crash (what lets the restart use IST)."""
        before = self.log_path.stat().st_size if self.log_path.exists() else 0
        subprocess.run(self.argv("--wsrep-recover"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, check=False)
        with open(self.log_path, "rb") as log:
            log.seek(before)
            text = log.read().decode(errors="replace")
        for line in reversed(text.splitlines()):
            if "Recovered position:" in line:
                return line.rsplit("Recovered position:", 1)[1].strip()
        return None

    def status(self, *names: str) -> dict[str, str]:
        import pymysql
        conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root", connect_timeout=2,
                               read_timeout=5, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep_%%'")
                values = dict(cur.fetchall())
        finally:
            conn.close()
        return {name: values.get(name, "") for name in names} if names else values

    def synced(self, size: int | None = None) -> bool:
        """Ready for application use (and in a cluster of ``size`` nodes)."""
        if not self.running() or not port_open(self.port):
            return False
        try:
            status = self.status("wsrep_ready", "wsrep_local_state_comment", "wsrep_cluster_size")
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return (status["wsrep_ready"] == "ON" and status["wsrep_local_state_comment"] == "Synced"
                and (size is None or status["wsrep_cluster_size"] == str(size)))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown, the others see the node vanish."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        _wait(lambda: not port_open(self.port), 30, f"{self.name} to stop listening")

    def stop(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class GaleraCluster:
    """Three nodes: ``start()`` bootstraps and joins them, ``destroy()`` kills them and removes the files."""

    def __init__(self, nodes: int = NODES) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mqueue-galera-"))
        ports = self._choose_ports(nodes)
        self.nodes = [Node(self, index, ports[index]) for index in range(nodes)]
        self.gcomm_address = "gcomm://" + ",".join(f"127.0.0.1:{node.gcomm_port}" for node in self.nodes)

    @staticmethod
    def _choose_ports(nodes: int) -> list[tuple[int, int, int, int]]:
        """The preferred ports when all are free (another cluster may hold them), else free ones."""
        preferred = [tuple(base + index for base in BASE_PORTS) for index in range(nodes)]
        if all(port_free(port) for ports in preferred for port in ports):
            return preferred
        chosen: list[int] = []
        while len(chosen) < nodes * len(BASE_PORTS):
            chosen.append(unused_port(avoid=set(chosen)))
        width = len(BASE_PORTS)
        return [tuple(chosen[index * width:(index + 1) * width]) for index in range(nodes)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def create_database(self, name: str) -> list[str]:
        """A new empty database (created on node 1, replicated); its URL on each node."""
        import pymysql
        conn = pymysql.connect(host="127.0.0.1", port=self.nodes[0].port, user="root", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
        return [node.url.replace(f"/{DATABASE}?", f"/{name}?") for node in self.nodes]

    def start(self) -> "GaleraCluster":
        missing = missing_packages()
        if missing:
            raise RuntimeError(f"a Galera cluster needs: {', '.join(missing)} (apt-get install -y {' '.join(missing)})")
        try:
            self.root.chmod(0o755)
            for node in self.nodes:
                node.datadir.mkdir(parents=True)
            subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={self.nodes[0].datadir}", "--user=mysql",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           check=True, capture_output=True, timeout=180)
            if os.geteuid() == 0:
                subprocess.run(["chown", "-R", "mysql:mysql", str(self.root)], check=True)
            first = self.nodes[0]
            first.start("--wsrep-new-cluster")
            self._wait_synced(first)
            import pymysql
            conn = pymysql.connect(host="127.0.0.1", port=first.port, user="root", autocommit=True)
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4")
            conn.close()
            for node in self.nodes[1:]:  # one at a time: an rsync donor serves one joiner
                node.start()
                self._wait_synced(node)
            _wait(lambda: all(node.synced(len(self.nodes)) for node in self.nodes), START_TIMEOUT,
                  "every node synced in one cluster")
        except BaseException:
            self.destroy()
            raise
        return self

    def _wait_synced(self, node: Node) -> None:
        try:
            _wait(lambda: node.synced() or not node.running(), START_TIMEOUT, f"{node.name} to sync")
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{node.log_tail()}") from None
        if not node.running():
            raise RuntimeError(f"{node.name} exited at start:\n{node.log_tail()}")

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int, wait: bool = True) -> None:
        """Start a killed node again from its recovered position, so it rejoins by IST."""
        node = self.nodes[index]
        position = node.recovered_position()
        node.start(*([f"--wsrep-start-position={position}"] if position else []))
        if wait:
            self._wait_synced(node)
            _wait(lambda: all(n.synced(len(self.nodes)) for n in self.nodes), START_TIMEOUT,
                  "every node synced in one cluster")

    def joined_by_ist(self, index: int) -> bool:
        """The node's log says its last join received an incremental state transfer (not a full SST)."""
        text = self.nodes[index].log_path.read_text(errors="replace")
        last_start = text.rfind("Recovered position")
        return "IST received" in text[last_start:] or "Receiving IST" in text[last_start:]

    def destroy(self) -> None:
        for node in self.nodes:
            try:
                if node.running():
                    node.proc.kill()
                    node.proc.wait(30)
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "GaleraCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.destroy()
