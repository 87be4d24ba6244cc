"""HMAC-signed pickles (taskstack/signing.py): nothing unsigned is ever unpickled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from taskstack.errors import SignatureError
from taskstack.signing import TAG_SIZE, Signer
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
