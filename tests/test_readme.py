"""README.rst as a test: its quick start runs as written and prints what the
README says it prints, and every command it names exists.  Its Alembic
recipe runs in ``test_alembic_recipe.py``.

The quick start runs in a copy of the working tree (no ``.venv``, ``.git``
or ``*.db``) with ``MQUEUE_PYTHON`` set to this interpreter, which
``scripts/example`` supports to skip creating a virtualenv; everything else
runs exactly as the README shows it.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
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


def by_hand_commands() -> list[str]:
    """The commands of "The example by hand"."""
    block = next(b for b in code_blocks(readme_text(), "bash") if "cd tasks_example" in b)
    return [command.split(" #")[0].strip() for command in shell_commands(block)]


def checkout_virtualenv(repo: Path) -> Path:
    """``repo/.venv`` as ``pip install -e .`` would make it: the checkout importable, and
    this interpreter's third-party packages through a ``.pth`` line (no network)."""
    venv = repo / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    Path(site, "checkout.pth").write_text("".join(f"{path}\n" for path in (str(repo), *ours)))
    return venv


@pytest.mark.timeout(60)
def test_the_example_by_hand_runs_in_the_virtualenv_it_activates(tmp_path):
    """Each command as written, in one shell whose PATH has no python of its own:
    only the activated .venv makes ``python -m mqueue`` work."""
    commands = by_hand_commands()
    assert commands[0] == ". .venv/bin/activate", commands
    start = next(i for i, c in enumerate(commands) if c.startswith("python -m mqueue start"))
    repo = copy_of_repository(tmp_path / "checkout")
    checkout_virtualenv(repo)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    script = "set -e\n" + "\n".join(commands[:start])  # start serves until Ctrl-C
    result = run_in_shell(script, repo, env, timeout=50)
    assert result.returncode == 0, result.stdout
    job = re.search(r"^welcome job (\d+) enqueued for ada@example\.com", result.stdout, re.M)
    assert job, result.stdout
    assert re.search(rf"^\s*{job.group(1)}\s+default\s+tasks\.mail\.welcome\b", result.stdout, re.M), result.stdout

    without = run_in_shell("set -e\n" + "\n".join(commands[1:start]), repo, env, timeout=50)
    assert without.returncode != 0  # the step item 2 of issue 11 was about


# -- what the README says about installing and arguments ---------------------------

def readme_section(title: str) -> str:
    text = readme_text()
    start = text.index(f"\n{title}\n")
    following = re.search(r"\n[^\n]+\n[-~=]{4,}\n", text[start + len(title) + 2:])
    return text[start:start + len(title) + 2 + (following.start() if following else len(text))]


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    return config


def distribution_name() -> str:
    """The name setup.cfg publishes under (``mqueue`` on PyPI is another project)."""
    return setup_cfg()["metadata"]["name"]


def test_the_install_lines_install_this_project():
    """``mqueue`` on PyPI is another project: the README installs this one, by its own name."""
    name = distribution_name()
    assert name != "mqueue"
    section = readme_section("Installing")
    assert f"distribution is named ``{name}``" in section and "the package you import\nis ``mqueue``" in section
    assert "``pip install mqueue`` installs that one, not this" in section
    assert f"``{name}[postgres] @ git+" in section
    installs = [c for b in code_blocks(readme_text(), "bash") for c in shell_commands(b) if "pip install" in c]
    assert installs and all(re.search(r"pip install (-e )?'\.\[postgres\]'", c) for c in installs), installs
    assert "postgres" in setup_cfg()["options.extras_require"]


def test_arguments_are_checked_as_the_readme_says(tmp_path):
    """Binding and storable types are checked at enqueue; annotations never are."""
    import datetime as dt
    import decimal
    import uuid

    import mqueue
    from mqueue import admin
    section = readme_section("Arguments")
    assert "Type annotations are not checked" in section
    received = []

    @mqueue.task(name="readme.invoice")
    def invoice(customer: uuid.UUID, amount: decimal.Decimal, due: dt.date) -> None:
        received.append((customer, amount, due))

    db = mqueue.Database(f"sqlite:///{tmp_path / 'arguments.db'}")
    try:
        db.create_all()
        with db.session():
            job_id = invoice.enqueue("c0ffee", "9.90", "2030-01-31")
            with pytest.raises(TypeError, match="due"):
                invoice.enqueue(uuid.uuid4(), 9.90, due=object())
            with pytest.raises(TypeError, match="due"):
                invoice.enqueue(uuid.uuid4(), decimal.Decimal("9.90"))
        assert [job.id for job in admin.list_jobs(db)] == [job_id]  # the refused ones stored nothing
        assert admin.get_job(db, job_id).decoded_args() == {"customer": "c0ffee", "amount": "9.90",
                                                            "due": "2030-01-31"}
        assert mqueue.Worker(db).run_until_empty(timeout=30).succeeded == 1
    finally:
        db.dispose()
    assert received == [("c0ffee", "9.90", "2030-01-31")]


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
