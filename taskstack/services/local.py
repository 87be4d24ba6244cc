"""The stack as local processes, for machines without Docker: ``taskstack-local``.

Starts ``redis-server`` (unless ``REDIS_URL`` names one), a ``cpu`` worker, an
``io`` worker, Flower and, when a ``prometheus`` binary is on PATH, Prometheus
with the compose stack's rules and dashboard (:mod:`taskstack.services.prometheus`;
without one it says so and runs the rest), prefixes their output with their
names (honcho does the process management). On Ctrl-C the workers, Flower and
Prometheus stop first, each given the workers' full soft shutdown, and Redis
last, so that the tasks the workers hand back reach it. The integration tests
start the very same commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from taskstack import names
from taskstack.services import dashboard, prometheus
from taskstack.settings import Settings
from taskstack.worker.shutdown import STOP_GRACE_PERIOD_SECONDS

STATE_DIR = Path(".taskstack")


def redis_config(password: str, port: int, data_dir: Path, maxmemory: int) -> str:
    """A redis.conf for the stack: password, append-only file, at most ``maxmemory`` bytes,
    never evict queued work (a full Redis refuses writes instead)."""
    return "\n".join(
        [
            "bind 127.0.0.1 ::1",
            f"port {port}",
            f'requirepass "{password}"',
            f'dir "{data_dir}"',
            "appendonly yes",
            f"maxmemory {maxmemory}",
            "maxmemory-policy noeviction",
            "save ''",
            "",
        ]
    )


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, readable by this user only (whatever its mode was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with open(fd, "w") as file:
        file.write(text)
    return path


def write_redis_config(settings: Settings, data_dir: Path) -> Path:
    """Write the config for the Redis named by ``settings.redis_url``, readable by us only."""
    url = urlsplit(settings.redis_url)
    config = redis_config(
        url.password or "", url.port or 6379, data_dir.resolve(), settings.redis_maxmemory
    )
    return write_private(data_dir / "redis.conf", config)


def metrics_ports(settings: Settings) -> dict[str, int]:
    """Each queue's worker -> the port of its item metrics (0: none)."""
    # One host, two workers: each serves its item metrics on a port of its own.
    base = settings.metrics_port
    return {queue: base + index if base else 0 for index, queue in enumerate(names.QUEUES)}


def prometheus_command(settings: Settings, flower_port: int, state_dir: Path) -> list[str]:
    """Write Prometheus's config and Flower's password file in ``state_dir``, readable by us
    only, and return its command; FileNotFoundError when it cannot run here."""
    template = prometheus.CONFIG_DIR / "prometheus.yml"
    if not template.is_file():
        raise FileNotFoundError(
            f"{template} is missing (Prometheus runs from a checkout): running without it"
        )
    ports = metrics_ports(settings).items()
    argv = prometheus.command(
        state_dir / "prometheus.yml", state_dir / "data", settings.prometheus_port
    )
    password_file = write_private(state_dir / "flower_password", settings.flower_password)
    config = prometheus.config(
        template.read_text(),
        flower=f"127.0.0.1:{flower_port}",
        flower_user=settings.flower_user,
        password_file=password_file.resolve(),
        workers={f"worker-{queue}": f"127.0.0.1:{port}" for queue, port in ports if port},
    )
    write_private(
        state_dir / "prometheus.yml", f"# Written by taskstack-local from {template}\n{config}"
    )
    return argv


def worker_command(queue: str, hostname: str = "%h") -> list[str]:
    return [sys.executable, "-m", "taskstack.worker.main", queue, f"--hostname={hostname}"]


def flower_command(port: int, db: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "taskstack.services.flower", f"--port={port}"]
    return command + ([f"--db={db}"] if db else [])


def redis_command(config: Path) -> list[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise FileNotFoundError(
            "redis-server is not installed: `apt-get install redis-server` "
            "(or `brew install redis`), or set REDIS_URL to a running Redis"
        )
    return [server, str(config)]


def main(argv: Sequence[str] | None = None) -> None:
    import honcho.manager  # only this command needs honcho

    parser = argparse.ArgumentParser(prog="taskstack-local", description=__doc__)
    parser.add_argument("--flower-port", type=int, default=int(os.environ.get("FLOWER_PORT", 5555)))
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    settings = Settings.for_service("taskstack-local")
    redis_argv: list[str] | None = None
    try:
        if not os.environ.get("REDIS_URL"):
            redis_argv = redis_command(write_redis_config(settings, args.state_dir / "redis"))
    except FileNotFoundError as exc:
        sys.exit(f"taskstack-local: {exc}")
    # Redis runs outside honcho, in a session of its own (Ctrl-C in the terminal
    # does not reach it), and stops only once honcho has stopped the rest.
    redis_process = subprocess.Popen(redis_argv, start_new_session=True) if redis_argv else None
    # honcho SIGKILLs whatever still runs 5 s after Ctrl-C: a worker needs its soft shutdown.
    honcho.manager.KILL_WAIT = STOP_GRACE_PERIOD_SECONDS
    manager = honcho.manager.Manager()
    for queue, port in metrics_ports(settings).items():
        env = dict(os.environ, WORKER_METRICS_PORT=str(port))
        manager.add_process(f"worker-{queue}", shlex.join(worker_command(queue)), env=env)
    flower = flower_command(args.flower_port, args.state_dir / "flower.db")
    manager.add_process("flower", shlex.join(flower))
    print(
        f"Flower: http://127.0.0.1:{args.flower_port} (user {settings.flower_user!r})",
        file=sys.stderr,
    )
    try:
        state = args.state_dir / "prometheus"
        manager.add_process(
            "prometheus", shlex.join(prometheus_command(settings, args.flower_port, state))
        )
        base = f"http://127.0.0.1:{settings.prometheus_port}"
        print(f"Prometheus: {base}, the dashboard: {dashboard.url(base)}", file=sys.stderr)
    except FileNotFoundError as exc:
        print(f"taskstack-local: {exc}", file=sys.stderr)
    try:
        manager.loop()
    finally:
        if redis_process is not None:
            redis_process.terminate()  # redis-server saves its append-only file and exits
            try:
                redis_process.wait(STOP_GRACE_PERIOD_SECONDS)
            except subprocess.TimeoutExpired:
                redis_process.kill()
                redis_process.wait()
    sys.exit(manager.returncode)


if __name__ == "__main__":
    main()
