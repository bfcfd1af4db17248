"""An outage longer than the lease, while a job that writes is running (MariaDB and PostgreSQL).

Daemon A reaches the server only through ``proxy.Proxy``; daemon B directly.
A's job writes, then waits; the proxy cuts A off, the job returns and its
COMMIT fails.  Its outcome is then unknown to A: A must stop trying to write
once its lease has expired and count the run lost (not done).  B rescues
the job and runs it; when A's database comes back, nothing A does may
count the job done a second time or repeat its effect.
"""

from __future__ import annotations

import re
import signal

import pytest
from daemons import effects, enqueue, first_start, job_row, jobs_left
from helpers import wait_for
from proxy import Proxy
from sqlalchemy.engine import make_url

LEASE = 2.0


@pytest.fixture
def proxy(database_url):
    url = make_url(database_url)
    with Proxy((url.host, url.port)) as running:
        yield running


def outcomes(daemon, job_id: int) -> list[str]:
    """The outcome of each run of ``job_id`` that ``daemon`` logged, in order."""
    pattern = re.compile(rf" job={job_id} task=\S+ queue=\S+ duration=\S+ outcome=(\w+)")
    return [m.group(1) for m in map(pattern.search, daemon.stderr().splitlines()) if m]


@pytest.mark.backends("mariadb", "postgresql")
def test_an_outage_longer_than_the_lease_counts_the_run_lost_and_the_job_is_done_once(
        database_url, db, tasks, daemons, proxy):
    proxied = make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
    a = daemons.start(url=proxied, lease=LEASE, name="proxied")
    a.wait_serving()
    [job_id] = enqueue(db, "proc.block", [{"write_first": True, "seconds": 60}])
    assert first_start(tasks, job_id, daemons=daemons)[1] == a.pid
    b = daemons.start(lease=LEASE, name="direct")
    b.wait_serving()

    proxy.refuse()  # A's database is away: open connections get a RST, new ones are refused
    proxy.reset()
    tasks.release()  # A's task returns: its COMMIT cannot happen
    # A gives up once its lease has surely expired, while still cut off: lost, not done.
    wait_for(lambda: outcomes(a, job_id), timeout=6 * LEASE, message=lambda: daemons.output())
    assert outcomes(a, job_id) == ["lost"]
    # B rescues the job once the lease expired on the database's clock, and runs it.
    wait_for(lambda: jobs_left(db) == 0, timeout=30, message=lambda: daemons.output())
    assert outcomes(b, job_id) == ["succeeded"]

    proxy.passthrough()  # A's database is back
    wait_for(lambda: proxy.open_connections() > 0, timeout=20, message=lambda: daemons.output())
    for daemon in (a, b):
        daemon.send(signal.SIGTERM)
    assert a.wait(30) == 0 and b.wait(30) == 0
    assert outcomes(a, job_id) == ["lost"] and outcomes(b, job_id) == ["succeeded"]  # done once, by B
    rows = [row for row in effects(db) if row.job_id == job_id]
    assert [(row.pid, row.retries, row.note) for row in rows] == [(b.pid, 1, "first")]  # the effect once
    done = job_row(db, job_id)
    assert (done.state, done.runs, done.owner.split(":")[1]) == ("succeeded", 2, str(b.pid))
    assert "Traceback" not in a.stderr() + b.stderr()
