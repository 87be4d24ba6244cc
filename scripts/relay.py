"""A delaying TCP relay: latency between the benchmark's hosts and this machine.

This kernel has no ``netem``, so the multi-host benchmark (``scripts/bench_hosts.py``)
puts this relay in front of every service a host reaches across the LAN (Redis,
the Dask scheduler, each Dask worker): a host connects to the relay's port on
this machine, and every chunk read from either side is written to the other
``delay`` seconds after it arrived, in order. It runs as a process of its own
(asyncio, one thread), outside the hosts' CPU quotas, so that its work takes
nothing from the benchmark's client. It counts the bytes it delivers to each
address: the bytes that reached each host.

Run by :class:`RelayProcess`; its control protocol is one line in, one line out
on stdin/stdout: ``delay <seconds>`` answers ``ok``, ``stats`` a JSON object
``{"into": {address: bytes}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

CHUNK = 256 * 1024


@dataclass(frozen=True)
class Route:
    """Listen on ``listen_host`` (a free port) and forward to ``target``."""

    name: str
    listen_host: str
    target_host: str
    target_port: int

    def spec(self) -> str:
        return f"{self.name}={self.listen_host}>{self.target_host}:{self.target_port}"

    @classmethod
    def parse(cls, spec: str) -> Route:
        name, rest = spec.split("=", 1)
        listen, target = rest.split(">", 1)
        host, port = target.rsplit(":", 1)
        return cls(name, listen, host, int(port))


class Relay:
    def __init__(self) -> None:
        self.delay = 0.0
        self.into: defaultdict[str, int] = defaultdict(int)

    async def serve(self, route: Route) -> int:
        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")[0]
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    route.target_host, route.target_port
                )
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                self.pump(reader, up_writer, route.target_host),
                self.pump(up_reader, writer, peer),
            )

        server = await asyncio.start_server(connected, route.listen_host, 0)
        return int(server.sockets[0].getsockname()[1])

    async def pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to: str
    ) -> None:
        """Forward ``reader`` to ``writer``, each chunk ``delay`` after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                self.into[to] += len(chunk)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while chunk := await reader.read(CHUNK):
                queue.put_nowait((loop.time() + self.delay, chunk))
        except OSError:
            pass
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError):
            await delivering
        writer.close()  # one side ended: so does the other (Redis and Dask close whole)

    async def control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            if line[0] == "delay":
                self.delay = float(line[1])
                answer = "ok"
            else:
                answer = json.dumps({"into": dict(self.into)})
            print(answer, flush=True)


async def main(specs: Sequence[str]) -> None:
    relay = Relay()
    ports = {}
    for spec in specs:
        route = Route.parse(spec)
        ports[route.name] = await relay.serve(route)
    print(json.dumps(ports), flush=True)
    await relay.control()  # until stdin closes: the harness ended
    os._exit(0)  # at once: the connections still open go with the process


class RelayProcess:
    """The relay, started by the harness: ``ports[name]`` is each route's port."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, *(route.spec() for route in routes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ports: dict[str, int] = json.loads(self._line())

    def set_delay(self, seconds: float) -> None:
        self._ask(f"delay {seconds}")

    def into(self) -> dict[str, int]:
        """Bytes delivered so far to each address."""
        return dict(json.loads(self._ask("stats"))["into"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _ask(self, line: str) -> str:
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()
        return self._line()

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the relay exited ({self.process.wait()})")
        return line


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
