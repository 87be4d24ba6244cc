"""HMAC-signed pickles bound to their place: the only way pickled bytes enter or leave the stack.

Functions the workers cannot import, and arguments or results JSON cannot
carry, travel as cloudpickle payloads. A payload is ``tag || header || body``
where ``tag`` is HMAC-SHA256 of everything after it under the stack's shared
secret; the receiver checks the tag in constant time *before* unpickling, so
bytes from anyone without the secret are never deserialized.

The header binds a payload to where it belongs, so that whoever can write to
Redis, but has not the secret, cannot reuse a genuine one elsewhere:

- a batch is bound to its batch id (its Celery task id), its reply list and a
  deadline: a copy pushed under another id (*replay*), with another reply list
  (*mismatch*) or after its deadline (*expired*) is refused;
- a reply is bound to its kind, its batch id and the calls it answers: one
  pushed as a reply of another batch (*splice*) is refused.

A redelivery of the same message (lease lost, soft shutdown, requeue) keeps
its id and reply list, so it passes until the deadline. The layouts (version
2; version 1 had no header and bound nothing), integers big-endian::

    batch: tag || "TSB2" || batch id (32 ASCII) || expires (u64, ms since the epoch)
               || reply list length (u16) || reply list (UTF-8) || pickle or frame
    reply: tag || "TSR2" || kind (1) || batch id (32 ASCII) || first (i64) || calls (u32)
               || pickle of (first, outcomes, *rest)

A batch's body is its pickle or its shared-data frame (:mod:`taskstack.sharing`).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Final, NamedTuple

import cloudpickle

from taskstack import names
from taskstack.errors import SignatureError, UnboundPayload

TAG_SIZE = hashlib.sha256().digest_size
_PROTOCOL = 5
BATCH_MAGIC: Final = b"TSB2"
REPLY_MAGIC: Final = b"TSR2"
_BATCH = struct.Struct(">4s32sQH")
_REPLY = struct.Struct(">4sc32sqI")


class BatchSeal(NamedTuple):
    """What a batch's signature binds besides its body."""

    batch_id: str
    reply_to: str
    expires: float
    """Seconds since the epoch (``time.time()``) after which workers refuse the batch."""

    def header(self) -> bytes:
        reply_to = self.reply_to.encode()
        expires = round(self.expires * 1000)
        return _BATCH.pack(BATCH_MAGIC, _id(self.batch_id), expires, len(reply_to)) + reply_to

    @staticmethod
    def parse(signed: memoryview) -> tuple[BatchSeal, memoryview]:
        """The seal of a verified batch, and its body."""
        _expect(signed, BATCH_MAGIC, _BATCH.size)
        _, batch_id, expires, length = _BATCH.unpack_from(signed)
        end = _BATCH.size + length
        reply_to = bytes(signed[_BATCH.size : end]).decode()
        return BatchSeal(batch_id.decode(), reply_to, expires / 1000), signed[end:]

    def check(self, batch_id: str, reply_to: str, now: float) -> None:
        """Refuse a batch delivered as another, to another reply list, or too late."""
        if batch_id != self.batch_id:
            raise SignatureError(
                f"replay: signed for batch {self.batch_id}, delivered as batch {batch_id}"
            )
        if reply_to != self.reply_to:
            raise SignatureError(
                f"mismatch: signed to reply to {self.reply_to}, delivered with reply_to {reply_to}"
            )
        if now > self.expires:
            raise SignatureError(
                f"expired: its deadline passed {now - self.expires:.0f} s ago (its client's "
                "BATCH_EXPIRES bounds how long a batch may wait for a worker)"
            )


class ReplySeal(NamedTuple):
    """What a reply's signature binds besides its outcomes: the calls ``first`` to
    ``first + calls - 1`` of one batch (``first`` is :data:`~taskstack.names.WHOLE_BATCH`
    when one outcome stands for every call)."""

    kind: bytes
    batch_id: str
    first: int
    calls: int

    def header(self) -> bytes:
        return _REPLY.pack(REPLY_MAGIC, self.kind, _id(self.batch_id), self.first, self.calls)

    @staticmethod
    def parse(signed: memoryview) -> tuple[ReplySeal, memoryview]:
        """The seal of a verified reply, and its pickle."""
        _expect(signed, REPLY_MAGIC, _REPLY.size)
        _, kind, batch_id, first, calls = _REPLY.unpack_from(signed)
        return ReplySeal(kind, batch_id.decode(), first, calls), signed[_REPLY.size :]


class Signer:
    """Signs and verifies payloads with one shared secret; :meth:`bind` ties them to a place."""

    def __init__(self, secret: str | bytes, seal: BatchSeal | ReplySeal | None = None) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        self._key = secret.encode() if isinstance(secret, str) else secret
        self._header = seal.header() if seal is not None else b""

    def bind(self, seal: BatchSeal | ReplySeal) -> Signer:
        """This signer for one batch or reply: what it signs carries ``seal``."""
        return Signer(self._key, seal)

    def _tag(self, *parts: bytes | memoryview) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()

    def sign(self, payload: bytes) -> bytes:
        """``payload`` with the tag and the header in front."""
        return self._tag(self._header, payload) + self._header + payload

    def verify(self, blob: bytes | memoryview) -> memoryview:
        """What follows the tag (and this signer's header, which ``blob`` must carry);
        :class:`SignatureError` if the tag does not match."""
        if len(blob) <= TAG_SIZE:
            raise SignatureError(f"payload of {len(blob)} bytes is too short to carry a signature")
        view = memoryview(blob)
        tag, signed = view[:TAG_SIZE], view[TAG_SIZE:]
        if not hmac.compare_digest(tag, self._tag(signed)):
            raise SignatureError(
                "payload signature does not match: it was not signed with this stack's "
                "TASKSTACK_SECRET, or was altered on the way; it was not unpickled"
            )
        if signed[: len(self._header)] != self._header:
            raise SignatureError("mismatch: the payload was signed for another batch or reply")
        return signed[len(self._header) :]

    def dumps(self, obj: Any) -> bytes:
        """Pickle ``obj`` (by value where it cannot be imported) and sign it."""
        return self.sign(cloudpickle.dumps(obj, protocol=_PROTOCOL))

    def loads(self, blob: bytes | memoryview) -> Any:
        """Verify ``blob``'s signature, then unpickle it; :class:`SignatureError` otherwise."""
        return cloudpickle.loads(self.verify(blob))

    def open_batch(
        self, blob: bytes | memoryview, *, batch_id: str, reply_to: str, now: float
    ) -> memoryview:
        """The body of a batch delivered as ``batch_id`` with ``reply_to`` at ``now``;
        :class:`SignatureError` naming what is wrong (replay, mismatch, expired). Nothing
        of it is unpickled."""
        seal, body = BatchSeal.parse(self.verify(blob))
        seal.check(batch_id, reply_to, now)
        return body

    def loads_reply(self, blob: bytes | memoryview, *, kind: bytes, batch_id: str) -> Any:
        """``(first, outcomes, *rest)`` of a reply that arrived as ``kind`` of ``batch_id``;
        :class:`SignatureError`, before unpickling, if it was signed as another."""
        seal, pickled = ReplySeal.parse(self.verify(blob))
        if (seal.kind, seal.batch_id) != (kind, batch_id):
            raise SignatureError(
                f"splice: signed as a reply {seal.kind.decode(errors='replace')} of batch "
                f"{seal.batch_id}, pushed as a reply {kind.decode(errors='replace')} of "
                f"batch {batch_id}"
            )
        first, outcomes, *rest = cloudpickle.loads(pickled)
        if (first, len(outcomes)) != (seal.first, seal.calls):
            raise SignatureError(
                f"mismatch: signed for calls {seal.first} (+{seal.calls}), carries calls "
                f"{first} (+{len(outcomes)})"
            )
        return (first, outcomes, *rest)


def _id(batch_id: str) -> bytes:
    raw = batch_id.encode()
    if len(raw) != names.ID_SIZE:  # a shorter or longer one would not round-trip
        raise ValueError(f"batch ids are {names.ID_SIZE} characters, got {batch_id!r}")
    return raw


def _expect(signed: memoryview, magic: bytes, size: int) -> None:
    """Refuse what was signed as something else: the other kind, or by a release whose
    payloads were bound to nothing (a pickle or frame right after the tag)."""
    found = bytes(signed[: len(magic)])
    if found == magic and len(signed) >= size:
        return
    what, other = ("batch", "reply") if magic == BATCH_MAGIC else ("reply", "batch")
    if found in (BATCH_MAGIC, REPLY_MAGIC):
        raise SignatureError(f"mismatch: signed as a {other}, not as a {what}")
    upgrade = "client to the workers'" if what == "batch" else "workers to the client's"
    raise UnboundPayload(
        f"mismatch: this {what} was signed by an older release, which binds it to nothing "
        f"(this one expects {magic.decode()}): upgrade the {upgrade} release"
    )
