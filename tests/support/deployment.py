"""What the deployment files say: the services of compose.yaml and stack.yaml.

PyYAML is no dependency of the project: :func:`yaml_services` reads the subset
of YAML these files use (block mappings, anchors, aliases, merge keys) and
leaves values as they are written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.support import ROOT

DEPLOYMENT_FILES = (ROOT / "compose.yaml", ROOT / "stack.yaml")
"""The files that run the stack's services with Docker (Compose, Swarm)."""

YamlNode = dict[str, "YamlNode"] | str
"""A mapping, or a value as written (a scalar, a flow list, or a block list's lines)."""

_KEY = re.compile(r"^(?P<indent> *)(?P<key><<|[^\s:#'\"\-][^:]*?):(?:\s+(?P<value>.*))?$")


def _uncommented(line: str) -> str:
    """``line`` without its comment: a ``#`` that starts a token outside quotes."""
    quote = ""
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1  # an escaped character, e.g. \" inside "..."
            elif char == quote:
                quote = ""
        elif char in "'\"" and (i == 0 or line[i - 1] in " [{,:"):
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def yaml_text(path: Path) -> str:
    """A YAML file's content without its comments (what Docker reads of it)."""
    return "\n".join(_uncommented(line) for line in path.read_text().splitlines())


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _parse(lines: list[str], anchors: dict[str, YamlNode]) -> dict[str, YamlNode]:
    """The block mapping whose keys are indented as ``lines[0]``; merge keys resolved."""
    if not lines:
        return {}
    depth = _indent(lines[0])
    entries: list[tuple[str, str, list[str]]] = []  # (key, value on its line, lines below)
    for line in lines:
        match = _KEY.match(line)
        if match and len(match["indent"]) == depth:
            entries.append((match["key"], match["value"] or "", []))
        elif entries:
            entries[-1][2].append(line)
    own: dict[str, YamlNode] = {}
    merged: dict[str, YamlNode] = {}
    for key, written, below in entries:
        anchor, _, written = (
            written.partition(" ") if written.startswith("&") else ("", "", written)
        )
        value: YamlNode
        if written.startswith("*"):
            value = anchors[written[1:]]
        elif written:
            value = written
        elif below and _KEY.match(below[0]):
            value = _parse(below, anchors)
        else:
            value = "\n".join(line.strip() for line in below)
        if anchor:
            anchors[anchor[1:]] = value
        if key == "<<":
            assert isinstance(value, dict), f"<< merges a mapping, not {value!r}"
            merged.update(value)
        else:
            own[key] = value
    return {**merged, **own}  # a service's own keys override what it merges


def yaml_services(path: Path) -> dict[str, dict[str, YamlNode]]:
    """Each service of a Compose or Swarm file, with the anchors it merges (``<<: *python``).

    Values stay as written; flow lists such as ``command: ["taskstack-worker", "cpu"]``
    are JSON (see :func:`flow_list`).
    """
    lines = [line for line in yaml_text(path).splitlines() if line.strip()]
    document = _parse(lines, {})
    services = document["services"]
    assert isinstance(services, dict), f"{path.name}: services is no mapping"
    return {name: service for name, service in services.items() if isinstance(service, dict)}


def flow_list(value: YamlNode) -> list[str]:
    """A flow list of strings as written, e.g. ``["CMD", "taskstack-worker", "cpu", "--ping"]``."""
    assert isinstance(value, str), f"expected a flow list, got the mapping {value!r}"
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(item, str) for item in parsed), value
    return parsed
