"""The client's side of sending big things once: its store of shared data in Redis.

A batch is pickled with protocol 5; each buffer of at least ``SHARED_MIN_BYTES``
(a NumPy array's data) is stored once under its SHA-256 and
left out of the pickle, and each :func:`taskstack.share` handle is pickled
once and stored the same way (:mod:`taskstack.sharing` has the frame). The
store keeps a client's shared data within ``SHARED_MAX_BYTES``, renews its
expiry while the client uses it, and deletes it when the client shuts down;
a client that dies leaves it to expire ``SHARED_EXPIRES`` seconds after its
last use.

Reading a 50 MB buffer to hash it takes tens of milliseconds, so a buffer is
hashed once per map (or per run of submitted work): the *memo* a batch is
packed with remembers the digests of the buffers it saw, by the identity of
the object that owns them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis

from taskstack import sources
from taskstack.client.uploads import Uploads
from taskstack.connections import connect
from taskstack.errors import PayloadTooLarge
from taskstack.settings import Settings
from taskstack.sharing import (
    STORING,
    Ref,
    Shared,
    blob_key,
    frame,
    host_directory,
    host_token,
    uploading_key,
)
from taskstack.signing import Signer

logger = logging.getLogger(__name__)

RELEASE_WAIT_SECONDS: Final = 30.0
"""At shutdown, how long an upload under way may take before the keys are deleted."""

LARGEST_BUFFER: Final = 512 * 1024 * 1024
"""Redis's largest string (its default ``proto-max-bulk-len``)."""


@dataclass
class Memo:
    """Digests of the buffers already stored, by owning object, for one map or burst.

    An owner is held weakly where it can be (a NumPy array): the memo outlives
    the calls that passed it, and must not keep a big argument alive after its
    result is in. An entry counts only while its owner is the same object.
    """

    refs: dict[tuple[int, int], Ref] = field(default_factory=dict)
    owners: dict[int, Any] = field(default_factory=dict)
    """By id: a weak reference to the owner, or the owner itself if it takes none."""

    def get(self, owner: object, nbytes: int) -> Ref | None:
        held = self.owners.get(id(owner))
        if (held() if isinstance(held, weakref.ref) else held) is not owner:
            return None
        return self.refs.get((id(owner), nbytes))

    def put(self, owner: object, nbytes: int, ref: Ref) -> None:
        try:
            self.owners[id(owner)] = weakref.ref(owner)
        except TypeError:  # bytes, bytearray: kept, so that no other object takes the id
            self.owners[id(owner)] = owner
        self.refs[(id(owner), nbytes)] = ref


class SharedStore:
    """One client's shared data in Redis: ``taskstack:shared:<owner>:<sha256>``."""

    def __init__(
        self,
        client: redis.Redis,
        owner: str,
        *,
        min_bytes: int,
        max_bytes: int,
        expires: int,
        directory: Path | None = None,
        hosts: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.redis = client
        self.directory = directory
        """This host's shared directory, if the client may write there."""
        self.hosts = hosts
        """The tokens of the live workers' shared directories."""
        self.uploads = Uploads(client, owner, self._set, self._elsewhere, self._forget)
        self.owner = owner
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.expires = expires
        self.stored_bytes = 0
        self._stored: dict[bytes, tuple[int, float]] = {}
        """digest -> (size, when its expiry was last renewed)."""
        self._handles: dict[int, tuple[Shared[Any], Ref]] = {}
        self._lock = threading.Lock()

    @classmethod
    def configured(
        cls,
        broker: redis.Redis,
        owner: str,
        settings: Settings,
        hosts: Callable[[], frozenset[str]] = frozenset,
    ) -> SharedStore:
        """A store with the ``SHARED_*`` settings of ``settings``: on ``broker``, or on a Redis
        of its own (``SHARED_REDIS_URL``), where big transfers keep off the broker's thread."""
        url = settings.shared_redis_url
        return cls(
            connect(url) if url else broker,
            owner,
            min_bytes=settings.shared_min_bytes,
            max_bytes=settings.shared_max_bytes,
            expires=settings.shared_expires,
            directory=host_directory(settings.shared_dir, create=False),
            hosts=hosts,
        )

    def dumps(self, signer: Signer, obj: object, memo: Memo) -> bytes:
        """``obj`` signed, its big buffers and shared handles stored apart."""
        with self._lock:
            return signer.sign(self._encode(obj, memo))

    def release(self) -> None:
        """Delete everything this client stored (at shutdown)."""
        owed = self.uploads.close(RELEASE_WAIT_SECONDS)
        with self._lock:
            keys = [blob_key(self.owner, digest) for digest in self._stored]
            keys += [uploading_key(self.owner, digest) for digest in owed]
            self._stored.clear()
            self._handles.clear()
            self.stored_bytes = 0
        for start in range(0, len(keys), 512):
            self.redis.delete(*keys[start : start + 512])

    def _encode(self, obj: object, memo: Memo) -> bytes:
        refs: list[Ref] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            try:
                view = buffer.raw()
            except BufferError:  # not contiguous: pickled in band
                return True
            if view.nbytes < self.min_bytes:
                return True
            refs.append(self._put_buffer(view, memo))
            return False

        token = STORING.set(lambda handle: self._put_handle(handle, memo))
        try:
            pickled = sources.dumps(obj, buffer_callback=out_of_band)
        finally:
            STORING.reset(token)
        return frame(self.owner, refs, pickled) if refs else pickled

    def _put_handle(self, handle: Shared[Any], memo: Memo) -> tuple[str, bytes, int]:
        known = self._handles.get(id(handle))
        if known is not None and known[0] is handle and self._renew(*known[1]):
            digest, size = known[1]
        else:
            digest, size = self._put(memoryview(self._encode(handle.value, memo)))
            self._handles[id(handle)] = (handle, (digest, size))
        return self.owner, digest, size

    def _put_buffer(self, view: memoryview, memo: Memo) -> Ref:
        owner = view.obj
        ref = memo.get(owner, view.nbytes)
        if ref is not None and self._renew(*ref):
            return ref
        ref = self._put(view)
        memo.put(owner, view.nbytes, ref)
        return ref

    def _put(self, view: memoryview) -> Ref:
        digest = hashlib.sha256(view).digest()
        size = view.nbytes
        if self._renew(digest, size):
            return digest, size
        if size > LARGEST_BUFFER:
            raise PayloadTooLarge(
                f"a buffer of {size:,} bytes is over {LARGEST_BUFFER:,}, the largest value Redis "
                "stores: split the array into parts and pass those"
            )
        if self.stored_bytes + size > self.max_bytes:
            raise PayloadTooLarge(
                f"storing {size:,} more bytes of shared data would take this client past "
                f"SHARED_MAX_BYTES={self.max_bytes:,} (it holds {self.stored_bytes:,}): "
                "raise SHARED_MAX_BYTES (Redis must have the memory), or shut down "
                "executors whose shared data is no longer needed"
            )
        view = view.cast("B")
        local = self._local_directory()
        path = None if local is None else local / digest.hex()
        if path is not None and _write(path, view):
            # This host's workers map the file; Redis gets a copy once workers elsewhere need
            # it, read from the file: the caller's array is not kept alive until then.
            self.uploads.add(digest, _mapped(path) or view)
        else:
            self._set(digest, view)
        self._stored[digest] = (size, time.monotonic())
        self.stored_bytes += size
        return digest, size

    def _set(self, digest: bytes, view: memoryview) -> None:
        # One SET: redis-py writes the view to the socket as it is (no copy here), and
        # Redis reads it straight into the value. Appending pieces instead made Redis
        # copy the growing value at every piece: 5x slower for 50 MB.
        self.redis.set(blob_key(self.owner, digest), view, ex=self.expires)

    def _forget(self, digest: bytes, size: int) -> None:
        """Not in Redis after all (its upload failed): the next use stores it anew."""
        with self._lock:
            if self._stored.pop(digest, None) is not None:
                self.stored_bytes -= size

    def _elsewhere(self) -> bool:
        """Whether a live worker uses another shared directory than this client's."""
        token = None if self.directory is None else host_token(self.directory, create=False)
        return bool(self.hosts() - {token})

    def _local_directory(self) -> Path | None:
        """This host's shared directory, if a live worker uses it too."""
        if self.directory is None or not self.directory.is_dir():
            return None
        token = host_token(self.directory, create=False)
        return self.directory if token is not None and token in self.hosts() else None

    def _renew(self, digest: bytes, size: int) -> bool:
        """True if Redis still holds ``digest``, its expiry renewed when a quarter ran out."""
        known = self._stored.get(digest)
        if known is None:
            return False
        owed = self.uploads.owed(digest)
        if owed is not None:
            local = self._local_directory()
            if local is not None:  # written again if the host swept it, unused for a while
                _write(local / digest.hex(), owed)
            return True
        if time.monotonic() - known[1] < self.expires / 4:
            return True
        if self.redis.expire(blob_key(self.owner, digest), self.expires):
            self._stored[digest] = (size, time.monotonic())
            return True
        del self._stored[digest]  # expired or evicted: stored again
        self.stored_bytes -= size
        return False


def _write(path: Path, view: memoryview) -> bool:
    """Write ``view`` to ``path`` (atomically: the workers map whole files only)."""
    if path.exists():
        return True  # a worker of this host fetched it already
    draft = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(draft, "wb") as file:
            file.write(view)
        os.replace(draft, path)
    except OSError as exc:
        logger.warning("could not write shared data to %s: %s", path.parent, exc)
        draft.unlink(missing_ok=True)
        return False
    return True


def _mapped(path: Path) -> memoryview | None:
    """``path``'s bytes, mapped read-only (page cache, not this process's memory)."""
    try:
        with open(path, "rb") as file:
            return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError) as exc:
        logger.warning("could not map shared data %s: %s", path, exc)
        return None
