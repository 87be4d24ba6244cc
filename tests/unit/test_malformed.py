"""The tolerant decoder in kombu's Redis transport (the kombu version in the lock)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import kombu.transport.redis as redis_transport
import pytest

from taskstack.worker.malformed import MALFORMED_CONTENT_TYPE, tolerate_malformed_messages


@pytest.fixture
def tolerant() -> Iterator[None]:
    original = redis_transport.loads
    tolerate_malformed_messages()
    yield
    redis_transport.loads = original


def test_the_transport_still_decodes_queue_entries_through_its_module_loads() -> None:
    # What the wrapper relies on: kombu looks the decoder up on the module at call time.
    assert callable(redis_transport.loads)
    assert {"unacked_restore_interval", "unacked_restore_throttle"} <= set(
        redis_transport.Channel.from_transport_options
    )


@pytest.mark.parametrize("raw", ["not json", "[1, 2", '"a string"', '{"body": ""}', "{}"])
def test_a_malformed_entry_becomes_an_envelope_no_worker_accepts(tolerant: None, raw: str) -> None:
    envelope = redis_transport.loads(raw)
    assert envelope["content-type"] == MALFORMED_CONTENT_TYPE
    assert envelope["properties"]["delivery_tag"]


def test_well_formed_entries_and_restore_records_pass_unchanged(tolerant: None) -> None:
    message = {"body": "e30=", "properties": {"delivery_tag": "t1"}, "headers": {}}
    decoded = redis_transport.loads(json.dumps(message))
    assert decoded["properties"]["delivery_tag"] == "t1"
    assert decoded.get("content-type") != MALFORMED_CONTENT_TYPE
    assert redis_transport.loads("[1, 2, 3]") == [1, 2, 3]


def test_installing_twice_wraps_once(tolerant: None) -> None:
    wrapped = redis_transport.loads
    tolerate_malformed_messages()
    assert redis_transport.loads is wrapped
