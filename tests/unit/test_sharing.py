"""The frame that names stored buffers, and the share() handle (taskstack/sharing.py)."""

from __future__ import annotations

import hashlib
import pickle
import uuid

import cloudpickle
import pytest

from taskstack import share
from taskstack.sharing import MAGIC, frame, unframe


def test_a_frame_carries_its_owner_and_buffer_refs_before_the_pickle() -> None:
    owner = uuid.uuid4().hex
    refs = [(hashlib.sha256(b"a").digest(), 1), (hashlib.sha256(b"bc").digest(), 2)]
    pickled = pickle.dumps({"x": 1}, protocol=5)
    got_owner, got_refs, got_pickle = unframe(frame(owner, refs, pickled))
    assert (got_owner, got_refs, bytes(got_pickle)) == (owner, refs, pickled)


def test_a_plain_pickle_is_no_frame() -> None:
    pickled = pickle.dumps([1, 2], protocol=5)
    owner, refs, got = unframe(pickled)
    assert (owner, refs, bytes(got)) == ("", [], pickled)


@pytest.mark.parametrize(
    "data",
    [
        MAGIC + b"0" * 10,  # owner cut short
        MAGIC + b"0" * 32 + b"\x00\x00\x00\x05" + b"\x00" * 40,  # fewer refs than counted
        MAGIC + b"Z" * 32 + b"\x00\x00\x00\x00",  # not a client id
    ],
)
def test_a_malformed_frame_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        unframe(data)


def test_a_handle_pickled_outside_a_batch_is_its_value() -> None:
    table = {"k": list(range(10))}
    assert cloudpickle.loads(cloudpickle.dumps(share(table))) == table
