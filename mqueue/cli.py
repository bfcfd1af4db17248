"""``python -m mqueue``: argparse in, one call into mqueue, plain text out.

Every command goes through ``main``, which catches once: a known error
becomes one line on stderr and a named exit code; the traceback is shown
only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sqlalchemy.exc import DBAPIError

from . import config
from .errors import MQueueError
from .session import Database, safe_url
from .worker import DEFAULT_GRACE_SECONDS, DEFAULT_LEASE_SECONDS, DEFAULT_POLL_SECONDS

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", metavar="URL",
                        help=f"database URL (default: ${config.ENV_URL}, else sqlite:///mqueue.db)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="logging level (default info; debug also shows tracebacks)")
    parser = argparse.ArgumentParser(prog="mqueue", description="A task queue in your SQL database.",
                                     parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_subparser(common))
    commands.required = True

    start = commands.add_parser("start", help="run a worker daemon serving QUEUE(s), first named first served")
    start.add_argument("queues", nargs="+", metavar="QUEUE")
    add_database_option(start)
    start.add_argument("--tasks", default=None, metavar="PACKAGE",
                       help="package whose modules are imported to register tasks (default: tasks)")
    start.add_argument("--concurrency", type=positive_int, default=1, help="threads per process (default 1)")
    start.add_argument("--processes", type=positive_int, default=1,
                       help="worker processes under one supervisor (default 1)")
    start.add_argument("--lease", type=positive_float, default=DEFAULT_LEASE_SECONDS, metavar="SECONDS",
                       help="lease of a claimed job, renewed by heartbeats (default 60)")
    start.add_argument("--poll-interval", type=positive_float, default=DEFAULT_POLL_SECONDS,
                       metavar="SECONDS", help="longest wait between polls of an idle queue (default 0.1)")
    start.add_argument("--grace", type=non_negative_float, default=DEFAULT_GRACE_SECONDS, metavar="SECONDS",
                       help="time running jobs get to finish after SIGTERM (default 30)")
    start.set_defaults(handler=cmd_start)

    migrate = commands.add_parser("migrate", help="create or upgrade mqueue's tables")
    add_database_option(migrate)
    migrate.set_defaults(handler=cmd_migrate)
    return parser


LOG_LEVELS = ["debug", "info", "warning", "error"]


def _subparser(common: argparse.ArgumentParser):
    """Every sub-command also accepts the common options (e.g. ``start q --log-level debug``)."""
    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)
    return SubParser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def open_database(args, **engine_kwargs) -> Database:
    return Database(args.database or config.default_url(), **engine_kwargs)


def cmd_start(args) -> int:
    if args.processes > 1:
        from .supervisor import Supervisor, child_command
        argv = [a for a in (sys.argv[1:] if args.argv is None else args.argv)]
        return Supervisor(child_command(_without_processes(argv)), args.processes).run()
    from .registry import discover
    from .worker import Worker
    package = args.tasks or config.settings.package
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    discover(package)
    db = open_database(args, **({} if (args.database or config.default_url()).startswith("sqlite")
                                else {"pool_size": args.concurrency + 4, "max_overflow": 4}))
    Worker(db, queues=args.queues, concurrency=args.concurrency, lease=args.lease,
           poll_interval=args.poll_interval, grace=args.grace).run()
    return EXIT_OK


def _without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--processes":
            skip = True
        elif not item.startswith("--processes="):
            out.append(item)
    return out


def cmd_migrate(args) -> int:
    from .migrate import upgrade
    db = open_database(args)
    upgrade(db)
    print(f"mqueue tables are up to date in {db.safe_url}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    args.log_level = getattr(args, "log_level", "info")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.handler(args) or EXIT_OK
    except KeyboardInterrupt:
        return 130
    except (MQueueError, DBAPIError, ValueError, TypeError, LookupError, ImportError, OSError) as error:
        if args.log_level == "debug":
            logging.getLogger("mqueue").exception("command failed")
        print(f"mqueue: error: {one_line(error)}", file=sys.stderr)
        return EXIT_DATABASE if isinstance(error, DBAPIError) else EXIT_ERROR


def one_line(error: BaseException) -> str:
    """The error as one line with any database password masked."""
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return _mask_passwords(message)


def _mask_passwords(text: str) -> str:
    import re
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)
