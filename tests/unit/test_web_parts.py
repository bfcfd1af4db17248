"""The dashboard's pure parts: how failed jobs are grouped, the CSRF token check, the charts'
shapes, and Prometheus label escaping (no database)."""

from __future__ import annotations

import re

import pytest

from mqueue.admin import error_type
from mqueue.history import BUCKETS
from mqueue.web.forms import Csrf
from mqueue.web.metrics import label
from mqueue.web.svg import MIN_BARS, histogram, sparkline


@pytest.mark.parametrize("stored, expected", [
    ("Traceback (most recent call last):\n  ...\nRuntimeError: disk full\n", "RuntimeError"),
    ("requests.exceptions.ConnectionError: refused", "requests.exceptions.ConnectionError"),
    ("KeyError\n", "KeyError"),
    ("lease expired: the worker stopped heartbeating", "lease expired: the worker stopped heartbeating"),
    ("command exited with status 3: boom", "command exited with status 3: boom"),
    (None, "(no error)"), ("  \n", "(no error)"),
])
def test_error_type_groups_by_the_exception_named_last(stored, expected):
    assert error_type(stored) == expected


def test_csrf_token_belongs_to_its_cookie_and_secret():
    csrf = Csrf(b"k" * 32)
    cookie = Csrf.new_cookie()
    assert Csrf.usable(cookie) and not Csrf.usable("short") and not Csrf.usable(None)
    assert not Csrf.usable("a" * 40 + ";Path=/")
    token = csrf.token(cookie)
    assert csrf.valid(cookie, token)
    assert not csrf.valid(cookie, token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert not csrf.valid(Csrf.new_cookie(), token)
    assert not csrf.valid(cookie, "") and not csrf.valid(None, token)
    assert not Csrf(b"x" * 32).valid(cookie, token)
    assert Csrf("same").valid(cookie, Csrf("same").token(cookie))


def test_sparkline_scales_to_the_largest_count():
    svg = sparkline([0, 5, 10], "q: 15 jobs", width=100, height=20)
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert points == ["0.0,19.0", "50.0,10.0", "100.0,1.0"]
    assert 'aria-label="q: 15 jobs"' in svg
    assert "<title>&lt;q&gt;</title>" in sparkline([1], "<q>")
    assert sparkline([], "none") == ""


def test_histogram_draws_the_filled_range_and_at_least_min_bars():
    counts = [0] * len(BUCKETS)
    counts[3], counts[70] = 2, 1
    svg = histogram(counts, BUCKETS, "wait")
    assert svg.count("<rect") == 70 - 3 + 1
    assert f"<title>{BUCKETS[3]}: 2</title>" in svg and f"<title>{BUCKETS[70]}: 1</title>" in svg
    one = [0] * len(BUCKETS)
    one[-1] = 4
    assert histogram(one, BUCKETS, "run").count("<rect") == MIN_BARS
    assert "no jobs" in histogram([0] * len(BUCKETS), BUCKETS, "run")


def test_prometheus_label_values_are_escaped():
    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
