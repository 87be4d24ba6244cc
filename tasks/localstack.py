"""The stack as local processes, for machines without Docker: ``taskstack-local``.

Starts ``redis-server`` (unless ``REDIS_URL`` names one), a ``cpu`` worker, an
``io`` worker and Flower, prefixes their output with their names, and stops
them all on Ctrl-C (honcho does the process management). The integration
tests start the very same commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from tasks import constants
from tasks.settings import Settings, SettingsError

STATE_DIR = Path(".taskstack")


def redis_config(password: str, port: int, data_dir: Path) -> str:
    """A redis.conf for the stack: password, append-only file, never evict queued work."""
    return "\n".join(
        [
            "bind 127.0.0.1 ::1",
            f"port {port}",
            f'requirepass "{password}"',
            f'dir "{data_dir}"',
            "appendonly yes",
            "maxmemory-policy noeviction",
            "save ''",
            "",
        ]
    )


def write_redis_config(settings: Settings, data_dir: Path) -> Path:
    """Write the config for the Redis named by ``settings.redis_url``, readable by us only."""
    url = urlsplit(settings.redis_url)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "redis.conf"
    path.touch(mode=0o600)
    path.write_text(redis_config(url.password or "", url.port or 6379, data_dir.resolve()))
    return path


def worker_command(queue: str, hostname: str = "%h") -> list[str]:
    return [sys.executable, "-m", "tasks.worker", queue, f"--hostname={hostname}"]


def flower_command(port: int, db: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "tasks.monitor", f"--port={port}"]
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
    from honcho.manager import Manager  # only this command needs honcho

    parser = argparse.ArgumentParser(prog="taskstack-local", description=__doc__)
    parser.add_argument("--flower-port", type=int, default=int(os.environ.get("FLOWER_PORT", 5555)))
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        settings.check_exposure()
        commands: dict[str, list[str]] = {}
        if not os.environ.get("REDIS_URL"):
            commands["redis"] = redis_command(
                write_redis_config(settings, args.state_dir / "redis")
            )
    except (SettingsError, FileNotFoundError) as exc:
        sys.exit(f"taskstack-local: {exc}")
    for queue in constants.QUEUES:
        commands[f"worker-{queue}"] = worker_command(queue)
    commands["flower"] = flower_command(args.flower_port, args.state_dir / "flower.db")
    manager = Manager()
    for name, command in commands.items():
        manager.add_process(name, shlex.join(command))
    print(
        f"Flower: http://127.0.0.1:{args.flower_port} (user {settings.flower_user!r})",
        file=sys.stderr,
    )
    manager.loop()
    sys.exit(manager.returncode)


if __name__ == "__main__":
    main()
