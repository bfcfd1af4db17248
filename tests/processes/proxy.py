"""A small TCP proxy on loopback for cutting a daemon's database connections.

    proxy = Proxy(("127.0.0.1", 3306)).start()
    url = ...port=proxy.port...
    proxy.reset()        # every open connection gets a TCP RST, both ways
    proxy.refuse()       # nothing listens: new connections are refused
    proxy.blackhole()    # bytes stop flowing (held, not lost); new connections hang
    proxy.passthrough()  # back to normal; held bytes flow on
    proxy.delay(0.2)     # every chunk waits 0.2 s before it is forwarded (a slow link)
    proxy.hold_commit(after=b"run_seconds=")
                         # the next COMMIT of a transaction that sent those bytes
                         # (mqueue's completion of a job) reaches the server, its reply is held, then both ends
                         # get a RST: the client cannot know whether it committed

One thread accepts; each connection has one thread pumping both directions.
Modes apply to connections already open as well as new ones.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

PASS, BLACKHOLE, REFUSE = "pass", "blackhole", "refuse"
_TICK = 0.02


def _abort(sock: socket.socket | None) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Pair:
    def __init__(self, proxy: "Proxy", client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.reset = threading.Event()
        self.done = threading.Event()
        self.saw_pattern = False

    def run(self) -> None:
        try:
            self._pump()
        except OSError:
            pass
        finally:
            if self.reset.is_set():
                _abort(self.client)
                _abort(self.upstream)
            else:
                for sock in (self.client, self.upstream):
                    if sock is not None:
                        sock.close()
            self.proxy._forget(self)
            self.done.set()

    def _pump(self) -> None:
        selector = None
        try:
            while not self.reset.is_set():
                if self.proxy.mode != PASS:
                    self.proxy._flowing.wait(_TICK)
                    continue
                if self.upstream is None:
                    self.upstream = socket.create_connection(self.proxy.target, timeout=5)
                    self.upstream.settimeout(None)
                    selector = selectors.DefaultSelector()
                    selector.register(self.client, selectors.EVENT_READ, self.upstream)
                    selector.register(self.upstream, selectors.EVENT_READ, self.client)
                for key, _ in selector.select(_TICK):
                    if self.reset.is_set() or self.proxy.mode != PASS:
                        break
                    data = key.fileobj.recv(65536)
                    if not data:
                        return  # one side closed: close both
                    if self.proxy.delay_seconds:
                        time.sleep(self.proxy.delay_seconds)
                    if key.fileobj is self.client and self._hold_this_commit(data):
                        key.data.sendall(data)  # the server gets the COMMIT...
                        self.reset.wait(self.proxy.hold_seconds)  # ...its reply never leaves here
                        self.reset.set()
                        return
                    key.data.sendall(data)
        finally:
            if selector is not None:
                selector.close()


    def _hold_this_commit(self, data: bytes) -> bool:
        pattern = self.proxy.hold_pattern
        if pattern is None:
            return False
        if pattern in data:
            self.saw_pattern = True
        if self.saw_pattern and _is_commit(data):
            self.saw_pattern = False
            return self.proxy._take_hold()
        return False


def _is_commit(data: bytes) -> bool:
    """A lone COMMIT statement: MySQL COM_QUERY (11 bytes) or a PostgreSQL Query message (12)."""
    return len(data) < 40 and b"COMMIT" in data.upper()


class Proxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.host = host
        self.port = 0
        self.mode = PASS
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.connections_made = 0
        self.delay_seconds = 0.0
        self.hold_pattern: bytes | None = None
        self.hold_seconds = 0.0
        self.holds_left = 0
        self.commits_held = 0

    # -- life cycle
    def start(self) -> "Proxy":
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self.reset()
        if self._thread is not None:
            self._thread.join(5)
        self._unlisten()

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- modes
    def passthrough(self) -> None:
        self.mode = PASS
        self._flowing.set()

    def blackhole(self) -> None:
        self._flowing.clear()
        self.mode = BLACKHOLE

    def refuse(self) -> None:
        """Stop listening (new connections get ECONNREFUSED); open ones are untouched."""
        self._flowing.clear()
        self.mode = REFUSE
        with self._lock:
            self._unlisten()

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` late (0 to stop)."""
        self.delay_seconds = float(seconds)

    def hold_commit(self, after: bytes = b"", count: int = 1, hold_seconds: float = 1.0) -> None:
        """Arm: the next ``count`` COMMITs, each of a transaction that sent ``after``
        (any transaction if empty), reach the server, their replies are held
        for ``hold_seconds``, then both ends of the connection get a RST."""
        with self._lock:
            self.hold_pattern = after if count > 0 else None
            self.holds_left = count
            self.hold_seconds = hold_seconds

    def _take_hold(self) -> bool:
        with self._lock:
            if self.holds_left <= 0:
                return False
            self.holds_left -= 1
            self.commits_held += 1
            if self.holds_left == 0:
                self.hold_pattern = None
            return True

    def reset(self) -> int:
        """RST every open connection, both ways; return how many there were."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.reset.set()
        for pair in pairs:
            pair.done.wait(5)
        return len(pairs)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    # -- internals
    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.settimeout(_TICK)
        self.port = sock.getsockname()[1]
        self._listener = sock

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                if self.mode == REFUSE:
                    listener = None
                else:
                    if self._listener is None:
                        self._listen()
                    listener = self._listener
            if listener is None:
                self._closed.wait(_TICK)
                continue
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            client.settimeout(None)
            pair = _Pair(self, client)
            with self._lock:
                self._pairs.add(pair)
                self.connections_made += 1
            threading.Thread(target=pair.run, name="proxy-pair", daemon=True).start()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)
