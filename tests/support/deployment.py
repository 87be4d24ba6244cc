"""What the deployment files say: the services of compose.yaml and stack.yaml (PyYAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

DEPLOYMENT_FILES = (ROOT / "compose.yaml", ROOT / "stack.yaml")
"""The files that run the stack's services with Docker (Compose, Swarm)."""


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())  # anchors, aliases and merge keys resolved
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


def yaml_text(path: Path) -> str:
    """The file's data written out again: what Docker reads, comments left out."""
    return yaml.safe_dump(_load(path), sort_keys=False)


def yaml_services(path: Path) -> dict[str, dict[str, Any]]:
    """Each service's settings, with ``<<`` merge keys applied."""
    services = _load(path).get("services", {})
    assert isinstance(services, dict)
    return services


def flow_list(value: object) -> list[str]:
    """A command or healthcheck test as a list of strings."""
    assert isinstance(value, list), f"not a list: {value!r}"
    return [str(item) for item in value]
