"""Redis over TLS with one ACL user per role, as stack.yaml runs it, on loopback.

The redis-server takes the users and TLS lines that the image's entrypoint writes
(services/redis/lib.sh, from users.acl and the password files), and the certificates
of ``scripts/swarm-certs`` (``scripts/bench_tls.py`` starts it, for its benchmark too). A worker connects as ``worker``, Flower as ``monitor``,
the executor, Pool, joblib and a plain task as ``client``: everything runs, and Redis's
``ACL LOG`` stays empty, which is how users.acl was derived. Then each refusal that the
roles promise is asked for.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import joblib
import pytest
import redis

from scripts.bench_tls import REDIS_DIR, TlsRedis, lib_sh, tls_redis
from taskstack import ClusterExecutor, Pool, names
from taskstack.app import create_app
from taskstack.connections import connect
from taskstack.settings import Settings
from tests.integration import work
from tests.support import Worker, free_port, require, start_flower, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

USERS = ("admin", "worker", "client", "client-b", "monitor", "replica", "sentinel")


@dataclass
class SecureRedis:
    server: TlsRedis

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def passwords(self) -> dict[str, str]:
        return self.server.passwords

    def settings(self, base: Settings, user: str) -> Settings:
        return replace(base, redis_url=self.server.url(user), redis_tls_ca_file=str(self.server.ca))

    def client(self, user: str, **options: object) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.server.ca), "ssl_cert_reqs": "required"}
        kwargs = {**tls, "socket_timeout": 5.0, **options}
        return redis.Redis(port=self.port, username=user, password=self.passwords[user], **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory, logs_dir: Path) -> Iterator[SecureRedis]:
    """The redis-server of ``scripts/bench.py --tls-overhead``: the image's ACL and TLS lines."""
    require(shutil.which("redis-server") is not None, "redis-server")
    with tls_redis(tmp_path_factory.mktemp("redis-tls"), 1024**3, users=USERS) as server:
        stack = SecureRedis(server)
        yield stack
        with stack.client("admin") as admin:  # what was refused, for the log
            refused = admin.acl_log(count=100)
        (logs_dir / "redis-tls-acl.log").write_text("\n".join(map(str, refused)))


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
            # Celery's control, with its replies: the client user may ask the workers too.
            assert app.control.ping(destination=[secure_worker.node], timeout=5)
            stats = app.control.inspect(destination=[secure_worker.node], timeout=5).stats()
            assert secure_worker.node in (stats or {})
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


def test_a_restart_replays_every_transaction_of_the_append_only_file(tmp_path: Path) -> None:
    # Redis replays its append-only file as the default user, which the stack turns off:
    # with no rules of its own, Redis 7 dropped every MULTI/EXEC block of it (NOPERM).
    for user in ("worker", "admin"):
        (tmp_path / f"redis_user_{user}").write_text(user)
    users = lib_sh(
        "acl_users", str(REDIS_DIR / "users.acl"), env={"REDIS_USERS_DIR": str(tmp_path)}
    )
    port = free_port()
    config = tmp_path / "redis.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\nappendonly yes\nsave ''\n{users}"
    )
    client = redis.Redis(port=port, username="worker", password="worker", socket_timeout=5)
    admin = redis.Redis(port=port, username="admin", password="admin", socket_timeout=5)

    servers: list[subprocess.Popen[bytes]] = []

    def restarted() -> None:
        servers.append(subprocess.Popen(["redis-server", str(config)], stdout=subprocess.DEVNULL))
        wait_for(client.ping, 20, "redis-server")

    try:
        restarted()
        with client.pipeline(transaction=True) as pipe:  # as kombu keeps a delivered message
            pipe.hset("unacked", "tag", "message")
            pipe.zadd("unacked_index", {"tag": 1})
            pipe.execute()
        admin.shutdown()  # writes the append-only file out
        servers[-1].wait(timeout=20)
        restarted()
        assert client.hget("unacked", "tag") == b"message"
        assert client.zcard("unacked_index") == 1
    finally:
        for server in servers:  # whatever failed, no redis-server outlives the test
            if server.poll() is None:
                server.kill()
                server.wait(timeout=20)
        client.close()
        admin.close()
