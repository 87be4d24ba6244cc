"""A Redis primary, its replica and three Sentinels on loopback: real processes.

Sentinels give up on a primary after :data:`DOWN_AFTER_MS` without an answer, so a
failover completes within a few seconds. The primary (and whatever Redis holds
the role after a failover) refuses writes while no replica is within
:data:`MAX_LAG_SECONDS` of it (``min-replicas-to-write 1``).
"""

from __future__ import annotations

import os
import secrets
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import redis

from taskstack.services.local import redis_command, redis_config, write_private
from taskstack.settings import Settings
from tests.support import Service, free_port, start, wait_for

MASTER_NAME = "taskstack-test"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000
MAX_LAG_SECONDS = 10
QUORUM = 2


@dataclass
class ReplicaSet:
    """The processes, and the settings that reach them through the Sentinels."""

    password: str
    directory: Path
    logs: Path
    redis_ports: list[int]
    sentinel_ports: list[int]
    servers: dict[int, Service] = field(default_factory=dict)
    sentinels: list[Service] = field(default_factory=list)

    def settings(self, base: Settings) -> Settings:
        return replace(
            base,
            redis_url=f"redis://:{self.password}@127.0.0.1:{self.redis_ports[0]}/0",
            redis_sentinels=tuple(f"127.0.0.1:{port}" for port in self.sentinel_ports),
            redis_master_name=MASTER_NAME,
        )

    def client(self, port: int, **options: float) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, **options)  # type: ignore[arg-type]

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                with self.client(port, socket_timeout=1) as sentinel:
                    _, primary = sentinel.execute_command(
                        "SENTINEL", "get-master-addr-by-name", MASTER_NAME
                    )
                    return int(primary)
            except (redis.RedisError, TypeError):
                continue
        raise LookupError("no Sentinel answered")

    def start_server(self, port: int, primary: int | None) -> None:
        """A redis-server on ``port``; a replica of ``primary`` unless None."""
        data = self.directory / f"redis-{port}"
        data.mkdir(exist_ok=True)
        lines = [
            redis_config(self.password, port, data.resolve(), 1024**3),
            f'masterauth "{self.password}"',
            "min-replicas-to-write 1",
            f"min-replicas-max-lag {MAX_LAG_SECONDS}",
            "appendonly no",
        ]
        if primary is not None:
            lines.append(f"replicaof 127.0.0.1 {primary}")
        config = write_private(data / "redis.conf", "\n".join(lines) + "\n")
        service = start(f"redis-{port}", redis_command(config), dict(os.environ), self.logs)
        self.servers[port] = service
        with self.client(port) as client:
            wait_for(client.ping, 20, f"redis-server on {port} (log: {service.log})")

    def start_sentinel(self, port: int, primary: int) -> Service:
        config = write_private(
            self.directory / f"sentinel-{port}.conf",
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    f'dir "{self.directory.resolve()}"',
                    f'requirepass "{self.password}"',
                    f'sentinel sentinel-pass "{self.password}"',
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} {QUORUM}",
                    f'sentinel auth-pass {MASTER_NAME} "{self.password}"',
                    f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                    "",
                ]
            ),
        )
        return start(
            f"sentinel-{port}", [*redis_command(config), "--sentinel"], dict(os.environ), self.logs
        )

    def up(self) -> None:
        primary, replica = self.redis_ports
        self.start_server(primary, None)
        self.start_server(replica, primary)
        self.sentinels = [self.start_sentinel(port, primary) for port in self.sentinel_ports]
        self.wait_ready(primary)

    def wait_ready(self, primary: int, timeout: float = 30) -> None:
        """Until every Sentinel names ``primary``, knows a replica in sync and the
        other Sentinels: only then can they fail over again."""

        def ready() -> bool:
            for port in self.sentinel_ports:
                with self.client(port, socket_timeout=1) as sentinel:
                    master = sentinel.sentinel_master(MASTER_NAME)
                    replicas = sentinel.sentinel_slaves(MASTER_NAME)
                    if master["port"] != primary or master["num-other-sentinels"] < 2:
                        return False
                    if not any(r["master-link-status"] == "ok" for r in replicas):
                        return False
            return True

        wait_for(ready, timeout, f"the Sentinels to agree on primary {primary} with a replica")

    def kill(self, port: int) -> None:
        """SIGKILL the redis-server on ``port``: a host lost, nothing flushed."""
        process = self.servers[port].process
        process.send_signal(signal.SIGKILL)
        process.wait()

    def failed_over(self, old: int, timeout: float = 30) -> int:
        """Wait until the Sentinels name another primary than ``old``; its port."""
        return wait_for(
            lambda: (port := self.primary_port()) != old and port, timeout, "a failover"
        )

    def down(self) -> None:
        for service in [*self.sentinels, *self.servers.values()]:
            service.stop()


def replica_set(directory: Path, logs: Path) -> ReplicaSet:
    """Two Redis and three Sentinels, on five distinct free ports (not started)."""
    ports: set[int] = set()
    while len(ports) < 5:
        ports.add(free_port())
    first, second, *sentinels = sorted(ports)
    return ReplicaSet(secrets.token_hex(16), directory, logs, [first, second], sentinels)
