"""Where the intake hooks into kombu's Redis transport (the kombu version in the lock)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator

import kombu.transport.redis as redis_transport
import pytest
from kombu.transport import virtual

from taskstack.worker import intake


def test_queue_entries_are_decoded_right_into_deliver() -> None:
    # What the wrapper relies on: kombu looks ``loads`` up on its module at call time, and
    # hands a queue entry to ``_deliver`` straight from it, with the entry's queue.
    assert callable(redis_transport.loads)
    for method in (redis_transport.Channel._brpop_read, redis_transport.Channel._get):
        assert "loads(bytes_to_str(item))" in inspect.getsource(method)
    brpop = inspect.getsource(redis_transport.Channel._brpop_read)
    assert re.search(r"self\.connection\._deliver\(loads\(bytes_to_str\(item\)\), dest\)", brpop)
    assert "_get_and_deliver" in inspect.getsource(virtual.Channel)
    fanout = inspect.getsource(redis_transport.Channel._deliver_fanout_message)
    assert "self.connection._deliver(message" in fanout


def test_restore_records_are_unpacked_never_delivered() -> None:
    # A JSON list from ``loads`` is a restore record there, so the intake refuses lists in
    # ``_deliver`` only.
    for method in (redis_transport.QoS.restore_by_tag, redis_transport.Channel._restore):
        source = inspect.getsource(method)
        assert re.search(r"M, EX, RK = loads\(bytes_to_str\(\w+\)\)", source)
        assert "_deliver" not in source


def test_kombu_takes_a_key_error_for_a_lost_connection() -> None:
    # Why a message without ``id`` made the worker reconnect again and again: it must not
    # reach Celery.
    assert KeyError in redis_transport.Transport.connection_errors


@pytest.fixture
def restored() -> Iterator[None]:
    loads, deliver = redis_transport.loads, redis_transport.Transport._deliver
    yield
    redis_transport.loads, redis_transport.Transport._deliver = loads, deliver


def test_loads_never_raises_and_keeps_restore_records(restored: None) -> None:
    redis_transport.loads = intake._checked_loads(redis_transport.loads)
    unparsed = redis_transport.loads("\x00 not json")
    assert isinstance(unparsed, intake.Unparsed)
    assert unparsed.reason.startswith("not JSON")
    record = redis_transport.loads('[{"body": ""}, "", "cpu"]')
    assert record == [{"body": ""}, "", "cpu"]
    assert intake._raw_text(record) == '[{"body": ""}, "", "cpu"]'
