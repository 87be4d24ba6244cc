"""Malformed queue entries are dropped, never fatal.

Anyone who can write to Redis can push arbitrary bytes onto a queue list.
kombu's Redis transport decodes each entry as a JSON envelope and, when that
fails, the exception escapes the consumer loop and the whole worker exits.
:func:`tolerate_malformed_messages` makes such an entry decode to an envelope
of a content type no worker accepts, so Celery's own path for undecodable
messages logs it (naming the problem) and acknowledges it, and the worker
goes on with the rest of the queue.

This wraps ``kombu.transport.redis.loads``, a module attribute of the kombu
version pinned in the lock file; ``tests/unit/test_malformed.py`` checks it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, Final

import kombu.transport.redis as redis_transport

logger = logging.getLogger(__name__)

MALFORMED_CONTENT_TYPE: Final = "application/x-taskstack-malformed"


def _placeholder(reason: str, raw: object) -> dict[str, Any]:
    logger.error("dropping a malformed message from the queue (%s): %.200r", reason, raw)
    return {
        "body": "",
        "content-encoding": "utf-8",
        "content-type": MALFORMED_CONTENT_TYPE,
        "headers": {"taskstack_malformed": reason},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": uuid.uuid4().hex,
            "delivery_info": {"exchange": "", "routing_key": ""},
            "priority": 0,
        },
    }


def _tolerant(loads: Callable[[str], Any]) -> Callable[[str], Any]:
    def tolerant_loads(raw: str) -> Any:
        try:
            value = loads(raw)
        except (ValueError, TypeError) as exc:
            return _placeholder(f"not JSON: {exc}", raw)
        if isinstance(value, list):  # the transport's own restore records
            return value
        if (
            not isinstance(value, dict)
            or "body" not in value
            or not isinstance(value.get("properties"), dict)
            or "delivery_tag" not in value["properties"]
        ):
            return _placeholder("not a message envelope", raw)
        value["properties"].setdefault("delivery_info", {"exchange": "", "routing_key": ""})
        return value

    tolerant_loads.__wrapped__ = loads  # type: ignore[attr-defined]
    return tolerant_loads


def tolerate_malformed_messages() -> None:
    """Install the tolerant decoder in kombu's Redis transport (idempotent)."""
    if not hasattr(redis_transport.loads, "__wrapped__"):
        redis_transport.loads = _tolerant(redis_transport.loads)
