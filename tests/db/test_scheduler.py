"""Crons on every backend: sync, compare-and-set enqueue, catch-up, skip, DST, worker, CLI.

Every scheduling decision here is driven by an injected ``now`` (naive
UTC), so no test waits for a real minute.  Crons that a ``Worker`` also
serves are scheduled in 2031, far ahead of the real clock, so the worker's
own once-a-second tick (which reads the database clock) never finds them
due and cannot add jobs behind the test's back.  Each test uses its own
queue: ``Scheduler(db, [queue])`` then sees only that test's crons.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from zoneinfo import ZoneInfo

import pytest
from helpers import run_python, wait_for
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, func, insert, select

import mqueue
from mqueue import admin
from mqueue.cron import Schedule
from mqueue.errors import UnknownTaskError
from mqueue.registry import get_task, unregister
from mqueue.scheduler import Scheduler, registered_crons, unregister_cron
from mqueue.schema import FAILED, QUEUED, RUNNING, SUCCEEDED, cron_table, task_table

MINUTE = dt.timedelta(minutes=1)
#: A start far ahead of the real clock (see the module docstring).
T0 = dt.datetime(2031, 1, 1, 0, 0, 30)
BERLIN = ZoneInfo("Europe/Berlin")

effect_metadata = MetaData()
effect = Table(
    "effect", effect_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", BigInteger, nullable=False),
    Column("note", String(100), nullable=True),
)

#: Switch for ``flaky``: while true it raises after writing.
flaky_state = {"failing": True}


def write_effect(note: str) -> None:
    job = mqueue.current_job()
    mqueue.current_session().execute(insert(effect).values(job_id=job.id, note=note))


# -- the crons of this module, one queue per test ---------------------------------

@mqueue.cron(mqueue.Minutely, queue="tsc_sync", name="tsc.sync_minutely")
def sync_minutely() -> None:
    pass


@mqueue.cron("0 * * * *", queue="tsc_sync", name="tsc.sync_hourly")
def sync_hourly() -> None:
    pass


@mqueue.cron(mqueue.MINUTELY, queue="tsc_start", name="tsc.start")
def start_cron() -> None:
    pass


@mqueue.cron("* * * * *", queue="tsc_race", name="tsc.race", skip_if_scheduled=False)
def race() -> None:
    pass


@mqueue.cron(mqueue.HOURLY, queue="tsc_catchup", name="tsc.catchup", skip_if_scheduled=False)
def catchup() -> None:
    pass


@mqueue.cron(mqueue.Minutely(), queue="tsc_skip", name="tsc.skip")
def skipping() -> None:
    pass


@mqueue.cron(mqueue.Minutely(), queue="tsc_noskip", name="tsc.noskip", skip_if_scheduled=False)
def not_skipping() -> None:
    pass


@mqueue.cron("30 2 * * *", tz="Europe/Berlin", queue="tsc_dst", name="tsc.dst", skip_if_scheduled=False)
def berlin_half_past_two() -> None:
    pass


@mqueue.cron(mqueue.Minutely, queue="tsc_job", name="tsc.flaky", max_retries=3, backoff=3600)
def flaky() -> None:
    write_effect("flaky")
    if flaky_state["failing"]:
        raise RuntimeError("flaky cron broke")


@mqueue.cron(mqueue.Minutely, queue="tsc_job", name="tsc.doomed", max_retries=0)
def doomed() -> None:
    write_effect("doomed")
    raise RuntimeError("doomed cron always fails")


@mqueue.cron(mqueue.Hours(6), tz="Europe/Berlin", queue="tsc_cli", name="tsc.cli_report")
def cli_report() -> None:
    pass


@mqueue.cron(mqueue.Minutely, queue="tsc_broken", name="tsc.broken_priority", priority=2 ** 40)
def broken_priority() -> None:
    """Its job cannot be stored: the priority does not fit the column (server backends)."""


@mqueue.cron(mqueue.Minutely, queue="tsc_broken", name="tsc.fine_neighbour")
def fine_neighbour() -> None:
    pass


# -- helpers ------------------------------------------------------------------------

@pytest.fixture
def edb(db):
    """The migrated database of the backend under test, plus the ``effect`` table."""
    effect_metadata.create_all(db.engine)
    flaky_state["failing"] = True
    return db


def cron_row(db, name: str):
    with db.engine.connect() as conn:
        return conn.execute(select(cron_table).where(cron_table.c.name == name)).first()


def cron_names(db) -> set[str]:
    with db.engine.connect() as conn:
        return set(conn.execute(select(cron_table.c.name)).scalars())


def jobs_of(db, name: str) -> list:
    with db.engine.connect() as conn:
        return conn.execute(select(task_table).where(task_table.c.name == name).order_by(task_table.c.id)).all()


def effects(db) -> list:
    with db.engine.connect() as conn:
        return conn.execute(select(effect).order_by(effect.c.id)).all()


def only(crons: dict, *names: str) -> dict:
    return {name: crons[name] for name in names}


# -- decoration time ------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["61 * * * *", "* * * *", "* * * * * *", "every minute", "0 0 31 2 *"])
def test_bad_expression_is_refused_at_decoration_naming_it(spec):
    with pytest.raises(ValueError) as caught:
        mqueue.cron(spec, name="tsc.never_bad_expression")
    assert repr(spec) in str(caught.value)
    assert "tsc.never_bad_expression" not in registered_crons()


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "", "CEST+2"])
def test_bad_time_zone_is_refused_at_decoration_naming_it(tz):
    with pytest.raises(ValueError) as caught:
        mqueue.cron("0 3 * * *", tz=tz, name="tsc.never_bad_tz")
    assert repr(tz) in str(caught.value)
    assert "tsc.never_bad_tz" not in registered_crons()


def test_function_with_required_arguments_is_refused_and_not_registered():
    def needs_a_customer(customer_id, *, dry_run):
        pass

    with pytest.raises(ValueError) as caught:
        mqueue.cron(mqueue.HOURLY, name="tsc.never_needs_args")(needs_a_customer)
    assert "needs_a_customer" in str(caught.value)
    assert "no required arguments" in str(caught.value)
    assert "tsc.never_needs_args" not in registered_crons()
    with pytest.raises(UnknownTaskError):
        get_task("tsc.never_needs_args")


def test_cron_is_also_a_task_and_defaults_are_fine():
    def with_defaults(limit=10, *rest, **options):
        return limit

    registered = mqueue.cron(mqueue.Hourly, tz=ZoneInfo("Europe/Berlin"), name="tsc.defaults_ok",
                             queue="tsc_nowhere")(with_defaults)
    try:
        assert isinstance(registered, mqueue.Task)
        assert get_task("tsc.defaults_ok") is registered
        assert registered() == 10  # calling it runs it here
        spec = registered_crons()["tsc.defaults_ok"]
        assert (spec.schedule.expression, spec.schedule.tz, spec.queue_name()) == \
            ("0 * * * *", "Europe/Berlin", "tsc_nowhere")
    finally:
        unregister_cron("tsc.defaults_ok")
        unregister("tsc.defaults_ok")


def test_cron_over_task_keeps_the_task_name_and_options():
    def nightly() -> None:
        pass

    inner = mqueue.task(name="tsc.stacked", queue="tsc_stacked", priority=5, max_retries=2, backoff=[1, 2])(nightly)
    registered = mqueue.cron("0 4 * * *", tz="Europe/Berlin")(inner)
    try:
        assert registered.name == "tsc.stacked" and get_task("tsc.stacked") is registered
        assert (registered.queue, registered.priority, registered.max_retries, registered.backoff) == \
            ("tsc_stacked", 5, 2, (1.0, 2.0))
        assert registered_crons()["tsc.stacked"].queue_name() == "tsc_stacked"
    finally:
        unregister_cron("tsc.stacked")
        unregister("tsc.stacked")


def test_one_task_has_one_schedule():
    def twice() -> None:
        pass

    mqueue.cron(mqueue.HOURLY, name="tsc.twice")(twice)
    try:
        assert mqueue.cron("0 * * * *", name="tsc.twice")(twice) is not None  # the same again: a re-import
        with pytest.raises(ValueError) as caught:
            mqueue.cron(mqueue.DAILY, name="tsc.twice")(twice)
        assert "tsc.twice" in str(caught.value) and "'0 * * * *'" in str(caught.value)
        assert registered_crons()["tsc.twice"].schedule == Schedule.parse("0 * * * *")
    finally:
        unregister_cron("tsc.twice")
        unregister("tsc.twice")


# -- sync ---------------------------------------------------------------------------

def test_sync_inserts_rows_with_the_next_slot_after_now(edb):
    Scheduler(edb, ["tsc_sync"]).sync(now=T0)
    minutely, hourly = cron_row(edb, "tsc.sync_minutely"), cron_row(edb, "tsc.sync_hourly")
    assert (minutely.queue, minutely.schedule, minutely.tz) == ("tsc_sync", "* * * * *", "UTC")
    assert (hourly.queue, hourly.schedule, hourly.tz) == ("tsc_sync", "0 * * * *", "UTC")
    assert minutely.next_slot == dt.datetime(2031, 1, 1, 0, 1)
    assert hourly.next_slot == dt.datetime(2031, 1, 1, 1, 0)
    assert minutely.last_slot is None and minutely.last_job_id is None
    assert cron_names(edb) == {"tsc.sync_minutely", "tsc.sync_hourly"}  # other queues' crons not here


def test_new_cron_does_not_run_at_start_up(edb):
    scheduler = Scheduler(edb, ["tsc_start"])
    assert scheduler.tick(now=T0) == []  # the first tick syncs: next slot 00:01
    assert scheduler.tick(now=dt.datetime(2031, 1, 1, 0, 0, 59, 999999)) == []
    assert jobs_of(edb, "tsc.start") == []
    ids = scheduler.tick(now=dt.datetime(2031, 1, 1, 0, 1))
    assert len(ids) == 1
    assert [job.id for job in jobs_of(edb, "tsc.start")] == ids
    row = cron_row(edb, "tsc.start")
    assert (row.last_slot, row.next_slot, row.last_job_id) == \
        (dt.datetime(2031, 1, 1, 0, 1), dt.datetime(2031, 1, 1, 0, 2), ids[0])
    # a second worker starting later finds the row as it is and does not run the cron again
    assert Scheduler(edb, ["tsc_start"]).tick(now=dt.datetime(2031, 1, 1, 0, 1, 30)) == []
    assert len(jobs_of(edb, "tsc.start")) == 1


def test_changed_schedule_tz_or_queue_updates_the_row_and_keeps_the_last_run(edb):
    spec = dataclasses.replace(registered_crons()["tsc.sync_minutely"], skip_if_scheduled=False)
    Scheduler(edb, ["tsc_sync"], crons={spec.name: spec}).sync(now=T0)
    [job_id] = Scheduler(edb, ["tsc_sync"], crons={spec.name: spec}).tick(now=dt.datetime(2031, 1, 1, 0, 1, 10))
    last = dt.datetime(2031, 1, 1, 0, 1)

    quarterly = dataclasses.replace(spec, schedule=Schedule.parse("*/15 * * * *"))
    Scheduler(edb, ["tsc_sync"], crons={spec.name: quarterly}).sync(now=dt.datetime(2031, 1, 1, 0, 1, 20))
    row = cron_row(edb, spec.name)
    assert (row.schedule, row.tz, row.queue) == ("*/15 * * * *", "UTC", "tsc_sync")
    assert (row.last_slot, row.last_job_id) == (last, job_id)
    assert row.next_slot == dt.datetime(2031, 1, 1, 0, 15)

    # the same expression in India (UTC+05:30): the next full hour there is at half past in UTC
    kolkata = dataclasses.replace(spec, schedule=Schedule.parse("0 * * * *", tz="Asia/Kolkata"))
    Scheduler(edb, ["tsc_sync"], crons={spec.name: kolkata}).sync(now=dt.datetime(2031, 1, 1, 0, 2))
    row = cron_row(edb, spec.name)
    assert (row.schedule, row.tz) == ("0 * * * *", "Asia/Kolkata")
    assert (row.last_slot, row.next_slot) == (last, dt.datetime(2031, 1, 1, 0, 30))

    moved = dataclasses.replace(kolkata, queue="tsc_sync_moved")
    Scheduler(edb, ["tsc_sync", "tsc_sync_moved"], crons={spec.name: moved}).sync(now=dt.datetime(2031, 1, 1, 0, 3))
    row = cron_row(edb, spec.name)
    assert row.queue == "tsc_sync_moved" and (row.last_slot, row.last_job_id) == (last, job_id)
    assert row.next_slot == dt.datetime(2031, 1, 1, 0, 30)

    # unchanged code: a later sync leaves the row alone (a slot missed meanwhile is caught up by tick)
    again = Scheduler(edb, ["tsc_sync_moved"], crons={spec.name: moved})
    again.sync(now=dt.datetime(2031, 1, 1, 5, 0))
    assert cron_row(edb, spec.name).next_slot == dt.datetime(2031, 1, 1, 0, 30)
    assert len(again.tick(now=dt.datetime(2031, 1, 1, 5, 0))) == 1
    row = cron_row(edb, spec.name)
    assert (row.last_slot, row.next_slot) == (dt.datetime(2031, 1, 1, 4, 30), dt.datetime(2031, 1, 1, 5, 30))


def test_rows_of_crons_removed_from_the_code_are_deleted_for_served_queues_only(edb):
    with edb.engine.begin() as conn:
        conn.execute(insert(cron_table), [
            dict(name="tsc.long_gone", queue="tsc_sync", schedule="0 0 * * *", tz="UTC",
                 next_slot=dt.datetime(2031, 1, 2)),
            dict(name="elsewhere.report", queue="tsc_elsewhere", schedule="0 0 * * *", tz="UTC",
                 next_slot=dt.datetime(2031, 1, 2)),
        ])
    Scheduler(edb, ["tsc_sync"]).sync(now=T0)
    assert cron_names(edb) == {"tsc.sync_minutely", "tsc.sync_hourly", "elsewhere.report"}

    # the hourly cron is deleted from the code
    Scheduler(edb, ["tsc_sync"], crons=only(registered_crons(), "tsc.sync_minutely")).sync(now=T0)
    assert cron_names(edb) == {"tsc.sync_minutely", "elsewhere.report"}

    # the last cron of the queue goes too: a worker with no crons left still cleans up on its first tick
    assert Scheduler(edb, ["tsc_sync"], crons={}).tick(now=T0) == []
    assert cron_names(edb) == {"elsewhere.report"}


def cron_updates_in_progress(db) -> int:
    """Statements ``UPDATE mqueue_cron ...`` running right now in this database (server backends).

    (MariaDB's ``information_schema.innodb_trx`` was seen not to list such a
    waiting statement as ``LOCK WAIT``; the process list always shows it.)
    """
    if db.engine.dialect.name == "postgresql":
        query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND state = 'active' AND query LIKE 'UPDATE mqueue_cron%%'")
    else:
        query = ("SELECT count(*) FROM information_schema.processlist WHERE db = DATABASE() "
                 "AND command = 'Query' AND info LIKE 'UPDATE mqueue_cron%%'")
    with db.engine.connect() as conn:
        return conn.exec_driver_sql(query).scalar_one()


@pytest.mark.backends("mariadb", "postgresql")
def test_a_late_sync_of_the_same_change_cannot_move_the_next_slot_back(edb):
    """Two workers deploy the same schedule change at once; the first also takes a slot.

    The second read the old row before the first committed, so it wants to
    write the change too.  Its write waits for the first's row lock and must
    then find the change made: were it to reset ``next_slot`` from its older
    ``now``, the slot just taken would be enqueued a second time.
    """
    spec = dataclasses.replace(registered_crons()["tsc.sync_minutely"], skip_if_scheduled=False)
    with edb.engine.begin() as conn:  # what the old code left behind: an hourly schedule
        conn.execute(insert(cron_table).values(name=spec.name, queue="tsc_sync", schedule="0 * * * *", tz="UTC",
                                               next_slot=dt.datetime(2031, 1, 1, 1, 0)))
    slot = dt.datetime(2031, 1, 1, 0, 1)
    errors: list[BaseException] = []
    late = Scheduler(edb, ["tsc_sync"], crons={spec.name: spec})

    def late_sync() -> None:
        try:
            late.sync(now=slot - dt.timedelta(seconds=1))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    with edb.engine.connect() as first:
        with first.begin():
            # the first worker's sync and its tick, not yet committed: the minutely schedule, slot 00:01 taken
            first.execute(cron_table.update().where(cron_table.c.name == spec.name).values(
                schedule="* * * * *", last_slot=slot, next_slot=slot + MINUTE, last_job_id=12345))
            thread = threading.Thread(target=late_sync)
            thread.start()
            # it has read the old row and now waits for the first's row lock
            wait_for(lambda: cron_updates_in_progress(edb) >= 1 or not thread.is_alive(), timeout=20,
                     message="the late sync never tried to write")
            assert thread.is_alive(), f"the late sync did not wait for the row lock: {errors}"
        thread.join(30)
    assert not thread.is_alive() and not errors, errors
    row = cron_row(edb, spec.name)
    assert (row.schedule, row.last_slot, row.next_slot) == ("* * * * *", slot, slot + MINUTE)
    assert late.tick(now=slot + dt.timedelta(seconds=1)) == []  # the slot is not enqueued again


def test_a_worker_whose_code_has_no_crons_left_deletes_their_rows(edb):
    with edb.engine.begin() as conn:
        conn.execute(insert(cron_table), [
            dict(name="tsc.retired", queue="tsc_orphan", schedule="0 0 * * *", tz="UTC",
                 next_slot=dt.datetime(2031, 1, 2)),
            dict(name="elsewhere.report", queue="tsc_elsewhere", schedule="0 0 * * *", tz="UTC",
                 next_slot=dt.datetime(2031, 1, 2)),
        ])
    worker = mqueue.Worker(edb, queues=["tsc_orphan"], lease=2, poll_interval=0.05)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: cron_names(edb) == {"elsewhere.report"}, timeout=10,
                 message=lambda: f"cron rows left: {cron_names(edb)}")
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


# -- exactly one job per scheduled time ---------------------------------------------

@pytest.mark.parametrize("schedulers", [3, 8])
def test_each_slot_yields_exactly_one_job_with_concurrent_schedulers(edb, database_url, schedulers):
    """Each thread has its own Database (connection pool) and Scheduler, as separate workers would.

    All threads tick at the same injected ``now`` after a barrier.  The
    first round also races the initial sync; one round jumps three hours
    (catch-up under contention).
    """
    minutes = 8
    rounds = ([T0] + [T0 + n * MINUTE for n in range(1, minutes + 1)]
              + [T0 + minutes * MINUTE + dt.timedelta(seconds=10)]  # nothing due
              + [T0 + dt.timedelta(hours=3, minutes=3), T0 + dt.timedelta(hours=3, minutes=4)])
    expected_new = [0] + [1] * minutes + [0, 1, 1]
    barrier = threading.Barrier(schedulers, timeout=60)
    created: dict[tuple[int, int], list[int]] = {}
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        database = mqueue.Database(database_url)
        try:
            scheduler = Scheduler(database, ["tsc_race"])
            for index, now in enumerate(rounds):
                barrier.wait()
                created[number, index] = scheduler.tick(now=now)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            barrier.abort()
        finally:
            database.dispose()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(schedulers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)

    per_round = [sum(len(created[n, index]) for n in range(schedulers)) for index in range(len(rounds))]
    assert per_round == expected_new
    all_ids = sorted(job_id for ids in created.values() for job_id in ids)
    assert [job.id for job in jobs_of(edb, "tsc.race")] == all_ids
    assert len(all_ids) == sum(expected_new)
    row = cron_row(edb, "tsc.race")
    assert row.last_slot == dt.datetime(2031, 1, 1, 3, 4)
    assert row.next_slot == dt.datetime(2031, 1, 1, 3, 5)
    assert row.last_job_id == all_ids[-1]


def test_catch_up_after_three_hours_of_downtime_enqueues_one_job(edb):
    scheduler = Scheduler(edb, ["tsc_catchup"])
    scheduler.sync(now=dt.datetime(2031, 1, 1, 0, 10))
    assert len(scheduler.tick(now=dt.datetime(2031, 1, 1, 1, 0, 1))) == 1
    # every worker is down from 01:00:30 to 04:20: the slots 02:00, 03:00, 04:00 were missed
    later = Scheduler(edb, ["tsc_catchup"])
    ids = later.tick(now=dt.datetime(2031, 1, 1, 4, 20))
    assert len(ids) == 1
    row = cron_row(edb, "tsc.catchup")
    assert (row.last_slot, row.next_slot, row.last_job_id) == \
        (dt.datetime(2031, 1, 1, 4, 0), dt.datetime(2031, 1, 1, 5, 0), ids[0])
    for minute in (21, 40, 59):
        assert later.tick(now=dt.datetime(2031, 1, 1, 4, minute)) == []
    assert len(later.tick(now=dt.datetime(2031, 1, 1, 5, 0))) == 1
    assert len(jobs_of(edb, "tsc.catchup")) == 3


@pytest.mark.backends("mariadb", "postgresql")
def test_a_cron_whose_job_cannot_be_stored_does_not_stop_the_others(edb, caplog):
    scheduler = Scheduler(edb, ["tsc_broken"])
    scheduler.sync(now=T0)
    with caplog.at_level(logging.ERROR, logger="mqueue.scheduler"):
        ids = scheduler.tick(now=T0 + MINUTE)
    assert [admin.get_job(edb, job_id).name for job_id in ids] == ["tsc.fine_neighbour"]
    assert "cron=tsc.broken_priority" in caplog.text and "could not be enqueued" in caplog.text
    row = cron_row(edb, "tsc.broken_priority")  # rolled back: tried again on the next tick
    assert (row.last_slot, row.next_slot) == (None, T0 + MINUTE - dt.timedelta(seconds=30))


# -- skip_if_scheduled -----------------------------------------------------------------

def test_skip_if_scheduled_skips_while_the_previous_job_is_queued_or_running(edb):
    dialect = edb.dialect
    scheduler = Scheduler(edb, ["tsc_skip"])
    scheduler.sync(now=T0)

    def tick(minute: int) -> list[int]:
        return scheduler.tick(now=dt.datetime(2031, 1, 1, 0, minute, 5))

    [first] = tick(1)
    assert tick(2) == []  # first is still queued
    row = cron_row(edb, "tsc.skip")
    assert (row.last_job_id, row.next_slot) == (first, dt.datetime(2031, 1, 1, 0, 3))  # the slot is used up

    with edb.engine.begin() as conn:
        [claimed] = dialect.claim_jobs(conn, "tsc_skip", 1, "test-owner", 30)
    assert claimed.id == first and admin.get_job(edb, first).state == RUNNING
    assert tick(3) == []  # running

    with edb.engine.begin() as conn:
        assert dialect.complete_job(conn, claimed.id, claimed.token)
    assert admin.get_job(edb, first).state == SUCCEEDED
    [second] = tick(4)  # finished (succeeded): runs again
    assert second != first

    with edb.engine.begin() as conn:
        [claimed] = dialect.claim_jobs(conn, "tsc_skip", 1, "test-owner", 30)
        assert dialect.fail_job(conn, claimed.id, claimed.token, "it broke")
    assert admin.get_job(edb, second).state == FAILED
    [third] = tick(5)  # a failed job is neither queued nor running
    assert [(job.id, job.state) for job in jobs_of(edb, "tsc.skip")] == [
        (first, SUCCEEDED), (second, FAILED), (third, QUEUED)]
    assert cron_row(edb, "tsc.skip").last_job_id == third


def test_skip_if_scheduled_false_enqueues_anyway(edb):
    scheduler = Scheduler(edb, ["tsc_noskip"])
    scheduler.sync(now=T0)
    ids = [job_id for minute in (1, 2, 3) for job_id in scheduler.tick(now=dt.datetime(2031, 1, 1, 0, minute))]
    assert len(ids) == 3
    assert [(job.id, job.state) for job in jobs_of(edb, "tsc.noskip")] == [(i, QUEUED) for i in ids]


# -- daylight saving time ---------------------------------------------------------------

def local(*fields: int) -> dt.datetime:
    """A Berlin wall-clock time as naive UTC."""
    return dt.datetime(*fields, tzinfo=BERLIN).astimezone(dt.timezone.utc).replace(tzinfo=None)


@pytest.mark.parametrize("first_day, expected_slots", [
    # spring forward on Sunday 29 March 2026: 02:30 does not exist and runs at 03:00 CEST
    (dt.date(2026, 3, 28), [dt.datetime(2026, 3, 28, 1, 30), dt.datetime(2026, 3, 29, 1, 0),
                            dt.datetime(2026, 3, 30, 0, 30)]),
    # fall back on Sunday 25 October 2026: 02:30 happens twice and runs at its first occurrence (CEST)
    (dt.date(2026, 10, 24), [dt.datetime(2026, 10, 24, 0, 30), dt.datetime(2026, 10, 25, 0, 30),
                             dt.datetime(2026, 10, 26, 1, 30)]),
], ids=["spring-forward", "fall-back"])
def test_dst_days_get_exactly_one_run_each_in_berlin(edb, first_day, expected_slots):
    """``30 2 * * *`` in Europe/Berlin, ticked every minute through three local days around a change."""
    scheduler = Scheduler(edb, ["tsc_dst"])
    start = local(first_day.year, first_day.month, first_day.day)
    end = local(*(first_day + dt.timedelta(days=3)).timetuple()[:3])
    scheduler.sync(now=start)
    step = MINUTE
    runs = []  # (tick time, slot)
    now = start
    while now < end:
        for _ in scheduler.tick(now=now):
            runs.append((now, cron_row(edb, "tsc.dst").last_slot))
        now += step
    assert [slot for _, slot in runs] == expected_slots
    assert all(dt.timedelta(0) <= at - slot < step for at, slot in runs)  # enqueued on the first tick due
    local_days = [slot.replace(tzinfo=dt.timezone.utc).astimezone(BERLIN).date() for _, slot in runs]
    assert local_days == [first_day + dt.timedelta(days=n) for n in range(3)]
    assert len(jobs_of(edb, "tsc.dst")) == 3


# -- the cron's job is an ordinary job ------------------------------------------------------

def test_cron_job_is_an_ordinary_job(edb):
    worker_options = dict(queues=["tsc_job"], lease=2, poll_interval=0.05)
    scheduler = Scheduler(edb, ["tsc_job"])
    scheduler.sync(now=T0)
    new = scheduler.tick(now=T0 + MINUTE)
    by_name = {admin.get_job(edb, job_id).name: job_id for job_id in new}
    assert set(by_name) == {"tsc.flaky", "tsc.doomed"}
    flaky_id, doomed_id = by_name["tsc.flaky"], by_name["tsc.doomed"]
    job = admin.get_job(edb, flaky_id)
    assert (job.queue, job.state, job.retries, job.decoded_args()) == ("tsc_job", QUEUED, 0, {})

    result = mqueue.Worker(edb, **worker_options).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (0, 1, 1)
    job = admin.get_job(edb, flaky_id)
    assert (job.state, job.retries) == (QUEUED, 1)  # waiting for its retry (backoff 1 h)
    assert "flaky cron broke" in job.last_error
    job = admin.get_job(edb, doomed_id)
    assert (job.state, job.retries) == (FAILED, 1)  # max_retries=0: one run only
    assert "doomed cron always fails" in job.last_error
    assert effects(edb) == []  # the failed runs' writes rolled back
    assert {(j.id, j.state) for j in admin.list_jobs(edb, queue="tsc_job")} == {(flaky_id, QUEUED),
                                                                                (doomed_id, FAILED)}

    flaky_state["failing"] = False
    admin.retry_job(edb, flaky_id)  # due now
    result = mqueue.Worker(edb, **worker_options).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (1, 0, 0)
    job = admin.get_job(edb, flaky_id)  # kept on record, never run again
    assert (job.state, job.runs, job.finished) == (SUCCEEDED, 2, True)
    assert [(e.job_id, e.note) for e in effects(edb)] == [(flaky_id, "flaky")]

    # its task can be enqueued by hand, like any task
    with edb.session():
        by_hand = flaky.enqueue()
    assert admin.get_job(edb, by_hand).queue == "tsc_job"
    result = mqueue.Worker(edb, **worker_options).run_until_empty(timeout=30)
    assert (result.succeeded, result.retried, result.failed) == (1, 0, 0)
    assert [(e.job_id, e.note) for e in effects(edb)] == [(flaky_id, "flaky"), (by_hand, "flaky")]

    # the next slot: neither previous job is queued or running any more, so both crons run again
    assert len(scheduler.tick(now=T0 + 2 * MINUTE)) == 2
    with edb.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(task_table)
                            .where(task_table.c.state == QUEUED)).scalar_one() == 2
    assert {(job.id, job.state) for job in admin.list_jobs(edb, queue="tsc_job", state=SUCCEEDED)} == {
        (flaky_id, SUCCEEDED), (by_hand, SUCCEEDED)}


# -- the crons command ----------------------------------------------------------------------

@pytest.mark.backends("sqlite")
def test_crons_command_lists_queue_name_schedule_last_and_next_run(edb, database_url, tmp_path):
    scheduler = Scheduler(edb, ["tsc_cli"])
    scheduler.sync(now=T0)  # Hours(6) in Berlin: 00, 06, 12, 18 local = 23, 05, 11, 17 UTC in winter
    assert len(scheduler.tick(now=dt.datetime(2031, 1, 1, 5, 0, 2))) == 1
    result = run_python(["-m", "mqueue", "crons", "--database", database_url], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    header, *lines = result.stdout.splitlines()
    for title in ("NAME", "QUEUE", "SCHEDULE", "LAST RUN", "NEXT RUN"):
        assert title in header
    assert len(lines) == 1
    line = lines[0]
    for value in ("tsc.cli_report", "tsc_cli", "0 */6 * * *", "Europe/Berlin",
                  "2031-01-01 05:00:00", "2031-01-01 11:00:00"):
        assert value in line, (value, line)
    assert line.index("2031-01-01 05:00:00") < line.index("2031-01-01 11:00:00")  # last run, then next
