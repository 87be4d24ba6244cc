"""The local stack's redis-server config (taskstack/services/local.py)."""

from __future__ import annotations

from pathlib import Path

from taskstack.services.local import redis_config


def test_redis_config_requires_the_password(tmp_path: Path) -> None:
    config = redis_config("s3cret", 6390, tmp_path)
    assert 'requirepass "s3cret"' in config
    assert "appendonly yes" in config
    assert "maxmemory-policy noeviction" in config
