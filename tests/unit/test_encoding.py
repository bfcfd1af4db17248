"""Typed JSON arguments: exact round trips, refusals that name the argument, decode errors."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from decimal import Decimal

import pytest

from mqueue.encoding import decode_args, encode_args

BERLIN_SUMMER = dt.timezone(dt.timedelta(hours=2))
INDIA = dt.timezone(dt.timedelta(hours=5, minutes=30))


def round_trip(arguments: dict) -> dict:
    text = encode_args(arguments)
    assert isinstance(text, str)
    json.loads(text)  # always valid JSON
    return decode_args(text)


def assert_identical(actual, expected) -> None:
    """Equal, and of exactly the same types all the way down (1 == 1.0 == True is not enough)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_identical(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_identical(a, e)
    elif isinstance(expected, float) and math.isnan(expected):
        raise AssertionError("NaN is never stored")
    else:
        assert actual == expected
        if isinstance(expected, (dt.datetime, dt.time)):
            assert actual.tzinfo == expected.tzinfo
            assert actual.utcoffset() == expected.utcoffset()
        if isinstance(expected, Decimal):
            assert str(actual) == str(expected)  # same digits and exponent, not only equal


JSON_VALUES = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "int": -42,
    "big": 2**70,
    "float": 3.25,
    "negative_zero": -0.0,
    "tiny": 5e-324,
    "text": "héllo \u2603 \"quoted\" \\ \n",
    "empty_text": "",
    "list": [1, "two", 3.0, None, False],
    "empty_list": [],
    "dict": {"a": 1, "b": [True, {"c": None}]},
    "empty_dict": {},
}


@pytest.mark.parametrize("name", sorted(JSON_VALUES))
def test_json_values_round_trip_exactly(name):
    value = JSON_VALUES[name]
    assert_identical(round_trip({"value": value}), {"value": value})


def test_plain_json_is_stored_as_itself():
    # A row inserted by hand with plain JSON must mean what it says.
    arguments = {"user_id": 7, "tags": ["a", "b"], "opts": {"x": 1.5}}
    assert json.loads(encode_args(arguments)) == arguments


TYPED_VALUES = {
    "naive_datetime": dt.datetime(2024, 2, 29, 23, 59, 58, 123456),
    "naive_datetime_no_micro": dt.datetime(2024, 1, 1, 0, 0),
    "utc_datetime": dt.datetime(2024, 3, 31, 1, 30, 0, 1, tzinfo=dt.timezone.utc),
    "offset_datetime": dt.datetime(2024, 7, 1, 12, 0, 0, 999999, tzinfo=BERLIN_SUMMER),
    "half_hour_offset": dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=INDIA),
    "date": dt.date(2024, 2, 29),
    "old_date": dt.date(1, 1, 1),
    "time": dt.time(23, 59, 59, 500000),
    "midnight": dt.time(0, 0),
    "aware_time": dt.time(8, 15, 0, 42, tzinfo=INDIA),
    "decimal": Decimal("1.10"),
    "decimal_exponent": Decimal("-1.23E+7"),
    "decimal_long": Decimal("3.141592653589793238462643383279502884197"),
    "decimal_infinity": Decimal("Infinity"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "uuid4": uuid.uuid4(),
    "bytes": bytes(range(256)),
    "empty_bytes": b"",
}


@pytest.mark.parametrize("name", sorted(TYPED_VALUES))
def test_typed_values_round_trip_exactly(name):
    value = TYPED_VALUES[name]
    assert_identical(round_trip({"value": value}), {"value": value})


def test_typed_values_nested_in_lists_and_dicts():
    arguments = {
        "when": [TYPED_VALUES["offset_datetime"], {"day": dt.date(2020, 5, 17), "ids": [uuid.UUID(int=1)]}],
        "money": {"amounts": [Decimal("0.01"), Decimal("100")], "raw": {"blob": b"\x00\xff"}},
        "deep": [[[{"t": dt.time(1, 2, 3)}]]],
    }
    assert_identical(round_trip(arguments), arguments)


def test_datetime_keeps_its_offset_and_naive_stays_naive():
    aware = round_trip({"v": TYPED_VALUES["offset_datetime"]})["v"]
    naive = round_trip({"v": TYPED_VALUES["naive_datetime"]})["v"]
    assert aware.utcoffset() == dt.timedelta(hours=2)
    assert naive.tzinfo is None
    # a date never comes back as a datetime (datetime is a subclass of date)
    assert type(round_trip({"v": dt.date(2024, 1, 2)})["v"]) is dt.date


def test_user_dict_with_a_type_key_is_not_mistaken_for_a_tag():
    arguments = {
        "looks_like_a_date": {"$type": "date", "$value": "2024-01-01"},
        "looks_like_bytes": {"$type": "bytes", "$value": "AAAA"},
        "unknown_tag": {"$type": "nope", "$value": 1},
        "only_type": {"$type": "dict"},
        "type_and_more": {"$type": "x", "when": dt.date(2024, 1, 2), "n": 1},
        "nested": [{"inner": {"$type": "uuid", "$value": "not a uuid", "$extra": None}}],
        "none_tag": {"$type": None, "$value": None},
    }
    assert_identical(round_trip(arguments), arguments)


def test_argument_names_are_arbitrary_strings():
    arguments = {"$type": "datetime", "$value": "2024-01-01", "a b": 1, "ü": 2}
    assert_identical(round_trip(arguments), arguments)


@pytest.mark.parametrize("value, kind", [
    ({1, 2}, "set"),
    (frozenset(), "frozenset"),
    ((1, 2), "tuple"),
    (object(), "object"),
    (1 + 2j, "complex"),
    (bytearray(b"x"), "bytearray"),
    (dt.timedelta(seconds=1), "timedelta"),
    (lambda: None, "function"),
])
def test_unsupported_types_raise_type_error_naming_the_argument(value, kind):
    with pytest.raises(TypeError) as caught:
        encode_args({"ok": 1, "payload": value})
    message = str(caught.value)
    assert "'payload'" in message
    assert kind in message
    assert "'ok'" not in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_raise_type_error_naming_the_argument(value):
    with pytest.raises(TypeError, match="'ratio'"):
        encode_args({"ratio": value})


def test_error_points_into_nested_containers():
    with pytest.raises(TypeError) as caught:
        encode_args({"rows": [1, {"key": {3, 4}}]})
    message = str(caught.value)
    assert "'rows'" in message and "[1]" in message and "'key'" in message and "set" in message

    with pytest.raises(TypeError, match=r"'batch'.*nan"):
        encode_args({"batch": {"values": [1.0, float("nan")]}})


def test_non_string_dict_keys_are_refused():
    with pytest.raises(TypeError, match="'mapping'"):
        encode_args({"mapping": {1: "one"}})


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2]", "JSON object"),
    ('"text"', "JSON object"),
    ("42", "JSON object"),
    ("null", "JSON object"),
    ("{not json", "not valid JSON"),
    ("\x00", "not valid JSON"),
])
def test_decoding_anything_but_a_json_object_raises_value_error(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        decode_args(text)


def test_empty_args_mean_no_arguments():
    assert decode_args("{}") == {}
    assert decode_args("") == {}
    assert decode_args(None) == {}
    assert decode_args(b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("tagged", [
    {"$type": "nope", "$value": 1},
    {"$type": "date", "$value": "2024-13-45"},
    {"$type": "datetime", "$value": 12},
    {"$type": "time", "$value": "25:00"},
    {"$type": "decimal", "$value": "twelve"},
    {"$type": "decimal", "$value": [1]},
    {"$type": "uuid", "$value": "xyz"},
    {"$type": "uuid", "$value": 5},
    {"$type": "bytes", "$value": "!!not base64!!"},
    {"$type": "bytes", "$value": 3},
    {"$type": "dict", "$value": [1, 2]},
    {"$type": ["date"], "$value": "2024-01-01"},
])
def test_bad_tags_raise_value_error(tagged):
    text = json.dumps({"ok": 1, "arg": [tagged]})
    with pytest.raises(ValueError, match="cannot be decoded|unknown stored type"):
        decode_args(text)


def test_unknown_tag_is_named_in_the_error():
    with pytest.raises(ValueError, match="'pickle'"):
        decode_args('{"x": {"$type": "pickle", "$value": "gASVAAAA"}}')


def test_decode_accepts_an_already_parsed_object():
    # Some drivers hand JSON columns back as dicts.
    stored = json.loads(encode_args({"when": dt.date(2024, 1, 2)}))
    assert decode_args(stored) == {"when": dt.date(2024, 1, 2)}
