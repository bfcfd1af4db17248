"""Middleware: code of the application around every run of a task (qless, Dramatiq).

A middleware is ``fn(job, call_next)``: it runs before and after the task
by calling ``call_next()`` (which runs the task, or the next middleware)
and returns what that returned.  Process-wide ones (``add_middleware``)
wrap the task's own (``@task(middleware=[...])``), each list in its order,
the first outermost.  They run inside the job's session and where
``timeout=`` applies: their writes commit or roll back with the task's,
and an exception from one counts as the task's (retried with backoff).

e.g.::

    def timing(job, call_next):
        began = time.monotonic()
        try:
            return call_next()
        finally:
            log.info("job %s (%s, try %d) took %.3fs", job.id, job.name, job.retries + 1,
                     time.monotonic() - began)

    mqueue.add_middleware(timing)
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from .jobs import Job

#: ``fn(job, call_next) -> value``.
Middleware = Callable[[Job, Callable[[], Any]], Any]

_process_middleware: list[Middleware] = []
_lock = threading.Lock()


def add_middleware(fn: Middleware) -> Middleware:
    """Wrap every task run by this process with ``fn(job, call_next)``, inside those added before.

    Returns ``fn``, so it can be used as a decorator.
    """
    check_middleware([fn])
    with _lock:
        _process_middleware.append(fn)
    return fn


def remove_middleware(fn: Middleware) -> None:
    """Stop wrapping runs with ``fn`` (for tests and plug-ins that unload); ValueError if absent."""
    with _lock:
        _process_middleware.remove(fn)


def check_middleware(functions: Any) -> tuple[Middleware, ...]:
    """``functions`` as a tuple of callables; TypeError naming the first that is not one."""
    if callable(functions) or isinstance(functions, (str, bytes)):
        raise TypeError(f"middleware must be a list of functions fn(job, call_next), got {functions!r}")
    functions = tuple(functions)
    for fn in functions:
        if not callable(fn):
            raise TypeError(f"middleware must be functions fn(job, call_next), got {fn!r}")
    return functions


def run_wrapped(job: Job, run: Callable[[], Any], task_middleware: Sequence[Middleware] = ()) -> Any:
    """``run()`` inside the process-wide middleware, then ``task_middleware``; what the outermost returns."""
    with _lock:
        chain = (*_process_middleware, *task_middleware)
    if not chain:
        return run()

    def call(position: int) -> Any:
        if position == len(chain):
            return run()
        return chain[position](job, lambda: call(position + 1))

    return call(0)
