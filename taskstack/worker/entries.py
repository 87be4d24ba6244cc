"""What a queue entry must be before kombu and Celery may parse it, and why one is refused.

kombu's Redis transport hands each entry it pops, decoded from JSON, to kombu's
message class and then to Celery's consumer, which index it, decode its body
and convert its fields in the worker's main process. Every part they read is
checked here, with the type they assume: an entry of another shape made them
raise there, which stopped the worker (``Unrecoverable error``) or, for a
``KeyError``, made kombu reconnect again and again. So only well-formed Celery
protocol 2 messages of JSON content, for a task the worker knows, get through.

Every refusal is a :class:`Refused` whose reason starts with one of
:data:`REASONS`; docs/reliability.md lists them.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Container
from typing import Any, Final, NamedTuple

from celery.utils.time import maybe_iso8601

REASONS: Final = (
    "not JSON",
    "not a message envelope",
    "too large",
    "compressed",
    "unknown body encoding",
    "not JSON content",
    "bad headers",
    "bad properties",
    "bad body",
    "unknown task",
)
"""What a refused entry was, the first words of its reason (one more, from the delivery
bound: ``delivered N times without finishing``)."""

HEADROOM: Final = 64 * 1024
"""Bytes allowed beyond a batch's own in a message body, and beyond the body in an entry."""


def body_limit(max_payload_bytes: int) -> int:
    """Most bytes of JSON a message body may hold: a batch of ``max_payload_bytes``, which
    travels in base64 (4/3 of it), and the rest of its arguments."""
    return max_payload_bytes * 4 // 3 + HEADROOM


def entry_limit(max_payload_bytes: int) -> int:
    """Most characters of a whole queue entry: the largest body in base64, and its envelope."""
    return body_limit(max_payload_bytes) * 4 // 3 + HEADROOM


class Refused(ValueError):
    """An entry that is not a message the worker may hand to Celery; ``str()`` is the reason."""


class Task(NamedTuple):
    """A checked task message: its id, task name, arguments, the headers it came with, and
    its body decoded (JSON text)."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    body: str


def check_envelope(value: object, max_payload_bytes: int) -> dict[str, Any]:
    """The envelope as kombu reads it, for any queue (broadcasts too); else :class:`Refused`."""
    if not isinstance(value, dict):
        raise Refused(f"not a message envelope: a JSON {_json_type(value)}")
    missing = {"body", "properties"} - value.keys()
    if missing:
        raise Refused(f"not a message envelope: no {' or '.join(sorted(missing))}")
    body, properties, headers = value["body"], value["properties"], value.get("headers")
    if not isinstance(body, str):
        raise Refused(f"not a message envelope: body is a JSON {_json_type(body)}, not a string")
    if not isinstance(properties, dict):
        raise Refused(f"bad properties: a JSON {_json_type(properties)}, not an object")
    if headers is not None and not isinstance(headers, dict):
        raise Refused(f"bad headers: a JSON {_json_type(headers)}, not an object")
    if headers and "compression" in headers:
        # The stack never compresses, and inflating is unbounded (a 1.8 KB bzip2 bomb
        # made 1 GiB): refused without decoding a byte.
        raise Refused(f"compressed: compression {str(headers['compression'])[:50]!r}")
    encoding = properties.get("body_encoding")
    # What kombu decodes: base64, and plain text (none, or utf-8 in any case); any other
    # raises inside it.
    if not (encoding in (None, "base64") or str(encoding).lower() == "utf-8"):
        raise Refused(f"unknown body encoding: {str(encoding)[:50]!r}")
    size = len(body) * 3 // 4 if encoding == "base64" else len(body)
    if size > body_limit(max_payload_bytes):
        raise Refused(
            f"too large: a body of about {size:,} bytes, over {body_limit(max_payload_bytes):,} "
            f"(MAX_PAYLOAD_BYTES={max_payload_bytes:,} in base64, and 64 KiB)"
        )
    _check_types("bad properties", properties, _PROPERTY_TYPES, ("delivery_tag", "delivery_info"))
    _check_types(
        "bad properties", properties["delivery_info"], _DELIVERY_INFO_TYPES, (), "delivery_info"
    )
    for field in ("content-type", "content-encoding"):
        if not isinstance(value.get(field), str | None):
            raise Refused(f"bad properties: {field} is not a string")
    return value


def check_task(value: object, max_payload_bytes: int, tasks: Container[str] | None = None) -> Task:
    """A task message Celery can take: the envelope, its content type, headers and body,
    and (unless ``tasks`` is None) a task name in ``tasks``; else :class:`Refused`."""
    envelope = check_envelope(value, max_payload_bytes)
    content = (envelope.get("content-type"), envelope.get("content-encoding"))
    if content != ("application/json", "utf-8"):
        # Pickle above all: the stack never loads pickle outside its signed batches.
        raise Refused(f"not JSON content: content type {content[0]!r}, encoding {content[1]!r}")
    headers = envelope.get("headers")
    if not isinstance(headers, dict) or "task" not in headers:
        raise Refused("bad headers: no task name (not a Celery protocol 2 message)")
    _check_types("bad headers", headers, _HEADER_TYPES, ("id", "task"))
    for field in ("eta", "expires"):
        try:
            maybe_iso8601(headers.get(field))
        except (ValueError, OverflowError):
            raise Refused(
                f"bad headers: {field} {headers[field][:50]!r} is no ISO 8601 time"
            ) from None
    text, args, kwargs = _check_body(envelope)
    if tasks is not None and headers["task"] not in tasks:
        raise Refused(f"unknown task: {headers['task'][:200]!r}")
    return Task(headers["id"], headers["task"], args, kwargs, headers, text)


def _check_body(envelope: dict[str, Any]) -> tuple[str, list[Any], dict[str, Any]]:
    body: str = envelope["body"]
    try:
        if envelope["properties"].get("body_encoding") == "base64":
            # strict: nothing but the alphabet and its padding (b64decode's validate=True is
            # a regular expression, 4x slower on a large body)
            text = binascii.a2b_base64(body, strict_mode=True).decode()
        else:
            text = body
        decoded = json.loads(text)
    except (binascii.Error, UnicodeDecodeError):
        raise Refused("bad body: not base64 of UTF-8 text") from None
    except ValueError as exc:
        raise Refused(f"bad body: not JSON ({exc})") from None
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise Refused(
            f"bad body: a JSON {_json_type(decoded)}{_length(decoded)}, not Celery's "
            "[args, kwargs, embed]"
        )
    args, kwargs, embed = decoded
    if not (isinstance(args, list) and isinstance(kwargs, dict) and isinstance(embed, dict)):
        shape = ", ".join(_json_type(part) for part in decoded)
        raise Refused(f"bad body: [{shape}], not [args (array), kwargs (object), embed (object)]")
    _check_types("bad body", embed, _EMBED_TYPES, (), "embed")
    return text, args, kwargs


def _check_types(
    reason: str,
    values: dict[str, Any],
    types: dict[str, Any],
    required: tuple[str, ...] = (),
    part: str = "",
) -> None:
    """Each field of ``types`` that ``values`` has is of its type; ``required`` ones it has."""
    for field in required:
        if field not in values:
            raise Refused(f"{reason}: no {part + '.' if part else ''}{field}")
    for field, value in values.items():
        expected = types.get(field)
        if expected is not None and not _is(value, expected):
            where = f"{part}.{field}" if part else field
            raise Refused(f"{reason}: {where} is {_shown(value)}, not {_name(expected)}")


def _is(value: object, expected: Any) -> bool:
    # Exact types: JSON makes no subclasses, and a JSON true is no count.
    if expected is _COUNT:
        return type(value) is int and value >= 0
    if expected is _TIMELIMIT:  # [hard, soft] seconds, each a number or null
        return (
            isinstance(value, list)
            and len(value) == 2
            and all(v is None or (type(v) in _NUMBER and v >= 0) for v in value)
        )
    return type(value) in expected


def _name(expected: Any) -> str:
    if expected is _COUNT:
        return "a count (an integer, 0 or more)"
    if expected is _TIMELIMIT:
        return "[seconds or null, seconds or null]"
    names = {str: "a string", int: "an integer", list: "an array", dict: "an object"}
    names |= {bool: "true or false", type(None): "null"}
    return " or ".join(names[t] for t in expected)


def _shown(value: object) -> str:
    return f"a JSON {_json_type(value)} ({json.dumps(value)[:50]})"


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _length(value: object) -> str:
    return f" of {len(value)}" if isinstance(value, list) else ""


_NONE = type(None)
_STRING = (str,)
_COUNT = "count"
_TIMELIMIT = "timelimit"
_NUMBER = (int, float)
_HEADER_TYPES: Final[dict[str, Any]] = {
    "id": _STRING,
    "task": _STRING,
    "lang": (str, _NONE),
    "shadow": (str, _NONE),
    "eta": (str, _NONE),
    "expires": (str, _NONE),
    "group": (str, _NONE),
    "group_index": (int, _NONE),
    "retries": _COUNT,
    "timelimit": _TIMELIMIT,
    "root_id": (str, _NONE),
    "parent_id": (str, _NONE),
    "argsrepr": (str, _NONE),
    "kwargsrepr": (str, _NONE),
    "origin": (str, _NONE),
    "ignore_result": (bool, _NONE),
    "replaced_task_nesting": _COUNT,
    "stamped_headers": (list, _NONE),
    "stamps": (dict, _NONE),
    "redelivered": (bool, _NONE),
}
"""What Celery's worker reads from a protocol 2 message's headers, and the types it assumes
(celery/app/amqp.py writes them, celery/worker/request.py reads them)."""
_PROPERTY_TYPES: Final[dict[str, Any]] = {
    "delivery_tag": _STRING,
    "delivery_info": (dict,),
    "priority": (int, _NONE),
    "correlation_id": (str, _NONE),
    "reply_to": (str, _NONE),
    "delivery_mode": (int, _NONE),
}
_DELIVERY_INFO_TYPES: Final[dict[str, Any]] = {
    "exchange": (str, _NONE),
    "routing_key": (str, _NONE),
    "redelivered": (bool, _NONE),
}
_EMBED_TYPES: Final[dict[str, Any]] = {
    "callbacks": (list, _NONE),
    "errbacks": (list, _NONE),
    "chain": (list, _NONE),
    "chord": (dict, _NONE),
}
