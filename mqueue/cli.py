"""``python -m mqueue``: argparse in, one call into mqueue, plain text out.

Every command goes through ``main``, which catches once: a known error
becomes one line on stderr and a named exit code; the traceback is shown
only with ``--log-level debug``.  The job commands (``enqueue``, ``list``,
``show``, ``cancel``, ``retry``, ``stats``, ``crons``) parse, call
``mqueue.admin`` and format; ``--json`` prints one JSON document instead.
No output shows a database password.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import sys
from typing import Any, Sequence

from sqlalchemy.exc import SQLAlchemyError

from . import config
from .errors import (AccessDeniedError, DatabaseUnavailableError, DatabaseURLError, InvalidStateError,
                     JobNotFoundError, MQueueError, SchemaMissingError, UnknownTaskError, first_line, headline)
from .events import KINDS as EVENT_KINDS
from .registry import MAX_TAG_LENGTH
from .schema import STATES
from .session import Database, safe_url
from .worker import DEFAULT_GRACE_SECONDS, DEFAULT_LEASE_SECONDS, DEFAULT_POLL_SECONDS, LOG_FORMAT, ORDERS, PRIORITY

EXIT_OK = 0
EXIT_ERROR = 1        # anything else (e.g. the tasks package fails to import)
EXIT_USAGE = 2        # bad command line: option values, JSON arguments, unknown task name
EXIT_DATABASE = 3     # database unreachable, tables missing, or a database error
EXIT_NOT_FOUND = 4    # no job with that id
EXIT_STATE = 5        # the job's state forbids it (cancel or retry of a running job)


class UsageError(MQueueError, ValueError):
    """Bad input on the command line; exits with ``EXIT_USAGE``."""


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", metavar="URL",
                        help=f"database URL (default: ${config.ENV_URL}, else sqlite:///mqueue.db)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, type=str.lower,
                        help="logging level, in any case (default info; debug also shows tracebacks)")
    parser = OneLineParser(prog="mqueue", description="A task queue in your SQL database.",
                           parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_subparser(common))
    commands.required = True

    start = commands.add_parser("start", help="run a worker daemon serving QUEUE(s), first named first served",
                                description="Run a worker until SIGTERM/SIGINT. SIGUSR2 stops claiming and logs "
                                            "every thread's stack; SIGCONT claims again (with --processes the "
                                            "supervisor passes both on to every worker process).")
    start.add_argument("queues", nargs="+", metavar="QUEUE")
    add_database_option(start)
    start.add_argument("--tasks", default=None, metavar="PACKAGE",
                       help="package whose modules are imported to register tasks (default: tasks)")
    start.add_argument("--concurrency", type=worker_count, default=1, help="threads per process (default 1)")
    start.add_argument("--processes", type=worker_count, default=1,
                       help="worker processes under one supervisor (default 1)")
    start.add_argument("--lease", type=positive_float, default=None, metavar="SECONDS",
                       help="lease of a claimed job, renewed by heartbeats, for every queue of this worker; "
                            "default: the shared settings heartbeat:QUEUE, else heartbeat (see: mqueue config), "
                            f"else {DEFAULT_LEASE_SECONDS:g}")
    start.add_argument("--order", choices=ORDERS, default=PRIORITY,
                       help="with several QUEUEs: priority (default) drains the first named first; "
                            "round-robin takes from them in turn")
    start.add_argument("--poll-interval", type=positive_float, default=DEFAULT_POLL_SECONDS,
                       metavar="SECONDS", help="longest wait between polls of an idle queue (default 0.1)")
    start.add_argument("--grace", type=non_negative_float, default=DEFAULT_GRACE_SECONDS, metavar="SECONDS",
                       help="time running jobs get to finish after SIGTERM (default 30)")
    start.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                       help="with --exec: a command running longer is stopped and its run counts as failed")
    start.add_argument("--kill-interval", type=positive_float, default=None, metavar="SECONDS",
                       help="with --exec: seconds between the SIGTERMs sent to a command's process group "
                            "to stop it; SIGKILL after three (default 5)")
    start.add_argument("--exec", nargs=argparse.REMAINDER, default=None, metavar="COMMAND",
                       help="last option, e.g. --exec -- ./report.sh --fast: run COMMAND [ARG...] for every job "
                            "instead of a Python task, the job's args JSON on stdin and its id as last argument; "
                            "nothing after --exec is read by mqueue")
    start.set_defaults(handler=cmd_start)

    migrate = commands.add_parser("migrate", help="create or upgrade mqueue's tables")
    add_database_option(migrate)
    migrate.add_argument("--print-location", action="store_true",
                         help="print the directory of mqueue's Alembic revisions (for an application's "
                              "version_locations) and exit without touching a database")
    migrate.set_defaults(handler=cmd_migrate)
    add_job_commands(commands)
    add_web_command(commands)
    return parser


def add_web_command(commands) -> None:
    """``mqueue web``: the dashboard (``mqueue.web``)."""
    web = commands.add_parser(
        "web", help="serve the web dashboard (queues, jobs, failures, stats, /metrics)",
        description="Serve the web dashboard until Ctrl-C or SIGTERM. It binds 127.0.0.1 unless --host says "
                    "otherwise; set MQUEUE_WEB_PASSWORD to ask every visitor for that password (HTTP basic "
                    "auth, any user name).")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=port_number, default=8080, help="TCP port (default 8080; 0: any free one)")
    web.add_argument("--read-only", action="store_true", help="show no forms and refuse every action")
    add_database_option(web)
    web.set_defaults(handler=cmd_web)


def cmd_web(args) -> int:
    """The dashboard until a signal; a database that is down meanwhile shows 503 pages, not an exit."""
    from .web import serve
    db = open_database(args)
    db.check_file()  # a SQLite file that does not exist is reported, not created empty
    logger = logging.getLogger("mqueue.web")

    def ready(url: str) -> None:
        logger.info("dashboard of %s on %s%s", db.safe_url, url, " (read-only)" if args.read_only else "")
    try:
        serve(db, args.host, args.port, read_only=args.read_only, ready=ready)
    finally:
        db.dispose()
    return EXIT_OK


def add_job_commands(commands) -> None:
    """The operator's commands over ``mqueue.admin``."""
    enqueue = commands.add_parser(
        "enqueue", help="store a job for task NAME and print its id",
        description="Store a job for task NAME and print only its id. ARGUMENTS is a JSON object of named "
                    "arguments; typed values use the stored form, e.g. "
                    '{"when": {"$type": "datetime", "$value": "2030-01-01T00:00:00"}}. '
                    "With --tasks, or when a 'tasks' package is importable from the current directory, "
                    "the name and arguments are checked against the registered task; otherwise the row "
                    "is stored unchecked, with a warning on stderr.")
    enqueue.add_argument("name", metavar="NAME", help="task name, e.g. tasks.mail")
    enqueue.add_argument("arguments", nargs="?", default="{}", metavar="ARGUMENTS",
                         help="JSON object of named arguments (default {})")
    enqueue.add_argument("--delay", type=non_negative_float, metavar="SECONDS",
                         help="run no earlier than SECONDS from now (database clock)")
    enqueue.add_argument("--priority", type=priority, metavar="N",
                         help="higher runs first (default: the task's, else 0)")
    enqueue.add_argument("--queue", type=queue_name, metavar="QUEUE",
                         help=f"queue (default: the task's, else {config.settings.queue!r})")
    enqueue.add_argument("--depends-on", type=job_id, action="append", metavar="ID",
                         help="wait (state waiting) until job ID has succeeded (repeatable)")
    enqueue.add_argument("--tasks", metavar="PACKAGE",
                         help="import PACKAGE to check the task (default: tasks, if found)")
    enqueue.set_defaults(handler=cmd_enqueue)

    jobs = commands.add_parser("list", help="list jobs: running, then queued in claim order, then failed",
                               description="List jobs: running first, then queued in the order workers claim "
                                           "them, then waiting, failed and finished ones. Finished jobs "
                                           "(--state succeeded, canceled or expired) come newest first and are "
                                           "kept for jobs-history (see: mqueue config).")
    jobs.add_argument("--queue", type=queue_name, metavar="QUEUE", help="only this queue")
    jobs.add_argument("--state", choices=STATES, help="only jobs in this state")
    jobs.add_argument("--tag", type=tag_text, metavar="TAG", help="only jobs with this tag, newest first")
    jobs.add_argument("--limit", type=job_limit, default=50, metavar="N", help="at most N jobs (default 50)")
    jobs.set_defaults(handler=cmd_list)

    show = commands.add_parser("show", help="everything about one job: times, runs, history, every error")
    show.add_argument("id", type=job_id, metavar="ID", help="job id (see: mqueue list)")
    show.set_defaults(handler=cmd_show)

    cancel = commands.add_parser("cancel", help="cancel a queued, waiting or failed job (not a running one); "
                                                "kept as canceled",
                                 usage="%(prog)s [-h] (ID [--cascade] | --all-failed [--queue QUEUE]) "
                                       "[--database URL]")
    cancel.add_argument("id", nargs="?", type=job_id, metavar="ID", help="the job to cancel")
    cancel.add_argument("--cascade", action="store_true",
                        help="also cancel the jobs waiting for it (depends_on), and theirs")
    cancel.add_argument("--all-failed", action="store_true",
                        help="cancel every failed job (of --queue, else all) that no job waits for")
    cancel.add_argument("--queue", type=queue_name, metavar="QUEUE", help="with --all-failed: only this queue")
    cancel.set_defaults(handler=cmd_cancel)

    move = commands.add_parser("move", help="move a job to another queue (a running one is taken from its "
                                            "worker and runs again there)")
    move.add_argument("id", type=job_id, metavar="ID", help="job id (see: mqueue list)")
    move.add_argument("queue", type=queue_name, metavar="QUEUE", help="the new queue")
    move.set_defaults(handler=cmd_move)

    prioritize = commands.add_parser("priority", help="set a waiting, queued or failed job's priority "
                                                      "(higher runs first)")
    prioritize.add_argument("id", type=job_id, metavar="ID", help="job id (see: mqueue list)")
    prioritize.add_argument("priority", type=priority, metavar="N", help="the new priority")
    prioritize.set_defaults(handler=cmd_priority)

    retry = commands.add_parser("retry", help="run a failed or waiting job now (failed: retries back to 0)",
                                usage="%(prog)s [-h] (ID [--force] | --all-failed [--queue QUEUE]) "
                                      "[--database URL]")
    retry.add_argument("id", nargs="?", type=job_id, metavar="ID", help="the job to retry")
    retry.add_argument("--force", action="store_true",
                       help="a running job too, for a worker that was killed: the job is queued under a new "
                            "lease token, so that worker's run can never complete (its writes roll back)")
    retry.add_argument("--all-failed", action="store_true", help="retry every failed job (of --queue, else all)")
    retry.add_argument("--queue", type=queue_name, metavar="QUEUE", help="with --all-failed: only this queue")
    retry.set_defaults(handler=cmd_retry)

    counts = commands.add_parser(
        "stats", help="per queue: jobs by state and the oldest due job's age; with QUEUE: a day's wait and run",
        description="Without QUEUE: per queue, queued (due now), scheduled, running, failed, waiting, succeeded, "
                    "canceled, expired, other, paused and oldest_due_seconds, with the same names in the table and in "
                    "--json; queues with no jobs are listed too when known (those of the registered tasks and "
                    "of the crons). With QUEUE: for one UTC day (default today), the wait (eta to first start) "
                    "and run (start to finish) of the jobs that succeeded, as count, mean, std and a histogram, "
                    "and counts of jobs failed, runs retried and jobs expired.")
    counts.add_argument("queue", nargs="?", type=queue_name, metavar="QUEUE", help="one queue's daily stats")
    counts.add_argument("--day", type=utc_day, metavar="YYYY-MM-DD", help="with QUEUE: this UTC day")
    counts.add_argument("--tasks", metavar="PACKAGE",
                        help="import PACKAGE to list its tasks' queues too (default: tasks, if found)")
    counts.set_defaults(handler=cmd_stats)

    configure = commands.add_parser(
        "config", help="settings shared by every worker: list, show KEY, or set KEY VALUE",
        description="Settings stored in the database and read by every worker within a minute: "
                    "jobs-history (seconds a finished job is kept, default 30 days), jobs-history-count "
                    "(finished jobs kept at most, default 50000), stats-history (days of daily stats, "
                    "default 30), heartbeat (lease in seconds of a claimed job, default 60, for workers started "
                    "without --lease), heartbeat:QUEUE (one queue's lease, over heartbeat). 'default' as VALUE "
                    "puts a key back to its default (heartbeat:QUEUE: removed).")
    configure.add_argument("key", nargs="?", metavar="KEY")
    configure.add_argument("value", nargs="?", metavar="VALUE")
    configure.set_defaults(handler=cmd_config)

    crons = commands.add_parser("crons", help="registered crons with their last and next run")
    crons.set_defaults(handler=cmd_crons)

    pause = commands.add_parser("pause", help="stop every worker claiming from QUEUE(s) until resumed",
                                description="Every worker on every host stops claiming jobs of QUEUE(s) within "
                                            "one poll interval; running jobs finish. Stored in the database: "
                                            "it outlives restarts until 'mqueue resume'.")
    resume = commands.add_parser("resume", help="let workers claim from paused QUEUE(s) again")
    for command in (pause, resume):
        command.add_argument("queues", nargs="+", type=queue_name, metavar="QUEUE")
    pause.set_defaults(handler=cmd_pause, paused=True)
    resume.set_defaults(handler=cmd_pause, paused=False)
    workers = commands.add_parser(
        "workers", help="live workers: host, pid, queues, started, last seen, running job ids",
        description="Workers that wrote their row within 3 of their leases (a killed worker drops off then). "
                    "CLAIMING is 'no' between SIGUSR2 and SIGCONT.")
    workers.set_defaults(handler=cmd_workers)

    tag = commands.add_parser("tag", help="add tags to a job (live or finished); prints its tags")
    untag = commands.add_parser("untag", help="remove tags from a job; prints its tags")
    for command in (tag, untag):
        command.add_argument("id", type=job_id, metavar="ID", help="job id (see: mqueue list)")
        command.add_argument("tags", nargs="+", type=tag_text, metavar="TAG", help="1 to 100 characters each")
    tag.set_defaults(handler=cmd_tag)
    untag.set_defaults(handler=cmd_untag)
    track = commands.add_parser("track", help="track a job: it publishes an event at every change (see: events)")
    untrack = commands.add_parser("untrack", help="stop tracking a job")
    for command in (track, untrack):
        command.add_argument("id", type=job_id, metavar="ID", help="job id (see: mqueue list)")
    track.set_defaults(handler=cmd_track, tracked=True)
    untrack.set_defaults(handler=cmd_track, tracked=False)
    follow = commands.add_parser(
        "events", help="published events, one line each: tracked jobs' changes and every failed job",
        description="Print published events oldest first, one line each (ID TIME KIND job= queue= task= "
                    "[worker=] [error]): every change of a tracked job and every job that failed for good. "
                    "With --follow, wait for new ones until Ctrl-C or SIGTERM (exit status 0).")
    follow.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    follow.add_argument("--kind", action="append", choices=EVENT_KINDS, metavar="KIND",
                        help=f"only this kind (repeatable): {', '.join(EVENT_KINDS)}")
    follow.add_argument("--job", type=job_id, metavar="ID", help="only this job's events")
    follow.add_argument("--since", type=event_id, metavar="ID", help="only events after this event id")
    follow.set_defaults(handler=cmd_events)

    for command in (enqueue, jobs, show, cancel, retry, counts, crons, configure, tag, untag, track, untrack,
                    follow, move, prioritize, pause, resume, workers):
        add_database_option(command)
        if command not in (enqueue, cancel, retry, tag, untag, track, untrack, move, prioritize, pause, resume):
            command.add_argument("--json", action="store_true", help="print one JSON document")


class OneLineParser(argparse.ArgumentParser):
    """Bad command-line input is one line on stderr (no usage dump) and ``EXIT_USAGE``."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


LOG_LEVELS = ["debug", "info", "warning", "error"]


def _subparser(common: argparse.ArgumentParser):
    """Every sub-command also accepts the common options (e.g. ``start q --log-level debug``)."""
    class SubParser(OneLineParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)
    return SubParser


#: Ids and limits are 64-bit in every backend (SQLite's INTEGER too); a larger
#: number overflows the driver (a traceback, not an answer).
MAX_BIGINT = 2 ** 63 - 1
#: Priorities are 32-bit and stored next to their negation, so -2**31 is out too.
MAX_PRIORITY = 2 ** 31 - 1
#: Threads or processes: far more than any database serves connections to
#: (MariaDB's default max_connections is 151, PostgreSQL's 100).
MAX_WORKERS = 1000
#: About 31 years: beyond it datetime arithmetic and thread timeouts overflow.
MAX_SECONDS = 1e9


def _shown(text: str) -> str:
    """The offending input, quoted, cut short if it is long (e.g. 10**30 written out)."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _integer_type(expected: str, low: int, high: int):
    """An argparse type for integers from ``low`` to ``high``; anything else is one clear line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not a number, or more digits than int() reads
            value = None
        if value is None or (low == 1 and value < 1):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(text)}")
        if not low <= value <= high:
            bounds = f"up to {high}" if low == 1 else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"expected {expected} {bounds}, got {_shown(text)}")
        return value
    return parse


def _seconds_type(expected: str, accept):
    """An argparse type for a number of seconds with ``accept(value)``, at most ``MAX_SECONDS``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {_shown(text)}")
        if value > MAX_SECONDS:
            raise argparse.ArgumentTypeError(f"expected {expected} up to {MAX_SECONDS:.0f}, got {_shown(text)}")
        return value
    return parse


job_id = _integer_type("a positive integer", 1, MAX_BIGINT)
port_number = _integer_type("a TCP port", 0, 65535)
event_id = _integer_type("an event id (an integer >= 0)", 0, MAX_BIGINT)
job_limit = _integer_type("a positive integer", 1, MAX_BIGINT)
worker_count = _integer_type("a positive integer", 1, MAX_WORKERS)
priority = _integer_type("an integer", -MAX_PRIORITY, MAX_PRIORITY)
positive_float = _seconds_type("a positive number of seconds", lambda v: v > 0)
non_negative_float = _seconds_type("a number of seconds >= 0", lambda v: v >= 0)


def tag_text(text: str) -> str:
    if not 0 < len(text) <= MAX_TAG_LENGTH:
        raise argparse.ArgumentTypeError(f"expected a tag of 1 to {MAX_TAG_LENGTH} characters, got {_shown(text)}")
    return text


def utc_day(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a UTC day as YYYY-MM-DD, got {text!r}") from None


def queue_name(text: str) -> str:
    if not 0 < len(text) <= 100:
        raise argparse.ArgumentTypeError(f"expected a queue name of 1 to 100 characters, got {text!r}")
    return text


def open_database(args, **engine_kwargs) -> Database:
    url = args.database or config.default_url()
    try:
        return Database(url, **engine_kwargs)
    except DatabaseURLError:
        raise  # already names the URL and the scheme to use
    except (SQLAlchemyError, ImportError, ValueError) as error:
        raise UsageError(f"cannot use database URL {safe_url(url)}: {one_line(error)}") from None


def admin_database(args) -> Database:
    """The database of a job command, checked first: unreachable or unmigrated is one clear line.

    A SQLite file that does not exist is reported, not created empty.
    """
    db = open_database(args)
    db.check_file()
    db.check_schema()
    return db


#: Exit statuses of a worker process that a restart would not change: the
#: supervisor stops instead of restarting it (bad options, missing tables).
FINAL_EXIT_CODES = (EXIT_USAGE, EXIT_DATABASE)


def cmd_start(args) -> int:
    """A worker, or with ``--processes N`` a supervisor of N worker processes, until a signal.

    Before serving and before starting any process, the tasks are imported
    and the database is checked: missing tables end the start at once (a
    supervisor must not restart children that can only fail), a database
    that is not up yet is waited for, and SIGTERM/SIGINT during the wait
    exit 0.
    """
    from .startup import StartupSignals, StopRequested, wait_for_database
    from .supervisor import follow_supervisor
    url = args.database or config.default_url()
    package = args.tasks or config.settings.package
    command = shell_command(args)  # a command that cannot run: one line before anything else
    with StartupSignals() as signals:
        follow_supervisor()
        try:
            if command is None or args.tasks:  # an exec worker runs no Python task (its crons, if given)
                load_tasks(package)
            db = open_database(args)  # for the checks only: a worker opens its own engine on the URL
            ready = wait_for_database(db, signals.stopped)
            if not ready:
                logging.getLogger("mqueue.startup").info(
                    "received %s while waiting for the database: exiting", signal_name(signals.received))
                db.dispose()
                return EXIT_OK
            signals.interrupt_from_now()
            if args.processes > 1:
                db.dispose()  # the supervisor needs no connection while it supervises
                return run_supervisor(args, url, package)
            from .worker import Worker
            worker = Worker(db, queues=args.queues, concurrency=args.concurrency, lease=args.lease,
                            poll_interval=args.poll_interval, grace=args.grace, command=command, order=args.order)
            if worker.db is not db:
                db.dispose()
            worker.run()  # rides out outages itself (its loops back off and retry)
        except StopRequested as stop:
            logging.getLogger("mqueue.startup").info("received %s: exiting", signal_name(stop.args[0]))
    return EXIT_OK


def shell_command(args):
    """``--exec``'s ShellCommand, checked that it can be started; None without ``--exec``."""
    from .shell import DEFAULT_KILL_INTERVAL_SECONDS, ShellCommand
    if args.exec is None:
        for option, value in (("--timeout", args.timeout), ("--kill-interval", args.kill_interval)):
            if value is not None:
                raise UsageError(f"{option} applies to --exec commands only (Python tasks take timeout=)")
        return None
    if not args.exec:
        raise UsageError("--exec needs a COMMAND, e.g. --exec -- ./report.sh --fast")
    kill_interval = args.kill_interval if args.kill_interval is not None else DEFAULT_KILL_INTERVAL_SECONDS
    command = ShellCommand(args.exec, timeout_seconds=args.timeout, kill_interval_seconds=kill_interval)
    try:
        command.check()
    except ValueError as error:
        raise UsageError(str(error)) from None
    return command


def split_exec(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``start ... --exec [--] COMMAND [ARG...]``: mqueue's own arguments, and the command untouched.

    Everything after ``--exec`` belongs to the command (its own ``--flags``
    included), so argparse never sees it.
    """
    if "--exec" not in argv:
        return argv, None
    at = argv.index("--exec")
    if "start" not in argv[:at]:
        return argv, None
    command = argv[at + 1:]
    return argv[:at], command[1:] if command[:1] == ["--"] else command


def run_supervisor(args, url: str, package: str) -> int:
    """Supervise ``--processes`` workers; the URL goes through their environment, not ``ps``."""
    from .supervisor import Supervisor, child_command
    return Supervisor(child_command(worker_argv(args, package)), args.processes, env={config.ENV_URL: url},
                      final_exit_codes=FINAL_EXIT_CODES).run()


def worker_argv(args, package: str) -> list[str]:
    """The ``mqueue`` arguments of one supervised worker: this start's options, one process."""
    argv = ["start", "--tasks", package, "--processes", "1", "--concurrency", str(args.concurrency),
            "--poll-interval", repr(args.poll_interval), "--grace", repr(args.grace),
            "--log-level", args.log_level, "--order", args.order]
    if args.lease is not None:
        argv += ["--lease", repr(args.lease)]
    if args.exec is not None:
        if not args.tasks:
            argv[1:3] = []  # an exec worker imports a tasks package only when told to
        for option, value in (("--timeout", args.timeout), ("--kill-interval", args.kill_interval)):
            if value is not None:
                argv += [option, repr(value)]
    argv += ["--", *args.queues]
    if args.exec is not None:
        argv += ["--exec", "--", *args.exec]
    return argv


def signal_name(signum: int | None) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def cmd_migrate(args) -> int:
    from .migrate import upgrade, version_location
    if args.print_location:
        print(version_location())
        return EXIT_OK
    db = open_database(args)
    upgrade(db)
    print(f"mqueue tables are up to date in {db.safe_url}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, command = split_exec(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    if command is not None:
        args.exec = command
    args.log_level = getattr(args, "log_level", "info")
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.log_level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_library_tracebacks_as_one_line)
    try:
        return args.handler(args) or EXIT_OK
    except KeyboardInterrupt:
        return 130
    except (MQueueError, SQLAlchemyError, ValueError, TypeError, LookupError, ImportError, OSError) as error:
        if args.log_level == "debug":
            logging.getLogger("mqueue").exception("command failed")
        error = translated(args, error)
        print(f"mqueue: error: {one_line(error)}", file=sys.stderr)
        return exit_code(error)


def translated(args, error: BaseException) -> BaseException:
    """A driver error that escaped a command (e.g. ``migrate`` with a wrong password) in mqueue's words.

    Naming the URL (password masked): a refused login, an unreachable server, missing tables.
    """
    from sqlalchemy.exc import DBAPIError

    from .session import translate_error
    if not isinstance(error, DBAPIError):
        return error
    try:
        db = Database(getattr(args, "database", None) or config.default_url())
    except Exception:  # noqa: BLE001 - the URL itself is the problem: say the original error
        return error
    try:
        return translate_error(db.engine, error)
    finally:
        db.dispose()


def _library_tracebacks_as_one_line(record: logging.LogRecord) -> bool:
    """Below debug, another library's record with a traceback becomes one line.

    e.g. SQLAlchemy's pool logs "Exception during reset or similar" with a
    traceback when it discards a connection that died during an outage;
    mqueue already logs that outage in its own one-line warnings.
    """
    if record.exc_info and record.exc_info[1] is not None and not record.name.startswith("mqueue"):
        record.msg = f"{record.getMessage()}: {one_line(record.exc_info[1])}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


def warn(message: str) -> None:
    """One line on stderr that does not stop the command (stdout stays what scripts capture)."""
    print(f"mqueue: warning: {message}", file=sys.stderr)


def exit_code(error: BaseException) -> int:
    """The named exit code for an error that ends a command."""
    if isinstance(error, (SQLAlchemyError, DatabaseUnavailableError, SchemaMissingError, AccessDeniedError)):
        return EXIT_DATABASE
    if isinstance(error, JobNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, InvalidStateError):
        return EXIT_STATE
    if isinstance(error, (UsageError, UnknownTaskError, DatabaseURLError)):
        return EXIT_USAGE
    return EXIT_ERROR


def one_line(error: BaseException) -> str:
    """The error as one line with any database password masked."""
    return _mask_passwords(first_line(error))


def _mask_passwords(text: str) -> str:
    import re
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


# -- job commands: parse, call mqueue.admin, format -------------------------------

def cmd_enqueue(args) -> int:
    from . import admin
    from .registry import get_task
    kwargs = parse_arguments(args.arguments)
    checked = load_tasks(args.tasks)
    if checked:
        get_task(args.name)  # unknown task 'x' (did you mean 'y'?), before touching the database
    db = admin_database(args)
    try:
        job_id = admin.enqueue_by_name(db, args.name, kwargs, delay=args.delay, priority=args.priority,
                                       queue=args.queue, require_registered=checked, depends_on=args.depends_on)
    except (TypeError, ValueError) as error:  # signature mismatch, unstorable value
        raise UsageError(str(error)) from None
    if not checked:  # after the enqueue: a command that fails still says one thing
        warn(f"no tasks package {config.settings.package!r} importable from {os.getcwd()}: task name "
             f"{args.name!r} and its arguments were stored unchecked (run from the application's directory "
             f"or pass --tasks PACKAGE)")
    print(job_id)
    return EXIT_OK


def cmd_list(args) -> int:
    from . import admin
    db = admin_database(args)
    jobs = admin.list_jobs(db, queue=args.queue, state=args.state, limit=args.limit, tag=args.tag)
    filters = ", ".join(f"{key} {value}" for key, value in (("queue", args.queue), ("state", args.state),
                                                            ("tag", args.tag)) if value)
    print_listing(
        args, jobs, f"no jobs{f' ({filters})' if filters else ''}",
        ("ID", "QUEUE", "TASK", "STATE", "PRIORITY", "ETA (UTC)", "RETRIES", "LAST ERROR"),
        lambda job: (job.id, job.queue, job.name, job.state, job.priority, format_time(job.eta), job.retries,
                     excerpt(job.error_summary or "", 60)))
    if not args.json:
        paused = sorted(admin.paused_queues(db) & ({job.queue for job in jobs} | {args.queue}))
        if paused:
            print(f"paused (workers claim nothing from it until 'mqueue resume'): {', '.join(paused)}")
    return EXIT_OK


def cmd_show(args) -> int:
    from . import admin
    job = admin.get_job(admin_database(args), args.id)
    if args.json:
        return print_json(job.to_dict())
    print("\n".join(describe_job(job)))
    return EXIT_OK


def describe_job(job) -> list[str]:
    """``show``: every field, the decoded arguments one per line, the history, every failed run's error."""
    fields = [("task", job.name), ("queue", job.queue), ("state", job.state), ("priority", job.priority),
              ("eta", format_time(job.eta, " UTC")),
              ("retries", f"{job.retries} (max {'default' if job.max_retries is None else job.max_retries})"),
              ("runs", job.runs), ("tags", " ".join(job.tags) or "-"), ("tracked", "yes" if job.tracked else "no"),
              ("unique key", job.unique_key or "-"), ("worker", job.owner or "-"),
              ("created", format_time(job.created_at, " UTC")),
              ("started", format_time(job.started_at, " UTC")),
              ("finished", format_time(job.finished_at, " UTC")),
              ("waited", format_seconds(job.wait_seconds)), ("ran", format_seconds(job.run_seconds)),
              ("lease expires", format_time(job.lease_expires_at, " UTC")),
              ("expires", format_time(job.expires_at, " UTC")),
              ("depends on", describe_dependencies(job)),
              ("dependents", " ".join(map(str, job.dependents)) or "-")]
    lines = [f"job {job.id}", *(f"  {label + ':':<15}{value}" for label, value in fields), "  arguments:"]
    try:
        arguments = [f"{name} = {value!r}" for name, value in job.decoded_args().items()] or ["(none)"]
    except ValueError as error:
        arguments = [f"(cannot be decoded: {error})", job.raw_args]
    lines += [f"    {text}" for text in arguments]
    lines.append("  history:")
    for entry in job.history:
        by = f" by {entry.worker}" if entry.worker else ""
        detail = f": {excerpt(headline(entry.detail) or '', 80)}" if entry.detail else ""
        lines.append(f"    {format_time(entry.at, precise=True)}  {entry.kind}{by}{detail}")
    errors = [(entry.kind, entry.at, entry.detail) for entry in job.errors]
    if not errors and job.last_error:  # a row from before history was kept, or written by hand
        errors = [("last", None, job.last_error)]
    lines.append(f"  errors ({len(errors)}):" if errors else "  errors: -")
    for number, (kind, at, text) in enumerate(errors, 1):
        lines.append(f"    #{number} {kind}{f' at {format_time(at)} UTC' if at else ''}:")
        lines += [f"      {line}".rstrip() for line in text.rstrip().splitlines()]
    return lines


def describe_dependencies(job) -> str:
    """``ID (state)`` per dependency; a job held by one that will not succeed by itself says so."""
    if not job.depends_on:
        return "-"
    text = " ".join(f"{dep} ({state or 'pruned'})" for dep, state in zip(job.depends_on, job.dependency_states))
    if job.blocked_by:
        text += (f"; blocked by {', '.join(map(str, job.blocked_by))} (retry "
                 f"{'it' if len(job.blocked_by) == 1 else 'them'} to go on)")
    return text


def cmd_tag(args) -> int:
    from . import admin
    try:
        tags = admin.tag_job(admin_database(args), args.id, *args.tags)
    except ValueError as error:  # more than 50 tags on the job
        raise UsageError(str(error)) from None
    print(f"job {args.id} tags: {' '.join(tags) or '-'}")
    return EXIT_OK


def cmd_untag(args) -> int:
    from . import admin
    tags = admin.untag_job(admin_database(args), args.id, *args.tags)
    print(f"job {args.id} tags: {' '.join(tags) or '-'}")
    return EXIT_OK


def cmd_track(args) -> int:
    from . import admin
    job = admin.track_job(admin_database(args), args.id, tracked=args.tracked)
    print(f"job {job.id} ({job.name}, {job.state}) is {'tracked' if job.tracked else 'not tracked'}")
    return EXIT_OK


def cmd_events(args) -> int:
    """One line (or JSON object) per event; with --follow until SIGTERM/SIGINT, which exit 0."""
    import signal

    from . import admin

    def stop(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    stream = admin.events(admin_database(args), follow=args.follow, since=args.since, kind=args.kind,
                          job_id=args.job)
    try:
        for event in stream:
            print(json.dumps(event.to_dict()) if args.json else event, flush=args.follow)
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    return EXIT_OK


def check_one_or_all_failed(args, command: str, option: str) -> None:
    """``retry``/``cancel``: a job ID (with ``option``) or ``--all-failed`` (with ``--queue``), not both."""
    if args.all_failed == (args.id is not None):
        raise UsageError(f"give a job ID or --all-failed (see: mqueue {command} --help)")
    if args.queue is not None and not args.all_failed:
        raise UsageError("--queue goes with --all-failed; a job ID needs no queue")
    if getattr(args, option) and args.all_failed:
        raise UsageError(f"--{option} goes with a job ID, not with --all-failed")


def print_bulk(verb: str, count: int, queue: str | None) -> None:
    print(f"{verb} {count} failed job{'' if count == 1 else 's'}{f' in queue {queue}' if queue else ''}")


def cmd_cancel(args) -> int:
    from . import admin
    check_one_or_all_failed(args, "cancel", "cascade")
    db = admin_database(args)
    if args.all_failed:
        print_bulk("cancelled", admin.cancel_failed(db, args.queue), args.queue)
        return EXIT_OK
    job = admin.cancel_job(db, args.id, cascade=args.cascade)
    print(f"cancelled job {job.id} ({job.name}, was {job.state})")
    return EXIT_OK


def cmd_move(args) -> int:
    from . import admin
    job = admin.move_job(admin_database(args), args.id, args.queue)
    print(f"job {job.id} ({job.name}, {job.state}) is in queue {job.queue}")
    return EXIT_OK


def cmd_priority(args) -> int:
    from . import admin
    job = admin.set_priority(admin_database(args), args.id, args.priority)
    print(f"job {job.id} ({job.name}, {job.state}) has priority {job.priority}")
    return EXIT_OK


def cmd_retry(args) -> int:
    from . import admin
    check_one_or_all_failed(args, "retry", "force")
    db = admin_database(args)
    if args.all_failed:
        print_bulk("retried", admin.retry_failed(db, args.queue), args.queue)
    else:
        job = admin.retry_job(db, args.id, force=args.force)
        print(f"job {job.id} ({job.name}) is queued, due {format_time(job.eta, ' UTC')}")
    return EXIT_OK


def cmd_stats(args) -> int:
    """The overview: one row per known queue; the headings are the JSON keys."""
    from . import admin
    if args.queue is not None:
        return print_day_stats(args, admin.queue_stats(admin_database(args), args.queue, args.day))
    if args.day is not None:
        raise UsageError("--day goes with a QUEUE: mqueue stats QUEUE --day YYYY-MM-DD")
    return print_listing(
        args, admin.stats(admin_database(args), task_queues(args.tasks)), "no jobs",
        ("QUEUE", "QUEUED", "SCHEDULED", "RUNNING", "FAILED", "WAITING", "SUCCEEDED", "CANCELED", "EXPIRED",
         "OTHER", "PAUSED", "OLDEST_DUE_SECONDS"),
        lambda q: (q.queue, q.queued, q.scheduled, q.running, q.failed, q.waiting, q.succeeded, q.canceled,
                   q.expired, q.other, "yes" if q.paused else "no",
                   "-" if q.oldest_due_seconds is None else f"{q.oldest_due_seconds:.1f}"))


def task_queues(package: str | None) -> set[str]:
    """The queues of the tasks in ``--tasks`` (else ``tasks``, if found); a warning if that package fails."""
    from .registry import registered_tasks
    try:
        if not load_tasks(package):
            return set()
    except (UsageError, ImportError) as error:
        if package is not None:
            raise  # asked for by name: an error, as for enqueue
        warn(f"{error}; queues without jobs are not listed")
        return set()
    return {task.queue or config.settings.queue for task in registered_tasks().values()}


def print_day_stats(args, stats) -> int:
    """``stats QUEUE``: counts, then each timing with its non-empty histogram buckets as text bars."""
    if args.json:
        return print_json(stats.to_dict())
    print(f"queue {stats.queue}, {stats.day.isoformat()} (UTC): {stats.failed} failed, {stats.retried} retried, "
          f"{stats.expired} expired")
    for label, timing in (("wait", stats.wait), ("run", stats.run)):
        if not timing.count:
            print(f"{label}: no jobs succeeded")
            continue
        print(f"{label}: {timing.count} job{'' if timing.count == 1 else 's'}, mean {format_seconds(timing.mean)}, "
              f"std {format_seconds(timing.std)}")
        for bar in histogram_bars(timing.histogram):
            print(f"  {bar}")
    return EXIT_OK


def histogram_bars(counts, width: int = 40) -> list[str]:
    """Non-empty buckets as aligned text lines ``label count ####`` (bars scaled to the largest)."""
    from .history import BUCKETS
    filled = [(label, count) for label, count in zip(BUCKETS, counts) if count]
    largest = max((count for _, count in filled), default=0)
    digits = len(str(largest))
    return [f"{label:>4} {count:>{digits}} {'#' * max(1, round(width * count / largest))}" for label, count in filled]


def cmd_config(args) -> int:
    from . import admin
    from .shared_settings import key_for
    try:
        key = key_for(args.key) if args.key is not None else None  # before the database: a typo is one line
    except ValueError as error:
        raise UsageError(str(error)) from None
    db = admin_database(args)
    if key is None:
        values = admin.get_config(db)
        if args.json:
            return print_json(values)
        print_table(("KEY", "VALUE", "DEFAULT", "MEANING"),
                    [(name, value, (described := key_for(name)).default, described.meaning)
                     for name, value in values.items()])
        return EXIT_OK
    if args.value is None:
        value = admin.get_config(db).get(args.key)
        if value is None:  # heartbeat:QUEUE not set: the queue follows heartbeat
            value = admin.get_config(db)["heartbeat"]
        return print_json({args.key: value}) if args.json else (print(value) or EXIT_OK)
    try:
        value = admin.set_config(db, args.key, None if args.value == "default" else args.value)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if value is None:
        print(f"{args.key} removed: queue follows heartbeat (workers pick it up within a minute)")
    else:
        print(f"{args.key} = {value} (workers pick it up within a minute)")
    return EXIT_OK


def cmd_pause(args) -> int:
    """``pause``/``resume``: one write for all the queues named, then what is paused now."""
    from . import admin
    db = admin_database(args)
    (admin.pause_queue if args.paused else admin.resume_queue)(db, *args.queues)
    paused = sorted(admin.paused_queues(db))
    print(f"{'paused' if args.paused else 'resumed'} {', '.join(args.queues)}; paused now: "
          f"{', '.join(paused) or 'none'} (workers see it within one poll interval)")
    return EXIT_OK


def cmd_workers(args) -> int:
    from . import admin
    return print_listing(
        args, admin.list_workers(admin_database(args)), "no live workers",
        ("WORKER", "HOST", "PID", "QUEUES", "STARTED (UTC)", "LAST SEEN (UTC)", "LEASE", "CLAIMING", "RUNNING"),
        lambda w: (w.name, w.host, w.pid, ",".join(w.queues), format_time(w.started_at), format_time(w.last_seen),
                   format_seconds(w.lease_seconds), "yes" if w.claiming else "no",
                   " ".join(map(str, w.running)) or "-"))


def cmd_crons(args) -> int:
    from . import admin
    return print_listing(
        args, admin.list_crons(admin_database(args)),
        "no crons (a worker registers its queues' crons when it starts)",
        ("NAME", "QUEUE", "SCHEDULE", "TZ", "LAST RUN (UTC)", "NEXT RUN (UTC)"),
        lambda c: (c.name, c.queue, c.schedule, c.tz, format_time(c.last_run), format_time(c.next_run)))


def print_listing(args, items, empty: str, headers, row) -> int:
    """``--json``: one JSON list; otherwise an aligned table, or ``empty`` when there is nothing."""
    if args.json:
        return print_json([item.to_dict() for item in items])
    if not items:
        print(empty)
    else:
        print_table(headers, [row(item) for item in items])
    return EXIT_OK


def parse_arguments(text: str) -> dict[str, Any]:
    """The ARGUMENTS of ``enqueue``: a JSON object, typed values in their stored form."""
    from .admin import json_kind
    from .encoding import decode_args

    def reject(constant: str):
        raise ValueError(f"{constant} is not valid JSON")
    too_deep = f"invalid JSON for arguments: nested deeper than {MAX_ARGUMENT_DEPTH} levels"
    try:
        raw = json.loads(text, parse_constant=reject)
    except ValueError as error:
        raise UsageError(f"invalid JSON for arguments: {error}") from None
    except RecursionError:  # json's own parser gives up first on very deep input
        raise UsageError(too_deep) from None
    if nesting_depth(raw) > MAX_ARGUMENT_DEPTH:
        raise UsageError(too_deep)
    if not isinstance(raw, dict):
        raise UsageError(f"arguments must be a JSON object of named arguments, e.g. '{{\"to\": \"a@b.c\"}}', "
                         f"got {json_kind(raw)}")
    try:
        return decode_args(raw)
    except ValueError as error:
        raise UsageError(f"invalid arguments: {error}") from None


#: Arguments nest no deeper than this: encoding and decoding recurse per level,
#: and a few hundred levels reach Python's recursion limit (a traceback).
MAX_ARGUMENT_DEPTH = 100


def nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def load_tasks(package: str | None) -> bool:
    """Import the tasks package so enqueue can check names; False if there is none to import.

    Without ``--tasks``, the default package is used only if it is found
    from the current directory (or installed) as a real module or package.
    """
    from .registry import discover
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if package is None:
        package = config.settings.package
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:  # absent, or a bare directory (namespace package)
            return False
    try:
        discover(package)
    except ModuleNotFoundError as error:
        if str(error).startswith("tasks package"):
            raise UsageError(str(error)) from None
        raise ImportError(f"importing tasks package {package!r} failed: {error}") from None
    except Exception as error:  # SyntaxError, a failing module body: name the package, not a traceback
        raise ImportError(f"importing tasks package {package!r} failed: {type(error).__name__}: "
                          f"{one_line(error)}") from None
    return True


def print_json(document: Any) -> int:
    print(json.dumps(document, indent=2, ensure_ascii=False))
    return EXIT_OK


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Columns padded to their widest cell; numbers right-aligned; the last column unpadded."""
    cells = [[str(value) for value in row] for row in rows]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    widths = [max(len(str(title)), *(len(row[i]) for row in cells)) for i, title in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        parts = [value.rjust(width) if number else value.ljust(width)
                 for value, width, number in zip(values, widths, numeric)]
        parts[-1] = values[-1].rjust(widths[-1]) if numeric[-1] else values[-1]
        return "  ".join(parts).rstrip()

    print(line(header))
    for row in cells:
        print(line(row))


def format_time(value: dt.datetime | None, suffix: str = "", precise: bool = False) -> str:
    """``-`` or ``YYYY-MM-DD HH:MM:SS`` (with milliseconds if ``precise``)."""
    if value is None:
        return "-"
    return (value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if precise else value.strftime("%Y-%m-%d %H:%M:%S")) + suffix


def format_seconds(seconds: float | None) -> str:
    """A duration: ``-``, ``3.2ms``, ``4.5s``, ``42s``, ``3m04s``, ``2h05m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    for unit, size, small, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // small_size:02d}{small}"
    return f"{whole}s"


def excerpt(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."
