"""A private LAN of network namespaces: a bridge, this machine and hosts cabled to it.

Shared by the compose tests' private Docker hosts (``tests/compose/hosts.py``)
and the multi-host benchmark (``scripts/bench_hosts.py``). Each user names its
own :class:`Lan` (a name prefix and a /24 in the shared address space
``100.64.0.0/10``, which Docker never allocates from), so that a benchmark and
a test session can run side by side. The LAN's bridge lives in a namespace of
its own; this machine is ``.1`` on it and host ``i`` is ``.(1 + i)``, in a
namespace named ``<prefix>host<i>``. Needs root and ``ip``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from scripts.commands import run


@dataclass(frozen=True)
class Lan:
    """One private LAN's names and addresses."""

    prefix: str
    """Of every namespace and interface it makes, e.g. ``taskstack-``."""
    subnet: str
    """The first three octets of its /24, e.g. ``100.64.231``."""

    @property
    def namespace(self) -> str:
        """The network namespace of the LAN's bridge."""
        return f"{self.prefix}lan"

    @property
    def host_prefix(self) -> str:
        return f"{self.prefix}host"

    @property
    def machine_link(self) -> str:
        """This machine's interface on the LAN (at most 15 characters, as every interface)."""
        return f"{self.prefix}lan"

    @property
    def machine_address(self) -> str:
        return f"{self.subnet}.1"

    def host_name(self, index: int) -> str:
        """Host ``index``'s (from 1) network namespace and hostname."""
        return f"{self.host_prefix}{index}"

    def host_address(self, index: int) -> str:
        return f"{self.subnet}.{1 + index}"

    def build(self, hosts: Sequence[str]) -> None:
        """The LAN's namespace with its bridge, this machine and every host cabled to it;
        ``hosts[i]`` gets address ``.(2 + i)``."""
        lan = self.namespace
        run("ip", "netns", "add", lan)
        run("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", lan, "link", "set", "br0", "up")
        # Each veth pair is created with its ends in place: this machine gets one interface.
        run(
            *("ip", "link", "add", self.machine_link, "type", "veth"),
            *("peer", "name", "machine", "netns", lan),
        )
        run("ip", "addr", "add", f"{self.machine_address}/24", "dev", self.machine_link)
        run("ip", "link", "set", self.machine_link, "up")
        run("ip", "-n", lan, "link", "set", "machine", "master", "br0", "up")
        for i, name in enumerate(hosts, start=2):
            port = name.removeprefix(self.prefix)
            run("ip", "netns", "add", name)
            run(
                *("ip", "link", "add", "eth0", "netns", name, "type", "veth"),
                *("peer", "name", port, "netns", lan),
            )
            run("ip", "-n", lan, "link", "set", port, "master", "br0", "up")
            run("ip", "-n", name, "addr", "add", f"{self.subnet}.{i}/24", "dev", "eth0")
            run("ip", "-n", name, "link", "set", "eth0", "up")
            run("ip", "-n", name, "link", "set", "lo", "up")

    def remove(self) -> None:
        """Delete the LAN's and its hosts' namespaces, and with them every interface in them."""
        listed = run("ip", "netns", "list").split("\n")
        for name in (line.split(" ")[0] for line in listed):
            if name == self.namespace or name.startswith(self.host_prefix):
                with contextlib.suppress(subprocess.CalledProcessError):
                    run("ip", "netns", "del", name)
        # Gone with its peer in the LAN's namespace; this is for a namespace deleted by hand.
        with contextlib.suppress(subprocess.CalledProcessError):
            run("ip", "link", "del", self.machine_link)
