"""HMAC-signed pickles (taskstack/signing.py): nothing unsigned is ever unpickled, and\nnothing signed for one batch or reply is accepted as another."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from taskstack import names
from taskstack.errors import SignatureError, UnboundPayload
from taskstack.signing import TAG_SIZE, BatchSeal, ReplySeal, Signer
from tests.support import Tripwire


def test_round_trip_by_value_and_by_reference() -> None:
    signer = Signer("s3cret")
    offset = 3
    fn, value = signer.loads(signer.dumps((lambda x: x + offset, Path("/tmp"))))
    assert fn(1) == 4 and value == Path("/tmp")


@pytest.mark.parametrize(
    "forge",
    [
        lambda blob: Signer("other").dumps(object()),
        lambda blob: blob[TAG_SIZE:],
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),
        lambda blob: bytes([blob[0] ^ 1]) + blob[1:],
        lambda blob: b"",
    ],
    ids=["other secret", "tag stripped", "payload flipped", "tag flipped", "empty"],
)
def test_forged_payloads_are_never_unpickled(
    tripwire: Tripwire, forge: Callable[[bytes], bytes]
) -> None:
    signer = Signer("s3cret")
    blob = signer.dumps(tripwire)
    with pytest.raises(SignatureError):
        signer.loads(forge(blob))
    assert not tripwire.fired
    signer.loads(blob)
    assert tripwire.fired  # the tripwire does fire when the signature is good


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Signer("")


# -- bound to their place: batches and replies ------------------------------------------

SECRET = "s3cret"
BATCH_A, BATCH_B = "a" * names.ID_SIZE, "b" * names.ID_SIZE
REPLY_TO = names.REPLY_KEY_PREFIX + "c" * names.ID_SIZE
NOW = 1_700_000_000.0


def sealed_batch(obj: object, batch_id: str = BATCH_A, expires: float = NOW + 60) -> bytes:
    return Signer(SECRET).bind(BatchSeal(batch_id, REPLY_TO, expires)).dumps(obj)


def test_the_batch_layout_is_version_2_and_binds_id_reply_list_and_deadline() -> None:
    blob = sealed_batch([1, 2])
    header = struct.pack(
        ">4s32sQH", b"TSB2", BATCH_A.encode(), int((NOW + 60) * 1000), len(REPLY_TO)
    )
    assert blob[TAG_SIZE:].startswith(header + REPLY_TO.encode())
    body = Signer(SECRET).open_batch(blob, batch_id=BATCH_A, reply_to=REPLY_TO, now=NOW)
    assert cloudpickle.loads(body) == [1, 2]
    # Redelivered (same id, same reply list) at any time before its deadline: accepted.
    Signer(SECRET).open_batch(blob, batch_id=BATCH_A, reply_to=REPLY_TO, now=NOW + 59.9)


@pytest.mark.parametrize(
    ("delivered", "refusal"),
    [
        (
            {"batch_id": BATCH_B},
            f"replay: signed for batch {BATCH_A}, delivered as batch {BATCH_B}",
        ),
        ({"reply_to": REPLY_TO + "x"}, f"mismatch: signed to reply to {REPLY_TO}, delivered"),
        ({"now": NOW + 61}, "expired: its deadline passed 1 s ago"),
    ],
    ids=["replay", "other reply list", "expired"],
)
def test_a_batch_delivered_elsewhere_or_late_is_refused_before_unpickling(
    tripwire: Tripwire, delivered: dict[str, Any], refusal: str
) -> None:
    blob = sealed_batch([tripwire])
    where: dict[str, Any] = {"batch_id": BATCH_A, "reply_to": REPLY_TO, "now": NOW} | delivered
    with pytest.raises(SignatureError, match=re.escape(refusal)):
        Signer(SECRET).open_batch(blob, **where)
    assert not tripwire.fired


@pytest.mark.parametrize(
    ("forge", "refusal"),
    [
        (lambda blob: blob.replace(BATCH_A.encode(), BATCH_B.encode()), "does not match"),
        (lambda blob: Signer(SECRET).dumps([0]), "upgrade the client to the workers' release"),
        (
            lambda blob: Signer(SECRET).bind(ReplySeal(names.DONE, BATCH_A, 0, 1)).dumps([0]),
            "mismatch: signed as a reply, not as a batch",
        ),
    ],
    ids=["id rewritten in the header", "unbound (version 1)", "a reply"],
)
def test_a_batch_header_cannot_be_rewritten_dropped_or_borrowed(
    forge: Callable[[bytes], bytes], refusal: str
) -> None:
    with pytest.raises(SignatureError, match=re.escape(refusal)):
        Signer(SECRET).open_batch(
            forge(sealed_batch([0])), batch_id=BATCH_B, reply_to=REPLY_TO, now=NOW
        )


def test_batch_ids_are_fixed_width() -> None:
    with pytest.raises(ValueError, match="batch ids are 32 characters"):
        sealed_batch([0], batch_id="short")


def sealed_reply(
    batch_id: str, first: int, outcomes: list[Any], kind: bytes = names.PROGRESS
) -> bytes:
    seal = ReplySeal(kind, batch_id, first, len(outcomes))
    return Signer(SECRET).bind(seal).dumps((first, outcomes, 0.5, len(outcomes)))


def test_a_reply_round_trips_bound_to_its_kind_batch_and_calls() -> None:
    blob = sealed_reply(BATCH_A, 3, [(True, 9), (True, 16)])
    header = struct.pack(">4sc32sqI", b"TSR2", names.PROGRESS, BATCH_A.encode(), 3, 2)
    assert blob[TAG_SIZE:].startswith(header)
    loaded = Signer(SECRET).loads_reply(blob, kind=names.PROGRESS, batch_id=BATCH_A)
    assert loaded == (3, [(True, 9), (True, 16)], 0.5, 2)
    whole = sealed_reply(BATCH_A, names.WHOLE_BATCH, [(True, 0)], names.DONE)
    assert Signer(SECRET).loads_reply(whole, kind=names.DONE, batch_id=BATCH_A)[0] == -1


@pytest.mark.parametrize(
    ("arrived", "refusal"),
    [
        (
            {"batch_id": BATCH_B},
            f"splice: signed as a reply P of batch {BATCH_A}, pushed as a reply P of batch {BATCH_B}",
        ),
        ({"kind": names.DONE}, "splice: signed as a reply P"),
    ],
    ids=["another batch", "another kind"],
)
def test_a_reply_spliced_elsewhere_is_refused_before_unpickling(
    tripwire: Tripwire, arrived: dict[str, Any], refusal: str
) -> None:
    blob = sealed_reply(BATCH_A, 0, [(True, tripwire)])
    where: dict[str, Any] = {"kind": names.PROGRESS, "batch_id": BATCH_A} | arrived
    with pytest.raises(SignatureError, match=re.escape(refusal)):
        Signer(SECRET).loads_reply(blob, **where)
    assert not tripwire.fired


def test_a_reply_whose_outcomes_are_not_the_calls_its_header_names_is_refused() -> None:
    blob = Signer(SECRET).bind(ReplySeal(names.PROGRESS, BATCH_A, 5, 1)).dumps((0, [(True, 1)]))
    with pytest.raises(SignatureError, match=re.escape("signed for calls 5 (+1), carries calls 0")):
        Signer(SECRET).loads_reply(blob, kind=names.PROGRESS, batch_id=BATCH_A)
    with pytest.raises(UnboundPayload, match="upgrade the workers to the client's release"):
        Signer(SECRET).loads_reply(
            Signer(SECRET).dumps((0, [(True, 1)])), kind=names.PROGRESS, batch_id=BATCH_A
        )


def test_a_bound_signer_verifies_only_payloads_bound_like_its_own() -> None:
    seal = BatchSeal(BATCH_A, REPLY_TO, NOW)
    bound = Signer(SECRET).bind(seal)
    assert bound.loads(bound.dumps("x")) == "x"
    other = Signer(SECRET).bind(BatchSeal(BATCH_B, REPLY_TO, NOW))
    with pytest.raises(SignatureError, match="signed for another batch or reply"):
        bound.loads(other.dumps("x"))
