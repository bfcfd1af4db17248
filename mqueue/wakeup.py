"""Wake-ups: an idle worker starts a new job the moment its enqueuing transaction commits.

Polling stays the ground truth (a worker polls every ``--poll-interval``
whatever happens here); a wake-up only cuts the wait.  A lost or spurious
one costs at most a poll.

* In this process: ``notify_after_commit`` records the queue in the
  session; its ``after_commit`` sets the Events of this process's workers
  of that queue (never on rollback).
* PostgreSQL: the enqueuing transaction sends ``NOTIFY mqueue_jobs`` with
  the queue as payload (``insert_job`` in the INSERT statement itself, else
  ``notify_after_commit``).  PostgreSQL delivers it at commit and drops it
  on rollback.  Each worker process ``LISTEN``s on one connection of its own
  (``listen``), on every host.
* SQLite and MariaDB have no such channel.  After the commit, the
  enqueuing process sends one UDP datagram (the queue's name) on loopback
  to each worker process of that database on this host.  Workers register
  their port as a file ``<pid>-<port>`` in a directory per database under
  the temporary directory (``mqueue-wake-<uid>/<hash of the database>``,
  mode 0700).  An enqueue on another host gets no wake-up: its job starts
  at the next poll.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import weakref
from typing import Iterable

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from .errors import first_line

log = logging.getLogger("mqueue.wakeup")

#: PostgreSQL channel of new jobs; the payload is the queue's name.
JOBS_CHANNEL = "mqueue_jobs"
#: How long a listener waits in one call, so that ``release`` ends it soon.
LISTEN_SLICE_SECONDS = 0.5
#: After a broken PostgreSQL listening connection, before connecting again.
RECONNECT_SECONDS = 2.0
_INFO_KEY = "mqueue_wake_queues"
_ANNOUNCED_KEY = "mqueue_notified_queues"

_lock = threading.Lock()
_listeners: dict[str, set[threading.Event]] = {}


def subscribe(queues: Iterable[str], wake: threading.Event) -> None:
    with _lock:
        for queue in queues:
            _listeners.setdefault(queue, set()).add(wake)


def unsubscribe(queues: Iterable[str], wake: threading.Event) -> None:
    with _lock:
        for queue in queues:
            _listeners.get(queue, set()).discard(wake)


def notify(queues: Iterable[str]) -> None:
    """Wake this process's workers of ``queues``."""
    with _lock:
        events = {wake for queue in queues for wake in _listeners.get(queue, ())}
    for wake in events:
        wake.set()


# -- the enqueuing side ----------------------------------------------------------
def notify_after_commit(session: Session, queue: str) -> None:
    """Wake workers of ``queue`` once ``session`` commits (never on rollback).

    On PostgreSQL this sends the ``NOTIFY`` now, in the transaction, unless
    the INSERT already did (``mark_announced``).
    """
    session.info.setdefault(_INFO_KEY, set()).add(queue)
    announced = session.info.setdefault(_ANNOUNCED_KEY, set())
    if queue not in announced and _route(session).postgresql:
        session.execute(select(func.pg_notify(JOBS_CHANNEL, queue)))
        announced.add(queue)


def mark_announced(session: Session, queue: str) -> None:
    """The transaction of ``session`` has sent ``NOTIFY`` for ``queue`` already (in an INSERT)."""
    session.info.setdefault(_ANNOUNCED_KEY, set()).add(queue)


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    session.info.pop(_ANNOUNCED_KEY, None)
    queues = session.info.pop(_INFO_KEY, None)
    if queues:
        notify(queues)
        route = _route(session)
        if route.directory is not None:
            _send(route.directory, queues)


@event.listens_for(Session, "after_soft_rollback")
def _after_rollback(session: Session, _previous_transaction) -> None:
    if not session.in_transaction():
        session.info.pop(_INFO_KEY, None)
        session.info.pop(_ANNOUNCED_KEY, None)


class _Route:
    """How the workers of one engine's database are woken from here."""

    __slots__ = ("postgresql", "directory")

    def __init__(self, postgresql: bool, directory: str | None) -> None:
        self.postgresql = postgresql
        self.directory = directory


_NOWHERE = _Route(False, None)
_routes: "weakref.WeakKeyDictionary[object, _Route]" = weakref.WeakKeyDictionary()


def _route(session: Session) -> _Route:
    try:
        engine = session.get_bind().engine
    except Exception:  # noqa: BLE001 - unbound, or bound per mapper: this process's workers only
        return _NOWHERE
    route = _routes.get(engine)
    if route is None:
        from .dialects import dialect_for
        from .session import database_identity
        try:
            postgresql = dialect_for(engine).name == "postgresql"
        except ValueError:
            postgresql = False
        identity = None if postgresql else database_identity(engine)
        route = _Route(postgresql, None if identity is None else directory_for(identity))
        _routes[engine] = route
    return route


def directory_for(identity: tuple) -> str:
    """The directory where the workers of one database on this host register their ports."""
    digest = hashlib.sha256(repr(identity).encode()).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), f"mqueue-wake-{os.getuid()}", digest)


_sender: socket.socket | None = None


def _send(directory: str, queues: Iterable[str]) -> None:
    """One datagram per queue to each worker process registered in ``directory``; never raises."""
    global _sender
    try:
        names = os.listdir(directory)
    except OSError:
        return  # no worker of this database ever ran on this host
    if not names:
        return
    try:
        if _sender is None:
            _sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            _sender.setblocking(False)
        payloads = [queue.encode() for queue in queues]
        for name in names:
            pid, _, port = name.partition("-")
            if not _alive(int(pid)):   # killed before it could remove its registration
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
                continue
            for payload in payloads:
                _sender.sendto(payload, ("127.0.0.1", int(port)))
    except (OSError, ValueError):
        pass  # a full buffer or a stray file: that worker polls


# -- the worker side ---------------------------------------------------------------
class Listener:
    """One per process and database: turns PostgreSQL notifications or datagrams into ``notify``."""

    def __init__(self, db) -> None:
        self.db = db
        self.users = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._path: str | None = None
        self._connection = None

    def start(self) -> None:
        """Be ready to receive when this returns (LISTEN sent, or port registered)."""
        if self.db.dialect.name == "postgresql":
            self._listen()
            target = self._run_postgresql
        else:
            identity = self.db.dialect.database_identity(self.db.engine.url)
            if identity is None:
                return  # an in-memory database: only this process can enqueue into it
            if not self._register(directory_for(identity)):
                return
            target = self._run_datagrams
        self._thread = threading.Thread(target=target, name="mqueue-wakeup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._path is not None:
            with contextlib.suppress(Exception):
                os.unlink(self._path)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self._path))  # only if no other worker of it is registered
        if self._thread is not None:
            self._thread.join(LISTEN_SLICE_SECONDS * 4)
        for closeable in (self._socket, self._connection):
            if closeable is not None:
                with contextlib.suppress(Exception):
                    closeable.close()

    # PostgreSQL
    def _listen(self) -> None:
        raw = self.db.engine.raw_connection()
        connection = raw.driver_connection
        raw.detach()  # never back to the pool: it stays in LISTEN and autocommit
        connection.autocommit = True
        connection.execute(f"LISTEN {JOBS_CHANNEL}")
        self._connection = connection

    def _run_postgresql(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._connection is None:
                    self._listen()
                for note in self._connection.notifies(timeout=LISTEN_SLICE_SECONDS):
                    notify([note.payload])
                    if self._stopping.is_set():
                        break
            except Exception as error:  # noqa: BLE001 - a broken listener only loses speed: polling goes on
                log.info("wake-up listener lost its connection (%s); polling meanwhile", first_line(error))
                with contextlib.suppress(Exception):
                    self._connection.close()
                self._connection = None
                self._stopping.wait(RECONNECT_SECONDS)

    # SQLite, MariaDB
    def _register(self, directory: str) -> bool:
        sock = None
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            parent = os.path.dirname(directory)
            if os.stat(parent).st_uid != os.getuid():
                log.warning("%s belongs to another user: no wake-ups, polling only", parent)
                return False
            _forget_dead(directory)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(LISTEN_SLICE_SECONDS)
            path = os.path.join(directory, f"{os.getpid()}-{sock.getsockname()[1]}")
            try:
                open(path, "w").close()
            except FileNotFoundError:  # the last other worker removed the directory just now
                os.makedirs(directory, mode=0o700, exist_ok=True)
                open(path, "w").close()
        except OSError as error:
            log.warning("cannot register for wake-ups (%s): polling only", first_line(error))
            if sock is not None:
                sock.close()
            return False
        self._socket, self._path = sock, path
        return True

    def _run_datagrams(self) -> None:
        while not self._stopping.is_set():
            try:
                payload = self._socket.recv(512)
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(LISTEN_SLICE_SECONDS)
                continue
            notify([payload.decode(errors="replace")])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno != errno.ESRCH
    return True


def _forget_dead(directory: str) -> None:
    """Remove the registrations of processes that ended without removing theirs (killed)."""
    for name in os.listdir(directory):
        try:
            dead = not _alive(int(name.partition("-")[0]))
        except ValueError:
            continue
        if dead:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


_process_listeners: dict[tuple, Listener] = {}
#: Guards ``_process_listeners`` (not ``_lock``: starting a listener may wait for a connection).
_listeners_lock = threading.Lock()


def _forget_listeners_after_fork() -> None:
    """A forked child has none of its parent's listener threads: it starts its own."""
    _process_listeners.clear()


os.register_at_fork(after_in_child=_forget_listeners_after_fork)


def listen(db) -> tuple:
    """Start (or share) this process's listener for ``db``'s database; give the key to ``release``."""
    key = db.dialect.database_identity(db.engine.url) or (id(db),)
    with _listeners_lock:
        listener = _process_listeners.get(key)
        if listener is None:
            listener = _process_listeners[key] = Listener(db)
            try:
                listener.start()
            except Exception as error:  # noqa: BLE001 - no wake-ups, polling as before
                log.warning("wake-ups unavailable (%s): polling only", first_line(error))
        listener.users += 1
    return key


def release(key: tuple) -> None:
    """One user fewer; the last one stops the listener."""
    with _listeners_lock:
        listener = _process_listeners.get(key)
        if listener is None:
            return
        listener.users -= 1
        if listener.users > 0:
            return
        del _process_listeners[key]
    listener.stop()
