"""Queue entries as an attacker holding the Redis password would push them, built once for
every tier: a well-formed Celery message to start from, and the bad entries reliability.md lists.

Each :class:`BadEntry` is what is pushed (``LPUSH`` onto a queue, as a client does) and the
first words of the reason the worker's intake gives when it moves it to the dead letters;
:func:`letters` reads them back.
"""

from __future__ import annotations

import base64
import bz2
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from taskstack import names
from taskstack.worker import deadletters
from taskstack.worker.deadletters import DeadLetter

BOMB_BYTES = 256 * 1024 * 1024
"""What the bzip2 bomb inflates to: far over the 100 MB a worker may grow by."""


def body(decoded: Any) -> str:
    """A message body: ``decoded`` as JSON, in base64."""
    return base64.b64encode(json.dumps(decoded).encode()).decode()


def envelope(
    task: str = names.COUNT_PRIMES, args: Any = (0, 100), queue: str = names.CPU_QUEUE
) -> dict[str, Any]:
    """A well-formed Celery protocol 2 message of JSON content, as a client sends it."""
    task_id = str(uuid.uuid4())
    return {
        "body": body([list(args), {}, {"callbacks": None, "errbacks": None, "chain": None}]),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "eta": None,
            "expires": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(tuple(args)),
            "kwargsrepr": "{}",
            "origin": "attacker@test",
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def altered(change: Callable[[dict[str, Any]], object]) -> str:
    """A well-formed message as JSON text, after ``change`` altered it in place."""
    message = envelope()
    change(message)
    return json.dumps(message)


def _at(message: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The object holding the field ``path`` names (``properties.delivery_info``), and its key."""
    *parents, last = path.split(".")
    for part in parents:
        message = message[part]
    return message, last


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(message: dict[str, Any]) -> None:
        holder, key = _at(message, path)
        holder[key] = value

    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(message: dict[str, Any]) -> None:
        holder, key = _at(message, path)
        del holder[key]

    return change


def bzip2_bomb(size: int = BOMB_BYTES) -> bytes:
    """``size`` zero bytes bzip2-compressed, a megabyte at a time: a few hundred bytes."""
    compressor, zeros = bz2.BZ2Compressor(9), bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join(parts) + compressor.flush()


def bomb_entry() -> str:
    """A message whose body is a bzip2 bomb under a ``compression`` header, as kombu's
    own compression sends it."""
    message = envelope()
    message["headers"]["compression"] = "application/x-bz2"
    message["body"] = base64.b64encode(bzip2_bomb()).decode()
    return json.dumps(message)


def oversized_entry(max_payload_bytes: int) -> str:
    """A well-formed message whose JSON body holds a string larger than any batch may be."""
    message = envelope()
    message["body"] = body([[0, "x" * (2 * max_payload_bytes)], {}, {}])
    return json.dumps(message)


@dataclass(frozen=True)
class BadEntry:
    name: str
    build: Callable[[], str | bytes]
    reason: str
    """How the reason the intake records starts."""


BAD_ENTRIES = (
    BadEntry("not JSON", lambda: b"\x00 this is not a message", "not JSON"),
    BadEntry("a JSON list", lambda: "[1, 2, 3]", "not a message envelope: a JSON array"),
    BadEntry("not an envelope", lambda: json.dumps({"not": "an envelope"}), "not a message"),
    BadEntry("body not base64", lambda: altered(_set("body", "not base64!")), "bad body"),
    BadEntry(
        "unknown body_encoding",
        lambda: altered(_set("properties.body_encoding", "rot13")),
        "unknown body encoding",
    ),
    BadEntry(
        "delivery_info not a dict",
        lambda: altered(_set("properties.delivery_info", "cpu")),
        "bad properties: delivery_info",
    ),
    BadEntry("headers a list", lambda: altered(_set("headers", ["task"])), "bad headers"),
    BadEntry("body an object", lambda: altered(_set("body", body({"foo": 1}))), "bad body"),
    BadEntry("body a string", lambda: altered(_set("body", body("args"))), "bad body"),
    BadEntry("body null", lambda: altered(_set("body", body(None))), "bad body"),
    BadEntry("body a 2-list", lambda: altered(_set("body", body([[0, 1], {}]))), "bad body"),
    BadEntry(
        "timelimit 'x'", lambda: altered(_set("headers.timelimit", "x")), "bad headers: timelimit"
    ),
    BadEntry("headers without id", lambda: altered(_drop("headers.id")), "bad headers: no id"),
    BadEntry(
        "pickle",
        lambda: altered(_set("content-type", "application/x-python-serialize")),
        "not JSON content",
    ),
    BadEntry("unknown task", lambda: json.dumps(envelope("no.such.task")), "unknown task"),
)
"""The entries that once stopped or looped a worker, with the reason each must be refused."""


def letters(client: redis.Redis) -> list[DeadLetter]:
    """The dead-letter list's records, oldest first."""
    return [DeadLetter.loads(record) for record in deadletters.records(client)]
