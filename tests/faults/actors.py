"""Application processes for the fault tests: ``python actors.py ROLE URL ROOT [options]``.

Roles:
  enqueue-and-hang  open a session, enqueue 5 jobs, touch ROOT/flags/enqueued, wait to be killed
  unique            wait for ROOT/flags/go, enqueue every key of --keys once per session; print key=id lines
  enqueue           for --seconds: batches of 5 (some unique_key), committed; ids to the enqueue ledger
  cancel            for --seconds: cancel or retry random ledger ids; cancelled ids to the ledger as X
Sessions use --isolation when given (e.g. "REPEATABLE READ" on MariaDB).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # helpers

from ledger import Harness  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402

import mqueue  # noqa: E402
from mqueue import admin  # noqa: E402
from mqueue.errors import MQueueError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("url")
    parser.add_argument("root")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--isolation", default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    harness = Harness(Path(args.root))
    harness.activate()
    from faulttasks.jobs import work
    options = {"isolation_level": args.isolation} if args.isolation else {}
    db = mqueue.Database(args.url, **options)
    rng = random.Random(args.seed)
    errors = 0
    if args.role == "enqueue-and-hang":
        with db.session():
            for n in range(5):
                work.enqueue(n=n)
            harness.flag("enqueued").touch()
            time.sleep(600)  # killed here, before the COMMIT
        return 1
    if args.role == "unique":
        while not harness.flag("go").exists():
            time.sleep(0.005)
        for key in range(args.keys):
            with db.session():
                job_id = work.options(unique_key=f"key-{key}").enqueue(n=key)
            print(f"key-{key}={job_id}", flush=True)
        return 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            if args.role == "enqueue":
                ids = []
                with db.session():
                    for _ in range(5):
                        if rng.random() < 0.3:
                            ids.append(work.options(unique_key=f"storm-{rng.randrange(10)}").enqueue(n=0))
                        else:
                            ids.append(work.enqueue(n=1, sleep=rng.uniform(0, 0.01)))
                harness.record("C", set(ids))
            elif args.role == "cancel":
                known = sorted(harness.ledger()["C"])
                if not known:
                    time.sleep(0.01)
                    continue
                job_id = rng.choice(known[-50:])
                if rng.random() < 0.5:
                    harness.record("X", [job_id])  # before: a cancel whose reply is lost still counts
                    admin.cancel_job(db, job_id)
                else:
                    admin.retry_job(db, job_id)
        except MQueueError:
            pass  # running, not found, kept changing: the normal answers
        except DBAPIError as error:
            errors += 1
            print(f"database error in {args.role}: {str(error.orig).splitlines()[0]}", flush=True)
    print(f"{args.role}: {errors} database error(s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
