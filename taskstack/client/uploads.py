"""Shared data a client wrote to its own host's directory: uploaded to Redis only for
workers of other hosts.

The workers of the client's host map the file the client wrote
(:mod:`taskstack.client.sharing`); a Redis copy serves only workers elsewhere.
So the upload waits until the capacity beacons show a worker whose shared
directory is another one (or whose directory is unknown), then runs in this
thread, batches already sent. Meanwhile ``<key>:uploading`` stands, renewed
here, and a worker elsewhere that got a batch first waits for the upload
(:mod:`taskstack.worker.shared_objects`). With every worker on the client's
host, 50 MB never goes through Redis: its append-only file made that upload
the slowest part of a map.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import redis

from taskstack.sharing import uploading_key

logger = logging.getLogger(__name__)

UPLOADING_SECONDS: Final = 120
"""The "still uploading" mark expires after this unless renewed (the client died)."""
CHECK_SECONDS: Final = 1.0
"""How often the thread looks for a worker of another host."""


class Uploads:
    """The uploads one client owes: deferred until a worker of another host is live."""

    def __init__(
        self,
        client: redis.Redis,
        owner: str,
        upload: Callable[[bytes, memoryview], None],
        elsewhere: Callable[[], bool],
        failed: Callable[[bytes, int], None],
    ) -> None:
        self.client = client
        self.owner = owner
        self.upload = upload
        """Stores the bytes under their key; raises ``redis.RedisError`` on failure."""
        self.elsewhere = elsewhere
        """Whether a live worker uses another shared directory than this client's."""
        self._waiting: dict[bytes, memoryview] = {}
        self._busy: tuple[bytes, memoryview] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed = failed
        """Told of an upload that failed (digest, size): the next use stores it anew."""

    def add(self, digest: bytes, view: memoryview) -> None:
        """Owe Redis a copy of ``view``; its mark is set before the batches go."""
        self.client.set(uploading_key(self.owner, digest), b"1", ex=UPLOADING_SECONDS)
        with self._lock:
            self._waiting[digest] = view
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="taskstack-upload", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def owed(self, digest: bytes) -> memoryview | None:
        """The bytes of ``digest`` while they wait for their upload or are being uploaded."""
        with self._lock:
            view = self._waiting.get(digest)
            if view is None and self._busy is not None and self._busy[0] == digest:
                view = self._busy[1]
            return view

    def close(self, timeout: float) -> list[bytes]:
        """Stop (an upload under way ends first, within ``timeout``); the digests whose
        marks may still stand."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            left = list(self._waiting)
            if self._busy is not None:
                left.append(self._busy[0])
            self._waiting.clear()
        return left

    def _run(self) -> None:
        renewed = time.monotonic()
        unreachable = False
        while not self._closing.is_set():
            try:
                if self._waiting and self.elsewhere():
                    self._upload_all()
                elif time.monotonic() - renewed >= UPLOADING_SECONDS / 4:
                    self._renew_marks()
                    renewed = time.monotonic()
                unreachable = False
            except redis.RedisError as exc:  # retried each check; said once per outage
                if not unreachable:
                    logger.warning("shared data uploads: Redis unreachable (%s); retrying", exc)
                unreachable = True
            except Exception:  # a bug: never the end of the thread
                logger.exception("shared data uploads")
            self._wake.wait(CHECK_SECONDS)
            self._wake.clear()

    def _upload_all(self) -> None:
        while not self._closing.is_set():
            with self._lock:
                if not self._waiting:
                    return
                digest, view = next(iter(self._waiting.items()))
                del self._waiting[digest]
                self._busy = (digest, view)
            try:
                self.upload(digest, view)
            except redis.RedisError as exc:
                logger.warning("shared data %s not uploaded: %s", digest.hex()[:12], exc)
                self.failed(digest, view.nbytes)
            finally:
                with contextlib.suppress(redis.RedisError):  # else it expires
                    self.client.delete(uploading_key(self.owner, digest))
                with self._lock:
                    self._busy = None

    def _renew_marks(self) -> None:
        with self._lock:
            digests = list(self._waiting)
        if digests:
            with self.client.pipeline(transaction=False) as pipe:
                for digest in digests:
                    pipe.set(uploading_key(self.owner, digest), b"1", ex=UPLOADING_SECONDS)
                pipe.execute()
