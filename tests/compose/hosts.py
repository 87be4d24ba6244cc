"""A second Docker host on this machine: its own engine in its own network namespace.

``second_host()`` creates a network namespace joined to this one by a veth
pair (a private link, ``100.64.231.0/24``, in the shared address space that
Docker never allocates from), and starts a second ``dockerd`` in it with its own
data, state, socket and hostname. To Swarm it is another machine: it joins over
the link, and the overlay network's VXLAN traffic crosses it. Needs root,
``ip``, ``iptables``, ``nsenter`` and ``unshare``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.compose.swarm import Docker
from tests.conftest import wait_for

LINK_PREFIX = "100.64.231"
START_TIMEOUT = 60
STOP_TIMEOUT = 30


def run(*argv: str) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        exc.add_note(f"stderr:\n{exc.stderr[-3000:]}")
        raise


def can_host_a_second_engine() -> bool:
    tools = ("ip", "iptables", "nsenter", "unshare", "dockerd")
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in tools)


@dataclass(frozen=True)
class Host:
    name: str
    """Its network namespace and hostname."""
    address: str
    """Its address on the link."""
    peer: str
    """This machine's address on the link (where the swarm manager listens)."""
    docker: Docker

    def cut_off(self) -> None:
        """Drop every packet in and out of the host, as when its network fails.

        Its engine and containers keep running; the swarm and Redis stop hearing
        from them. The overlay's VXLAN packets leave from this namespace too.
        """
        for chain in ("INPUT", "OUTPUT"):
            run(
                "nsenter",
                f"--net=/run/netns/{self.name}",
                "iptables",
                "-I",
                chain,
                "1",
                "-j",
                "DROP",
            )

    def esp_aead_available(self) -> bool:
        """Whether the kernel has AES-GCM for IPsec, which encrypted overlays need."""
        try:
            run(
                *("ip", "-n", self.name, "xfrm", "state", "add"),
                *("src", self.address, "dst", self.peer, "proto", "esp", "spi", "0x7a5c"),
                *("mode", "transport", "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128"),
            )
        except subprocess.CalledProcessError:
            return False
        run("ip", "-n", self.name, "xfrm", "state", "flush")
        return True


@contextlib.contextmanager
def second_host(directory: Path, name: str = "taskstack-host2") -> Iterator[Host]:
    """A Docker engine in a network namespace of its own; removed with all it ran afterwards."""
    link, inside = "tsh2-out", "tsh2-in"
    peer, address = f"{LINK_PREFIX}.1", f"{LINK_PREFIX}.2"
    socket = directory / "docker.sock"
    host = Host(name, address, peer, Docker(f"unix://{socket}"))
    engine: subprocess.Popen[bytes] | None = None
    remove_link(name, link)  # left over by a run that was killed
    try:
        run("ip", "netns", "add", name)
        run("ip", "link", "add", link, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", inside, "netns", name)
        run("ip", "addr", "add", f"{peer}/24", "dev", link)
        run("ip", "link", "set", link, "up")
        run("ip", "-n", name, "addr", "add", f"{address}/24", "dev", inside)
        run("ip", "-n", name, "link", "set", inside, "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        directory.mkdir(parents=True, exist_ok=True)
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup
        # hierarchies dockerd needs. unshare --uts gives it a hostname of its own.
        dockerd = [
            *("dockerd", "--storage-driver=vfs", f"--host=unix://{socket}"),
            f"--data-root={directory / 'data'}",
            f"--exec-root={directory / 'exec'}",
            f"--pidfile={directory / 'docker.pid'}",
        ]
        with open(directory / "dockerd.log", "wb") as log:
            engine = subprocess.Popen(
                [
                    *("nsenter", f"--net=/run/netns/{name}", "unshare", "--uts"),
                    *("sh", "-c", f'hostname {name} && exec "$@"', "sh", *dockerd),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: engine.poll() is not None or host.docker("info", "--format", "{{.Name}}"),
            START_TIMEOUT,
            f"the engine of {name}",
        )
        if engine.poll() is not None:
            log_tail = (directory / "dockerd.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"dockerd of {name} exited with {engine.returncode}:\n{log_tail}")
        yield host
    finally:
        if engine is not None and engine.poll() is None:
            # Its containers go down with it (no live-restore); it unmounts what it mounted.
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(engine.pid, signal.SIGKILL)
                engine.wait()
        remove_link(name, link)
        shutil.rmtree(directory, ignore_errors=True)


def remove_link(name: str, link: str) -> None:
    """Delete the namespace and the veth pair, where they exist."""
    with contextlib.suppress(subprocess.CalledProcessError):
        run("ip", "link", "del", link)  # takes its peer inside the namespace along
    with contextlib.suppress(subprocess.CalledProcessError):
        run("ip", "netns", "del", name)
