"""A minimal asyncio Redis client for the simulated hosts of ``scripts/simulate.py``.

Why not ``redis.asyncio``: with it, the harness spent about 3 ms of CPU per
simulated batch (its connection pool and command layers, nine round trips a
batch), more than the client and Redis together, so the harness, not the stack,
set the knee. This one writes RESP2 by hand and parses replies in the
protocol callback: the same commands reach Redis, one round trip each as a
worker sends them, for a fraction of the CPU. It is a load generator's client,
never the stack's (whose connections all come from :mod:`taskstack.connections`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any
from urllib.parse import urlsplit

Arg = bytes | str | int | float


class ReplyError(Exception):
    """Redis answered ``-ERR ...``."""


def encode(args: tuple[Arg, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply from ``buf[pos:]`` and the position after it; position -1 if incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None, -1
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return None, -1
        return bytes(buf[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse(buf, after)
            if after < 0:
                return None, -1
            items.append(item)
        return items, after
    if kind == b":":
        return int(line), after
    if kind == b"-":
        return ReplyError(line.decode(errors="replace")), after
    return line, after  # "+OK", "+QUEUED"


class Connection(asyncio.Protocol):
    """One connection; commands are answered in the order they were sent."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        pos = 0
        while self.waiting:
            value, end = parse(self.buffer, pos)
            if end < 0:
                break
            pos = end
            waiter = self.waiting.popleft()
            if waiter.done():
                continue
            if isinstance(value, ReplyError):
                waiter.set_exception(value)
            else:
                waiter.set_result(value)
        del self.buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("Redis closed the connection")
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)

    def send(self, *commands: tuple[Arg, ...]) -> list[asyncio.Future[Any]]:
        """Write ``commands`` in one go; a future for each reply."""
        if self.lost is not None or self.transport is None:
            raise ConnectionError(f"connection lost: {self.lost}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self.waiting.extend(futures)
        self.transport.write(b"".join(encode(c) for c in commands))
        return futures

    async def call(self, *args: Arg) -> Any:
        return await self.send(args)[0]

    async def transaction(self, *commands: tuple[Arg, ...]) -> Any:
        """``MULTI``, ``commands``, ``EXEC`` in one write, as redis-py's pipelines send them."""
        futures = self.send(("MULTI",), *commands, ("EXEC",))
        return (await asyncio.gather(*futures))[-1]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(url: str) -> Connection:
    """A connection to the Redis of a ``redis://:password@host:port/db`` URL, logged in."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        Connection, parts.hostname or "127.0.0.1", parts.port or 6379
    )
    if parts.password:
        await conn.call("AUTH", *([parts.username] if parts.username else []), parts.password)
    db = parts.path.strip("/")
    if db and db != "0":
        await conn.call("SELECT", db)
    return conn
