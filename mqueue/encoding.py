"""Typed JSON: the only format in which task arguments are stored.

A job's ``args`` column holds a JSON object of named arguments.  Plain JSON
values are stored as themselves, so a row inserted by hand with
``{"user_id": 7}`` is a valid job.  The few non-JSON types that tasks
commonly take are stored as tagged objects ``{"$type": ..., "$value": ...}``
and come back as the same type.  Nothing is ever pickled: a row can carry
data, never code.
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
    "dict": lambda v: {k: _decode(x) for k, x in v.items()},
}


def _encode(value: Any, where: str) -> Any:
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        if not math.isfinite(value):
            raise TypeError(f"argument {where} is {value!r}, which JSON cannot store")
        return value
    if kind is list:
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"argument {where} has a non-string key {key!r}; JSON objects need str keys")
            out[key] = _encode(item, f"{where}[{key!r}]")
        return {TAG: "dict", VALUE: out} if TAG in out else out
    if kind in _ENCODERS:
        tag, convert = _ENCODERS[kind]
        return {TAG: tag, VALUE: convert(value)}
    raise TypeError(
        f"argument {where} has type {kind.__name__}, which mqueue cannot store; use JSON types, "
        "datetime, date, time, Decimal, UUID or bytes")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict):
        tag = value.get(TAG)
        if tag is not None and set(value) == {TAG, VALUE}:
            try:
                decoder = _DECODERS[tag]
            except KeyError:
                raise ValueError(f"unknown stored type {tag!r}") from None
            return decoder(value[VALUE])
        return {key: _decode(item) for key, item in value.items()}
    return value


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode_args(arguments: dict[str, Any]) -> str:
    """Return the JSON text of named arguments; raise TypeError naming a bad one."""
    encoded = {name: _encode(value, repr(name)) for name, value in arguments.items()}
    return _dumps(encoded)


def decode_args(text: str | bytes | dict | None) -> dict[str, Any]:
    """Turn a stored ``args`` value back into named arguments.

    Raises ValueError for anything that is not a JSON object: such a row
    fails with that message instead of running with guessed arguments.
    """
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        raw = text
    else:
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as error:
            raise ValueError(f"args is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"args must be a JSON object of named arguments, got {type(raw).__name__}")
    try:
        return {name: _decode(value) for name, value in raw.items()}
    except (TypeError, ValueError, AttributeError, ArithmeticError) as error:  # Decimal: InvalidOperation
        raise ValueError(f"args cannot be decoded: {error}") from None
