"""Typed JSON: the only format in which task arguments are stored.

A job's ``args`` column holds a JSON object of named arguments.  Plain JSON
values are stored as themselves, so a row inserted by hand with
``{"user_id": 7}`` is a valid job.  The few non-JSON types that tasks
commonly take are stored as tagged objects ``{"$type": ..., "$value": ...}``
and come back as the same type.  Nothing is ever pickled: a row can carry
data, never code.

Limits, checked when a job is enqueued: ``MAX_ARGS_BYTES`` of JSON text (a
job row is not a blob store, and the column must hold it on every backend)
and ``MAX_ARGS_DEPTH`` levels of nesting (MySQL's own JSON limit; deeper
data also hits Python's recursion limit in the worker, where a row must
fail with a clear error instead).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import uuid
from decimal import Decimal
from typing import Any, Callable

TAG = "$type"
VALUE = "$value"
#: Largest ``args`` JSON text, in UTF-8 bytes (1 MiB).
MAX_ARGS_BYTES = 1_048_576
#: Deepest nesting of lists and objects in ``args`` (the named-arguments object is level 1).
MAX_ARGS_DEPTH = 100

# type -> (tag, to_json); decoding below is the mirror image.
_ENCODERS: dict[type, tuple[str, Callable[[Any], Any]]] = {
    dt.datetime: ("datetime", lambda v: v.isoformat()),
    dt.date: ("date", lambda v: v.isoformat()),
    dt.time: ("time", lambda v: v.isoformat()),
    Decimal: ("decimal", str),
    uuid.UUID: ("uuid", str),
    bytes: ("bytes", lambda v: base64.b64encode(v).decode("ascii")),
}
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": Decimal,
    "uuid": uuid.UUID,
    "bytes": lambda v: base64.b64decode(v.encode("ascii"), validate=True),
}


class _TooDeep(ValueError):
    """Nesting beyond ``MAX_ARGS_DEPTH``: raised at the bottom, reworded once at the top."""


def _encode(value: Any, where: str, depth: int = 2) -> Any:
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        if not math.isfinite(value):
            raise TypeError(f"argument {where} is {value!r}, which JSON cannot store")
        return value
    if kind is list:
        if depth > MAX_ARGS_DEPTH:
            raise _TooDeep()
        return [_encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if kind is dict:
        if depth > MAX_ARGS_DEPTH:
            raise _TooDeep()
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"argument {where} has a non-string key {key!r}; JSON objects need str keys")
            out[key] = _encode(item, f"{where}[{key!r}]", depth + 1)
        return {TAG: "dict", VALUE: out} if TAG in out else out
    if kind in _ENCODERS:
        tag, convert = _ENCODERS[kind]
        return {TAG: tag, VALUE: convert(value)}
    raise TypeError(
        f"argument {where} has type {kind.__name__}, which mqueue cannot store; use JSON types, "
        "datetime, date, time, Decimal, UUID or bytes")


def _decode(value: Any, depth: int = 2) -> Any:
    if isinstance(value, (list, dict)) and depth > MAX_ARGS_DEPTH:
        raise _TooDeep()
    if isinstance(value, list):
        return [_decode(item, depth + 1) for item in value]
    if isinstance(value, dict):
        tag = value.get(TAG)
        if tag is not None and set(value) == {TAG, VALUE}:
            if tag == "dict":  # an object whose own keys include the tag
                return {k: _decode(x, depth + 1) for k, x in value[VALUE].items()}
            try:
                decoder = _DECODERS[tag]
            except KeyError:
                raise ValueError(f"unknown stored type {tag!r}") from None
            return decoder(value[VALUE])
        return {key: _decode(item, depth + 1) for key, item in value.items()}
    return value


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode_args(arguments: dict[str, Any], task: str | None = None) -> str:
    """Return the JSON text of named arguments; raise TypeError naming a bad one.

    ValueError (naming ``task`` and the limit) for args nested deeper than
    ``MAX_ARGS_DEPTH`` or larger than ``MAX_ARGS_BYTES``: nothing is stored.
    """
    whose = f"{task}: " if task else ""
    encoded = {}
    for name, value in arguments.items():
        try:
            encoded[name] = _encode(value, repr(name))
        except _TooDeep:
            raise ValueError(f"{whose}argument {name!r} is nested deeper than {MAX_ARGS_DEPTH} levels "
                             f"(MAX_ARGS_DEPTH); flatten it") from None
    text = _dumps(encoded)
    # At most 4 UTF-8 bytes a character: short texts need no encoding to be measured.
    if len(text) * 4 > MAX_ARGS_BYTES and len(text.encode("utf-8")) > MAX_ARGS_BYTES:
        raise ValueError(f"{whose}args are {len(text.encode('utf-8')):,} bytes of JSON, over the limit of "
                         f"{MAX_ARGS_BYTES:,} (MAX_ARGS_BYTES); store large data in a table and pass its id")
    return text


def decode_args(text: str | bytes | dict | None) -> dict[str, Any]:
    """Turn a stored ``args`` value back into named arguments.

    Raises ValueError for anything that is not a JSON object: such a row
    fails with that message instead of running with guessed arguments.
    """
    if text is None or text == "":
        return {}
    too_deep = f"args nested too deeply (more than {MAX_ARGS_DEPTH} levels, MAX_ARGS_DEPTH)"
    if isinstance(text, dict):
        raw = text
    else:
        try:
            raw = json.loads(text)
        except RecursionError:  # the parser's own limit, far deeper than ours
            raise ValueError(too_deep) from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"args is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"args must be a JSON object of named arguments, got {type(raw).__name__}")
    try:
        return {name: _decode(value) for name, value in raw.items()}
    except (_TooDeep, RecursionError):
        raise ValueError(too_deep) from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as error:  # Decimal: InvalidOperation
        raise ValueError(f"args cannot be decoded: {error}") from None
