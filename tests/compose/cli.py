"""The ``docker`` CLI aimed at one engine, with a timeout on every command.

:data:`LOCAL` is the engine the environment names (the developer's own); the
private hosts of tests/compose/hosts.py each have a :class:`Docker` of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

from scripts.commands import COMMAND_TIMEOUT, run

__all__ = ["COMMAND_TIMEOUT", "LOCAL", "Docker", "run"]


@dataclass(frozen=True)
class Docker:
    host: str | None = None
    """The engine's address, e.g. ``unix:///tmp/.../docker.sock``; ``None``: the local one."""

    def __call__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdin: IO[bytes] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> str:
        return run(*self.argv(*args), env=env, stdin=stdin, timeout=timeout)

    def argv(self, *args: str) -> list[str]:
        """The command line of ``docker <args>`` on this engine."""
        return ["docker", *(() if self.host is None else ("--host", self.host)), *args]


LOCAL = Docker()
