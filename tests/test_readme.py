"""README.rst as a test: its quick start runs as written and prints what the
README says it prints, every command it names exists, and its Alembic recipe
works against a real Alembic environment on every backend.

The quick start runs in a copy of the working tree (no ``.venv``, ``.git``
or ``*.db``) with ``MQUEUE_PYTHON`` set to this interpreter, which
``scripts/example`` supports to skip creating a virtualenv; everything else
runs exactly as the README shows it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO_ROOT, run_python

README = REPO_ROOT / "README.rst"
QUICK_START_SECONDS = 150


# -- reading the README --------------------------------------------------------

def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str, language: str | None = None) -> list[str]:
    """The bodies of ``.. code-block:: LANGUAGE`` directives, dedented, in order."""
    lines = text.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)\.\. code-block::\s*(\S+)\s*$", line)
        if not match or (language is not None and match.group(2) != language):
            continue
        indent = len(match.group(1))
        body = []
        for following in lines[number + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def literal_block_after(text: str, marker: str) -> list[str]:
    """The lines of the ``::`` literal block of the paragraph that contains ``marker``
    (line breaks in the paragraph count as spaces)."""
    start = re.search(r"\s+".join(map(re.escape, marker.split())), text).start()
    colons = text.index("::\n", start)
    lines = []
    for line in text[colons + 3:].splitlines():
        if line.strip() and not line.startswith(" "):
            break
        if line.strip():
            lines.append(line.strip())
    return lines


def sample_line_pattern(line: str) -> re.Pattern:
    """A sample output line as a regex: a leading ``...`` stands for anything
    (a log line's time stamp), and every number for any number."""
    prefix = ""
    if line.startswith("... "):
        prefix, line = ".*", line[4:]
    parts = re.split(r"(\d+(?:\.\d+)?)", line)
    pattern = "".join(r"\d+(?:\.\d+)?" if index % 2 else re.escape(part) for index, part in enumerate(parts))
    return re.compile(prefix + pattern)


def quick_start_commands() -> list[str]:
    return shell_commands(code_blocks(readme_text(), "bash")[0])


# -- running the quick start ----------------------------------------------------

def copy_of_repository(destination: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "*.db", "*.db-wal", "*.db-shm", "__pycache__",
                                    ".pytest_cache", "*.egg-info", ".benchmarks")
    shutil.copytree(REPO_ROOT, destination, symlinks=True, ignore=ignore)
    return destination


def run_in_shell(command: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run one README command with bash; on timeout kill its whole process group
    (the example's background daemon included)."""
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{command!r} did not finish within {timeout}s; output:\n{output}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # nothing may outlive the test
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def run_quick_start(tmp_path: Path, database_url: str | None) -> str:
    repo = copy_of_repository(tmp_path / "checkout")
    env = {key: value for key, value in os.environ.items() if key not in ("MQUEUE_DATABASE_URL", "PYTHONPATH")}
    env.update(MQUEUE_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    if database_url is not None:
        env["MQUEUE_DATABASE_URL"] = database_url
    commands = quick_start_commands()
    assert commands, "README.rst: the first code-block:: bash (the quick start) is empty"
    output = []
    for command in commands:
        result = run_in_shell(command, repo, env, QUICK_START_SECONDS)
        output.append(result.stdout)
        assert result.returncode == 0, f"{command!r} exited with {result.returncode}:\n{result.stdout}"
    return "".join(output)


def assert_welcome_mail_written(output: str) -> None:
    enqueued = re.search(r"^welcome job (\d+) enqueued for ada@example\.com", output, re.M)
    assert enqueued, f"signup printed no job id:\n{output}"
    job = enqueued.group(1)
    assert re.search(rf"^  mail \d+ to ada@example\.com: 'Welcome!' \(written by job {job}\)$", output, re.M), \
        f"the outbox shows no welcome mail written by job {job}:\n{output}"
    assert re.search(rf"job={job} task=tasks\.mail\.welcome queue=default .*outcome=succeeded", output), \
        f"the worker logged no success for job {job}:\n{output}"
    assert "daemon exited with status 0" in output, output


@pytest.mark.timeout(QUICK_START_SECONDS + 30)
def test_quick_start_runs_as_written(tmp_path):
    assert quick_start_commands() == ["scripts/example"]
    output = run_quick_start(tmp_path, database_url=None)
    assert_welcome_mail_written(output)
    assert (tmp_path / "checkout" / "tasks_example" / "example.db").exists()
    sample = [line for line in literal_block_after(readme_text(), "The end of its output looks like this")
              if line != "..."]
    assert len(sample) >= 4
    for line in sample:
        assert sample_line_pattern(line).search(output), f"README sample line {line!r} not in output:\n{output}"


@pytest.mark.timeout(60)
def test_the_example_digest_cron_runs(tmp_path):
    """The example's hourly cron is an ordinary task too: enqueue it by name and
    run it with ``Worker.run_until_empty``, as the README describes."""
    run_quick_start(tmp_path, database_url=None)
    example = tmp_path / "checkout" / "tasks_example"
    env = {"MQUEUE_DATABASE_URL": "sqlite:///example.db", "PYTHONPATH": str(tmp_path / "checkout")}
    enqueued = run_python(["-m", "mqueue", "enqueue", "tasks.mail.digest"], cwd=example, env=env)
    assert enqueued.returncode == 0, enqueued.stderr
    job = int(enqueued.stdout.strip())
    ran = run_python(["-c", "import mqueue, tasks.mail\n"
                            "r = mqueue.Worker('sqlite:///example.db').run_until_empty(timeout=30)\n"
                            "print(r.succeeded, r.retried, r.failed)"], cwd=example, env=env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1", "0", "0"]
    shown = run_python(["show.py"], cwd=example, env=env)
    assert re.search(rf"to team@example\.com: '1 signup\(s\) in the last hour' \(written by job {job}\)",
                     shown.stdout), shown.stdout


@pytest.mark.backends("mariadb", "postgresql")
@pytest.mark.timeout(QUICK_START_SECONDS + 30)
def test_quick_start_on_a_server_database(tmp_path, database_url):
    output = run_quick_start(tmp_path, database_url)
    assert_welcome_mail_written(output)
    password = re.search(r"://[^:/@]+:([^@]+)@", database_url)
    assert password is None or password.group(1) not in output


# -- the command line ---------------------------------------------------------

def cli_commands() -> set[str]:
    result = run_python(["-m", "mqueue", "--help"])
    assert result.returncode == 0, result.stderr
    commands = set(re.findall(r"^    ([a-z][\w-]*)\s", result.stdout, re.M))
    assert {"start", "migrate"} <= commands, result.stdout
    return commands


def command_options(command: str) -> set[str]:
    result = run_python(["-m", "mqueue", command, "--help"])
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(--[a-z][\w-]*)", result.stdout))


def test_every_command_in_the_readme_exists_and_every_command_is_documented():
    text = readme_text()
    documented = set(re.findall(r"python -m mqueue\s+([a-z][\w-]*)", text))
    existing = cli_commands()
    assert sorted(documented - existing) == [], "README names commands that python -m mqueue --help lacks"
    assert sorted(existing - documented) == [], "commands missing from README.rst"


def test_options_in_the_readme_exist():
    text = readme_text()
    wanted: dict[str, set[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        match = re.search(r"python -m mqueue ([a-z][\w-]*)(.*)", line)
        if match:
            wanted.setdefault(match.group(1), set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match.group(2)))
    # the option table of "Running workers" documents ``start``
    section = text[text.index("Running workers\n"):text.index("Inside a task\n")]
    wanted.setdefault("start", set()).update(re.findall(r"``(--[a-z][\w-]*)", section))
    assert len(wanted["start"]) >= 8
    for command, options in sorted(wanted.items()):
        missing = options - command_options(command) - {"--help"}
        assert not missing, f"README uses {sorted(missing)} with 'python -m mqueue {command}'"


# -- Alembic ----------------------------------------------------------------------

APP_MODELS = '''
from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "app_customer"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(255))
'''


def readme_include_object() -> str:
    """The README's ``include_object`` function, as written there."""
    block = next(b for b in code_blocks(readme_text(), "python") if "def include_object" in b)
    function = block[block.index("def include_object"):].split("\n\n")[0]
    compile(function, "README include_object", "exec")
    return function


def mqueue_install_dir() -> str:
    """Run the README's one-liner that finds where mqueue is installed."""
    line = next(c for b in code_blocks(readme_text(), "bash") for c in shell_commands(b)
                if "mqueue.__file__" in c)
    argv = shlex.split(line)
    assert argv[0] == "python"
    result = run_python(argv[1:], cwd="/")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip()
    assert os.path.isdir(os.path.join(path, "migrations", "versions")), path
    return path


class AlembicProject:
    """A scratch application with its own Alembic environment, set up as the README says."""

    def __init__(self, root: Path, database_url: str) -> None:
        from alembic import command
        from alembic.config import Config
        self.root = root
        root.mkdir()
        (root / "app_models.py").write_text(APP_MODELS)
        command.init(Config(str(root / "alembic.ini")), str(root / "migrations"))
        env_py = root / "migrations" / "env.py"
        env = env_py.read_text()
        assert "target_metadata = None" in env and "target_metadata=target_metadata\n" in env
        env = env.replace("target_metadata = None",
                          "import app_models\ntarget_metadata = app_models.Base.metadata\n\n\n"
                          + readme_include_object() + "\n")
        env = env.replace("target_metadata=target_metadata\n",
                          "target_metadata=target_metadata, include_object=include_object\n")
        env_py.write_text(env)
        self.ini = root / "alembic.ini"
        ini = self.ini.read_text()
        ini = re.sub(r"(?m)^sqlalchemy\.url = .*$", lambda _: "sqlalchemy.url = " + database_url.replace("%", "%%"), ini)
        self.ini.write_text(ini)

    def set_version_locations(self, *extra: str) -> None:
        ini = self.ini.read_text()
        line = "version_locations = " + ":".join(["%(here)s/migrations/versions", *extra])
        ini = re.sub(r"(?m)^#? ?version_locations = .*$", lambda _: line, ini, count=1)
        assert line in ini
        self.ini.write_text(ini)

    def alembic(self, *args: str) -> str:
        result = run_python(["-m", "alembic", *args], cwd=self.root, env={"PYTHONPATH": str(self.root)})
        assert result.returncode == 0, f"alembic {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    def revision_upgrade_body(self, message: str) -> str:
        path = next((self.root / "migrations" / "versions").glob(f"*_{message}.py"))
        text = path.read_text()
        return text[text.index("def upgrade"):text.index("def downgrade")]

    def revision_id(self, message: str) -> str:
        path = next((self.root / "migrations" / "versions").glob(f"*_{message}.py"))
        return path.name.split("_")[0]


def table_names(database_url: str) -> set[str]:
    from sqlalchemy import create_engine, inspect
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.timeout(120)
def test_alembic_version_locations_recipe(tmp_path, database_url):
    """Way 2: mqueue's revisions inside the application's own Alembic environment."""
    app = AlembicProject(tmp_path / "app", database_url)
    app.set_version_locations()
    app.alembic("revision", "--autogenerate", "-m", "customers")
    app.alembic("upgrade", "head")

    app.set_version_locations(os.path.join(mqueue_install_dir(), "migrations", "versions"))
    heads = app.alembic("heads")
    assert "(mqueue)" in heads and app.revision_id("customers") in heads
    app.alembic("upgrade", "mqueue@head")
    assert {"app_customer", "mqueue_task", "mqueue_cron", "alembic_version"} <= table_names(database_url)
    app.alembic("upgrade", "heads")

    app.alembic("revision", "--autogenerate", "-m", "nothing", "--head", f"{app.revision_id('customers')}@head")
    body = app.revision_upgrade_body("nothing")
    assert "op." not in body, f"autogenerate touched mqueue's tables despite include_object:\n{body}"

    # The revisions applied are the ones python -m mqueue migrate would apply.
    from mqueue.migrate import alembic_config
    from alembic.script import ScriptDirectory
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() in app.alembic("current")


@pytest.mark.timeout(120)
def test_include_object_beside_mqueue_migrate(tmp_path, database_url):
    """Way 1: ``python -m mqueue migrate`` plus the application's own Alembic history."""
    result = run_python(["-m", "mqueue", "migrate", "--database", database_url])
    assert result.returncode == 0, result.stderr
    app = AlembicProject(tmp_path / "app", database_url)
    app.set_version_locations()
    app.alembic("revision", "--autogenerate", "-m", "customers")
    assert "mqueue" not in app.revision_upgrade_body("customers")
    app.alembic("upgrade", "head")
    app.alembic("revision", "--autogenerate", "-m", "nothing")
    assert "op." not in app.revision_upgrade_body("nothing")
    assert {"mqueue_alembic_version", "alembic_version", "app_customer"} <= table_names(database_url)


# -- the example's code as the README shows it -------------------------------------

def test_code_shown_from_the_example_is_the_example():
    """A python block that starts with ``# tasks_example/FILE`` is an excerpt of that file."""
    shown = [b for b in code_blocks(readme_text(), "python") if b.startswith("# tasks_example/")]
    assert len(shown) >= 2
    for block in shown:
        header, _, excerpt = block.partition("\n")
        path = REPO_ROOT / header.split()[1]
        source = path.read_text(encoding="utf-8")
        assert re.sub(r"\s+", "", excerpt) in re.sub(r"\s+", "", source), \
            f"README.rst shows code under {header!r} that is not in {path}"
