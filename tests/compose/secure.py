"""compose.tls.yaml in the compose tier: the stack with Redis over TLS and a Redis user per
role, as stack.yaml runs it, its secrets made by scripts/swarm-secrets and handed to
Compose as the docs say (``eval "$(scripts/swarm-secrets --env)"``)."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support import ROOT, run

if TYPE_CHECKING:
    from tests.compose.conftest import Stack

TLS_FILE = ROOT / "compose.tls.yaml"
SECRETS = ROOT / "scripts" / "swarm-secrets"
CA_IN_CONTAINERS = "/run/secrets/redis_ca.crt"


def with_tls(stack: Stack, directory: Path) -> Stack:
    """``stack`` with compose.tls.yaml over it, and fresh secrets in ``directory``."""
    run([str(SECRETS)], env={**os.environ, "TASKSTACK_SECRETS_DIR": str(directory)})
    return dataclasses.replace(stack, secrets=directory, files=(*stack.files, TLS_FILE))


@functools.cache
def environment(directory: Path) -> dict[str, str]:
    """What ``eval "$(scripts/swarm-secrets --env)"`` exports, for ``docker compose``."""
    script = f'eval "$("{SECRETS}" --env)" && env -0'
    shown = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": os.environ["PATH"], "TASKSTACK_SECRETS_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    pairs = (entry.partition("=") for entry in shown.split("\0") if entry)
    return {
        name: value for name, _, value in pairs if name.startswith(("REDIS_USER_", "REDIS_TLS_"))
    }


def password(directory: Path, user: str) -> str:
    return (directory / f"redis_user_{user}").read_text()


def url(directory: Path, user: str, address: str) -> str:
    """``rediss://`` as ``user`` at ``address`` (``HOST:PORT``)."""
    return f"rediss://{user}:{password(directory, user)}@{address}/0"


def internal_url(directory: Path) -> str:
    """Redis as a worker reaches it from its container, with the CA secret compose.tls.yaml
    gives it: a worker-side test function connects with it."""
    return f"{url(directory, 'worker', 'redis:6379')}?ssl_cert_reqs=required&ssl_ca_certs={CA_IN_CONTAINERS}"
