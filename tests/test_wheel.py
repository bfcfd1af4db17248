"""The built wheel works on its own: installed in a fresh virtualenv, it migrates every backend.

The repository is copied and built into a wheel once per test session; the
virtualenv sees the test environment's third-party packages (SQLAlchemy,
Alembic, croniter, drivers: a ``.pth`` line adds that site-packages directory
without running its ``.pth`` files, so the editable install of the repository
stays out) but not the repository, so the migrations must come from inside the
installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from test_readme import distribution_name
from sqlalchemy import create_engine, inspect, text

BUILD_TIMEOUT = 300
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".benchmarks", "*.db", "*.db-wal", "*.db-shm")


def clean_env() -> dict[str, str]:
    """Our environment without anything that would put the repository on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV",
                        "MQUEUE_DATABASE_URL")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(argv, cwd: Path, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=str(cwd), env=clean_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(venv_python, venv_dir, work_dir)`` with the freshly built wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    # A copy, so the build never writes build/ or egg-info into the shared working tree.
    shutil.copytree(REPO_ROOT, source, ignore=COPY_IGNORE, symlinks=True)
    dist = root / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, source], cwd=root)
    wheels = list(dist.glob(f"{distribution_name().replace('-', '_')}-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    venv_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(venv_site.stdout.strip()) / "test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    # The system's pip, running in the venv's interpreter, installs into the venv.
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheels[0]], cwd=root)
    work = root / "work"
    work.mkdir()
    return python, venv, work


def test_installed_wheel_migrates_a_fresh_database(installed, database_url, backend):
    python, venv, work = installed

    where = run([python, "-c", "import mqueue, sys; print(mqueue.__file__); print(sys.prefix)"], cwd=work)
    location, prefix = where.stdout.split()
    assert Path(prefix).resolve() == venv.resolve()
    assert venv.resolve() in Path(location).resolve().parents, location
    assert REPO_ROOT not in Path(location).resolve().parents

    engine = create_engine(database_url)
    try:
        assert inspect(engine).get_table_names() == []
        first = run([python, "-m", "mqueue", "migrate", "--database", database_url], cwd=work, timeout=120)
        assert "Traceback" not in first.stderr
        # Again, through the console script: nothing to do, still fine.
        script = python.parent / "mqueue"
        run([script, "migrate", "--database", database_url], cwd=work, timeout=120)

        assert set(inspect(engine).get_table_names()) == {"mqueue_task", "mqueue_cron", "mqueue_event", "mqueue_stats",
                                                          "mqueue_setting", "mqueue_tag", "mqueue_dependency",
                                                          "mqueue_queue", "mqueue_worker", "mqueue_alembic_version"}
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM mqueue_alembic_version")).scalars().all()
        from mqueue.migrate import alembic_config
        from alembic.script import ScriptDirectory
        assert versions == [ScriptDirectory.from_config(alembic_config()).get_current_head()] == ["mqueue_0005"]
    finally:
        engine.dispose()
    if backend == "sqlite":
        assert not (work / "mqueue.db").exists()  # the --database URL was used, not the default


def test_installed_wheel_is_named_as_the_readme_says_and_shows_its_revisions(installed):
    """The distribution's name (the README's install line), and mqueue's revisions found
    from the installed package: the printed location and Alembic's ``mqueue:`` resource name."""
    python, venv, work = installed
    name = run([python, "-c", "import importlib.metadata as m; print(m.distribution('mqueue-sql').name)"], cwd=work)
    assert name.stdout.strip() == distribution_name() == "mqueue-sql"
    printed = run([python, "-m", "mqueue", "migrate", "--print-location"], cwd=work).stdout.strip()
    assert venv.resolve() in Path(printed).resolve().parents, printed
    assert sorted(p.name for p in Path(printed).glob("*.py")) == sorted(
        p.name for p in (REPO_ROOT / "mqueue" / "migrations" / "versions").glob("*.py"))
    resolved = run([python, "-c", "from alembic.util import coerce_resource_to_filename as c; "
                                  "print(c('mqueue:migrations/versions'))"], cwd=work).stdout.strip()
    assert Path(resolved).resolve() == Path(printed).resolve()


def test_installed_wheel_ships_the_dashboard_files(installed, tmp_path):
    """The dashboard's stylesheet and script are package data: served from the installed wheel."""
    python, venv, work = installed
    code = ("import sys, io; from wsgiref.util import setup_testing_defaults\n"
            "from mqueue.web import app\n"
            "import mqueue.web, pathlib\n"
            "assert pathlib.Path(sys.prefix).resolve() in pathlib.Path(mqueue.web.__file__).resolve().parents\n"
            "for name in ('dashboard.css', 'dashboard.js'):\n"
            "    environ = {'PATH_INFO': '/static/' + name}; setup_testing_defaults(environ)\n"
            "    status = []\n"
            "    body = b''.join(app(sys.argv[1])(environ, lambda s, h: status.append(s)))\n"
            "    print(name, status[0], len(body))\n")
    result = run([python, "-c", code, f"sqlite:///{tmp_path / 'none.db'}"], cwd=work)
    lines = result.stdout.splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["dashboard.css 200 OK", "dashboard.js 200 OK"]
    assert all(int(line.rsplit(" ", 1)[1]) > 100 for line in lines)
