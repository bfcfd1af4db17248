"""Errors a new user meets before any database is involved (issue 11, items 8 and 9)."""

from __future__ import annotations

import pytest

import mqueue
from mqueue.registry import unregister

PASSWORD = "s3cret"


@pytest.fixture
def welcome():
    @mqueue.task(name="fh_unit.welcome")
    def welcome(user_id: int, greeting: str = "hi", *, channel: str = "mail") -> None:
        pass
    yield welcome
    unregister("fh_unit.welcome")


def test_enqueue_names_the_unexpected_keyword_with_a_suggestion(welcome):
    with pytest.raises(TypeError) as caught:
        welcome.enqueue(uid=1)
    assert str(caught.value) == ("fh_unit.welcome: got an unexpected keyword argument 'uid' (did you mean "
                                 "'user_id'?); missing a required argument: 'user_id'")


@pytest.mark.parametrize("kwargs, message", [
    (dict(user_id=1, chanel="sms"), "got an unexpected keyword argument 'chanel' (did you mean 'channel'?)"),
    (dict(user_id=1, colour="red"), "got an unexpected keyword argument 'colour'"),
    (dict(user_id=1, greting="yo", zzz=2), "got an unexpected keyword argument 'greting' (did you mean "
                                            "'greeting'?); got an unexpected keyword argument 'zzz'"),
    (dict(), "missing a required argument: 'user_id'"),
])
def test_enqueue_mismatches_say_every_problem_once(welcome, kwargs, message):
    with pytest.raises(TypeError) as caught:
        welcome.enqueue(**kwargs)
    assert str(caught.value) == f"fh_unit.welcome: {message}"


@pytest.mark.parametrize("url, advice", [
    (f"postgres://app:{PASSWORD}@db.example.com/app",
     "SQLAlchemy has no scheme 'postgres://'; use postgresql+psycopg://app:***@db.example.com/app"),
    (f"mysql://app:{PASSWORD}@db.example.com/app",
     "its driver is not installed (No module named 'MySQLdb'); use mysql+pymysql://app:***@db.example.com/app"),
    (f"oracle://app:{PASSWORD}@db.example.com/app",
     "mqueue supports MySQL/MariaDB, PostgreSQL and SQLite, not 'oracle'; "
     "use one of mysql+pymysql://, postgresql+psycopg://, sqlite://"),
])
def test_a_url_with_an_unusable_scheme_says_which_url_and_which_scheme_to_use(url, advice):
    with pytest.raises(mqueue.DatabaseURLError) as caught:
        mqueue.Database(url)
    scheme = url.split("://")[0]
    assert str(caught.value) == f"cannot use database URL {scheme}://app:***@db.example.com/app: {advice}"
    assert isinstance(caught.value, ValueError)
