"""``@task``: the process-wide registry of tasks by name, and enqueueing.

A worker only ever runs a function found here under the row's name; a row
never names a module to import.  ``discover(package)`` imports every module
under the tasks package so their decorators run.
"""

from __future__ import annotations

import datetime as dt
import difflib
import importlib
import inspect
import numbers
import pkgutil
import threading
from typing import Any, Callable, Generic, Iterable, ParamSpec, Sequence, TypeVar

from sqlalchemy.exc import DBAPIError

from . import wakeup
from .config import settings
from .dialects.base import DEFAULT_MAX_RETRIES  # one default, also used in SQL by rescue
from .dialects.functions import utc_now
from .encoding import encode_args
from .errors import DuplicateTaskError, NoSessionError, UnknownTaskError
from .middleware import check_middleware
from .retry import Backoff, check_backoff
from .schema import WAITING
from .session import peek_session, translate_error

P = ParamSpec("P")
R = TypeVar("R")

MAX_NAME_LENGTH = 255   # width of mqueue_task.name
MAX_QUEUE_LENGTH = 100  # width of mqueue_task.queue
ENQUEUE_OPTIONS = ("delay", "eta", "priority", "queue", "max_retries", "unique_key", "tags", "track", "depends_on",
                   "expires")
MAX_TAG_LENGTH = 100    # width of mqueue_tag.tag
MAX_TAGS = 50           # tags per job

_registry: dict[str, "Task"] = {}
_registry_lock = threading.Lock()


class Task(Generic[P, R]):
    """A registered function.  Call it to run it here; ``enqueue`` it to run it in a worker."""

    def __init__(self, fn: Callable[P, R], name: str, queue: str | None, priority: int,
                 max_retries: int, backoff: Backoff, timeout: float | None,
                 expires: float | None = None, middleware: Sequence[Callable] = ()) -> None:
        self.fn = fn
        #: Seconds after enqueueing past which a job not started yet is never run (``expired``).
        self.expires = expires
        #: ``fn(job, call_next)`` around each run, inside the process-wide ones (``middleware.py``).
        self.middleware = tuple(middleware)
        self.name = name
        self.queue = queue
        self.priority = priority
        self.max_retries = max_retries
        self.backoff = backoff
        self.timeout = timeout
        self.signature = inspect.signature(fn)
        params = self.signature.parameters.values()
        # Keyword calls of a plain signature are checked with two set tests
        # instead of Signature.bind (which was half of enqueue_many's time).
        self._plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self._names = frozenset(p.name for p in params)
        self._required = frozenset(p.name for p in params if p.default is p.empty)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = getattr(fn, "__module__", None)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<mqueue task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(self, **options: Any) -> "TaskCall":
        """Per-call options: ``delay, eta, priority, queue, max_retries, unique_key, tags, track``,
        ``depends_on`` (job ids that must succeed first) and ``expires`` (seconds, a timedelta or a
        datetime: a job not started by then is never run).

        e.g.::

            mail.options(delay=30, priority=5).enqueue(to="a@example.com")
        """
        return TaskCall(self, _check_options(options))

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> int:
        """Store a job for a worker; return its id.  Commits with the current session."""
        return TaskCall(self, {}).enqueue(*args, **kwargs)

    def enqueue_many(self, calls: Iterable[dict[str, Any]]) -> list[int]:
        """Store one job per dict of keyword arguments in one batch; return the ids."""
        return TaskCall(self, {}).enqueue_many(calls)

    # -- used by the worker ------------------------------------------------
    def bind_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Named arguments for storage; TypeError on a signature mismatch."""
        if not args and self._plain and self._required <= kwargs.keys() <= self._names:
            return dict(kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self.name}: {self._mismatch(kwargs, error)}") from None
        named = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            named[name] = list(value) if kind is inspect.Parameter.VAR_POSITIONAL else value
        return named

    def _mismatch(self, kwargs: dict, error: TypeError) -> str:
        """``Signature.bind``'s complaint, naming every unexpected keyword first, with a "did you mean".

        ``bind`` reports only its first problem: ``welcome(uid=1)`` for
        ``welcome(user_id)`` says "missing a required argument: 'user_id'"
        and never names ``uid``, the actual mistake.
        """
        params = self.signature.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return str(error)
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unused = [name for name in accepted if name not in kwargs]
        problems = []
        for name in kwargs:
            if name not in accepted:
                hint = difflib.get_close_matches(name, unused, n=1, cutoff=0.5)
                problems.append(f"got an unexpected keyword argument {name!r}"
                                + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if "unexpected keyword argument" not in str(error):
            problems.append(str(error))
        return "; ".join(problems)

    def call_arguments(self, named: dict[str, Any]) -> tuple[list, dict]:
        """Rebuild ``(args, kwargs)`` from stored named arguments, checking the signature."""
        args: list = []
        kwargs: dict = {}
        positional = True
        for name, param in self.signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(named.get(name, ()))
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(named.get(name, {}))
            elif name not in named:
                if positional and param.kind is not inspect.Parameter.KEYWORD_ONLY \
                        and param.default is not inspect.Parameter.empty:
                    args.append(param.default)  # keeps later positional values in their places
                else:
                    positional = False
            elif param.kind is inspect.Parameter.POSITIONAL_ONLY or (
                    positional and param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD):
                args.append(named[name])
            else:
                kwargs[name] = named[name]
        known = set(self.signature.parameters)
        extra = [k for k in named if k not in known]
        if extra and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self.signature.parameters.values()):
            raise TypeError(f"{self.name}: unexpected argument(s) {', '.join(map(repr, extra))}")
        kwargs.update((k, named[k]) for k in extra)  # **kwargs given flat, e.g. in a row inserted by hand
        self.signature.bind(*args, **kwargs)  # raises TypeError naming what is missing
        return args, kwargs


class TaskCall:
    """A task with per-call options, made by ``Task.options(...)``."""

    def __init__(self, task: Task, options: dict[str, Any]) -> None:
        self.task = task
        self.opts = options

    def enqueue(self, *args: Any, **kwargs: Any) -> int:
        row = self._row(self.task.bind_arguments(args, kwargs))
        return _store(lambda session: insert_row(session, row), row["queue"])

    def enqueue_many(self, calls: Iterable[dict[str, Any]]) -> list[int]:
        rows = []
        for number, call in enumerate(calls):
            if not isinstance(call, dict):
                raise TypeError(f"{self.task.name}.enqueue_many: item {number} must be a dict of "
                                f"keyword arguments, got {type(call).__name__}")
            rows.append(self._row(self.task.bind_arguments((), call)))
        if not rows:
            return []
        if self.opts.get("unique_key") is not None:
            raise ValueError("unique_key applies to one job; use enqueue() for each")
        if self.opts.get("depends_on"):
            raise ValueError("depends_on applies to one job; use enqueue() for each")
        return _store(lambda session: _insert_many(session, rows), rows[0]["queue"])

    def _row(self, named: dict[str, Any]) -> dict[str, Any]:
        opts = self.opts
        row = {
            "queue": opts.get("queue") or self.task.queue or settings.queue,
            "name": self.task.name,
            "args": encode_args(named, self.task.name),
            "priority": opts.get("priority", self.task.priority),
            "max_retries": opts.get("max_retries", self.task.max_retries),
        }
        if opts.get("unique_key") is not None:
            row["unique_key"] = opts["unique_key"]
        if opts.get("track"):
            row["tracked"] = 1
        if opts.get("tags"):
            row["tags"] = opts["tags"]
        if opts.get("eta") is not None:
            row["eta"] = opts["eta"]
        elif opts.get("delay") is not None:
            row["delay"] = opts["delay"]
        expires = opts.get("expires", self.task.expires)
        if isinstance(expires, dt.datetime):
            row["expires_at"] = expires
        elif expires is not None:
            row["expires"] = expires
        if opts.get("depends_on"):
            row["depends_on"] = opts["depends_on"]
        return row


def insert_row(session, row: dict[str, Any]) -> int:
    """Insert one job from its row values plus ``delay``, ``expires``, ``tags``, ``depends_on``; its id
    (an existing one's for a ``unique_key`` a live job holds)."""
    from .dialects import dialect_for
    values = dict(row)
    delay = values.pop("delay", None)
    if delay is not None:
        values["eta"] = utc_now(delay)
    expires = values.pop("expires", None)
    if expires is not None:
        values["expires_at"] = utc_now(expires)
    dialect = dialect_for(session)
    tags = values.pop("tags", ())
    depends_on = values.pop("depends_on", ())
    waits_for = dialect.lock_dependencies(session, depends_on) if depends_on else []
    if waits_for:
        values.update(state=WAITING, pending_deps=len(waits_for))
    if "unique_key" in values:
        job_id, created = dialect.insert_unique_job(session, values)
    else:
        job_id, created = dialect.insert_job(session, values), True
    if created:
        if waits_for:
            dialect.add_dependencies(session, job_id, waits_for)
        _put(dialect, session, [job_id], tags, values.get("tracked", False))
    return job_id


def _put(dialect, session, job_ids: list[int], tags: Sequence[str], tracked: bool) -> None:
    """What a new job has besides its row: tags, a tracked job's ``put`` event.  Nothing for a plain job."""
    if tags:
        dialect.add_tags(session, [(job_id, tag) for job_id in job_ids for tag in tags])
    if tracked:
        dialect.emit_tracked(session, job_ids, "put")


def _insert_many(session, rows: list[dict[str, Any]]) -> list[int]:
    from .dialects import dialect_for
    dialect = dialect_for(session)
    if any("delay" in row or "expires" in row for row in rows):
        now = dialect.db_now(session)
        for row in rows:
            if "delay" in row:
                row["eta"] = now + dt.timedelta(seconds=row.pop("delay"))
            if "expires" in row:
                row["expires_at"] = now + dt.timedelta(seconds=row.pop("expires"))
    # executemany needs one key set for every row
    keys = set().union(*rows)
    if "eta" in keys:
        default_now = dialect.db_now(session)
        for row in rows:
            row.setdefault("eta", default_now)
    tags = [row.pop("tags", ()) for row in rows][0]  # one TaskCall: the same options for every row
    job_ids = dialect.insert_jobs(session, rows)
    _put(dialect, session, job_ids, tags, rows[0].get("tracked", False))
    return job_ids


def _store(write: Callable, queue: str):
    """Run ``write(session)`` in the current session, else in the default database."""
    session = peek_session()
    if session is not None:
        result = _translated(session, write)
        wakeup.notify_after_commit(session, queue)
        return result
    database = settings.database
    if database is None:
        raise NoSessionError(
            "enqueue needs a session: use 'with db.session():', 'with mqueue.use_session(session):' "
            "or mqueue.init(queue, database=url) for enqueues outside a session")
    with database.session() as session:
        result = _translated(session, write)
        wakeup.notify_after_commit(session, queue)
    return result


def _translated(session, write: Callable):
    try:
        return write(session)
    except DBAPIError as error:
        translated = translate_error(session, error)
        if translated is error:
            raise
        raise translated from None


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    for key in options:
        if key not in ENQUEUE_OPTIONS:
            hint = difflib.get_close_matches(key, ENQUEUE_OPTIONS, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise TypeError(f"unknown enqueue option {key!r}{suggestion}; "
                            f"options are {', '.join(ENQUEUE_OPTIONS)}")
    out = dict(options)
    if out.get("delay") is not None:
        delay = out["delay"]
        if isinstance(delay, dt.timedelta):
            delay = delay.total_seconds()
        if not isinstance(delay, numbers.Real) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"delay must be seconds >= 0 or a timedelta, got {options['delay']!r}")
        out["delay"] = float(delay)
    if out.get("eta") is not None:
        out["eta"] = to_naive_utc(out["eta"])
    if out.get("delay") is not None and out.get("eta") is not None:
        raise ValueError("give delay or eta, not both")
    if "priority" in out:
        _check_int("priority", out["priority"])
    if "max_retries" in out:
        _check_int("max_retries", out["max_retries"], minimum=0)
    if out.get("queue") is not None:
        check_queue_name(out["queue"])
    if out.get("unique_key") is not None and (not isinstance(out["unique_key"], str)
                                              or not 0 < len(out["unique_key"]) <= 255):
        raise ValueError(f"unique_key must be a string of 1 to 255 characters, got {out['unique_key']!r}")
    if out.get("tags") is not None:
        out["tags"] = check_tags(out["tags"])
    if "track" in out and not isinstance(out["track"], bool):
        raise ValueError(f"track must be True or False, got {out['track']!r}")
    if out.get("depends_on") is not None:
        out["depends_on"] = check_job_ids(out["depends_on"])
    if out.get("expires") is not None:
        out["expires"] = check_expires(out["expires"], datetime_ok=True)
    return out


def check_job_ids(ids: Any) -> tuple[int, ...]:
    """``depends_on``: a list of job ids (integers), sorted without repeats."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"depends_on must be a list of job ids, got {ids!r}")
    ids = list(ids)
    for job_id in ids:
        if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id < 1:
            raise ValueError(f"depends_on must be a list of job ids (integers >= 1), got {job_id!r} in it")
    return tuple(sorted(set(ids)))


def check_expires(expires: Any, datetime_ok: bool = False) -> "float | dt.datetime":
    """``expires``: seconds > 0 from enqueueing (or a timedelta); per call also a datetime (naive: UTC)."""
    if datetime_ok and isinstance(expires, dt.datetime):
        return to_naive_utc(expires)
    seconds = expires.total_seconds() if isinstance(expires, dt.timedelta) else expires
    if not isinstance(seconds, numbers.Real) or isinstance(seconds, bool) or not 0 < seconds < float("inf"):
        also = ", a timedelta or a datetime" if datetime_ok else " or a timedelta"
        raise ValueError(f"expires must be seconds > 0{also}, got {expires!r}")
    return float(seconds)


def check_tags(tags: Any, already: int = 0) -> tuple[str, ...]:
    """Tags as a sorted tuple without repeats; ``ValueError`` unless each is a string of 1 to
    ``MAX_TAG_LENGTH`` characters and there are at most ``MAX_TAGS`` (with ``already`` on the job)."""
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise ValueError(f"tags must be a list of strings, got {tags!r}")
    tags = list(tags)
    for tag in tags:
        if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG_LENGTH:
            shown = tag if not isinstance(tag, str) or len(tag) <= 40 else tag[:37] + "..."
            raise ValueError(f"a tag must be a string of 1 to {MAX_TAG_LENGTH} characters, got {shown!r}")
        if tag != tag.strip():  # MySQL compares 'a ' equal to 'a': refused rather than merged
            raise ValueError(f"a tag must not start or end with white space, got {tag!r}")
    unique = tuple(sorted(set(tags)))
    if already + len(unique) > MAX_TAGS:
        raise ValueError(f"a job has at most {MAX_TAGS} tags, got {already + len(unique)}")
    return unique


def check_queue_name(queue: Any) -> str:
    """Queue names are 1 to 100 characters (the width of ``mqueue_task.queue``)."""
    if not isinstance(queue, str) or not 0 < len(queue) <= MAX_QUEUE_LENGTH:
        raise ValueError(f"queue must be a string of 1 to {MAX_QUEUE_LENGTH} characters, got {queue!r}")
    return queue


def to_naive_utc(value: dt.datetime) -> dt.datetime:
    """An aware datetime converted to UTC, or a naive one taken as UTC already."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"eta must be a datetime, got {type(value).__name__}")
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _check_int(name: str, value: Any, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")


def task(fn: Callable | None = None, *, name: str | None = None, queue: str | None = None,
         priority: int = 0, max_retries: int = DEFAULT_MAX_RETRIES, backoff: Backoff = None,
         timeout: float | None = None, expires: "float | dt.timedelta | None" = None,
         middleware: Sequence[Callable] = ()):
    """Register a function as a task, by default named ``module.qualname``.

    e.g.::

        @mqueue.task
        def mail(to: str) -> None: ...

        @mqueue.task(queue="reports", max_retries=3, backoff=[10, 60], timeout=300)
        def report(day: datetime.date) -> None: ...

    ``middleware``: functions ``fn(job, call_next)`` around each run of
    this task, inside those of ``mqueue.add_middleware`` (``middleware.py``).

    An ``async def`` task runs to completion on an event loop in the worker's
    thread (with the job's synchronous session); generator functions are
    refused here, since nothing would ever iterate them.
    """
    _check_int("priority", priority)
    _check_int("max_retries", max_retries, minimum=0)
    backoff = check_backoff(backoff)
    if timeout is not None and (not isinstance(timeout, numbers.Real) or isinstance(timeout, bool)
                                or not timeout > 0):  # also refuses NaN
        raise ValueError(f"timeout must be seconds > 0, got {timeout!r}")
    if queue is not None:
        check_queue_name(queue)
    if expires is not None:
        expires = check_expires(expires)
    middleware = check_middleware(middleware)

    def register(function: Callable) -> Task:
        if isinstance(function, Task):
            function = function.fn
        task_name = name or f"{function.__module__}.{function.__qualname__}"
        if not isinstance(task_name, str) or not 0 < len(task_name) <= MAX_NAME_LENGTH:
            raise ValueError(f"task name must be a string of 1 to {MAX_NAME_LENGTH} characters, got {task_name!r}")
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            # A worker would create the generator and never iterate it: the body would never run.
            raise TypeError(f"task {task_name!r} is a generator function, which a worker cannot run; "
                            f"return instead of yield (enqueue one job per item if need be)")
        registered = Task(function, task_name, queue, priority, max_retries, backoff, timeout, expires, middleware)
        _add(registered)
        return registered

    return register(fn) if fn is not None else register


def _add(new: Task) -> None:
    with _registry_lock:
        old = _registry.get(new.name)
        if old is not None and not _same_definition(old.fn, new.fn):
            raise DuplicateTaskError(
                f"task name {new.name!r} is already registered by {old.fn.__module__}.{old.fn.__qualname__}; "
                f"give one of them another name=")
        _registry[new.name] = new


def _same_definition(a: Callable, b: Callable) -> bool:
    """The same function re-imported (e.g. a module reloaded) may register again."""
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def get_task(name: str) -> Task:
    """The task registered under ``name``; UnknownTaskError (with a suggestion) otherwise."""
    try:
        return _registry[name]
    except KeyError:
        pass
    hint = difflib.get_close_matches(name, list(_registry), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise UnknownTaskError(f"unknown task {name!r}{suggestion}")


def registered_tasks() -> dict[str, Task]:
    return dict(_registry)


def unregister(name: str) -> None:
    """Remove a task (tests)."""
    with _registry_lock:
        _registry.pop(name, None)


def discover(package: str) -> list[str]:
    """Import ``package`` and every module under it; return the module names.

    An import error names the module and is not swallowed: a worker must
    not start with half its tasks missing.
    """
    try:
        root = importlib.import_module(package)
    except ModuleNotFoundError as error:
        if error.name and package.startswith(error.name):
            raise ModuleNotFoundError(
                f"tasks package {package!r} not found (run from the directory that contains it, "
                f"or pass --tasks PACKAGE)", name=error.name) from None
        raise
    imported = [package]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
    return imported
