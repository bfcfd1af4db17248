"""The shipped Alembic migrations: idempotent, tracked apart, identical to mqueue.schema."""

from __future__ import annotations

import ast
import datetime as dt
import random
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import REPO_ROOT, run_python
from sqlalchemy import inspect, insert, select, text

import mqueue
from mqueue.dialects.functions import utc_now
from mqueue.migrate import alembic_config, current_revision, upgrade
from mqueue.schema import metadata, task_table

ENV_PY = Path(mqueue.__file__).resolve().parent / "migrations" / "env.py"
CLAIM_INDEX = "ix_mqueue_task_queue_state_neg_priority_eta_id"
CLAIM_COLUMNS = ["queue", "state", "neg_priority", "eta", "id"]


def env_namespace() -> dict:
    """``include_object`` and the constants it uses, taken from the shipped env.py itself.

    env.py runs migrations when imported, so only its module-level constants
    and that one function are executed here.
    """
    tree = ast.parse(ENV_PY.read_text(), str(ENV_PY))
    keep = [node for node in tree.body
            if (isinstance(node, ast.FunctionDef) and node.name == "include_object")
            or (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant))]
    assert any(isinstance(node, ast.FunctionDef) for node in keep), "env.py lost include_object"
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(ENV_PY), "exec"), namespace)
    return namespace


@pytest.fixture
def db(database_url):
    database = mqueue.Database(database_url)
    yield database
    database.dispose()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def table_names(db) -> set[str]:
    with db.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


#: Every table mqueue's migrations create (finished jobs' events, daily stats, shared settings since 0003;
#: tags since 0004).
MQUEUE_TABLES = {"mqueue_task", "mqueue_cron", "mqueue_event", "mqueue_stats", "mqueue_setting", "mqueue_tag",
                 "mqueue_dependency", "mqueue_queue", "mqueue_worker",
                 "mqueue_alembic_version"}


def version_rows(db) -> list[str]:
    with db.engine.connect() as conn:
        return [row[0] for row in conn.execute(text("SELECT version_num FROM mqueue_alembic_version"))]


def test_upgrade_twice_is_idempotent_and_tracked_in_its_own_table(db):
    assert table_names(db) == set()
    upgrade(db)
    assert table_names(db) == MQUEUE_TABLES
    assert "alembic_version" not in table_names(db)
    assert version_rows(db) == [head_revision()] == ["mqueue_0005"]
    assert current_revision(db) == head_revision()

    with db.engine.begin() as conn:
        conn.execute(insert(task_table).values(queue="tmig", name="tmig.kept", args="{}"))
    upgrade(db)
    assert table_names(db) == MQUEUE_TABLES
    assert version_rows(db) == [head_revision()]
    with db.engine.connect() as conn:
        assert conn.execute(select(task_table.c.name)).scalars().all() == ["tmig.kept"]


def test_upgrade_accepts_a_url(database_url):
    upgrade(database_url)
    db = mqueue.Database(database_url)
    try:
        assert current_revision(db) == head_revision()
    finally:
        db.dispose()


def test_the_applications_own_alembic_version_is_left_alone(db):
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('app_0042')"))
    upgrade(db)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["app_0042"]
    assert version_rows(db) == [head_revision()]


def test_head_is_mqueues_only_branch():
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    base = script.get_revision(script.get_bases()[0])
    assert "mqueue" in (base.branch_labels or ())


def test_env_py_compares_only_mqueue_tables():
    include_object = env_namespace()["include_object"]
    assert include_object(None, "mqueue_task", "table", True, None)
    assert include_object(None, "mqueue_cron", "table", True, None)
    assert include_object(None, "mqueue_event", "table", True, None)
    assert not include_object(None, "mqueue_alembic_version", "table", True, None)
    assert not include_object(None, "users", "table", True, None)
    assert not include_object(None, "alembic_version", "table", True, None)


def _is_clock_default(diff) -> bool:
    """PostgreSQL's server-default comparison evaluates both sides in a SELECT;
    for the clock (``clock_timestamp()``) two evaluations differ by design."""
    if not (isinstance(diff, tuple) and diff[0] == "modify_default"):
        return False
    reflected, wanted = diff[5], diff[6]
    return (isinstance(getattr(wanted, "arg", None), utc_now)
            and "clock_timestamp()" in str(getattr(reflected, "arg", "")))


def test_autogenerate_finds_no_difference_between_migrations_and_schema(db, backend):
    upgrade(db)
    include_object = env_namespace()["include_object"]
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": include_object,
                                                         "compare_type": True})
        assert compare_metadata(context, metadata) == []

        strict = MigrationContext.configure(conn, opts={"include_object": include_object,
                                                        "compare_type": True,
                                                        "compare_server_default": True})
        diffs = compare_metadata(strict, metadata)
    flat = [d for group in diffs for d in (group if isinstance(group, list) else [group])]
    if backend == "postgresql":
        flat = [d for d in flat if not _is_clock_default(d)]
    assert flat == []


def test_migrated_columns_match_the_schema_in_detail(db, backend):
    upgrade(db)
    with db.engine.connect() as conn:
        inspector = inspect(conn)
        for table in metadata.sorted_tables:
            reflected = {c["name"]: c for c in inspector.get_columns(table.name)}
            assert list(reflected) == [c.name for c in table.columns], table.name
            for column in table.columns:
                found = reflected[column.name]
                if column.primary_key or column.computed is not None:
                    continue  # sequences / identity and generated columns are checked below
                assert found["nullable"] == column.nullable, (table.name, column.name)
                assert (found["default"] is not None) == (column.server_default is not None), \
                    (table.name, column.name, found["default"])
            pk = inspector.get_pk_constraint(table.name)
            assert pk["name"] in (f"pk_{table.name}", "PRIMARY", None)
        computed = {c["name"]: c.get("computed") for c in inspector.get_columns("mqueue_task")}
        assert computed["neg_priority"] is not None, "neg_priority must be a generated column"
        if backend == "sqlite":
            ddl = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'mqueue_task'")).scalar_one()
            assert "AUTOINCREMENT" in ddl.upper()


def test_the_claim_index_exists(db):
    upgrade(db)
    with db.engine.connect() as conn:
        indexes = {ix["name"]: ix for ix in inspect(conn).get_indexes("mqueue_task")}
    assert CLAIM_INDEX in indexes
    assert indexes[CLAIM_INDEX]["column_names"] == CLAIM_COLUMNS
    assert not indexes[CLAIM_INDEX]["unique"]


def test_the_unique_key_is_enforced_by_the_database(db):
    upgrade(db)
    from sqlalchemy.exc import IntegrityError
    with db.engine.begin() as conn:
        conn.execute(insert(task_table).values(queue="q", name="n", args="{}", unique_key="same"))
        conn.execute(insert(task_table).values(queue="q", name="n", args="{}", unique_key=None))
        conn.execute(insert(task_table).values(queue="q", name="n", args="{}", unique_key=None))
    with pytest.raises(IntegrityError):
        with db.engine.begin() as conn:
            conn.execute(insert(task_table).values(queue="q", name="n", args="{}", unique_key="same"))


from mqueue.dialects.mysql import CLAIM_SELECT, HEAD_CLAIM  # noqa: E402 - the statements the claim runs


def explain(conn, statement) -> list[dict]:
    compiled = statement.compile(dialect=conn.dialect)
    return [dict(row) for row in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params).mappings()]


@pytest.mark.backends("mariadb")
def test_mariadb_claim_walks_the_claim_index_without_filesort(db):
    upgrade(db)
    rng = random.Random(7)
    now = dt.datetime.utcnow()
    rows = [dict(queue=rng.choice(["mail", "reports", "other"]), name="tmig.x", args="{}",
                 priority=rng.randint(-5, 5), state=rng.choice(["queued", "queued", "running", "failed"]),
                 eta=now - dt.timedelta(seconds=rng.randint(-600, 600)))
            for _ in range(3000)]
    with db.engine.begin() as conn:
        conn.execute(insert(task_table), rows)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE TABLE mqueue_task").all()
        claim = CLAIM_SELECT.params(from_queue="mail", level=0, limit=10)  # one priority level
        assert "SKIP LOCKED" in str(claim.compile(dialect=conn.dialect))
        [plan] = explain(conn, claim)
        assert plan["key"] == CLAIM_INDEX, plan
        assert "filesort" not in (plan["Extra"] or "").lower(), plan
        assert "temporary" not in (plan["Extra"] or "").lower(), plan

        # The check can fail: an ORDER BY the index does not follow is a filesort.
        wrong = claim.order_by(None).order_by(task_table.c.priority.desc(), task_table.c.eta)
        [bad_plan] = explain(conn, wrong)
        assert "filesort" in (bad_plan["Extra"] or "").lower(), bad_plan

        # The claim's first statement: the level range (two index dives) and the first level's
        # locking read (the same index range; its level a scalar subquery read the same way).
        head = HEAD_CLAIM.params(from_queue="mail", limit=10)
        plans = explain(conn, head)
        [locking] = [plan for plan in plans if plan["table"] == "mqueue_task"]
        assert locking["key"] == CLAIM_INDEX and locking["type"] == "range", plans
        assert "filesort" not in (locking["Extra"] or "").lower(), plans
        assert "temporary" not in (locking["Extra"] or "").lower(), plans
        # Every other part reads no rows: the MIN/MAX dives are done while planning, and the
        # paused-queue checks are primary-key lookups.
        others = [plan for plan in plans if plan is not locking and plan["select_type"] != "UNION RESULT"]
        assert "Select tables optimized away" in {plan["Extra"] for plan in others}, plans
        assert all(plan["type"] in (None, "const", "system") for plan in others), plans


def test_import_alembic_from_the_repository_root_is_the_library():
    result = run_python("import alembic, alembic.command; print(alembic.__file__)", cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    location = Path(result.stdout.strip()).resolve()
    shadow = (REPO_ROOT / "alembic").resolve()
    assert location.name == "__init__.py"
    assert location.parent != shadow, location  # (a .venv inside the repository is fine)
    # In this process too (pytest puts the repository root on sys.path).
    import alembic
    assert alembic.__file__ is not None
    assert Path(alembic.__file__).resolve().parent != shadow
    assert not (REPO_ROOT / "alembic" / "__init__.py").exists()


def test_repository_alembic_directory_uses_the_shipped_scripts():
    """One copy is the truth: the repository's script directory finds mqueue's head revision."""
    from alembic.config import Config
    config = Config(str(REPO_ROOT / "alembic" / "alembic.ini"))
    script = ScriptDirectory.from_config(config)
    assert script.get_current_head() == head_revision()


def test_check_schema_names_the_missing_table_and_the_fix(db):
    with pytest.raises(mqueue.SchemaMissingError) as caught:
        db.check_schema()
    assert "mqueue_task" in str(caught.value)
    assert "python -m mqueue migrate" in str(caught.value)
    upgrade(db)
    db.check_schema()


def test_create_all_and_drop_all_for_tests(db):
    db.create_all()
    assert MQUEUE_TABLES - {"mqueue_alembic_version"} <= table_names(db)
    db.check_schema()
    db.drop_all()
    assert not MQUEUE_TABLES & table_names(db)


def test_upgrade_from_0001_keeps_waiting_and_failed_jobs(db, backend):
    """0002 (failed_unique_key, MEDIUMTEXT on MySQL) on a database that has jobs in it."""
    upgrade(db, "mqueue_0001")
    assert current_revision(db) == "mqueue_0001"
    from sqlalchemy import column, table
    old_task = table("mqueue_task", *(column(name) for name in (
        "queue", "name", "args", "state", "priority", "eta", "retries", "unique_key", "last_error")))
    with db.engine.begin() as conn:
        for values in (dict(name="tmig.waiting", args='{"n": 1}', unique_key="w"),
                       dict(name="tmig.later", args="{}", priority=3, eta=dt.datetime(2100, 1, 1)),
                       dict(name="tmig.failed", args="{}", state="failed", retries=11, last_error="boom")):
            conn.execute(insert(old_task).values(queue="tmig", **values))
    upgrade(db)
    assert current_revision(db) == head_revision()
    with db.engine.connect() as conn:
        rows = conn.execute(select(task_table).order_by(task_table.c.id)).all()
    assert [(r.name, r.state, r.priority, r.unique_key, r.failed_unique_key, r.last_error) for r in rows] == [
        ("tmig.waiting", "queued", 0, "w", None, None),
        ("tmig.later", "queued", 3, None, None, None),
        ("tmig.failed", "failed", 0, None, None, "boom")]
    assert rows[1].eta == dt.datetime(2100, 1, 1)
    # The columns now hold 1 MiB (MySQL TEXT stopped at 64 KiB).
    big = "x" * 1_048_576
    with db.engine.begin() as conn:
        conn.execute(task_table.update().where(task_table.c.id == rows[2].id).values(last_error=big, args=big))
    with db.engine.connect() as conn:
        stored = conn.execute(select(task_table).where(task_table.c.id == rows[2].id)).one()
    assert (stored.args, stored.last_error) == (big, big)


def test_migration_scripts_import_nothing_from_mqueue():
    """Frozen revisions: a later edit of the models must never change what an old revision creates."""
    versions = Path(mqueue.__file__).resolve().parent / "migrations" / "versions"
    for script in sorted(versions.glob("*.py")):
        tree = ast.parse(script.read_text(), str(script))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("mqueue"), (script.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("mqueue") for alias in node.names), script.name


@pytest.mark.backends("sqlite")
def test_sqlite_triggers_from_migrations_equal_those_of_create_all(db, database_url, tmp_path):
    """0002 carries a frozen copy of the eta triggers; at this revision it must match the live one."""
    def triggers(database):
        with database.engine.connect() as conn:
            return dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")).all())

    upgrade(db)
    created = mqueue.Database(f"sqlite:///{tmp_path / 'created.db'}")
    try:
        created.create_all()
        assert triggers(db) == triggers(created)
        assert set(triggers(db)) == {"mqueue_task_eta_on_insert", "mqueue_task_eta_on_update"}
    finally:
        created.dispose()


def test_downgrade_to_0001_and_back_keeps_jobs(db):
    from alembic import command
    upgrade(db)
    with db.engine.begin() as conn:
        conn.execute(insert(task_table).values(queue="tmig", name="tmig.kept", args="{}"))
    config = alembic_config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "mqueue_0001")
    assert current_revision(db) == "mqueue_0001"
    upgrade(db)
    with db.engine.connect() as conn:
        assert conn.execute(select(task_table.c.name)).scalars().all() == ["tmig.kept"]
