"""Enqueueing on every backend: transactional, options, bulk, unique keys, hand-made rows, errors.

Rows are read through a separate plain engine (``observer``), so what a test
sees is what any other connection sees.  Times are compared with the
database's own clock, read with each backend's native SQL rather than
through mqueue.
"""

from __future__ import annotations

import datetime as dt
import threading
import traceback

import pytest
from helpers import free_port, run_python, wait_for
from sqlalchemy import event, func, insert, select, text

import mqueue
from mqueue.config import settings
from mqueue.encoding import decode_args, encode_args
from mqueue.migrate import upgrade
from mqueue.schema import task_table as t

from helpers import note, note_metadata, notes  # noqa: E402 - shared scratch table

#: What the tasks below were called with, in order.
calls: list = []


@mqueue.task(name="tenq.mail", queue="tenq")
def mail(to: str, subject: str = "hello") -> None:
    calls.append(("mail", to, subject))


@mqueue.task(name="tenq.tuned", queue="tenq-tuned", priority=3, max_retries=4)
def tuned(n: int) -> None:
    calls.append(("tuned", n))


@mqueue.task(name="tenq.plain")
def plain(n: int = 0) -> None:
    calls.append(("plain", n))


@mqueue.task(name="tenq.order", queue="tenq-order")
def order(label: str) -> None:
    calls.append(label)


@mqueue.task(name="tenq.hand", queue="tenq-hand")
def hand(user_id: int, note: str = "default") -> None:
    calls.append(("hand", user_id, note, mqueue.current_job().retries))


@mqueue.task(name="tenq.give_up", queue="tenq-unique")
def give_up(n: int) -> None:
    raise mqueue.Fail("no point")


@mqueue.task(name="tenq.succeed", queue="tenq-unique")
def succeed(n: int) -> None:
    calls.append(("succeed", n))


@mqueue.task(name="tenq.self_unique", queue="tenq-unique")
def self_unique(key: str) -> None:
    again = self_unique.options(unique_key=key).enqueue(key)
    calls.append(("self_unique", mqueue.current_job().id, again))


NATIVE_NOW = {
    "sqlite": "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')",
    "mariadb": "SELECT UTC_TIMESTAMP(6)",
    "postgresql": "SELECT clock_timestamp() AT TIME ZONE 'utc'",
}


@pytest.fixture(autouse=True)
def clean_state():
    calls.clear()
    yield
    database = settings.database
    mqueue.init()  # back to: queue "default", no database
    if database is not None:
        database.dispose()


@pytest.fixture
def db(db):
    note_metadata.create_all(db.engine)
    return db


@pytest.fixture
def db_time(observer, backend):
    """The database's current UTC time as a naive datetime, by the backend's own SQL."""
    def now() -> dt.datetime:
        with observer.connect() as conn:
            value = conn.exec_driver_sql(NATIVE_NOW[backend]).scalar_one()
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        assert value.tzinfo is None
        return value
    return now


def rows(engine, *where):
    with engine.connect() as conn:
        return conn.execute(select(t).where(*where).order_by(t.c.id)).all()


def row(engine, job_id):
    found = rows(engine, t.c.id == job_id)
    return found[0] if found else None


def count(engine, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(t).where(*where)).scalar_one()


def run_worker(db, queue: str, **options) -> mqueue.RunResult:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lease", 5)
    return mqueue.Worker(db, queues=[queue], **options).run_until_empty(timeout=60)


# -- transactional enqueue -------------------------------------------------------------------


def test_enqueue_commits_with_the_session(db, observer):
    with db.session() as session:
        session.execute(insert(note).values(text="user created"))
        job_id = mail.enqueue("ada@example.com", subject="welcome")
        assert isinstance(job_id, int)
        assert count(observer) == 0  # invisible until the transaction commits
    stored = row(observer, job_id)
    assert stored is not None
    assert (stored.queue, stored.name, stored.state) == ("tenq", "tenq.mail", "queued")
    assert decode_args(stored.args) == {"to": "ada@example.com", "subject": "welcome"}
    assert notes(observer) == ["user created"]


def test_enqueue_rolls_back_with_the_session(db, observer):
    with pytest.raises(RuntimeError, match="signup failed"):
        with db.session() as session:
            session.execute(insert(note).values(text="user created"))
            mail.enqueue("ada@example.com")
            mail.options(unique_key="welcome-ada").enqueue("ada@example.com")
            mail.enqueue_many([{"to": "b@example.com"}, {"to": "c@example.com"}])
            raise RuntimeError("signup failed")
    assert count(observer) == 0
    assert notes(observer) == []
    # The rolled-back unique job holds no key.
    with db.session():
        job_id = mail.options(unique_key="welcome-ada").enqueue("ada@example.com")
    assert [r.id for r in rows(observer)] == [job_id]


def test_enqueue_in_a_caller_managed_session(db, observer):
    session = db.Session()
    try:
        with mqueue.use_session(session):
            first = mail.enqueue("one@example.com")
        session.rollback()
        with mqueue.use_session(session):
            second = mail.enqueue("two@example.com")
        assert count(observer) == 0
        session.commit()
    finally:
        session.close()
    assert [r.id for r in rows(observer)] == [second]


def test_enqueue_outside_a_session_uses_the_init_database_and_commits_at_once(db, observer):
    mqueue.init("tenq-init", database=db)
    job_id = plain.enqueue(5)
    stored = row(observer, job_id)
    assert stored is not None
    assert stored.queue == "tenq-init"  # the task names no queue: init's default applies
    assert mail.enqueue("x@example.com") != job_id
    ids = plain.enqueue_many([{"n": 1}, {"n": 2}])
    assert count(observer, t.c.id.in_(ids)) == 2


def test_init_accepts_a_url_string(db, observer, database_url):
    mqueue.init("tenq-url", database=database_url)
    assert isinstance(settings.database, mqueue.Database)
    job_id = plain.enqueue()
    assert row(observer, job_id).queue == "tenq-url"


def test_a_session_wins_over_the_init_database(db, observer, tmp_path):
    other = mqueue.Database(f"sqlite:///{tmp_path / 'other.db'}")
    upgrade(other)
    mqueue.init("tenq-init", database=other)
    with pytest.raises(LookupError):
        with db.session():
            mail.enqueue("in the session")
            raise LookupError("roll back")
    assert count(observer) == 0
    with other.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t)).scalar_one() == 0


def test_enqueue_with_neither_session_nor_database_raises(db, observer):
    assert settings.database is None
    with pytest.raises(mqueue.NoSessionError) as caught:
        mail.enqueue("nobody@example.com")
    message = str(caught.value)
    assert "db.session()" in message and "mqueue.init" in message
    with pytest.raises(mqueue.NoSessionError):
        mail.enqueue_many([{"to": "a"}])
    with pytest.raises(mqueue.NoSessionError):
        mail.options(delay=1).enqueue("nobody@example.com")
    assert count(observer) == 0


# -- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay, seconds", [(30, 30), (dt.timedelta(minutes=2), 120), (0.25, 0.25), (0, 0)])
def test_delay_counts_from_the_database_clock(db, observer, db_time, delay, seconds):
    before = db_time()
    with db.session():
        job_id = mail.options(delay=delay).enqueue("later@example.com")
    after = db_time()
    eta = row(observer, job_id).eta
    shift = dt.timedelta(seconds=seconds)
    assert before + shift <= eta <= after + shift, (before, eta, after)


def test_delay_in_enqueue_many(db, observer, db_time):
    before = db_time()
    with db.session():
        ids = mail.options(delay=60).enqueue_many([{"to": "a"}, {"to": "b"}])
    after = db_time()
    for stored in rows(observer, t.c.id.in_(ids)):
        assert before + dt.timedelta(seconds=60) <= stored.eta <= after + dt.timedelta(seconds=60)


def test_no_delay_means_due_now(db, observer, db_time):
    before = db_time()
    with db.session():
        job_id = mail.enqueue("now@example.com")
    after = db_time()
    assert before <= row(observer, job_id).eta <= after


@pytest.mark.parametrize("eta, stored", [
    (dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
     dt.datetime(2031, 5, 6, 5, 8, 9, 123456)),
    (dt.datetime(2031, 5, 6, 7, 8, 9, 654321, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
     dt.datetime(2031, 5, 6, 12, 38, 9, 654321)),
    (dt.datetime(2031, 5, 6, 7, 8, 9, 1, tzinfo=dt.timezone.utc), dt.datetime(2031, 5, 6, 7, 8, 9, 1)),
    (dt.datetime(2031, 5, 6, 7, 8, 9, 999999), dt.datetime(2031, 5, 6, 7, 8, 9, 999999)),  # naive is UTC
    (dt.datetime(2001, 1, 1), dt.datetime(2001, 1, 1)),  # in the past: due at once
], ids=["plus2", "minus0530", "utc", "naive", "past"])
def test_eta_aware_or_naive_utc_is_stored_exactly(db, observer, eta, stored):
    with db.session():
        job_id = mail.options(eta=eta).enqueue("eta@example.com")
    assert row(observer, job_id).eta == stored


def test_eta_keeps_microseconds(db, observer):
    etas = [dt.datetime(2030, 1, 2, 3, 4, 5, micro) for micro in (0, 1, 10, 123456, 500000, 999999)]
    with db.session():
        ids = [mail.options(eta=eta).enqueue("precise") for eta in etas]
        many = mail.options(eta=etas[3]).enqueue_many([{"to": "a"}, {"to": "b"}])
    assert [row(observer, job_id).eta for job_id in ids] == etas
    assert [r.eta for r in rows(observer, t.c.id.in_(many))] == [etas[3], etas[3]]


def test_task_defaults_and_per_call_options_are_stored(db, observer):
    with db.session():
        default_id = tuned.enqueue(1)
        custom_id = tuned.options(priority=-7, queue="elsewhere", max_retries=0).enqueue(2)
        plain_id = mail.enqueue("p@example.com")
    default, custom, ordinary = row(observer, default_id), row(observer, custom_id), row(observer, plain_id)
    assert (default.queue, default.priority, default.max_retries) == ("tenq-tuned", 3, 4)
    assert (custom.queue, custom.priority, custom.max_retries) == ("elsewhere", -7, 0)
    assert (ordinary.queue, ordinary.priority, ordinary.max_retries) == ("tenq", 0, 10)
    for stored in (default, custom, ordinary):
        assert (stored.retries, stored.state, stored.unique_key) == (0, "queued", None)
        assert stored.neg_priority == -stored.priority


# -- enqueue_many ---------------------------------------------------------------------------------


def test_enqueue_many_of_a_thousand_returns_ids_in_order(db, observer):
    with db.session():
        ids = tuned.options(priority=9).enqueue_many({"n": n} for n in range(1000))
    assert len(ids) == 1000
    assert len(set(ids)) == 1000
    assert all(isinstance(job_id, int) for job_id in ids)
    stored = {r.id: r for r in rows(observer)}
    assert set(stored) == set(ids)
    for n, job_id in enumerate(ids):
        r = stored[job_id]
        assert decode_args(r.args) == {"n": n}
        assert (r.name, r.queue, r.priority, r.max_retries, r.state) == ("tenq.tuned", "tenq-tuned", 9, 4, "queued")


def test_enqueue_many_of_text_larger_than_one_statement_stores_every_character(db, observer):
    """Over a megabyte of arguments (MariaDB sends them in several statements of at most 512 KiB of
    text, as one JSON array each): quotes, backslashes, control characters and 4-byte UTF-8 come back
    as stored by a single enqueue, and the ids are in input order."""
    odd = 'quote " backslash \\ newline \n tab \t nul-ish \\u0000 é ß 中文 😀 '
    calls = [{"to": f"{n}:" + odd * (40 + n % 7), "subject": "é" * (n % 3)} for n in range(400)]
    assert sum(len(encode_args(call, "tenq.mail")) for call in calls) > 2 * 512 * 1024
    with db.session():
        ids = mail.enqueue_many(calls)
    assert ids == sorted(ids) and len(set(ids)) == len(calls)
    stored = {r.id: r for r in rows(observer)}
    assert [stored[job_id].args for job_id in ids] == [encode_args(call, "tenq.mail") for call in calls]
    assert [decode_args(stored[job_id].args) for job_id in ids] == calls


def test_enqueue_many_on_a_handle_that_never_connected_is_one_insert_statement(db, database_url, observer):
    """Before its first connection an engine does not know the server's version (so on MariaDB
    whether INSERT ... RETURNING exists): the batch must still go as one statement, not 1,000."""
    fresh = mqueue.Database(database_url)
    inserts: list[str] = []
    event.listen(fresh.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: inserts.append(statement)
                 if statement.lstrip().upper().startswith("INSERT") else None)
    try:
        with fresh.session():
            ids = mail.enqueue_many({"to": f"user{n}@example.com"} for n in range(1000))
    finally:
        fresh.dispose()
    assert len(inserts) == 1, inserts[:3]
    assert ids == sorted(ids) and count(observer) == 1000


def test_enqueue_many_of_nothing_stores_nothing(db, observer):
    with db.session():
        assert mail.enqueue_many([]) == []
    assert count(observer) == 0


def test_enqueue_many_refuses_a_unique_key(db, observer):
    with db.session():
        with pytest.raises(ValueError, match="unique_key"):
            mail.options(unique_key="k").enqueue_many([{"to": "a"}])
    assert count(observer) == 0


# -- unique_key -------------------------------------------------------------------------------------


def test_unique_key_returns_the_queued_job(db, observer):
    with db.session():
        first = mail.options(unique_key="digest-42").enqueue("a@example.com")
        again_same_session = mail.options(unique_key="digest-42").enqueue("b@example.com")
    with db.session():
        again_later = mail.options(unique_key="digest-42", delay=60).enqueue("c@example.com")
    mqueue.init(database=db)
    again_outside = mail.options(unique_key="digest-42").enqueue("d@example.com")
    assert first == again_same_session == again_later == again_outside
    assert [(r.id, decode_args(r.args)["to"]) for r in rows(observer)] == [(first, "a@example.com")]

    with db.session():
        other = mail.options(unique_key="digest-43").enqueue("e@example.com")
        no_key = mail.enqueue("f@example.com")
        no_key_again = mail.enqueue("f@example.com")
    assert len({first, other, no_key, no_key_again}) == 4


def test_unique_key_while_running_returns_the_running_job(db, observer):
    with db.session():
        job_id = self_unique.options(unique_key="self").enqueue("self")
    result = run_worker(db, "tenq-unique")
    assert result.succeeded == 1
    assert calls == [("self_unique", job_id, job_id)]
    assert [(r.id, r.state, r.unique_key, r.runs) for r in rows(observer)] == [(job_id, "succeeded", None, 1)]


def test_unique_key_is_free_again_after_the_job_failed(db, observer):
    with db.session():
        failed_id = give_up.options(unique_key="once").enqueue(1)
    assert run_worker(db, "tenq-unique").failed == 1
    assert row(observer, failed_id).state == "failed"
    with db.session():
        new_id = give_up.options(unique_key="once").enqueue(2)
        assert give_up.options(unique_key="once").enqueue(3) == new_id
    assert new_id != failed_id
    assert [(r.id, r.state) for r in rows(observer)] == [(failed_id, "failed"), (new_id, "queued")]


def test_unique_key_is_free_again_after_the_job_succeeded(db, observer):
    with db.session():
        done_id = succeed.options(unique_key="daily").enqueue(1)
    assert run_worker(db, "tenq-unique").succeeded == 1
    assert (row(observer, done_id).state, row(observer, done_id).unique_key) == ("succeeded", None)
    with db.session():
        new_id = succeed.options(unique_key="daily").enqueue(2)
    assert new_id != done_id
    assert [(r.id, r.state, r.unique_key) for r in rows(observer)] == [
        (done_id, "succeeded", None), (new_id, "queued", "daily")]


def test_unique_key_is_free_again_after_the_row_was_deleted_by_hand(db, observer):
    with db.session():
        first = mail.options(unique_key="manual").enqueue("a")
    with db.engine.begin() as conn:
        conn.execute(t.delete().where(t.c.id == first))
    with db.session():
        second = mail.options(unique_key="manual").enqueue("b")
    assert second != first
    assert count(observer) == 1


def warm_pool(db, connections: int) -> None:
    """Open the pool's connections up front, so racing threads do not queue on connecting."""
    opened = [db.engine.connect() for _ in range(connections)]
    for conn in opened:
        conn.close()


def test_unique_key_under_concurrent_sessions_stores_one_job(db, observer):
    threads_count = 8
    warm_pool(db, threads_count)
    for round_number in range(4):
        key = f"race-{round_number}"
        barrier = threading.Barrier(threads_count, timeout=30)
        ids: list[int] = []
        errors: list[BaseException] = []

        def racer(n: int) -> None:
            try:
                with db.session():
                    barrier.wait()
                    ids.append(mail.options(unique_key=key).enqueue(f"racer{n}@example.com"))
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=racer, args=(n,)) for n in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [], "".join(traceback.format_exception(errors[0]))
        assert len(ids) == threads_count
        assert len(set(ids)) == 1, ids
        assert [r.id for r in rows(observer, t.c.unique_key == key)] == ids[:1]
    assert count(observer) == 4


RACER = """
import os, sys, time
from pathlib import Path
import mqueue

url, key, ready, go = sys.argv[1:5]

@mqueue.task(name="tenq.mail", queue="tenq")
def mail(to, subject="hello"):
    pass

db = mqueue.Database(url)
with db.engine.connect():
    pass
Path(ready, str(os.getpid())).touch()
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.001)
with db.session():
    job_id = mail.options(unique_key=key).enqueue(f"process {os.getpid()}")
print(job_id)
"""


def test_unique_key_from_separate_processes_stores_one_job(db, observer, database_url, tmp_path):
    processes = 4
    ready = tmp_path / "ready"
    ready.mkdir()
    go = tmp_path / "go"
    results: list = []

    def launch() -> None:
        results.append(run_python(["-c", RACER, database_url, "proc-key", str(ready), str(go)], timeout=120))

    threads = [threading.Thread(target=launch) for _ in range(processes)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(list(ready.iterdir())) == processes, timeout=60,
                 message=lambda: f"only {len(list(ready.iterdir()))} racers ready; {results}")
    finally:
        go.touch()
        for thread in threads:
            thread.join(120)
    assert len(results) == processes
    for result in results:
        assert result.returncode == 0, result.stderr
    ids = {int(result.stdout.strip()) for result in results}
    assert len(ids) == 1
    assert [r.id for r in rows(observer)] == list(ids)


# -- rows made by hand ---------------------------------------------------------------------------------


def test_a_hand_inserted_row_is_a_valid_job(db, observer, db_time):
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO mqueue_task (queue, name, args) VALUES (:queue, :name, :args)"),
                     {"queue": "tenq-hand", "name": "tenq.hand", "args": '{"user_id": 7}'})
    [stored] = rows(observer)
    now = db_time()
    assert stored.state == "queued"
    assert stored.eta <= now
    assert now - stored.eta < dt.timedelta(minutes=1)
    assert now - stored.created_at < dt.timedelta(minutes=1)
    assert (stored.priority, stored.retries, stored.token) == (0, 0, 0)
    assert stored.neg_priority == 0
    assert stored.unique_key is None

    result = run_worker(db, "tenq-hand")
    assert (result.succeeded, result.retried, result.failed) == (1, 0, 0)
    assert calls == [("hand", 7, "default", 0)]
    assert [(r.id, r.state, r.runs) for r in rows(observer)] == [(stored.id, "succeeded", 1)]


def test_a_hand_inserted_row_with_only_a_name_uses_the_default_queue(db, observer):
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO mqueue_task (name, args) VALUES ('tenq.plain', '{}')"))
    [stored] = rows(observer)
    assert stored.queue == "default"
    result = run_worker(db, "default")
    assert result.succeeded == 1
    assert calls == [("plain", 0)]


# -- errors ----------------------------------------------------------------------------------------------


def test_missing_tables_say_how_to_create_them(database_url, observer):
    db = mqueue.Database(database_url)  # never migrated
    try:
        attempts = [
            lambda: mail.enqueue("x"),
            lambda: mail.options(unique_key="k").enqueue("x"),
            lambda: mail.options(delay=5).enqueue_many([{"to": "x"}]),
        ]
        for attempt in attempts:
            with pytest.raises(mqueue.SchemaMissingError) as caught:
                with db.session():
                    attempt()
            assert "python -m mqueue migrate" in str(caught.value)
        mqueue.init(database=db)
        with pytest.raises(mqueue.SchemaMissingError, match="python -m mqueue migrate"):
            mail.enqueue("x")
    finally:
        db.dispose()


def unreachable_url(backend: str, tmp_path) -> str:
    if backend == "mariadb":
        return f"mysql+pymysql://mqueue_user:s3cret-pw@127.0.0.1:{free_port()}/app"
    if backend == "postgresql":
        return f"postgresql+psycopg://mqueue_user:s3cret-pw@127.0.0.1:{free_port()}/app"
    return f"sqlite:///{tmp_path / 'no' / 'such' / 'directory' / 'app.db'}"


def test_unreachable_database_is_one_clear_error_without_the_password(backend, tmp_path):
    url = unreachable_url(backend, tmp_path)
    db = mqueue.Database(url)
    assert "s3cret-pw" not in repr(db) and "s3cret-pw" not in db.safe_url
    try:
        with pytest.raises(mqueue.DatabaseUnavailableError) as caught:
            with db.session():
                mail.enqueue("x")
        errors = [caught.value]
        mqueue.init(database=db)
        with pytest.raises(mqueue.DatabaseUnavailableError) as caught:
            mail.options(unique_key="k").enqueue("x")
        errors.append(caught.value)
    finally:
        db.dispose()
    for error in errors:
        message = str(error)
        assert "\n" not in message
        assert "s3cret-pw" not in message
        assert "s3cret-pw" not in "".join(traceback.format_exception(error))
        if backend != "sqlite":
            assert "***" in message and "127.0.0.1" in message


# -- ordering ------------------------------------------------------------------------------------------


def test_higher_priority_first_then_oldest_eta_then_lowest_id(db, db_time):
    now = db_time()

    def ago(seconds: float) -> dt.datetime:
        return now - dt.timedelta(seconds=seconds)

    plan = [  # label, priority, eta; enqueued in this order (so ids ascend in it)
        ("A", 0, ago(10)),
        ("D", -3, ago(100)),
        ("C", 5, ago(5)),
        ("B", 5, ago(1)),
        ("F", 0, ago(10) + dt.timedelta(microseconds=1)),
        ("E", 5, ago(5)),  # same priority and eta as C, later id
        ("later", 100, now + dt.timedelta(hours=1)),  # not due
        ("G", 10, ago(0.001)),
        ("H", 5, ago(5.5)),
        ("I", 5, ago(5) - dt.timedelta(microseconds=1)),
    ]
    with db.session():
        for label, priority, eta in plan:
            order.options(priority=priority, eta=eta).enqueue(label)
    result = run_worker(db, "tenq-order", concurrency=1)
    assert result.succeeded == len(plan) - 1
    assert calls == ["G", "H", "I", "C", "E", "B", "A", "F", "D"]
