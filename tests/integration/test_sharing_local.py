"""A client on a worker's host writes shared data to the host's directory itself
(taskstack/client/sharing.py), and uploads it to Redis meanwhile for the other hosts,
whose workers wait for that upload (taskstack/worker/shared_objects.py).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskstack import ClusterExecutor, capacity, names
from taskstack.client import uploads
from taskstack.client.sharing import Memo, SharedStore
from taskstack.errors import SharedDataGone
from taskstack.settings import Settings
from taskstack.sharing import blob_key, host_directory, host_token, uploading_key
from taskstack.signing import Signer
from taskstack.worker.shared_objects import HostCache
from tests.integration import work
from tests.support import Worker, free_port, redis_traffic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MB = 1024 * 1024


def test_a_client_on_a_workers_host_hands_it_the_data_without_redis(
    redis_server: Settings, cpu_worker: Worker, redis_client: redis.Redis
) -> None:
    # The session's workers and this client all use the default directory: one host.
    directory = host_directory(redis_server.shared_dir)
    array = np.random.default_rng().random(20 * MB // 8)  # a new digest
    beacon, stranger = names.CAPACITY_KEY_PREFIX + names.CPU_QUEUE, "cpu@another-host"
    with ClusterExecutor(settings=redis_server) as executor:
        wait_for(
            lambda: host_token(directory, create=False) in executor._dispatcher._capacity.hosts,
            30,
            "the worker to announce its shared directory",
        )
        before = redis_traffic(redis_client)
        results = list(executor.map(functools.partial(work.total_plus, array), range(50)))
        moved_in, moved_out = (
            a - b for a, b in zip(redis_traffic(redis_client), before, strict=True)
        )
        owner = executor._dispatcher.id
        (mark,) = redis_client.scan_iter(f"{names.SHARED_KEY_PREFIX}{owner}:*")
        assert mark.endswith(b":uploading")  # owed, not sent: no worker elsewhere needs it
        path = directory / hashlib.sha256(array.tobytes()).hexdigest()
        path.unlink()  # swept by the host, unused for SHARED_EXPIRES
        again = list(executor.map(functools.partial(work.total_plus, array), range(4)))
        assert path.exists(), "the next map did not write the swept file again"
        assert [total for total, _ in again] == pytest.approx(
            [float(array.sum()) + i for i in range(4)]
        )
        # A worker of another host comes: it gets its copy from Redis.
        value = f"1 {time.time() + 60} {capacity.VERSIONS} {'0' * 32}"
        redis_client.hset(beacon, stranger, value)
        try:
            key = mark.removesuffix(b":uploading")
            wait_for(lambda: redis_client.strlen(key) == array.nbytes, 30, "the upload")
            assert redis_client.get(key) == array.tobytes()
            wait_for(lambda: not redis_client.exists(mark), 10, "the mark to go")
        finally:
            redis_client.hdel(beacon, stranger)
    assert [total for total, _ in results] == pytest.approx(
        [float(array.sum()) + i for i in range(50)]
    )
    assert moved_in < MB, f"{moved_in / MB:.1f} MB went into Redis for the client's own host"
    assert moved_out < MB, f"{moved_out / MB:.1f} MB came out of Redis to the client's own host"
    assert not list(redis_client.scan_iter(f"{names.SHARED_KEY_PREFIX}{owner}:*"))


def _store(client: redis.Redis, directory: Path) -> SharedStore:
    token = host_token(directory, create=True)
    assert token is not None
    return SharedStore(
        client,
        uuid.uuid4().hex,
        min_bytes=1024,
        max_bytes=100 * MB,
        expires=60,
        directory=directory,
        hosts=lambda: frozenset({token, "another-host"}),  # uploaded at once
    )


def test_a_worker_on_another_host_waits_for_the_upload_under_way(
    redis_server: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    signer = Signer(redis_server.secret)
    store = _store(redis_client, host_directory(str(tmp_path / "client-host")))
    array = np.arange(100_000, dtype=np.int64)
    blob = store.dumps(signer, ([(work.total_plus, (array, 1), None)], None), Memo())
    (digest,) = store._stored
    wait_for(lambda: store.uploads.owed(digest) is None, 30, "the upload")
    key, mark = blob_key(store.owner, digest), uploading_key(store.owner, digest)
    # Replay the moment between the batch's sending and the upload's end.
    stored = redis_client.get(key)
    assert isinstance(stored, bytes) and len(stored) == array.nbytes
    redis_client.delete(key)
    redis_client.set(mark, b"1", ex=60)
    loaded: list[Any] = []
    other_host = HostCache(host_directory(str(tmp_path / "other-host")), 60)
    loader = threading.Thread(
        target=lambda: loaded.append(other_host.loads(signer, blob, redis_client))
    )
    loader.start()
    loader.join(1.0)  # a window in which the loader must keep waiting
    assert loader.is_alive() and not loaded, "the worker went on without the data"
    redis_client.set(key, stored)  # the upload ends
    redis_client.delete(mark)
    loader.join(30)
    ((calls, _),) = loaded
    assert np.array_equal(calls[0][1][0], array)
    assert other_host.fetched == 1
    store.release()


def test_an_upload_that_never_comes_fails_the_batch_saying_so(
    redis_server: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    signer = Signer(redis_server.secret)
    store = _store(redis_client, host_directory(str(tmp_path / "client-host")))
    blob = store.dumps(signer, np.arange(100_000, dtype=np.int64), Memo())
    (digest,) = store._stored
    wait_for(lambda: store.uploads.owed(digest) is None, 30, "the upload")
    redis_client.delete(blob_key(store.owner, digest))  # the client died mid-upload
    with pytest.raises(SharedDataGone, match="no longer in Redis"):
        HostCache(host_directory(str(tmp_path / "other-host")), 60).loads(
            signer, blob, redis_client
        )
    # The client's own host never needed Redis for it.
    local = HostCache(host_directory(str(tmp_path / "client-host")), 60)
    assert np.array_equal(local.loads(signer, blob, redis_client), np.arange(100_000))
    assert local.fetched == 0
    store.release()


def test_an_unreachable_redis_is_reported_once_while_the_upload_thread_retries(
    redis_server: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(uploads, "CHECK_SECONDS", 0.01)
    monkeypatch.setattr(uploads, "UPLOADING_SECONDS", 1)  # the marks renewed every 0.25 s
    checks: list[float] = []

    def elsewhere() -> bool:  # no other host: the marks are renewed
        checks.append(time.monotonic())
        return False

    owed = uploads.Uploads(
        redis.Redis.from_url(redis_server.redis_url),
        f"test-{uuid.uuid4().hex}",
        upload=lambda digest, view: None,
        elsewhere=elsewhere,
        failed=lambda digest, size: None,
    )
    digest = uuid.uuid4().bytes * 2
    owed.add(digest, memoryview(b"data"))
    assert redis_client.exists(uploading_key(owed.owner, digest))
    # Redis is gone (and the client tries once per call, so that the test goes quickly).
    owed.client = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "Redis unreachable" in r.getMessage()]

    try:
        wait_for(warnings, 30, "a warning that Redis is unreachable")
        seen = len(checks)  # each check retries the renewal, which fails again
        wait_for(lambda: len(checks) >= seen + 20, 30, "the thread to retry 20 times")
    finally:
        owed.close(5)
    assert len(warnings()) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info]  # no traceback per retry
