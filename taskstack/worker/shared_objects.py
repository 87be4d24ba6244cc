"""The worker's side of sending big things once: fetched once per host, mapped by each process.

A verified batch names the buffers and shared objects it was pickled with by
SHA-256 (:mod:`taskstack.sharing`). The first process of a host to need one
fetches it from Redis, checks its digest, and writes it to a file named by
the digest in the host's shared directory (``SHARED_DIR``, under a lock so
that the host fetches it once); every process then maps that file read-only,
so the operating system keeps one copy in memory however many processes use
it. A process checks the digest of a file it did not write itself before its
first use, so nothing unverified is ever unpickled. Files unused for
``SHARED_EXPIRES`` seconds are deleted by the next fetch.

A client on a host whose directory a live worker uses (it reads the worker's
token, :func:`taskstack.sharing.host_token`, in the capacity beacons) writes
the file itself and uploads to Redis after sending its batches: the workers
of its own host never wait for Redis, and a worker elsewhere waits for the
upload to finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Final

import cloudpickle
import redis

from taskstack.errors import SharedDataGone, SignatureError
from taskstack.sharing import (
    HOST_TOKEN,
    RESOLVING,
    blob_key,
    host_directory,
    unframe,
    uploading_key,
)
from taskstack.signing import Signer

FETCH_PIECE: Final = 4 * 1024 * 1024
"""Bytes fetched per ``GETRANGE``: a big object never sits whole in a process's heap."""
UPLOAD_WAIT_SECONDS: Final = 120.0
"""How long a worker waits for shared data its client is still uploading (the client
wrote it to its own host's directory first, and sent the batches meanwhile)."""
UPLOAD_POLL_SECONDS: Final = 0.05
KEEP_PER_PROCESS: Final = 16
"""Mapped files and loaded shared objects a process keeps at hand (least recent dropped)."""


class HostCache:
    """This process's view of the host's shared data."""

    def __init__(self, directory: Path, expires: float) -> None:
        self.directory = directory
        self.expires = expires
        self._maps: OrderedDict[bytes, memoryview] = OrderedDict()
        self._objects: OrderedDict[bytes, Any] = OrderedDict()
        self.fetched = 0
        """Buffers this process fetched from Redis (the others came from the host's files)."""

    def loads(self, signer: Signer, blob: bytes, client: redis.Redis) -> Any:
        """Verify a signed batch, gather the shared data it names, then unpickle it."""
        return self.unpickle(signer.verify(blob), client)

    def unpickle(self, data: memoryview, client: redis.Redis) -> Any:
        """Gather the shared data a verified batch ``data`` names, then unpickle it."""
        owner, refs, pickled = unframe(data)
        buffers = [self.buffer(client, owner, digest, size) for digest, size in refs]
        token = RESOLVING.set(lambda o, d, s: self._resolve(client, o, d, s))
        try:
            return cloudpickle.loads(pickled, buffers=buffers)
        finally:
            RESOLVING.reset(token)

    def _resolve(self, client: redis.Redis, owner: str, digest: bytes, size: int) -> Any:
        if digest in self._objects:
            self._objects.move_to_end(digest)
            return self._objects[digest]
        obj = self.unpickle(self.buffer(client, owner, digest, size), client)
        self._objects[digest] = obj
        while len(self._objects) > KEEP_PER_PROCESS:
            self._objects.popitem(last=False)
        return obj

    def buffer(self, client: redis.Redis, owner: str, digest: bytes, size: int) -> memoryview:
        """The verified bytes with this digest, mapped read-only from the host's file."""
        if digest in self._maps:
            self._maps.move_to_end(digest)
            return self._maps[digest]
        path = self.directory / digest.hex()
        wrote = not path.exists() and self._fetch(client, owner, digest, size, path)
        try:
            view = _map(path)
        except FileNotFoundError:  # swept in between: unused for SHARED_EXPIRES
            wrote = self._fetch(client, owner, digest, size, path)
            view = _map(path)
        if not wrote and (len(view) != size or hashlib.sha256(view).digest() != digest):
            path.unlink(missing_ok=True)  # the next batch fetches it anew
            raise SignatureError(f"the host's copy of shared data {digest.hex()} is corrupt")
        with contextlib.suppress(OSError):
            os.utime(path)  # in use: not swept
        self._maps[digest] = view
        while len(self._maps) > KEEP_PER_PROCESS:
            self._maps.popitem(last=False)  # arrays still using it keep the mapping alive
        return view

    def _fetch(self, client: redis.Redis, owner: str, digest: bytes, size: int, path: Path) -> bool:
        """Fetch under the host's lock; True if this process wrote the (verified) file."""
        with open(self.directory / f"{digest.hex()}.lock", "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for one bounded fetch at most
            if path.exists():
                return False
            tmp = self.directory / f".{digest.hex()}.{os.getpid()}.tmp"
            try:
                _download(client, owner, digest, size, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)
            self.fetched += 1
        self._sweep()
        return True

    def _sweep(self) -> None:
        """Delete files no process has used for ``expires`` seconds (mapped ones live on)."""
        cutoff = time.time() - self.expires
        for entry in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if entry.name != HOST_TOKEN and entry.stat().st_mtime < cutoff:
                    entry.unlink()


def _download(client: redis.Redis, owner: str, digest: bytes, size: int, path: Path) -> None:
    """Copy the stored bytes to ``path`` in pieces (no second whole copy in this process's
    heap), checking their SHA-256 on the way; first wait out an upload under way."""
    key = blob_key(owner, digest)
    deadline = time.monotonic() + UPLOAD_WAIT_SECONDS
    while (
        client.strlen(key) == 0
        and client.exists(uploading_key(owner, digest))
        and time.monotonic() < deadline
    ):
        time.sleep(UPLOAD_POLL_SECONDS)
    if client.strlen(key) == 0:
        raise SharedDataGone(
            f"shared data {digest.hex()[:12]} is no longer in Redis: its client shut "
            "down, or it went unused for SHARED_EXPIRES seconds"
        )
    hasher = hashlib.sha256()
    written = 0
    with open(path, "wb") as file:
        while written < size:
            piece = client.getrange(key, written, min(written + FETCH_PIECE, size) - 1)
            assert isinstance(piece, bytes)
            if not piece:
                break
            hasher.update(piece)
            file.write(piece)
            written += len(piece)
    if written != size or client.strlen(key) != size or hasher.digest() != digest:
        raise SignatureError(
            f"shared data {digest.hex()[:12]} fetched from Redis does not match the "
            "digest its signed batch names; it was not unpickled"
        )


def _map(path: Path) -> memoryview:
    with open(path, "rb") as file:
        return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))


_caches: dict[int, HostCache] = {}


def host_cache(configured_dir: str, expires: float) -> HostCache:
    """This process's cache (a forked child gets its own)."""
    pid = os.getpid()
    if pid not in _caches:
        _caches.clear()
        _caches[pid] = HostCache(host_directory(configured_dir), expires)
    return _caches[pid]
