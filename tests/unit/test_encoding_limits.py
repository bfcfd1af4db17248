"""Limits on what a job carries (args size and depth, stored errors) and what a task may be."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

import mqueue
from mqueue.encoding import MAX_ARGS_BYTES, MAX_ARGS_DEPTH, decode_args, encode_args
from mqueue.executor import DEFERRED, LOST, MAX_ERROR_BYTES, SUCCEEDED, Outcome, format_error
from mqueue.registry import unregister


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_args_up_to_the_depth_limit_round_trip_and_deeper_ones_are_refused_naming_the_task():
    # The named-arguments object is level 1, so an argument may nest MAX_ARGS_DEPTH - 1 levels.
    fine = {"a": nested(MAX_ARGS_DEPTH - 1)}
    assert decode_args(encode_args(fine)) == fine
    with pytest.raises(ValueError, match=r"^tasks\.x: argument 'a' is nested deeper than 100 levels"):
        encode_args({"a": nested(MAX_ARGS_DEPTH)}, "tasks.x")


@pytest.mark.parametrize("depth", [MAX_ARGS_DEPTH, 5_000, 200_000])
def test_stored_args_nested_too_deeply_are_a_clear_value_error(depth):
    text_ = '{"a": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(ValueError, match="args nested too deeply"):
        decode_args(text_)


def test_args_over_the_size_limit_are_refused_in_bytes_not_characters():
    assert len(encode_args({"a": "x" * (MAX_ARGS_BYTES - 10)}).encode()) <= MAX_ARGS_BYTES
    with pytest.raises(ValueError, match=r"^tasks\.x: args are .* bytes .*1,048,576 \(MAX_ARGS_BYTES\)"):
        encode_args({"a": "x" * MAX_ARGS_BYTES}, "tasks.x")
    with pytest.raises(ValueError, match="MAX_ARGS_BYTES"):
        encode_args({"a": "€" * (MAX_ARGS_BYTES // 3)})  # a third as many characters, 3 bytes each


def test_enqueue_refuses_too_big_or_too_deep_args_before_needing_a_session():
    @mqueue.task(name="limits.sink")
    def sink(data):
        pass

    try:
        with pytest.raises(ValueError, match=r"limits\.sink: args are"):
            sink.enqueue("x" * MAX_ARGS_BYTES)
        with pytest.raises(ValueError, match=r"limits\.sink: argument 'data' is nested deeper"):
            sink.enqueue_many([{"data": 1}, {"data": nested(MAX_ARGS_DEPTH + 5)}])
    finally:
        unregister("limits.sink")


def test_generator_functions_are_refused_at_decoration_and_async_ones_accepted():
    def numbers():
        yield 1

    async def stream():
        yield 1

    async def coroutine():
        return 1

    with pytest.raises(TypeError, match=r"task 'limits.numbers' is a generator function"):
        mqueue.task(name="limits.numbers")(numbers)
    with pytest.raises(TypeError, match="generator function"):
        mqueue.task(stream)
    try:
        assert mqueue.task(name="limits.coroutine")(coroutine).name == "limits.coroutine"
    finally:
        unregister("limits.coroutine")


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:  # noqa: B902
        return caught


def test_a_huge_error_is_cut_by_utf8_bytes_keeping_the_traceback_end_and_the_message_start():
    stored = format_error(raised(RuntimeError("Größe 😀 " + "ü€😀\n" * 100_000)))
    assert len(stored.encode("utf-8")) <= MAX_ERROR_BYTES
    stored.encode("utf-8").decode("utf-8")  # whole characters only
    assert "raise error" in stored  # the innermost frame
    last = stored.splitlines()[-1]
    assert last.startswith("RuntimeError: Größe 😀 ü€😀") and last.endswith("cut]")


def test_a_huge_traceback_keeps_its_end():
    error = None
    for layer in range(400):  # a long chain of causes: some 100 kB of traceback
        try:
            raise ValueError(f"layer {layer}") from error
        except ValueError as caught:
            error = caught
    stored = format_error(error)
    assert len(stored.encode("utf-8")) <= MAX_ERROR_BYTES
    assert stored.startswith("[... ") and "the start cut" in stored.splitlines()[0]
    assert stored.splitlines()[-1] == "ValueError: layer 399"
    assert "ValueError: layer 398" in stored


def test_a_sqlalchemy_errors_stored_last_line_is_the_drivers_message_not_the_background_link():
    engine = create_engine("sqlite://")
    with pytest.raises(OperationalError) as info, engine.connect() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    stored = format_error(info.value)
    assert "sqlalche.me" not in stored and "Background on this error" not in stored
    assert stored.splitlines()[-1] == ("sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) "
                                       "no such table: no_such_table")
    assert "[SQL: SELECT * FROM no_such_table]" in stored


def test_outcomes_are_a_small_frozen_type_compared_by_value():
    assert SUCCEEDED == Outcome("succeeded") and SUCCEEDED != LOST
    assert str(DEFERRED) == "deferred" and f"{LOST}" == "lost"
    with pytest.raises(AttributeError):
        SUCCEEDED.name = "failed"
    assert json.dumps(str(SUCCEEDED)) == '"succeeded"'


def test_any_errors_stored_last_line_is_its_own_first_line():
    """``mqueue list`` shows the last line: not the second line of a message, nor a note."""
    multi = ValueError("order 7 is invalid\nfield total: expected > 0")
    assert format_error(multi).splitlines()[-1] == "ValueError: order 7 is invalid"
    noted = KeyError("sku")
    noted.add_note("while pricing cart 12")
    assert format_error(noted).splitlines()[-1] == "KeyError: 'sku'"
