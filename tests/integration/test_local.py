"""The local stack's redis-server (taskstack/services/local.py's config) for real."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import redis

from taskstack.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_redis_refuses_clients_without_the_password(
    redis_server: Settings, redis_client: redis.Redis
) -> None:
    url = urlsplit(redis_server.redis_url)
    anonymous = redis.Redis(host=url.hostname or "", port=url.port or 6379)
    wrong = redis.Redis(host=url.hostname or "", port=url.port or 6379, password="wrong")
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
    finally:
        anonymous.close()
        wrong.close()
    assert redis_client.ping()
