"""Batch messages published without ``send_task``: Celery's protocol 2, built once.

``send_task`` cost a client ~1.4 ms of CPU per batch, most of it kombu making a
new redis-py client (and its table of response callbacks) for every publish
(docs/benchmarks/scaling.md). A batch message differs from the previous one
only in its id, its arguments and what Flower shows of them, so the message is
made once per executor from Celery's own ``as_task_v2``, and each batch fills
in those fields. What goes to Redis is what kombu's Redis transport (the
version in the lock file) sends for ``send_task``: an ``LPUSH`` of the JSON
envelope (body in base64) onto the queue's key for priority 0, and, if the
app sends task-sent events (an executor's own app does not), a ``PUBLISH`` of
the event on kombu's fanout topic for ``celeryev``. Several batches ready at
once go in one round trip, on a connection of the publisher's own, past
redis-py's client layer.

Workers, Flower and ``revoke`` cannot tell the difference (a test compares the
envelope with ``send_task``'s key for key): the intake guard, Celery's
protocol-2 parser and the signed payload see the same message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import redis
from celery import Celery
from celery.utils.time import utcoffset

from taskstack import names
from taskstack.connections import WAIT_COMMAND, check_acks, drop, replicated

EMBED: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
"""Protocol 2's third body element: a batch has no callbacks, chain or chord."""


class Message(NamedTuple):
    """One batch's message, as it will be filled in."""

    id: str
    kwargs: dict[str, Any]
    kwargsrepr: str
    """What Flower shows of the arguments (never the signed pickle)."""


class Publisher:
    """Publishes one executor's batches onto ``queue`` (``names.RUN_BATCH`` messages)."""

    def __init__(self, app: Celery, client: redis.Redis, queue: str) -> None:
        self.client = client
        self.connection: Any = None
        # Behind Sentinels a batch counts as published once a replica has it: a
        # failover could lose it otherwise, and nothing would ever send it again.
        self.wait: list[tuple[bytes, ...]] = []
        if replicated(client):
            self.wait = [tuple(str(part).encode() for part in WAIT_COMMAND)]
        # The fields Celery would set (origin, time limits, protocol version...), once.
        headers, properties, _, sent = app.amqp.as_task_v2(
            slot("id"),
            names.RUN_BATCH,
            kwargs={},
            reply_to=app.thread_oid,
            create_sent_event=bool(app.conf.task_send_sent_event),
            ignore_result=True,
            argsrepr="()",
            kwargsrepr=slot("kwargsrepr"),
        )
        # send_task hands argsrepr/kwargsrepr to kombu, which keeps them among the
        # properties; kombu adds the rest as it publishes.
        properties.update(
            argsrepr="()",
            kwargsrepr=slot("kwargsrepr"),
            delivery_mode=2,
            delivery_info={"exchange": "", "routing_key": queue},
            priority=0,
            body_encoding="base64",
            delivery_tag=slot("tag"),
        )
        self.message = _envelope(slot("body"), headers, properties)
        self.event: Template | None = None
        self.clock = app.clock
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            # kombu's names: the list for priority 0, the event exchange's fanout topics.
            self.queue_key = channel._q_for_pri(queue, 0).encode()
            exchange = app.conf.event_exchange
            topics = channel._get_publish_topics(exchange, "task.sent")
            self.topics: list[bytes] = [topic.encode() for topic in topics]
        if sent is None:
            return
        # Celery's task-sent event (its dispatcher adds who and when), for Flower.
        self.event = Template(
            {
                "hostname": headers["origin"],
                "utcoffset": slot("utcoffset"),
                "pid": os.getpid(),
                "clock": slot("clock"),
                **sent,
                "queue": queue,
                "exchange": "",
                "routing_key": queue,
                "timestamp": slot("timestamp"),
                "type": "task-sent",
            }
        )
        self.sent_envelope = _envelope(
            slot("body"),
            {"hostname": headers["origin"]},
            {
                "delivery_mode": 1,
                "delivery_info": {"exchange": exchange, "routing_key": "task.sent"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": slot("tag"),
            },
        )

    def commands(self, message: Message) -> list[tuple[bytes, ...]]:
        """The Redis commands that publish ``message``."""
        body = json.dumps([[], message.kwargs, EMBED]).encode()
        quoted = f'"{message.id}"'
        kwargsrepr = json.dumps(message.kwargsrepr)
        envelope = self.message.fill(
            body=f'"{base64.b64encode(body).decode()}"',
            id=quoted,
            kwargsrepr=kwargsrepr,
            # Unique per message, as kombu's: a batch id is a uuid4 already.
            tag=f'"{_uuid_text(message.id)}"',
        )
        out: list[tuple[bytes, ...]] = [(b"LPUSH", self.queue_key, envelope.encode())]
        if self.event is not None:
            event = self.event.fill(
                utcoffset=json.dumps(utcoffset()),
                clock=json.dumps(self.clock.forward()),
                id=quoted,
                kwargsrepr=kwargsrepr,
                timestamp=json.dumps(time.time()),
            )
            sent = self.sent_envelope.fill(
                body=f'"{base64.b64encode(event.encode()).decode()}"',
                tag=f'"{uuid.uuid4()}"',
            )
            out.extend((b"PUBLISH", topic, sent.encode()) for topic in self.topics)
        return out

    def publish(self, messages: Sequence[Message]) -> None:
        """Publish ``messages`` in one round trip; raises ``redis.RedisError`` (then
        none, some or all of them may have been published)."""
        commands = [command for message in messages for command in self.commands(message)]
        commands += self.wait
        if self.connection is None:
            self.connection = self.client.connection_pool.get_connection()
        connection = self.connection
        try:
            connection.send_packed_command([b"".join(map(_resp, commands))])
            for _ in commands:
                answer = connection.read_response()  # raises an error reply
            if self.wait:
                check_acks(answer)
        except BaseException:
            drop(self.client, connection)  # the next publish connects afresh
            self.connection = None
            raise

    def close(self) -> None:
        if self.connection is not None:
            self.client.connection_pool.release(self.connection)
            self.connection = None


def _resp(command: tuple[bytes, ...]) -> bytes:
    """``command`` in Redis's protocol (redis-py's packer costs more than the rest here)."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


def _uuid_text(hex_id: str) -> str:
    """A 32-digit hex id in UUID form, as kombu's delivery tags are."""
    h = hex_id
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _envelope(body: Any, headers: dict[str, Any], properties: dict[str, Any]) -> Template:
    """kombu's envelope of a message, as its Redis transport stores it."""
    return Template(
        {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
    )


def slot(name: str) -> str:
    """A value to fill in later in a :class:`Template`."""
    return f"@@{name}@@"


class Template:
    """JSON made once with :func:`slot` values, filled in per message: the text is what
    ``json.dumps`` makes of the whole, for a few string joins."""

    _SLOT = re.compile(r'"@@(\w+)@@"')

    def __init__(self, obj: Any) -> None:
        parts = self._SLOT.split(json.dumps(obj))
        self.text = parts[0::2]
        self.slots = parts[1::2]

    def fill(self, **values: str) -> str:
        """The JSON with each slot replaced by its value (JSON text: ``'"abc"'``, ``'1'``)."""
        out = [self.text[0]]
        for name, text in zip(self.slots, self.text[1:], strict=True):
            out.append(values[name])
            out.append(text)
        return "".join(out)
