"""A daemon whose database connections are cut mid-drain (MariaDB and PostgreSQL).

The daemon reaches the server only through ``proxy.Proxy``; the test itself
enqueues and checks through a direct connection.  Every job must end done
exactly once, and the daemon must say what happened in one-line warnings,
never a traceback.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter

import pytest
from daemons import effect_count, effects, enqueue, job_states, jobs_left
from helpers import wait_for
from proxy import Proxy
from sqlalchemy.engine import make_url

JOBS = 400
OUTAGE_SECONDS = 3.0
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


@pytest.fixture
def proxy(database_url):
    url = make_url(database_url)
    with Proxy((url.host, url.port)) as running:
        yield running


def proxied(database_url: str, proxy: Proxy) -> str:
    return make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)


def cut_and_refuse(proxy: Proxy) -> None:
    """Every open connection gets a RST; new ones are refused for the outage."""
    proxy.refuse()
    proxy.reset()
    time.sleep(OUTAGE_SECONDS)  # the outage itself
    proxy.passthrough()


def blackhole_then_cut(proxy: Proxy) -> None:
    """Nothing flows (statements and COMMITs hang) for the outage, then every connection gets a RST."""
    proxy.blackhole()
    time.sleep(OUTAGE_SECONDS)  # the outage itself
    proxy.reset()
    proxy.passthrough()


def blackhole_then_heal(proxy: Proxy) -> None:
    """Nothing flows for the outage, then the held bytes flow on (a network stall)."""
    proxy.blackhole()
    time.sleep(OUTAGE_SECONDS)  # the outage itself
    proxy.passthrough()


@pytest.mark.backends("mariadb", "postgresql")
@pytest.mark.parametrize("outage", [cut_and_refuse, blackhole_then_cut, blackhole_then_heal],
                         ids=["reset-refuse", "blackhole-reset", "blackhole-heal"])
def test_outage_mid_drain_loses_nothing_and_runs_nothing_twice(backend, database_url, db, tasks, daemons,
                                                               proxy, outage):
    daemon = daemons.start(url=proxied(database_url, proxy), concurrency=4, lease=2)
    daemon.wait_serving()
    # One job in four writes nothing (the worker completes those in batches), spread through the queue.
    ids, quiet = [], []
    for first in range(0, JOBS, 8):
        calls = [{"n": n, "sleep": 0.01} for n in range(first, first + 8)]
        ids += enqueue(db, "proc.effect", calls[:6])
        quiet += enqueue(db, "proc.quiet", calls[6:])
    wait_for(lambda: effect_count(db) >= JOBS // 8, timeout=30, message=daemon.stderr)
    assert jobs_left(db) > JOBS // 4, "the outage must hit mid-drain"

    started = time.monotonic()
    outage(proxy)
    wait_for(lambda: jobs_left(db) == 0, timeout=60, interval=0.1,
             message=lambda: f"{jobs_left(db)} jobs left\n{daemon.stderr()[-5000:]}")
    recovered = time.monotonic() - started
    print(f"\n[{backend}] {outage.__name__}: drained {recovered:.1f}s after the outage began; "
          f"{len(tasks.executions()) - JOBS} extra run(s) rolled back")

    per_job = Counter(row.job_id for row in effects(db))
    assert sorted(per_job) == sorted(ids)
    assert [job for job, count in per_job.items() if count != 1] == []
    assert {r[0] for r in tasks.executions()} == set(ids) | set(quiet)
    assert job_states(db) == {"succeeded": JOBS}

    daemon.send(signal.SIGTERM)
    assert daemon.wait(30) == 0
    log = daemon.stderr()
    assert "Traceback" not in log
    strays = [line for line in log.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert strays == [], "every log record is one line"
    if outage is not blackhole_then_heal:
        warnings = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
        assert warnings, log
        print("\n".join(sorted({_shape(line) for line in warnings})))


def _shape(line: str) -> str:
    """A warning with its timestamp, ids and numbers masked, to print each kind once."""
    text = LOG_LINE.sub("", line)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:200]
