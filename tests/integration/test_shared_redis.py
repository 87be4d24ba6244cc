"""Shared data on a Redis of its own (``SHARED_REDIS_URL``): the client uploads there and the
workers download from there, while batches and replies stay on the broker."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis

from taskstack import ClusterExecutor, names
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker, free_port, redis_traffic, start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MB = 1024 * 1024
ARRAY_BYTES = 8 * MB


@pytest.fixture
def shared_redis(redis_server: Settings, tmp_path: Path, logs_dir: Path) -> Iterator[redis.Redis]:
    """A second redis-server, for shared data only."""
    url = f"redis://:{secrets.token_urlsafe(12)}@127.0.0.1:{free_port()}/0"
    service = start_redis(replace(redis_server, redis_url=url), tmp_path, logs_dir, "redis-shared")
    client = redis.Redis.from_url(url)
    yield client
    client.close()
    service.stop()


def _shared_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(f"{names.SHARED_KEY_PREFIX}*"))


def test_shared_data_goes_through_the_shared_redis_not_the_broker(
    redis_server: Settings,
    shared_redis: redis.Redis,
    start_worker: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    # A broker database of this test's own (the session's workers serve database 0), and a
    # worker "on another host" (its own shared directory), so the data must cross Redis.
    url = shared_redis.get_connection_kwargs()
    shared_url = f"redis://:{url['password']}@127.0.0.1:{url['port']}/0"
    broker = replace(redis_server, redis_url=redis_server.redis_url.rsplit("/", 1)[0] + "/4")
    settings = replace(broker, shared_redis_url=shared_url)
    start_worker(names.CPU_QUEUE, replace(settings, shared_dir=str(tmp_path / "worker-host")))
    client_side = replace(settings, shared_dir=str(tmp_path / "client-host"))
    broker_client = redis.Redis.from_url(broker.redis_url)
    array = np.random.default_rng().random(ARRAY_BYTES // 8)
    expected = float(array.sum())
    try:
        before_broker, before_shared = redis_traffic(broker_client), redis_traffic(shared_redis)
        with ClusterExecutor(settings=client_side) as executor:
            results = list(executor.map(functools.partial(work.total_plus, array), range(50)))
            stored = _shared_keys(shared_redis)
            assert _shared_keys(broker_client) == []
        into_broker = redis_traffic(broker_client)[0] - before_broker[0]
        into_shared = redis_traffic(shared_redis)[0] - before_shared[0]
        out_of_shared = redis_traffic(shared_redis)[1] - before_shared[1]
    finally:
        broker_client.close()
    assert [total - i for i, (total, _) in enumerate(results)] == pytest.approx([expected] * 50)
    assert len(stored) == 1 and stored[0].startswith(names.SHARED_KEY_PREFIX.encode())
    assert into_shared >= ARRAY_BYTES and out_of_shared >= ARRAY_BYTES  # uploaded, fetched
    assert into_broker < MB, f"{into_broker / MB:.1f} MB went into the broker"
    assert _shared_keys(shared_redis) == []  # deleted at shutdown, there too
