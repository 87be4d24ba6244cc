"""One typed settings object (taskstack/settings.py): read from the environment, checked."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from celery.app.utils import filter_hidden_settings

from taskstack import connections, names
from taskstack.app import create_app
from taskstack.errors import SettingsError
from taskstack.settings import Settings

URL = "redis://:pw@redis:6379/0"


def test_defaults_are_safe_for_loopback() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert "taskstack-local" in settings.redis_url
    settings.check_exposure()


def test_from_env_parses_every_type() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": URL,
            "WORKER_CPU_CONCURRENCY": "3",
            "TASK_SOFT_TIME_LIMIT": "9.5",
            "TASK_TIME_LIMIT": "10",
            "LEASE_SECONDS": "6.5",
            "FLOWER_USER": "ops",
            "WORKER_IO_CONCURRENCY": "",  # empty means unset, as compose passes ${VAR:-}
        }
    )
    assert settings.redis_url == URL
    assert settings.cpu_concurrency == 3
    assert settings.soft_time_limit == 9.5
    assert settings.lease_seconds == 6.5
    assert settings.io_concurrency == Settings().io_concurrency
    assert settings.flower_basic_auth.startswith("ops:")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "redis://redis:6379/0"}, "REDIS_URL has no password"),
        ({"REDIS_URL": "http://:pw@redis"}, "REDIS_URL must start with redis://"),
        (
            {"WORKER_CPU_CONCURRENCY": "two"},
            "WORKER_CPU_CONCURRENCY must be a valid int, got 'two'",
        ),
        ({"WORKER_IO_CONCURRENCY": "0"}, "WORKER_IO_CONCURRENCY must be positive"),
        ({"TASK_SOFT_TIME_LIMIT": "50", "TASK_TIME_LIMIT": "40"}, "must be below TASK_TIME_LIMIT"),
        ({"REDIS_VISIBILITY_TIMEOUT": "100"}, "REDIS_VISIBILITY_TIMEOUT is no longer read"),
        ({"LEASE_SECONDS": "1"}, "LEASE_SECONDS must be at least 2.0, got 1.0"),
        ({"LEASE_SECONDS": "ten"}, "LEASE_SECONDS must be a valid float, got 'ten'"),
        ({"LEASE_SWEEP_SECONDS": "0"}, "LEASE_SWEEP_SECONDS must be positive"),
        ({"LEASE_SWEEP_SECONDS": "20"}, "LEASE_SWEEP_SECONDS (20.0) must not exceed"),
        ({"BIND_ADDRESS": "everywhere"}, "BIND_ADDRESS must be an IP address"),
        ({"PROMETHEUS_PORT": "0"}, "PROMETHEUS_PORT must be positive"),
        ({"PROMETHEUS_PORT": "90900"}, "PROMETHEUS_PORT must be a port number, got 90900"),
        ({"REDIS_SENTINELS": "s1:26379,s2"}, "REDIS_SENTINELS must list HOST:PORT addresses"),
        ({"REDIS_SENTINELS": "s1:0"}, "got 's1:0'"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert message in str(error.value)


def test_tasks_may_run_far_longer_than_the_lease() -> None:
    """Live workers renew their claims: the time limit is no longer bounded by the lease."""
    settings = Settings.from_env({"TASK_TIME_LIMIT": "86400", "TASK_SOFT_TIME_LIMIT": "86000"})
    assert settings.time_limit > 1000 * settings.lease_seconds


def test_exposed_stack_refuses_default_secrets() -> None:
    exposed = Settings.from_env({"BIND_ADDRESS": "0.0.0.0"})
    with pytest.raises(SettingsError, match="REDIS_PASSWORD, FLOWER_PASSWORD, TASKSTACK_SECRET"):
        exposed.check_exposure()
    Settings.from_env(
        {
            "BIND_ADDRESS": "0.0.0.0",
            "REDIS_URL": URL,
            "FLOWER_PASSWORD": "x",
            "TASKSTACK_SECRET": "y",
        }
    ).check_exposure()


def test_every_variable_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-a-file\n")  # as `echo value > file` writes it
    (tmp_path / "limit").write_text("7")
    settings = Settings.from_env(
        {
            "TASKSTACK_SECRET_FILE": str(tmp_path / "secret"),
            "WORKER_CPU_CONCURRENCY_FILE": str(tmp_path / "limit"),
        }
    )
    assert settings.secret == "from-a-file"
    assert settings.cpu_concurrency == 7


def test_redis_password_completes_a_url_without_one(tmp_path: Path) -> None:
    (tmp_path / "redis_password").write_text("p@ss:/ word")
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://redis:6379/0",
            "REDIS_PASSWORD_FILE": str(tmp_path / "redis_password"),
        }
    )
    assert settings.redis_url == "redis://:p%40ss%3A%2F%20word@redis:6379/0"
    assert urlsplit(settings.redis_url).hostname == "redis"
    assert unquote(urlsplit(settings.redis_url).password or "") == "p@ss:/ word"
    # The same password in both places is no conflict (a shell that sourced .env).
    assert Settings.from_env({"REDIS_URL": URL, "REDIS_PASSWORD": "pw"}).redis_url == URL


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TASKSTACK_SECRET": "a", "TASKSTACK_SECRET_FILE": "{dir}/given"},
            "set TASKSTACK_SECRET or TASKSTACK_SECRET_FILE, not both",
        ),
        ({"FLOWER_PASSWORD_FILE": "{dir}/missing"}, "FLOWER_PASSWORD_FILE='{dir}/missing' cannot"),
        ({"TASKSTACK_SECRET_FILE": "{dir}/empty"}, "TASKSTACK_SECRET_FILE='{dir}/empty' is empty"),
        ({"REDIS_URL": URL, "REDIS_PASSWORD": "other"}, "REDIS_URL has a password other than"),
        ({"WORKER_IO_CONCURRENCY_FILE": "{dir}/given"}, "WORKER_IO_CONCURRENCY must be a valid"),
    ],
)
def test_bad_files_name_the_variable(tmp_path: Path, env: dict[str, str], message: str) -> None:
    (tmp_path / "given").write_text("value")
    (tmp_path / "empty").write_text("\n")
    env = {name: value.format(dir=tmp_path) for name, value in env.items()}
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert message.format(dir=tmp_path) in str(error.value)


def test_without_redis_url_the_port_and_password_make_one() -> None:
    # What a client on the host reaches: the Redis that `docker compose up` publishes.
    assert (
        Settings.from_env({"REDIS_PORT": "6390"}).redis_url
        == "redis://:taskstack-local@127.0.0.1:6390/0"
    )
    assert Settings.from_env({"REDIS_PASSWORD": "pw"}).redis_url == "redis://:pw@127.0.0.1:6379/0"


def test_redis_port_and_password_together_make_the_url() -> None:
    settings = Settings.from_env({"REDIS_PORT": "6390", "REDIS_PASSWORD": "pw"})
    assert settings.redis_url == "redis://:pw@127.0.0.1:6390/0"


@pytest.mark.parametrize("port", ["x", "0", "65536", "-1", "63 79"])
def test_a_bad_redis_port_names_the_variable(port: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_PORT"):
        Settings.from_env({"REDIS_PORT": port})


def test_task_modules_are_a_comma_separated_list_of_module_names() -> None:
    settings = Settings.from_env({"TASK_MODULES": "tasks, myteam.tasks"})
    assert settings.task_modules == ("tasks", "myteam.tasks")
    with pytest.raises(SettingsError, match="TASK_MODULES names 'not a module!'"):
        Settings.from_env({"TASK_MODULES": "not a module!"})


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        Settings(
            redis_url="redis://user:p%40ss@redis.example:6390/2",
            cpu_concurrency=3,
            io_concurrency=5,
            soft_time_limit=9.5,
            time_limit=12.0,
            lease_seconds=4.0,
            lease_sweep_seconds=1.0,
            result_expires=120,
            max_tasks_per_child=10,
            max_memory_per_child=1000,
            max_payload_bytes=4096,
            secret="s3cret",
            flower_user="ops",
            flower_password="pw",
            bind_address="0.0.0.0",
            task_modules=("tasks", "myteam.tasks"),
            redis_sentinels=("s1:26379", "s2:26380"),
            redis_master_name="main",
        ),
    ],
    ids=["defaults", "every field set"],
)
def test_to_env_round_trips_through_from_env(settings: Settings) -> None:
    assert Settings.from_env(settings.to_env()) == settings


def test_with_sentinels_every_connection_asks_them_for_the_primary() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://:p%40ss@ignored:6379/3",
            "REDIS_SENTINELS": "s1:26379, s2:26380,s3:26381",
            "REDIS_MASTER_NAME": "main",
        }
    )
    assert settings.redis_sentinels == ("s1:26379", "s2:26380", "s3:26381")
    address = settings.redis_address
    assert address == "redis+sentinel://:p%40ss@s1:26379,s2:26380,s3:26381/3?master=main"
    assert settings.shared_url == address
    sentinels, master, credentials = connections.sentinel_parts(address)
    assert sentinels == [("s1", 26379), ("s2", 26380), ("s3", 26381)]
    assert (master, credentials, connections.database(address)) == ("main", {"password": "p@ss"}, 3)
    broker, options, tls = connections.kombu_broker(address)
    assert tls == {}
    assert broker.split(";") == [
        f"sentinel://:p%40ss@{host}/3" for host in ("s1:26379", "s2:26380", "s3:26381")
    ]
    assert options["master_name"] == "main"
    assert options["sentinel_kwargs"]["password"] == "p@ss"
    assert "p%40ss" not in connections.masked(address)


def test_without_sentinels_the_broker_is_redis_url() -> None:
    settings = Settings.from_env({"REDIS_URL": URL})
    assert settings.redis_address == URL
    assert connections.kombu_broker(URL) == (URL, {}, {})


def test_with_sentinels_the_app_takes_kombus_sentinel_transport_and_backend() -> None:
    settings = Settings(redis_url=URL, redis_sentinels=("s1:26379", "s2:26379"))
    app = create_app(settings)
    try:
        assert app.conf.broker_url == "sentinel://:pw@s1:26379/0;sentinel://:pw@s2:26379/0"
        assert app.conf.result_backend == app.conf.broker_url
        options = app.conf.broker_transport_options
        assert options["master_name"] == "taskstack"
        assert options["visibility_timeout"] == settings.lease_seconds  # today's options kept
        assert app.conf.result_backend_transport_options["master_name"] == "taskstack"
        assert app.conf[names.REDIS_SETTING] == settings.redis_address
        # Celery's inspection of a worker's configuration hides the password.
        shown = str(filter_hidden_settings(app.conf.table()))
        assert ":pw@" not in shown
    finally:
        app.close()


def test_tls_verifies_the_server_against_the_ca_file(tmp_path: Path) -> None:
    ca = tmp_path / "redis_ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://worker@redis-1:6379/2",
            "REDIS_PASSWORD": "pw",
            "REDIS_TLS_CA_FILE": str(ca),
        }
    )
    address = settings.redis_address
    assert address.startswith("rediss://worker:pw@redis-1:6379/2?ssl_cert_reqs=required")
    tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": str(ca)}
    assert connections.tls_options(address) == tls
    broker, options, broker_tls = connections.kombu_broker(address)
    assert (broker, options, broker_tls) == ("rediss://worker:pw@redis-1:6379/2", {}, tls)
    client = connections.connect(address)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"], kwargs["username"]) == (
        str(ca),
        "required",
        "worker",
    )
    client.close()


def test_tls_with_sentinels_reaches_them_over_tls_too(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://client:pw@ignored/0",
            "REDIS_SENTINELS": "s1:26379,s2:26379",
            "REDIS_TLS_CA_FILE": str(ca),
        }
    )
    address = settings.redis_address
    assert address.startswith("rediss+sentinel://client:pw@s1:26379,s2:26379/0?master=taskstack&")
    broker, options, tls = connections.kombu_broker(address)
    assert broker == "sentinel://client:pw@s1:26379/0;sentinel://client:pw@s2:26379/0"
    # The primary, named by its IP address, is checked against the CA; the Sentinels by name.
    assert tls == {
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": str(ca),
        "ssl_check_hostname": False,
    }
    sentinel_kwargs = options["sentinel_kwargs"]
    assert sentinel_kwargs | {"ssl_check_hostname": True} == sentinel_kwargs
    assert (sentinel_kwargs["ssl"], sentinel_kwargs["ssl_ca_certs"]) == (True, str(ca))
    assert json.loads(json.dumps(options)) == options  # a worker's `inspect conf` answer


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "redis://:pw@h/0"}, "REDIS_URL does not start with rediss://"),
        ({"REDIS_URL": "rediss://:pw@h/0"}, "cannot be read"),
    ],
)
def test_a_ca_file_needs_tls_and_must_be_readable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**env, "REDIS_TLS_CA_FILE": "/nonexistent/ca.crt"})
