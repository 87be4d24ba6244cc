"""Docker hosts of the tests' own: engines in network namespaces, on a private LAN.

``private_hosts()`` builds a LAN in a network namespace of its own (a bridge,
``100.64.231.0/24``, in the shared address space that Docker never allocates
from; ``scripts/lan.py``, which the multi-host benchmark uses too, with names
and a subnet of its own): this machine is ``.1`` on it, and host ``i`` is
``.(1 + i)``. Each host is a network namespace with its own ``dockerd``, data,
socket and hostname, so that the swarm tests never run ``docker swarm`` on the
engine the developer's own projects run on. To Swarm the hosts are separate machines: they join over the
LAN, the overlay's VXLAN traffic crosses it, and a host cut off it is gone.
The images they run are built by this machine's engine and loaded into theirs.

Each engine also lives in PID and mount namespaces of its own, under
``setpriv --pdeathsig``: when the test session ends, however it ends, the kernel
ends the engine, its containers and its mounts (and its iptables rules go with
its network namespace). The namespaces and data directories are removed
afterwards; namespaces that a killed run left are removed first. The names are
fixed: one test session at a time on a machine makes hosts. Needs root, ``ip``,
``iptables``, ``nsenter``, ``unshare`` and ``setpriv``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scripts.lan import Lan
from tests.compose.cli import Docker, run
from tests.compose.conftest import docker_available
from tests.support import require, wait_for

PRIVATE_LAN = Lan(prefix="taskstack-", subnet="100.64.231")
"""Host ``i``'s network namespace and hostname: ``taskstack-host<i>``."""
MACHINE_ADDRESS = PRIVATE_LAN.machine_address
START_TIMEOUT = 60
STOP_TIMEOUT = 60
"""A swarm manager takes 8 s to stop, and gives a task's container 10 s; then it is killed."""
TOOLS = ("ip", "iptables", "nsenter", "unshare", "setpriv", "dockerd")


@dataclass(frozen=True)
class Host:
    """One of the tests' own Docker hosts, made by :func:`private_hosts`."""

    name: str
    """Its network namespace and hostname."""
    address: str
    """Its address on the LAN."""
    docker: Docker

    def cut_off(self) -> None:
        """Drop every packet in and out of the host, as when its network fails.

        Its engine and containers keep running; the swarm and Redis stop hearing
        from them. The overlay's VXLAN packets leave from this namespace too.
        """
        for chain in ("INPUT", "OUTPUT"):
            rule = (chain, "1", "--jump", "DROP")
            run("nsenter", f"--net=/run/netns/{self.name}", "iptables", "--insert", *rule)

    def reconnect(self) -> None:
        """Undo :meth:`cut_off`: the host is back on the LAN, as it left it."""
        for chain in ("INPUT", "OUTPUT"):
            rule = (chain, "--jump", "DROP")
            run("nsenter", f"--net=/run/netns/{self.name}", "iptables", "--delete", *rule)

    def esp_aead_available(self) -> bool:
        """Whether the kernel has AES-GCM for IPsec, which encrypted overlays need."""
        try:
            run(
                *("ip", "-n", self.name, "xfrm", "state", "add"),
                *("src", self.address, "dst", MACHINE_ADDRESS, "proto", "esp", "spi", "0x7a5c"),
                *("mode", "transport", "aead", "rfc4106(gcm(aes))", "0x" + "11" * 20, "128"),
            )
        except subprocess.CalledProcessError:
            return False
        run("ip", "-n", self.name, "xfrm", "state", "flush")
        return True


def can_host_engines() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in TOOLS)


def require_private_hosts() -> None:
    """Skip (fail in CI) where the local engine cannot build images or hosts cannot be made."""
    require(docker_available(), "a Docker engine with Compose v2")
    require(can_host_engines(), f"root and {', '.join(TOOLS)} (private Docker hosts)")


@contextlib.contextmanager
def private_hosts(directory: Path, count: int) -> Iterator[tuple[Host, ...]]:
    """``count`` hosts on a private LAN with this machine; removed with all they ran afterwards."""
    names = [PRIVATE_LAN.host_name(i) for i in range(1, count + 1)]
    engines: list[Engine] = []
    PRIVATE_LAN.remove()  # left over by a run that was killed
    stack = contextlib.ExitStack()
    try:
        PRIVATE_LAN.build(names)
        stack.enter_context(lan_resolver())
        for i, name in enumerate(names, start=1):
            engines.append(Engine.start(name, PRIVATE_LAN.host_address(i), directory / name))
        for engine in engines:
            engine.wait_ready()
        yield tuple(engine.host for engine in engines)
    finally:
        for engine in engines:
            engine.terminate()
        for engine in engines:
            engine.wait_stopped()
        stack.close()
        PRIVATE_LAN.remove()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def lan_resolver() -> Iterator[None]:
    """The LAN's DNS server, at this machine's address: it knows no name, and says so at
    once (``NXDOMAIN``), as a LAN's resolver does for a name Swarm does not know (one
    whose tasks are all on a lost node). The engines forward such names here; with no
    answer at all, each lookup took the containers' resolver 10 s to give up."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((MACHINE_ADDRESS, 53))
    server.settimeout(0.5)
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            try:
                query, sender = server.recvfrom(512)
            except TimeoutError:
                continue
            with contextlib.suppress(IndexError):
                server.sendto(nxdomain(query), sender)

    thread = threading.Thread(target=answer, name="lan-resolver", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
        server.close()


def nxdomain(query: bytes) -> bytes:
    """The answer to a DNS ``query`` (RFC 1035, 4.1) that its name does not exist: its
    id, opcode, recursion flag and one question, and RCODE 3 with no records."""
    end = 12
    while query[end]:  # the question's name, label by label, then its type and class
        end += 1 + query[end]
    question = query[12 : end + 5]
    flags = bytes([0x80 | (query[2] & 0x79), 0x83])  # a response; recursion available
    return query[:2] + flags + b"\x00\x01" + bytes(6) + question


@dataclass
class Engine:
    """A host's ``dockerd``, started by :meth:`start`."""

    host: Host
    process: subprocess.Popen[bytes]
    """``unshare``, whose one child is ``dockerd``: PID 1 of the engine's PID namespace."""
    log: Path

    @classmethod
    def start(cls, name: str, address: str, directory: Path) -> Engine:
        """Start the engine of host ``name``; the call must come from the main thread.

        (``--pdeathsig`` fires when the thread that started the engine ends.)
        """
        directory.mkdir(parents=True)
        socket = directory / "docker.sock"
        config = directory / "daemon.json"
        # Not this machine's /etc/docker/daemon.json. Containers' DNS forwards names
        # Swarm does not know to this machine, where lan_resolver() answers NXDOMAIN
        # at once, as a LAN's resolver would. Without it, it goes to resolvers the
        # LAN cannot reach, and a service whose node is gone takes 20 s to fail to
        # resolve (10 s with no answer here), stalling every client that asks for it.
        config.write_text(json.dumps({"dns": [MACHINE_ADDRESS]}) + "\n")
        # The storage driver is left to dockerd: overlay2 where the filesystem
        # allows it (a 15 s image load where vfs takes 70 s), else vfs.
        dockerd = [
            *("dockerd", f"--config-file={config}", f"--host=unix://{socket}"),
            f"--data-root={directory / 'data'}",
            f"--exec-root={directory / 'exec'}",
            f"--pidfile={directory / 'docker.pid'}",
        ]
        argv = [
            # The engine ends with this process (SIGKILL to unshare, which then
            # kills its child, PID 1 of the engine's PID namespace: all of it).
            *("setpriv", "--pdeathsig", "KILL", "--"),
            # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup
            # hierarchies dockerd needs. The new mount namespace takes the engine's
            # mounts away with it; --uts gives it a hostname of its own.
            *("nsenter", f"--net=/run/netns/{name}"),
            *("unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"),
            *("sh", "-c", f'hostname {name} && exec "$@"', "sh", *dockerd),
        ]
        log = directory / "dockerd.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches pytest, which stops it in order
            )
        return cls(Host(name, address, Docker(f"unix://{socket}")), process, log)

    def wait_ready(self) -> None:
        wait_for(
            lambda: self.process.poll() is not None or self.host.docker("info", timeout=10),
            START_TIMEOUT,
            f"the engine of {self.host.name}",
        )
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"dockerd of {self.host.name} exited:\n{tail}")

    def terminate(self) -> None:
        """Ask dockerd to stop (it stops its containers and unmounts what it mounted)."""
        if self.process.poll() is not None:
            return
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            os.kill(int(children.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):  # no dockerd to ask: end it all at once
            self.process.kill()

    def wait_stopped(self) -> None:
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()  # --kill-child: the whole PID namespace goes
            self.process.wait(STOP_TIMEOUT)
