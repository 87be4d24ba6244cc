from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from taskstack import ClusterExecutor, Pool, names
from taskstack.settings import Settings
from tests.support import Worker


@pytest.fixture
def executor(redis_server: Settings, cpu_worker: Worker) -> Iterator[ClusterExecutor]:
    with ClusterExecutor(settings=redis_server) as ex:
        yield ex


@pytest.fixture
def io_executor(redis_server: Settings, io_worker: Worker) -> Iterator[ClusterExecutor]:
    with ClusterExecutor(settings=redis_server, queue=names.IO_QUEUE) as ex:
        yield ex


@pytest.fixture
def pool(redis_server: Settings, cpu_worker: Worker) -> Iterator[Pool]:
    with Pool(settings=redis_server) as p:
        yield p


@pytest.fixture
def dead_letters(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """A client of the session's Redis, whose dead-letter list is empty before and after."""
    redis_client.delete(names.DEAD_LETTERS_KEY)
    yield redis_client
    redis_client.delete(names.DEAD_LETTERS_KEY)
