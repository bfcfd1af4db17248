"""``python -m mqueue``: argparse in, one call into mqueue, plain text out.

Every command goes through ``main``, which catches once: a known error
becomes one line on stderr and a named exit code; the traceback is shown
only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sqlalchemy.exc import DBAPIError

from . import config
from .errors import MQueueError
from .session import Database, safe_url

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", metavar="URL",
                        help=f"database URL (default: ${config.ENV_URL}, else sqlite:///mqueue.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mqueue", description="A task queue in your SQL database.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="logging level (debug also shows tracebacks)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    migrate = commands.add_parser("migrate", help="create or upgrade mqueue's tables")
    add_database_option(migrate)
    migrate.set_defaults(handler=cmd_migrate)
    return parser


def open_database(args) -> Database:
    return Database(args.database or config.default_url())


def cmd_migrate(args) -> int:
    from .migrate import upgrade
    db = open_database(args)
    upgrade(db)
    print(f"mqueue tables are up to date in {db.safe_url}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
