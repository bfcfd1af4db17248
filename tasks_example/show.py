"""Print the outbox: ``python show.py``.

``python show.py --wait JOB_ID`` first waits (up to ``--timeout`` seconds)
until the worker has completed that job, i.e. its outbox row exists.
"""

from __future__ import annotations

import argparse
import sys
import time

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from models import DATABASE_URL, Outbox


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait", type=int, metavar="JOB_ID", help="wait until this job has written its mail")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    args = parser.parse_args()

    engine = create_engine(DATABASE_URL)
    try:
        with Session(engine) as session:
            if args.wait is not None:
                deadline = time.monotonic() + args.timeout
                while session.scalar(select(Outbox.id).where(Outbox.job_id == args.wait)) is None:
                    if time.monotonic() > deadline:
                        print(f"job {args.wait} has not written its mail after {args.timeout:g}s "
                              f"(is a worker running?)", file=sys.stderr)
                        return 1
                    session.rollback()       # end the read transaction: see new commits
                    time.sleep(0.1)
            rows = session.scalars(select(Outbox).order_by(Outbox.id)).all()
            print(f"outbox: {len(rows)} mail(s)")
            for mail in rows:
                print(f"  mail {mail.id} to {mail.to_address}: {mail.subject!r} (written by job {mail.job_id})")
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
