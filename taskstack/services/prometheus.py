"""Prometheus for the local stack: the compose stack's config, pointed at this host.

``taskstack-local`` runs a ``prometheus`` binary (Debian's package has one) with
services/prometheus/prometheus.yml itself, rewritten only where a container's
view differs from this host's: the rule files are read where they lie in the
checkout (the very rules.yml and alerts.yml of the image, so the recording
rules, the alerts and with them the dashboard are the same), Flower is scraped
at its loopback port with its user and a password file, and the workers'
discovery by DNS becomes their loopback metrics ports. The intervals, the jobs
and their relabelling stay the compose file's own text, so the two cannot
drift apart.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "services" / "prometheus"
"""The compose stack's Prometheus files, in the checkout this package runs from."""

IMAGE_CONFIG_DIR = "/etc/taskstack/"
"""Where services/prometheus/Dockerfile puts them, as the rule files name them."""


def config(
    template: str,
    *,
    flower: str,
    flower_user: str,
    password_file: Path,
    workers: Mapping[str, str],
) -> str:
    """services/prometheus/prometheus.yml (``template``) for Prometheus on this host.

    ``flower`` and each of ``workers`` (compose service name -> address) is a
    ``host:port``; Flower's password is read from ``password_file``.
    """
    start, end, lines = _block(template, "rule_files")
    in_image = [line.strip().removeprefix("- ").strip("\"'") for line in lines[start + 1 : end]]
    rule_files = [str(CONFIG_DIR / path.removeprefix(IMAGE_CONFIG_DIR)) for path in in_image]
    text = _replace(template, "rule_files", rule_files)
    text = _replace(
        text, "basic_auth", {"username": flower_user, "password_file": str(password_file)}
    )
    text = _replace(text, "static_configs", [{"targets": [flower]}])
    # Each target carries the label DNS discovery would have given it, so that the
    # workers job's own relabelling makes it the same `service` label as in compose.
    targets = [
        {"targets": [address], "labels": {"__meta_dns_name": service}}
        for service, address in workers.items()
    ]
    return _replace(text, "dns_sd_configs", targets, as_key="static_configs")


def command(config_file: Path, data_dir: Path, port: int) -> list[str]:
    """Prometheus on 127.0.0.1:``port``, or FileNotFoundError saying why it cannot run."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError(
            "no prometheus on PATH: running without Prometheus, so without the dashboard "
            "(`apt-get install prometheus` or `brew install prometheus` adds them)"
        )
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def _block(text: str, key: str) -> tuple[int, int, list[str]]:
    """Where the one ``key:`` line of ``text`` is, and the lines indented under it."""
    lines = text.splitlines()
    found = [index for index, line in enumerate(lines) if line.strip() == f"{key}:"]
    if len(found) != 1:
        raise ValueError(f"{CONFIG_DIR / 'prometheus.yml'} has {len(found)} `{key}:`, not one")
    start = found[0]
    indent = _indent(lines[start])
    end = start + 1
    while end < len(lines) and lines[end].strip() and _indent(lines[end]) > indent:
        end += 1
    return start, end, lines


def _replace(text: str, key: str, value: object, *, as_key: str = "") -> str:
    """``text`` with its one ``key:`` block replaced by ``as_key: value``, in YAML's flow
    style (JSON is YAML)."""
    start, end, lines = _block(text, key)
    lines[start:end] = [f"{' ' * _indent(lines[start])}{as_key or key}: {json.dumps(value)}"]
    return "\n".join(lines) + "\n"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
