"""HMAC-signed pickles: the only way pickled bytes enter or leave the stack.

Functions the workers cannot import, and arguments or results JSON cannot
carry, travel as cloudpickle payloads. A payload is ``tag || pickle`` where
``tag`` is HMAC-SHA256 of the pickle under the stack's shared secret; the
receiver checks the tag in constant time *before* unpickling, so bytes from
anyone without the secret are never deserialized.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import cloudpickle

from taskstack.errors import SignatureError

TAG_SIZE = hashlib.sha256().digest_size
_PROTOCOL = 5


class Signer:
    """Signs and verifies pickled payloads with one shared secret."""

    def __init__(self, secret: str | bytes) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        self._key = secret.encode() if isinstance(secret, str) else secret

    def _tag(self, payload: bytes | memoryview) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def sign(self, payload: bytes) -> bytes:
        """``payload`` with its tag in front."""
        return self._tag(payload) + payload

    def verify(self, blob: bytes | memoryview) -> memoryview:
        """The payload of a signed ``blob``; :class:`SignatureError` if the tag does not match."""
        if len(blob) <= TAG_SIZE:
            raise SignatureError(f"payload of {len(blob)} bytes is too short to carry a signature")
        view = memoryview(blob)
        tag, payload = view[:TAG_SIZE], view[TAG_SIZE:]
        if not hmac.compare_digest(tag, self._tag(payload)):
            raise SignatureError(
                "payload signature does not match: it was not signed with this stack's "
                "TASKSTACK_SECRET, or was altered on the way; it was not unpickled"
            )
        return payload

    def dumps(self, obj: Any) -> bytes:
        """Pickle ``obj`` (by value where it cannot be imported) and sign it."""
        return self.sign(cloudpickle.dumps(obj, protocol=_PROTOCOL))

    def loads(self, blob: bytes) -> Any:
        """Verify ``blob``'s signature, then unpickle it; :class:`SignatureError` otherwise."""
        return cloudpickle.loads(self.verify(blob))
