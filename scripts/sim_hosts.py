"""Simulated worker hosts for ``scripts/simulate.py``: the wire of a worker, no Celery.

One harness process runs many simulated hosts as asyncio tasks. A host of P
processes does on the stack's real Redis what a prefork worker's consumer and
its children do for each batch, command for command:

- ``BRPOP`` on the queue's lists (kombu's priority lists), only while one of its
  P processes is free (``worker_prefetch_multiplier=1``);
- kombu's unacked bookkeeping, ``MULTI ZADD HSET EXEC``, and its ack,
  ``MULTI ZREM HDEL EXEC``;
- the task events Flower reads (``PUBLISH`` of task-received, -started, -succeeded),
  a worker heartbeat per host every 2 s, and the capacity beacon every 10 s;
- the real claim script (:data:`taskstack.claims.START_SCRIPT`, in a worker's
  ``start`` mode, with the start notice) and the real reply script (:data:`taskstack.claims.PROGRESS_SCRIPT`),
  a progress reply every :data:`~taskstack.names.PROGRESS_SECONDS` and the final
  one, signed with the stack's key as the batch task signs them.

The batch's signature is verified as a worker verifies it, but nothing is
unpickled and nothing runs: the batch is held for ``calls x call_seconds`` and
every call's outcome is :data:`RESULT`. Its number of calls comes from the
message's ``kwargsrepr`` (``items=N``, what Flower shows), else from its pickle.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

import cloudpickle

from scripts.sim_resp import Arg, Connection, connect
from taskstack import capacity, claims, names
from taskstack.signing import Signer
from taskstack.worker.calls import pack_outcomes

RESULT: Final = "simulated"
"""Every simulated call's value: the clients check each result against it."""
PRIORITY_LISTS: Final = ("", "\x06\x163", "\x06\x166", "\x06\x169")
"""kombu's Redis transport keeps a queue in one list per priority step; a consumer pops all."""
UNACKED, UNACKED_INDEX = "unacked", "unacked_index"
EVENTS: Final = "/0.celeryev/"
HEARTBEAT_SECONDS: Final = 2.0
_ITEMS = re.compile(r"items=(\d+)")


@dataclass(frozen=True)
class Plan:
    """What one harness process simulates."""

    redis_url: str
    secret: str
    hosts: tuple[tuple[str, int], ...]
    """Node name and processes of each simulated host."""
    call_seconds: float
    queue: str = names.CPU_QUEUE


class Harness:
    """The simulated hosts of one process. Each host has a connection for its consumer's
    ``BRPOP`` and one per process, as a prefork worker's children each have their own."""

    def __init__(self, plan: Plan, counters: Any) -> None:
        self.plan = plan
        self.counters = counters
        """Shared ``[batches, items]`` answered, read by the coordinator."""
        self.signer = Signer(plan.secret)
        self.lists = [plan.queue + suffix for suffix in PRIORITY_LISTS]
        self.running: set[asyncio.Task[None]] = set()
        self.connections: list[Connection] = []

    async def connect(self) -> Connection:
        conn = await connect(self.plan.redis_url)
        self.connections.append(conn)
        return conn

    async def run(self, ready: Any, stop: Any) -> None:
        control = await self.connect()
        await self.beacon(control)
        loops = [asyncio.create_task(self.host(node, n)) for node, n in self.plan.hosts]
        loops.append(asyncio.create_task(self.beacons(control)))
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)  # polls a multiprocessing.Event: no awaitable form
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await control.call("HDEL", capacity_key(self.plan.queue), *(n for n, _ in self.plan.hosts))
        for conn in self.connections:
            conn.close()

    async def beacon(self, control: Connection) -> None:
        """Each host's capacity entry, as :class:`taskstack.capacity.CapacityBeacon` writes it."""
        expires = time.time() + capacity.TTL_SECONDS
        key = capacity_key(self.plan.queue)
        for node, processes in self.plan.hosts:
            await control.call("HSET", key, node, f"{processes} {expires} {capacity.VERSIONS} -")

    async def beacons(self, control: Connection) -> None:
        beat = 0
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            beat += 1
            if beat % round(capacity.REFRESH_SECONDS / HEARTBEAT_SECONDS) == 0:
                await self.beacon(control)
            for node, _ in self.plan.hosts:
                await control.call(
                    "PUBLISH", EVENTS + "worker.heartbeat", event("worker-heartbeat", node)
                )

    async def host(self, node: str, processes: int) -> None:
        consumer = await self.connect()
        free: asyncio.Queue[Connection] = asyncio.Queue()
        for _ in range(processes):
            free.put_nowait(await self.connect())
        while True:
            process = await free.get()
            popped = await consumer.call("BRPOP", *self.lists, 1)
            if popped is None:
                free.put_nowait(process)
                continue
            task = asyncio.create_task(self.batch(node, popped[1], process, free))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def batch(
        self, node: str, raw: bytes, process: Connection, free: asyncio.Queue[Connection]
    ) -> None:
        try:
            await self._batch(node, raw, process)
        finally:
            free.put_nowait(process)

    async def _batch(self, node: str, raw: bytes, r: Connection) -> None:
        message = json.loads(raw)
        headers, properties = message["headers"], message["properties"]
        tag = properties["delivery_tag"]
        unacked = b'[%s, "", "%s"]' % (raw, self.plan.queue.encode())  # as kombu stores it
        await r.transaction(
            ("ZADD", UNACKED_INDEX, time.time(), tag), ("HSET", UNACKED, tag, unacked)
        )
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        batch_id, reply_to = headers["id"], kwargs["reply_to"]
        body = self.signer.open_batch(
            base64.b64decode(kwargs["payload"]),
            batch_id=batch_id,
            reply_to=reply_to,
            now=time.time(),
        )
        calls = count_calls(headers.get("kwargsrepr") or "", body)
        await r.call("PUBLISH", EVENTS + "task.received", event("task-received", node, batch_id))
        keys = [claims.claim_key(batch_id)]
        args: list[Arg] = [claims.TTL_SECONDS, "start"]  # as a worker starts it
        if kwargs.get("notify_start"):
            keys.append(reply_to)
            args.append(names.STARTED + batch_id.encode())
        claimed = await r.call("EVAL", claims.START_SCRIPT, len(keys), *keys, *args)
        if claimed == [claims.WHOLE_BATCH.encode()]:  # cancelled by its client: skipped
            await self.ack(r, tag)
            return
        await r.call("PUBLISH", EVENTS + "task.started", event("task-started", node, batch_id))
        await self.hold(r, batch_id, reply_to, calls)
        await r.call("PUBLISH", EVENTS + "task.succeeded", event("task-succeeded", node, batch_id))
        await self.ack(r, tag)
        self.counters[0] += 1
        self.counters[1] += calls

    async def hold(self, r: Connection, batch_id: str, reply_to: str, calls: int) -> None:
        """Run ``calls`` simulated calls: a progress reply every PROGRESS_SECONDS, as
        :func:`taskstack.worker.calls.run_calls` sends them, then the batch's end."""
        step, every = self.plan.call_seconds, names.PROGRESS_SECONDS
        started = time.perf_counter()
        end = started + calls * step
        sent = 0
        while True:
            left = end - time.perf_counter()
            if left <= every:
                await asyncio.sleep(max(0.0, left))
                break
            await asyncio.sleep(every)
            seconds = time.perf_counter() - started
            done = min(calls - 1, int(seconds / step)) if step else calls - 1
            if done > sent:
                await self.reply(
                    r, names.PROGRESS, batch_id, reply_to, (sent, done), seconds, calls
                )
                sent = done
        seconds = time.perf_counter() - started
        await self.reply(r, names.DONE, batch_id, reply_to, (sent, calls), seconds, calls)

    async def reply(
        self,
        r: Connection,
        kind: bytes,
        batch_id: str,
        reply_to: str,
        span: tuple[int, int],
        seconds: float,
        calls: int,
    ) -> None:
        first, upto = span
        outcomes: list[names.Outcome] = [(True, RESULT)] * (upto - first)
        ran = upto if kind == names.PROGRESS else calls
        reply = pack_outcomes(self.signer, kind, batch_id, first, outcomes, seconds, ran)
        keys = (reply_to, claims.claim_key(batch_id))
        await r.call("EVAL", claims.PROGRESS_SCRIPT, 2, *keys, reply, upto, claims.TTL_SECONDS)

    async def ack(self, r: Connection, tag: str) -> None:
        await r.transaction(("ZREM", UNACKED_INDEX, tag), ("HDEL", UNACKED, tag))


def capacity_key(queue: str) -> str:
    return names.CAPACITY_KEY_PREFIX + queue


def count_calls(kwargsrepr: str, body: memoryview) -> int:
    found = _ITEMS.search(kwargsrepr)
    if found:
        return int(found[1])
    calls, _ = cloudpickle.loads(body)
    return len(calls)


def event(kind: str, node: str, task_id: str = "") -> bytes:
    """A task or worker event about as big as Celery's, in kombu's fanout envelope."""
    head, middle, tail = _event_template(kind, node)
    body = base64.b64encode(b"%s%s%s" % (head, task_id.encode(), middle)).decode()
    return b"%s%s%s%s%s" % (
        b'{"body": "',
        body.encode(),
        tail,
        uuid.uuid4().hex.encode(),
        b'"}}',
    )


@functools.cache
def _event_template(kind: str, node: str) -> tuple[bytes, bytes, bytes]:
    """The parts of ``kind``'s event from ``node`` around its task id: built once, since
    building each event anew cost the harness more than the rest of a batch's bookkeeping."""
    fields = {
        "hostname": node,
        "utcoffset": 0,
        "pid": os.getpid(),
        "clock": 1,
        "timestamp": time.time(),
        "type": kind,
        "local_received": time.time(),
        "name": names.RUN_BATCH if kind == "task-received" else None,
        "args": "()",
        "kwargs": "{fn=tasks.compute.noop, items=..., map=..., client=...}",
        "parent_id": None,
        "retries": 0,
    }
    head, middle = json.dumps({**fields, "uuid": "@"}).rsplit("@", 1)
    envelope = {
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"hostname": node},
        "properties": {
            "delivery_mode": 1,
            "delivery_info": {"exchange": "celeryev", "routing_key": kind.replace("-", ".")},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "@",
        },
    }
    tail = '", ' + json.dumps(envelope)[1:].rsplit('@"}}', 1)[0]
    return head.encode(), middle.encode(), tail.encode()


def serve(plan: Plan, counters: Any, ready: Any, stop: Any) -> None:
    """A harness process's entry point (``multiprocessing`` target)."""
    asyncio.run(Harness(plan, counters).run(ready, stop))
