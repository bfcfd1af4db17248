"""README.rst's recipe for mqueue's revisions in an application's own Alembic, run as written.

A scratch application is made with ``alembic init``; its ``alembic.ini``
gets the README's ``ini`` lines and its ``env.py`` the README's changes; then
the README's commands run through the ``alembic`` command line, on every
backend: a new application, one with revisions of its own, and databases
switching between ``python -m mqueue migrate`` and the application's
Alembic in both directions, or refusing to when the records disagree.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from helpers import run_python
from sqlalchemy import create_engine, inspect, text
from test_readme import code_blocks, readme_text

import mqueue
from mqueue import admin
from mqueue.migrate import VERSION_TABLE, MigrationConflictError, revisions, upgrade, version_location

APP_MODELS = """
from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()
Table("app_customer", metadata, Column("id", Integer, primary_key=True), Column("email", String(255)))
"""


# -- the recipe as the README gives it --------------------------------------------------

def migrations_section() -> str:
    text = readme_text()
    start = text.index("Migrations with Alembic\n---")
    return text[start:text.index("\nDeployment\n---", start)]


def readme_ini_settings() -> dict[str, str]:
    """``key = value`` lines of the section's ``ini`` block."""
    (block,) = code_blocks(migrations_section(), "ini")
    return dict(line.split(" = ", 1) for line in block.splitlines())


def readme_env_py() -> str:
    (block,) = [b for b in code_blocks(migrations_section(), "python") if "def run_migrations_online" in b]
    return block


def readme_commands(marker: str) -> list[str]:
    """The commands of the section's bash block that contains ``marker``, comments dropped."""
    (block,) = [b for b in code_blocks(migrations_section(), "bash") if marker in b]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


NEW_APPLICATION = "--head base"
EXISTING_APPLICATION = "alembic heads"
README_HEAD = re.compile(r"\b[0-9a-f]{12}(?=@head)")


class AlembicApp:
    """A scratch application with its own Alembic environment, as ``alembic init`` makes it."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        root.mkdir()
        (root / "app_models.py").write_text(APP_MODELS)
        self.ini = root / "alembic.ini"
        command.init(Config(str(self.ini)), str(root / "alembic"))
        self.env_py = root / "alembic" / "env.py"
        env = self.env_py.read_text()
        assert "target_metadata = None" in env
        self.env_py.write_text(env.replace(
            "target_metadata = None", "import app_models\ntarget_metadata = app_models.metadata"))
        self.set_ini("sqlalchemy.url", database_url.replace("%", "%%"))

    def set_ini(self, key: str, value: str) -> None:
        """Set ``key`` where alembic.ini sets it, else where its comment shows it."""
        ini = self.ini.read_text()
        for pattern in (rf"(?m)^{re.escape(key)} = .*$", rf"(?m)^# {re.escape(key)} = .*$"):
            ini, count = re.subn(pattern, lambda _: f"{key} = {value}", ini, count=1)
            if count:
                self.ini.write_text(ini)
                return
        raise AssertionError(f"alembic.ini has no {key} line")

    def follow_readme(self, version_locations: bool = True) -> None:
        """env.py changed as the README says, and alembic.ini too unless ``version_locations=False``
        (way 1: the application's Alembic beside ``python -m mqueue migrate``)."""
        for key, value in readme_ini_settings().items() if version_locations else ():
            self.set_ini(key, value)
        wanted = readme_env_py()
        for line in ("import mqueue.migrate", "include_object=mqueue.migrate.include_object)",
                     "include_object=mqueue.migrate.include_object, ...)"):
            assert line in wanted, f"README's env.py lacks {line!r}"
        assert re.search(r"with context.begin_transaction\(\):\n\s+mqueue.migrate.adopt\(context\)\n"
                         r"\s+context.run_migrations\(\)", wanted), "README's env.py: adopt before run_migrations"
        env = self.env_py.read_text()
        env = env.replace("import app_models\n", "import mqueue.migrate\nimport app_models\n")
        assert env.count("target_metadata=target_metadata") == 2  # offline and online
        env = env.replace("target_metadata=target_metadata",
                          "target_metadata=target_metadata, include_object=mqueue.migrate.include_object")
        online = "        with context.begin_transaction():\n            context.run_migrations()"
        assert env.count(online) == 1
        env = env.replace(online, "        with context.begin_transaction():\n"
                                  "            mqueue.migrate.adopt(context)\n            context.run_migrations()")
        self.env_py.write_text(env)

    def alembic(self, command_line: str, ok: bool = True) -> subprocess.CompletedProcess:
        argv = shlex.split(command_line)
        assert argv[0] == "alembic", command_line
        result = run_python(["-m", "alembic", *argv[1:]], cwd=self.root, env={"PYTHONPATH": str(self.root)})
        result.output = result.stdout + result.stderr
        if ok:
            assert result.returncode == 0, f"{command_line}:\n{result.output}"
        return result

    def revision(self, message: str) -> Path:
        (path,) = (self.root / "alembic" / "versions").glob(f"*_{message.replace(' ', '_')}.py")
        return path

    def revision_id(self, message: str) -> str:
        return self.revision(message).name.split("_")[0]

    def upgrade_body(self, message: str) -> str:
        source = self.revision(message).read_text()
        return source[source.index("def upgrade"):source.index("def downgrade")]


# -- reading the database ------------------------------------------------------------------

def tables(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def versions(database_url: str, table: str = "alembic_version") -> set[str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(text(f"SELECT version_num FROM {table}")).scalars())
    finally:
        engine.dispose()


def mqueue_migrate(database_url: str) -> subprocess.CompletedProcess:
    return run_python(["-m", "mqueue", "migrate", "--database", database_url])


def revision_files() -> set[str]:
    return {path.name for path in Path(version_location()).glob("*.py")}


HEAD = revisions()[-1]


# -- the recipe ------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_new_application_follows_the_readme_and_switches_both_ways(tmp_path, database_url):
    shipped = revision_files()
    app = AlembicApp(tmp_path / "app", database_url)
    app.follow_readme()
    commands = readme_commands(NEW_APPLICATION)
    assert any("--head base --branch-label app --version-path alembic/versions" in c for c in commands)
    for line in commands:
        app.alembic(line)

    initial = app.revision("initial").read_text()
    assert "down_revision" in initial and re.search(r"down_revision[^=]*= None", initial), initial
    assert "branch_labels" in initial and "('app',)" in initial
    assert "create_table('app_customer'" in initial and "mqueue" not in initial
    assert "op." not in app.upgrade_body("add orders"), "autogenerate touched mqueue's tables"
    assert revision_files() == shipped, "the application's revision went into the installed package"
    assert {"app_customer", "mqueue_task", "mqueue_cron", "alembic_version"} <= tables(database_url)
    assert VERSION_TABLE not in tables(database_url)
    assert versions(database_url) == {app.revision_id("initial"), HEAD}

    # To python -m mqueue migrate: it takes the record over and runs none of the application's revisions.
    result = mqueue_migrate(database_url)
    assert result.returncode == 0, result.stderr
    assert f"took over mqueue's revision {HEAD} from alembic_version" in result.stderr
    assert versions(database_url) == {app.revision_id("initial")}
    assert versions(database_url, VERSION_TABLE) == {HEAD}
    assert "Traceback" not in result.stderr

    # And back: the application's Alembic takes the record again and runs only its own pending revision.
    back = app.alembic("alembic upgrade heads")
    assert f"took over mqueue's revision {HEAD} from {VERSION_TABLE}" in back.output
    assert "-> mqueue_" not in back.output, back.output
    assert versions(database_url) == {app.revision_id("add orders"), HEAD}
    assert VERSION_TABLE not in tables(database_url)


@pytest.mark.timeout(120)
def test_an_existing_application_takes_over_a_database_mqueue_migrated(tmp_path, database_url):
    app = AlembicApp(tmp_path / "app", database_url)
    app.alembic("alembic revision --autogenerate -m customers")
    app.alembic("alembic upgrade head")
    upgrade(database_url)
    job_id = admin.enqueue_by_name(database_url, "recipe.kept", {"n": 1})

    app.follow_readme()
    mine = app.revision_id("customers")
    outputs = [app.alembic(README_HEAD.sub(mine, line)).output for line in readme_commands(EXISTING_APPLICATION)]
    heads = outputs[0]
    assert mine in heads and f"{HEAD} (mqueue)" in heads
    assert f"took over mqueue's revision {HEAD} from {VERSION_TABLE}" in outputs[1]
    assert "-> mqueue_" not in outputs[1], "mqueue's tables were created again"

    orders = app.revision("add orders").read_text()
    assert f"down_revision: Union[str, Sequence[str], None] = '{mine}'" in orders and "('app',)" in orders
    assert "op." not in app.upgrade_body("add orders")
    assert versions(database_url) == {mine, HEAD}
    assert VERSION_TABLE not in tables(database_url)
    assert admin.get_job(database_url, job_id).name == "recipe.kept"
    assert "--head app@head" in migrations_section()  # later revisions: the branch label


@pytest.mark.timeout(120)
def test_the_applications_alembic_beside_mqueue_migrate_leaves_mqueue_alone(tmp_path, database_url):
    """Way 1 with the README's env.py: autogenerate ignores mqueue's tables, adopt takes nothing."""
    assert mqueue_migrate(database_url).returncode == 0
    app = AlembicApp(tmp_path / "app", database_url)
    app.follow_readme(version_locations=False)
    app.alembic("alembic revision --autogenerate -m customers")
    assert "mqueue" not in app.upgrade_body("customers")
    app.alembic("alembic upgrade head")
    app.alembic("alembic revision --autogenerate -m nothing")
    assert "op." not in app.upgrade_body("nothing")
    assert versions(database_url) == {app.revision_id("customers")}
    assert versions(database_url, VERSION_TABLE) == {HEAD}


# -- records that cannot be taken over -------------------------------------------------------

@pytest.mark.timeout(120)
def test_tables_without_a_record_stop_both_ways_before_anything_changes(tmp_path, database_url):
    """Tables of db.create_all(), or the original MQueue's: their schema is unknown, never guessed."""
    db = mqueue.Database(database_url)
    db.create_all()
    before = tables(database_url)

    refused = mqueue_migrate(database_url)
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "mqueue_task exists" in refused.stderr and "records its revision" in refused.stderr
    assert tables(database_url) == before  # no empty mqueue_alembic_version left behind

    app = AlembicApp(tmp_path / "app", database_url)
    app.follow_readme()
    failed = app.alembic("alembic upgrade heads", ok=False)
    assert failed.returncode != 0 and "Traceback" not in failed.output, failed.output
    assert re.search(r"^FAILED: table mqueue_task exists .*rename or drop mqueue's tables.*, then run alembic "
                     r"upgrade heads again$", failed.output, re.M), failed.output
    assert tables(database_url) == before
    db.drop_all()   # as the line says
    db.dispose()
    app.alembic("alembic upgrade heads")
    assert versions(database_url) == {HEAD}


def test_records_that_disagree_stop_both_ways_before_anything_changes(tmp_path, database_url):
    """mqueue_alembic_version and alembic_version naming different revisions of mqueue's."""
    oldest = revisions()[0]
    assert oldest != HEAD, "needs two revisions of mqueue's"
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": oldest})
    finally:
        engine.dispose()

    with pytest.raises(MigrationConflictError, match=f"recorded twice .*{oldest} in alembic_version, "
                                                     f"{HEAD} in {VERSION_TABLE}"):
        upgrade(database_url)
    app = AlembicApp(tmp_path / "app", database_url)
    app.follow_readme()
    failed = app.alembic("alembic upgrade heads", ok=False)
    assert failed.returncode != 0 and "FAILED: mqueue's revision is recorded twice" in failed.output, failed.output
    assert versions(database_url) == {oldest} and versions(database_url, VERSION_TABLE) == {HEAD}


def test_a_revision_from_a_later_mqueue_is_one_line(database_url):
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'mqueue_9999'"))
    finally:
        engine.dispose()
    result = mqueue_migrate(database_url)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "records mqueue_9999, which this mqueue does not know" in result.stderr


def test_print_location_needs_no_database(tmp_path):
    result = run_python(["-m", "mqueue", "migrate", "--print-location"], cwd=tmp_path,
                        env={"MQUEUE_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == version_location()
    assert {path.name for path in Path(result.stdout.strip()).glob("*.py")} == revision_files() != set()
    assert list(tmp_path.iterdir()) == []


def test_include_object_leaves_out_only_mqueues_tables():
    from mqueue.migrate import include_object
    for name in ("mqueue_task", "mqueue_cron", VERSION_TABLE):
        assert not include_object(None, name, "table", True, None)
    assert include_object(None, "app_customer", "table", True, None)
    assert include_object(None, "ix_mqueue_task_x", "index", True, None)  # goes with its table
