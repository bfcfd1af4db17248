"""The task registry: names, direct calls, validation at decoration, argument binding, discover()."""

from __future__ import annotations

import datetime as dt
import importlib
import sys
import textwrap
import threading
import uuid

import pytest
from sqlalchemy import func, select

import mqueue
from mqueue.encoding import decode_args, encode_args
from mqueue.migrate import upgrade
from mqueue.registry import get_task, registered_tasks, unregister
from mqueue.schema import task_table

#: Every task this module registers by an explicit name starts with this.
PREFIX = "treg."


@pytest.fixture(autouse=True)
def forget_tasks():
    before = set(registered_tasks())
    yield
    for name in set(registered_tasks()) - before:
        unregister(name)


@pytest.fixture
def sqlite_db(tmp_path):
    database = mqueue.Database(f"sqlite:///{tmp_path / 'registry.db'}")
    upgrade(database)
    yield database
    database.dispose()


def job_count(database) -> int:
    with database.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(task_table)).scalar_one()


# -- names ----------------------------------------------------------------------


@mqueue.task
def module_level_mail(to: str) -> str:
    return f"mail to {to}"


class Reports:
    @staticmethod
    def weekly() -> None:
        pass


weekly_report = mqueue.task(Reports.weekly)


def test_default_name_is_module_dot_qualname():
    assert module_level_mail.name == f"{__name__}.module_level_mail"
    assert get_task(f"{__name__}.module_level_mail") is module_level_mail
    assert weekly_report.name == f"{__name__}.Reports.weekly"


def test_default_name_of_a_function_defined_in_a_test():
    @mqueue.task
    def local_one() -> None:
        pass

    assert local_one.name == f"{__name__}.test_default_name_of_a_function_defined_in_a_test.<locals>.local_one"
    assert get_task(local_one.name) is local_one


def test_explicit_name_and_options_are_kept():
    @mqueue.task(name=PREFIX + "explicit", queue="mail", priority=5, max_retries=2, backoff=[1, 2], timeout=30)
    def explicit() -> None:
        pass

    assert explicit.name == PREFIX + "explicit"
    assert (explicit.queue, explicit.priority, explicit.max_retries, explicit.timeout) == ("mail", 5, 2, 30)
    assert get_task(PREFIX + "explicit") is explicit
    assert isinstance(explicit, mqueue.Task)


def test_decorator_with_empty_parentheses():
    @mqueue.task()
    def bare() -> int:
        return 1

    assert bare.name.endswith(".bare")
    assert bare() == 1


def test_unknown_task_suggests_the_closest_name():
    @mqueue.task(name=PREFIX + "send_invoice")
    def send_invoice() -> None:
        pass

    with pytest.raises(mqueue.UnknownTaskError, match=r"did you mean 'treg\.send_invoice'"):
        get_task(PREFIX + "send_invoise")


# -- calling ---------------------------------------------------------------------


def test_calling_the_task_runs_it_here_and_now():
    calls = []

    @mqueue.task(name=PREFIX + "direct")
    def direct(a, b=2, *, c):
        calls.append((a, b, c, threading.current_thread()))
        return a + b + c

    assert direct(1, c=10) == 13
    assert calls == [(1, 2, 10, threading.current_thread())]
    assert direct.__name__ == "direct"
    assert direct.__wrapped__ is direct.fn


def test_calling_the_task_stores_nothing(sqlite_db):
    with sqlite_db.session():
        assert module_level_mail("x@example.com") == "mail to x@example.com"
    assert job_count(sqlite_db) == 0


def test_direct_call_propagates_exceptions():
    @mqueue.task(name=PREFIX + "raiser")
    def raiser():
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        raiser()


# -- duplicates -----------------------------------------------------------------


def test_two_different_functions_under_one_name_raise():
    @mqueue.task(name=PREFIX + "dup")
    def first() -> None:
        pass

    with pytest.raises(mqueue.DuplicateTaskError, match=r"treg\.dup"):
        @mqueue.task(name=PREFIX + "dup")
        def second() -> None:
            pass

    assert get_task(PREFIX + "dup") is first


def test_a_function_of_another_module_under_the_same_name_raises():
    def job() -> None:
        pass

    mqueue.task(name=PREFIX + "clash")(job)
    impostor = type(job)(job.__code__, {}, "job")
    impostor.__qualname__ = job.__qualname__
    impostor.__module__ = "some.other.module"
    with pytest.raises(mqueue.DuplicateTaskError, match="some other name|another name"):
        mqueue.task(name=PREFIX + "clash")(impostor)
    assert get_task(PREFIX + "clash").fn is job


def test_the_same_function_may_register_again():
    def again() -> int:
        return 7

    one = mqueue.task(name=PREFIX + "again")(again)
    two = mqueue.task(name=PREFIX + "again")(again)
    three = mqueue.task(name=PREFIX + "again")(one)  # decorating the Task itself
    assert one() == two() == three() == 7
    assert get_task(PREFIX + "again").fn is again


def test_a_reloaded_module_may_register_again(tmp_path, monkeypatch):
    package = f"treg_reload_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{package}.py").write_text(textwrap.dedent("""
        import mqueue

        @mqueue.task
        def job():
            return "v1"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module(package)
        first = module.job
        module = importlib.reload(module)
        assert module.job is not first
        assert get_task(f"{package}.job") is module.job
    finally:
        sys.modules.pop(package, None)


# -- validation at decoration and enqueue ---------------------------------------------


@pytest.mark.parametrize("options, word", [
    ({"priority": 1.5}, "priority"),
    ({"priority": "high"}, "priority"),
    ({"priority": True}, "priority"),
    ({"max_retries": -1}, "max_retries"),
    ({"max_retries": 2.0}, "max_retries"),
    ({"max_retries": None}, "max_retries"),
    ({"backoff": -1}, "backoff"),
    ({"backoff": []}, "backoff"),
    ({"backoff": [5, "x"]}, "backoff"),
    ({"backoff": "60"}, "backoff"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -3}, "timeout"),
    ({"timeout": "5"}, "timeout"),
    ({"timeout": float("nan")}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"queue": ""}, "queue"),
    ({"queue": 5}, "queue"),
])
def test_bad_task_options_raise_value_error_at_decoration(options, word):
    with pytest.raises(ValueError, match=word):
        mqueue.task(name=PREFIX + "bad", **options)  # the decorator itself is never made
    assert PREFIX + "bad" not in registered_tasks()


def test_good_task_options_are_accepted():
    for number, options in enumerate([{"backoff": 0}, {"backoff": (1, 2.5)}, {"backoff": lambda n: n},
                                      {"timeout": 0.25}, {"priority": -5}, {"max_retries": 0}]):
        mqueue.task(name=f"{PREFIX}good{number}", **options)(lambda: None)


def test_unknown_enqueue_option_says_did_you_mean():
    with pytest.raises(TypeError, match=r"unknown enqueue option 'prority' \(did you mean 'priority'\?\)"):
        module_level_mail.options(prority=3)
    with pytest.raises(TypeError, match=r"'unique_kye'.*did you mean 'unique_key'"):
        module_level_mail.options(unique_kye="x")
    with pytest.raises(TypeError, match=r"unknown enqueue option 'zzz'"):
        module_level_mail.options(zzz=1)


@pytest.mark.parametrize("options, word", [
    ({"priority": "1"}, "priority"),
    ({"max_retries": -2}, "max_retries"),
    ({"delay": -1}, "delay"),
    ({"delay": "10"}, "delay"),
    ({"queue": ""}, "queue"),
    ({"unique_key": ""}, "unique_key"),
    ({"unique_key": "k" * 256}, "unique_key"),
    ({"delay": 5, "eta": dt.datetime(2030, 1, 1)}, "delay or eta"),
])
def test_bad_enqueue_options_raise_value_error(options, word):
    with pytest.raises(ValueError, match=word):
        module_level_mail.options(**options)


def test_eta_must_be_a_datetime():
    with pytest.raises(TypeError, match="eta"):
        module_level_mail.options(eta="2030-01-01")


def test_signature_mismatch_raises_type_error_before_anything_is_stored(sqlite_db):
    with sqlite_db.session():
        with pytest.raises(TypeError, match="module_level_mail"):
            module_level_mail.enqueue()
        with pytest.raises(TypeError):
            module_level_mail.enqueue("a@example.com", "extra")
        with pytest.raises(TypeError):
            module_level_mail.enqueue(too="a@example.com")
        with pytest.raises(TypeError):
            module_level_mail.options(priority=1).enqueue(1, 2, 3)
        with pytest.raises(TypeError):
            module_level_mail.enqueue_many([{"to": "ok@example.com"}, {"wrong": 1}])
        with pytest.raises(TypeError, match="item 1"):
            module_level_mail.enqueue_many([{"to": "ok@example.com"}, ("to", "x")])
        with pytest.raises(TypeError, match="'to'"):
            module_level_mail.enqueue(to={"a", "set"})
        with pytest.raises(TypeError, match="'to'"):
            module_level_mail.enqueue_many([{"to": "ok"}, {"to": float("nan")}])
    assert job_count(sqlite_db) == 0
    with sqlite_db.session():
        job_id = module_level_mail.enqueue("a@example.com")
    assert job_count(sqlite_db) == 1
    assert isinstance(job_id, int)


# -- argument binding ---------------------------------------------------------------


def everything(a, /, b, c=3, *args, d, e=5, **kw):
    return (a, b, c, args, d, e, kw)


@pytest.mark.parametrize("args, kwargs", [
    ((1, 2), {"d": 4}),
    ((1, 2, 30), {"d": 4}),
    ((1, 2, 30, 40, 50), {"d": 4, "e": 6}),
    ((1,), {"b": 2, "d": 4, "x": 1, "y": [2]}),
    ((1, 2, 30, 40), {"d": 4, "z": {"nested": dt.date(2024, 1, 1)}}),
    ((1,), {"b": 2, "c": 33, "d": 4}),
])
def test_call_arguments_round_trip(args, kwargs):
    registered = mqueue.task(name=PREFIX + "everything")(everything)
    named = registered.bind_arguments(args, kwargs)
    stored = decode_args(encode_args(named))
    call_args, call_kwargs = registered.call_arguments(stored)
    assert everything(*call_args, **call_kwargs) == everything(*args, **kwargs)


def test_bound_arguments_are_named():
    registered = mqueue.task(name=PREFIX + "everything")(everything)
    assert registered.bind_arguments((1, 2, 30, 40), {"d": 4, "x": 9}) == {
        "a": 1, "b": 2, "c": 30, "args": [40], "d": 4, "kw": {"x": 9}}
    assert registered.bind_arguments((1,), {"b": 2, "d": 4}) == {"a": 1, "b": 2, "d": 4}


def test_hand_written_arguments_bind_by_name():
    registered = mqueue.task(name=PREFIX + "everything")(everything)
    # What a person would write in a row by hand: names only, **kwargs flat.
    args, kwargs = registered.call_arguments({"a": 1, "b": 2, "d": 4, "extra": "x"})
    assert everything(*args, **kwargs) == (1, 2, 3, (), 4, 5, {"extra": "x"})


def test_missing_default_before_later_positional_values():
    @mqueue.task(name=PREFIX + "posonly")
    def posonly(a=1, b=2, /):
        return (a, b)

    args, kwargs = posonly.call_arguments({"b": 5})
    assert posonly(*args, **kwargs) == (1, 5)

    @mqueue.task(name=PREFIX + "gap")
    def gap(a, b=2, *rest):
        return (a, b, rest)

    args, kwargs = gap.call_arguments({"a": 1, "rest": [3]})
    assert gap(*args, **kwargs) == (1, 2, (3,))


def test_call_arguments_refuse_what_does_not_fit():
    @mqueue.task(name=PREFIX + "strict")
    def strict(a, *, b):
        return a, b

    with pytest.raises(TypeError, match="unexpected argument"):
        strict.call_arguments({"a": 1, "b": 2, "c": 3})
    with pytest.raises(TypeError, match="'b'"):
        strict.call_arguments({"a": 1})
    with pytest.raises(TypeError):
        strict.call_arguments({"b": 1})
    assert strict.call_arguments({"a": 1, "b": 2}) == ([1], {"b": 2})


# -- discover --------------------------------------------------------------------------


def write_package(root, name: str) -> None:
    files = {
        f"{name}/__init__.py": "import mqueue\n\n@mqueue.task\ndef at_root():\n    return 'root'\n",
        f"{name}/mail.py": "import mqueue\n\n@mqueue.task\ndef send(to):\n    return to\n",
        f"{name}/_private.py": "import mqueue\n\n@mqueue.task\ndef hidden():\n    return 'hidden'\n",
        f"{name}/reports/__init__.py": "",
        f"{name}/reports/daily.py": "import mqueue\n\n@mqueue.task\ndef daily():\n    return 'daily'\n",
        f"{name}/reports/deep/__init__.py": "",
        f"{name}/reports/deep/deeper.py": "import mqueue\n\n@mqueue.task(name='treg.deepest')\n"
                                          "def deepest():\n    return 'deep'\n",
        f"{name}/not_python.txt": "import nothing",
    }
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@pytest.fixture
def package_root(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []
    yield tmp_path, names
    for module in list(sys.modules):
        if any(module == n or module.startswith(n + ".") for n in names):
            del sys.modules[module]


def test_discover_imports_every_module_of_the_package(package_root):
    root, names = package_root
    package = f"treg_tasks_{uuid.uuid4().hex[:8]}"
    names.append(package)
    write_package(root, package)

    imported = mqueue.registry.discover(package)

    assert sorted(imported) == sorted([
        package, f"{package}._private", f"{package}.mail", f"{package}.reports",
        f"{package}.reports.daily", f"{package}.reports.deep", f"{package}.reports.deep.deeper"])
    for name in (f"{package}.at_root", f"{package}.mail.send", f"{package}._private.hidden",
                 f"{package}.reports.daily.daily", "treg.deepest"):
        assert name in registered_tasks(), name
    assert get_task("treg.deepest")() == "deep"
    # Twice is fine: the same functions register again.
    assert sorted(mqueue.registry.discover(package)) == sorted(imported)


def test_discover_a_single_module(package_root):
    root, names = package_root
    module = f"treg_single_{uuid.uuid4().hex[:8]}"
    names.append(module)
    (root / f"{module}.py").write_text("import mqueue\n\n@mqueue.task\ndef only():\n    pass\n")
    assert mqueue.registry.discover(module) == [module]
    assert f"{module}.only" in registered_tasks()


def test_discover_a_missing_package_says_what_to_do(package_root):
    with pytest.raises(ModuleNotFoundError) as caught:
        mqueue.registry.discover("treg_no_such_package_here")
    message = str(caught.value)
    assert "'treg_no_such_package_here'" in message
    assert "--tasks" in message


def test_discover_does_not_hide_a_broken_module(package_root):
    root, names = package_root
    package = f"treg_broken_{uuid.uuid4().hex[:8]}"
    names.append(package)
    write_package(root, package)
    (root / package / "reports" / "broken.py").write_text("import treg_module_that_does_not_exist\n")
    with pytest.raises(ModuleNotFoundError, match="treg_module_that_does_not_exist"):
        mqueue.registry.discover(package)


def test_discover_does_not_hide_a_broken_subpackage(package_root):
    root, names = package_root
    package = f"treg_broken_pkg_{uuid.uuid4().hex[:8]}"
    names.append(package)
    write_package(root, package)
    (root / package / "reports" / "__init__.py").write_text("from . import nonexistent_sibling\n")
    with pytest.raises(ImportError, match="nonexistent_sibling"):
        mqueue.registry.discover(package)
