"""Redis over TLS with one ACL user per role, as stack.yaml runs it, on loopback.

The redis-server takes the users and TLS lines that the image's entrypoint writes
(services/redis/lib.sh, from users.acl and the password files), and the certificates
of ``scripts/swarm-certs``. A worker connects as ``worker``, Flower as ``monitor``,
the executor, Pool, joblib and a plain task as ``client``: everything runs, and Redis's
``ACL LOG`` stays empty, which is how users.acl was derived. Then each refusal that the
roles promise is asked for.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import joblib
import pytest
import redis

from taskstack import ClusterExecutor, Pool, names
from taskstack.app import create_app
from taskstack.connections import connect
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Service, Worker, free_port, start, start_flower, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
REDIS_DIR = ROOT / "services" / "redis"
USERS = ("admin", "worker", "client", "client-b", "monitor", "replica", "sentinel")


@dataclass
class SecureRedis:
    port: int
    ca: Path
    passwords: dict[str, str]
    service: Service

    def settings(self, base: Settings, user: str) -> Settings:
        return replace(
            base,
            redis_url=f"rediss://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0",
            redis_tls_ca_file=str(self.ca),
        )

    def client(self, user: str, **options: object) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_cert_reqs": "required"}
        kwargs = {**tls, "socket_timeout": 5.0, **options}
        return redis.Redis(port=self.port, username=user, password=self.passwords[user], **kwargs)  # type: ignore[arg-type]


def lib_sh(function: str, *args: str, env: dict[str, str]) -> str:
    """Output of a function of the image's services/redis/lib.sh, run here by sh."""
    script = f'. "{REDIS_DIR}/lib.sh" && {function} "$@"'
    result = subprocess.run(
        ["sh", "-c", script, "lib.sh", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory, logs_dir: Path) -> Iterator[SecureRedis]:
    secrets_dir = tmp_path_factory.mktemp("secrets")
    subprocess.run(
        [ROOT / "scripts" / "swarm-certs"],
        env={**os.environ, "TASKSTACK_SECRETS_DIR": str(secrets_dir)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwords = {user: secrets.token_urlsafe(16) for user in USERS}
    for user, password in passwords.items():
        (secrets_dir / f"redis_user_{user}").write_text(password)
    port = free_port()
    tls = {
        "REDIS_TLS_CERT_FILE": str(secrets_dir / "redis_tls.crt"),
        "REDIS_TLS_KEY_FILE": str(secrets_dir / "redis_tls.key"),
        "REDIS_TLS_CA_FILE": str(secrets_dir / "redis_ca.crt"),
    }
    users = lib_sh(
        "acl_users", str(REDIS_DIR / "users.acl"), env={"REDIS_USERS_DIR": str(secrets_dir)}
    )
    data = tmp_path_factory.mktemp("redis-tls")
    config = data / "redis.conf"
    config.write_text(
        f"bind 127.0.0.1\ndir {data}\nappendonly no\nsave ''\n{users}"
        + lib_sh("tls_config", str(port), env=tls)
    )
    config.chmod(0o600)
    service = start("redis-tls", ["redis-server", str(config)], dict(os.environ), logs_dir)
    stack = SecureRedis(port, secrets_dir / "redis_ca.crt", passwords, service)
    with stack.client("admin") as admin:
        wait_for(admin.ping, 20, f"redis-server over TLS (log: {service.log})")
        admin.acl_log_reset()
    yield stack
    with stack.client("admin") as admin:  # what was refused, for the log
        (logs_dir / "redis-tls-acl.log").write_text("\n".join(map(str, admin.acl_log(count=100))))
    service.stop()


@pytest.fixture(scope="module")
def secure_worker(
    secure_redis: SecureRedis, base_settings: Settings, start_worker: Callable[..., Worker]
) -> Worker:
    return start_worker(names.CPU_QUEUE, secure_redis.settings(base_settings, "worker"))


def test_every_role_does_its_work_and_redis_refuses_nothing(
    secure_redis: SecureRedis, secure_worker: Worker, base_settings: Settings, logs_dir: Path
) -> None:
    flower = start_flower(secure_redis.settings(base_settings, "monitor"), logs_dir, "flower-tls")
    try:
        client = secure_redis.settings(base_settings, "client")
        with ClusterExecutor(settings=client) as executor:
            assert list(executor.map(work.square, range(200))) == [x * x for x in range(200)]
            assert executor.submit(work.add, 2, 3).result(timeout=30) == 5
            # Shared data: a big argument goes once to Redis and is fetched by the worker.
            blob = secrets.token_bytes(client.shared_min_bytes + 1)
            assert executor.submit(len, blob).result(timeout=30) == len(blob)
            assert executor._dispatcher.reply_key.startswith(names.REPLY_KEY_PREFIX + "client:")
        with Pool(settings=client) as pool:
            assert pool.map(work.square, range(50)) == [x * x for x in range(50)]
        with joblib.parallel_config(backend="taskstack", settings=client):
            out = joblib.Parallel(n_jobs=2)(joblib.delayed(work.add)(x, 1) for x in range(20))
        assert out == list(range(1, 21))
        app = create_app(client)
        try:
            assert app.send_task(names.COUNT_PRIMES, args=[0, 1000]).get(timeout=30) == 168
        finally:
            app.close()
        status, body = flower.get("/api/workers?refresh=1")
        assert status == 200 and secure_worker.node in body
        wait_for(
            lambda: names.COUNT_PRIMES in flower.get("/api/tasks")[1], 30, "Flower to list the task"
        )
        assert flower.get("/broker")[0] == 200
    finally:
        flower.service.stop()

    with secure_redis.client("admin") as admin:
        refused = admin.acl_log()
    assert refused == [], refused


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("KEYS", "*"),
        ("LRANGE", names.reply_key("client-b", "0" * 32), 0, -1),
        ("BLPOP", names.reply_key("client-b", "0" * 32), 1),
        ("SET", names.DEAD_LETTERS_KEY, "x"),
    ],
)
def test_a_client_may_not(secure_redis: SecureRedis, command: tuple[object, ...]) -> None:
    with (
        secure_redis.client("client") as client,
        pytest.raises(redis.exceptions.NoPermissionError),
    ):
        client.execute_command(*command)


@pytest.mark.parametrize(
    "command",
    [
        ("SET", "anything", "x"),
        ("LPUSH", names.CPU_QUEUE, "{}"),
        ("DEL", names.DEAD_LETTERS_KEY),
        ("HSET", "unacked", "x", "y"),
        ("FLUSHALL",),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("EVAL", "return redis.call('SET', KEYS[1], 1)", 1, "x"),
    ],
)
def test_the_monitor_may_read_but_never_write(
    secure_redis: SecureRedis, command: tuple[object, ...]
) -> None:
    with secure_redis.client("monitor") as monitor:
        assert monitor.llen(names.CPU_QUEUE) >= 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            monitor.execute_command(*command)


def test_a_client_without_the_ca_is_refused(secure_redis: SecureRedis) -> None:
    # The system's CAs, as a client that was not given REDIS_TLS_CA_FILE has.
    client = connect(
        f"rediss://client:{secure_redis.passwords['client']}@127.0.0.1:{secure_redis.port}/0"
    )
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        client.ping()
    client.close()


def test_plaintext_to_the_tls_port_is_refused(secure_redis: SecureRedis) -> None:
    client = redis.Redis(
        port=secure_redis.port, username="client", password=secure_redis.passwords["client"]
    )
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()
