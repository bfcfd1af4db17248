"""``mqueue web``: the dashboard on ``wsgiref``, one thread per request.

A slow page (a large listing, a database waiting out a lock) must not hold
up the others, so requests run in daemon threads (``ThreadingMixIn``); the
``Database`` behind the dashboard is shared, its pool thread-safe.
"""

from __future__ import annotations

import logging
import signal
import socket
import socketserver
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server as _make_server

log = logging.getLogger("mqueue.web")


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class ThreadingWSGIServer6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class LoggingHandler(WSGIRequestHandler):
    """One log line per request through ``logging`` (wsgiref writes to stderr itself)."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)


def make_server(application, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A threaded ``wsgiref`` server bound to ``host:port`` (port 0: any free one); not started."""
    server_class = ThreadingWSGIServer6 if ":" in host else ThreadingWSGIServer
    return _make_server(host, port, application, server_class=server_class, handler_class=LoggingHandler)


def serve(database, host: str = "127.0.0.1", port: int = 8080, read_only: bool = False,
          password: str | None = None, ready=None) -> None:
    """Serve the dashboard of ``database`` until SIGTERM or Ctrl-C.

    ``ready(url)`` is called once the socket listens (the CLI prints it).
    """
    from .application import app
    server = make_server(app(database, read_only=read_only, password=password), host, port)

    def stop(signum, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        bound_host, bound_port = server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if ready is not None:
            ready(f"http://{shown}:{bound_port}/")
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
