"""Big objects sent once: the frame that names them and the :func:`share` handle.

A batch's pickle is made with pickle protocol 5: a buffer at least
``SHARED_MIN_BYTES`` long (a NumPy array's data, anything pickled through a
``pickle.PickleBuffer``) leaves the pickle *out of band*. The client stores it
once in Redis under its SHA-256 (``taskstack:shared:<client id>:<digest>``) and
the pickle travels in a *frame* that lists the digests and sizes of the buffers
it needs::

    MAGIC || owner (32 ASCII bytes) || count (u32) || count x (digest[32], size u64) || pickle

A batch's frame is signed as a whole (:mod:`taskstack.signing`), so the
worker knows which digests the client meant; it fetches each buffer once per
host, checks its SHA-256 against the signed digest, and only then unpickles.
A :func:`share` handle (for other big objects: ``bytes``, big lists and
dicts) is stored the same way, as a frame of its own whose digest the signed
batch carries.

This module is what both sides need: the frame, and the reconstructor that a
shared handle becomes in a pickle. The client's store is
:mod:`taskstack.client.sharing`, the worker's host cache
:mod:`taskstack.worker.shared_objects`.
"""

from __future__ import annotations

import contextvars
import os
import secrets
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from taskstack import names

T = TypeVar("T")

MAGIC: Final = b"TSF1"
"""Starts a frame; a plain pickle starts with the PROTO opcode (0x80) instead."""
DIGEST_SIZE: Final = 32
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">32sQ")
OWNER_SIZE: Final = names.ID_SIZE

Ref = tuple[bytes, int]
"""``(sha256 digest, size)`` of one stored buffer or frame."""


def blob_key(owner: str, digest: bytes) -> str:
    """The Redis key holding ``owner``'s copy of the bytes with this SHA-256."""
    return f"{names.SHARED_KEY_PREFIX}{owner}:{digest.hex()}"


def uploading_key(owner: str, digest: bytes) -> str:
    """Set while the client uploads ``blob_key(owner, digest)`` after sending its batches
    (it wrote the bytes to the host's directory first): a worker elsewhere waits for it."""
    return blob_key(owner, digest) + ":uploading"


HOST_TOKEN: Final = ".host"
"""The file in a host's shared directory that names it in the workers' capacity beacons."""


def host_directory(configured: str, *, create: bool = True) -> Path:
    """The host's shared directory: ``configured``, or one per user in the temp dir."""
    base = Path(configured) if configured else Path(tempfile.gettempdir())
    path = base / f"taskstack-shared-{os.getuid()}"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def host_token(directory: Path, *, create: bool) -> str | None:
    """The random token that names ``directory``: a worker makes it (the first one wins),
    and a client that reads the token of a live worker knows it shares the directory."""
    path = directory / HOST_TOKEN
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    except OSError:
        return None
    draft = directory / f"{HOST_TOKEN}.{os.getpid()}.tmp"
    draft.write_text(secrets.token_hex(16))
    try:
        os.link(draft, path)  # atomic, and fails if another process got there first
    except FileExistsError:
        pass
    finally:
        draft.unlink()
    return path.read_text().strip() or None


def frame(owner: str, refs: Sequence[Ref], pickled: bytes) -> bytes:
    """A pickle together with the stored buffers it was made with."""
    head = [MAGIC, owner.encode("ascii"), _COUNT.pack(len(refs))]
    head.extend(_ENTRY.pack(digest, size) for digest, size in refs)
    return b"".join(head) + pickled


def unframe(data: bytes | memoryview) -> tuple[str, list[Ref], memoryview]:
    """``(owner, buffer refs, pickle)`` of a frame; a plain pickle has no owner and no refs.

    Raises ``ValueError`` for a truncated or malformed frame.
    """
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        return "", [], view
    at = len(MAGIC)
    try:
        owner = bytes(view[at : at + OWNER_SIZE]).decode("ascii")
        at += OWNER_SIZE
        (count,) = _COUNT.unpack_from(view, at)
        at += _COUNT.size
        refs = [_ENTRY.unpack_from(view, at + i * _ENTRY.size) for i in range(count)]
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed shared-object frame: {exc}") from None
    if len(owner) != OWNER_SIZE or not all(c in "0123456789abcdef" for c in owner):
        raise ValueError("malformed shared-object frame: bad owner id")
    return owner, refs, view[at + count * _ENTRY.size :]


class Shared(Generic[T]):
    """A handle to an object sent to the workers once, made by :func:`share`.

    Pass it to calls in place of the object: on the workers the argument *is*
    the object, unpickled once per worker process and reused by every call
    there, from this map or any later one of the same client. ``value`` is the
    object on the client.
    """

    __slots__ = ("__weakref__", "value")

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"share({type(self.value).__name__})"

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        store = STORING.get()
        if store is None:  # pickled outside a batch (e.g. by the user): it is its value
            return _identity, (self.value,)
        owner, digest, size = store(self)
        return resolve, (owner, digest, size)


def share(obj: T) -> Shared[T]:
    """Send ``obj`` to the workers once, like Dask's ``scatter``, for use in many calls.

    The handle is pickled once per client, the first time a batch carries it;
    its big buffers are stored once in Redis and mapped once per worker host.
    On the workers, ``obj`` arrives as it was then: treat it as read-only
    there (NumPy arrays arrive read-only), and share the changed object anew
    after changing it. It is deleted from Redis when the client shuts down, or
    ``SHARED_EXPIRES`` seconds after its last use if the client dies.
    """
    return Shared(obj)


def _identity(value: T) -> T:
    return value


STORING: contextvars.ContextVar[Callable[[Shared[Any]], tuple[str, bytes, int]] | None] = (
    contextvars.ContextVar("taskstack_storing", default=None)
)
"""Set by the client while it pickles a batch: stores a handle, returns its reference."""

RESOLVING: contextvars.ContextVar[Callable[[str, bytes, int], Any] | None] = contextvars.ContextVar(
    "taskstack_resolving", default=None
)
"""Set by the worker while it unpickles a verified batch: loads a handle's object."""


def resolve(owner: str, digest: bytes, size: int) -> Any:
    """What a :class:`Shared` handle becomes in a batch: its object, loaded on the worker."""
    loader = RESOLVING.get()
    if loader is None:
        raise RuntimeError("a shared object can only be loaded by a worker running its batch")
    return loader(owner, digest, size)
