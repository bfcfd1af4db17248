"""Sign a user up: ``python signup.py ada@example.com``.

The user row and the welcome job are written in ONE transaction: if the
signup rolls back, no mail is ever queued; if it commits, the job exists.
"""

from __future__ import annotations

import argparse

import mqueue
from models import DATABASE_URL, User
from tasks.mail import welcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("email")
    args = parser.parse_args()

    db = mqueue.Database(DATABASE_URL)
    with db.session() as session:
        user = User(email=args.email)
        session.add(user)
        session.flush()                      # assigns user.id
        job_id = welcome.enqueue(user.id)    # same transaction as the user row
    print(f"welcome job {job_id} enqueued for {user.email} (user {user.id})")
    db.dispose()


if __name__ == "__main__":
    main()
