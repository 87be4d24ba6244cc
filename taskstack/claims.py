"""Who may still stop a sent batch: the claim a worker takes before it runs one.

``concurrent.futures`` promises that ``cancel()`` returns True only for a call
that will never run. Once a batch has been published, its client and the
worker that picks it up race; Redis settles the race. Each batch has a hash
(:data:`~taskstack.names.CLAIM_KEY_PREFIX`): the worker takes its ``started``
field before it runs any call, and a client cancels the whole batch (``all``)
or one call (``c<index>``) only while that field is absent, each side in one
Lua script, so exactly one of them wins. A worker skips the calls a client
cancelled in time, and skips a batch cancelled as a whole without running it.

The same hash records how far a batch got: its ``done`` field counts the calls
whose outcomes were sent, and only grows (:data:`PROGRESS_SCRIPT` pushes a reply
and moves it, in one step). A batch redelivered after its worker died starts
at ``done``.

A process that waits on its own batches may run one itself while no worker has
started it (:func:`take`, the fork-join of nested joblib calls): it takes the same
``started`` field, plus ``held``, so a worker that later picks the batch's queue
entry skips it, and the batch runs once.

Running batches also watch *stop keys* (:data:`~taskstack.names.STOP_KEY_PREFIX`):
a client that stops a map (Ctrl-C, a timeout, a closed iterator) or
terminates sets one, and the batch returns after the call it is running.
"""

from __future__ import annotations

from typing import Final

import redis

from taskstack import names
from taskstack.connections import WAIT_COMMAND, check_acks, replicated

TTL_SECONDS: Final = 24 * 3600
"""Claims and stop keys outlive any batch, and expire with the reply lists."""

WHOLE_BATCH: Final = "all"
HELD: Final = "held"
"""The claim field of a batch its own client took to run in its process."""

START_SCRIPT: Final = """
if redis.call('hexists', KEYS[1], 'all') == 1 then return {'all'} end
if redis.call('hexists', KEYS[1], 'held') == 1 then return {'held'} end
if ARGV[2] == 'take' then
  if redis.call('hexists', KEYS[1], 'started') == 1 then return {'started'} end
  redis.call('hset', KEYS[1], 'held', '1')
end
redis.call('hset', KEYS[1], 'started', '1')
redis.call('expire', KEYS[1], ARGV[1])
if KEYS[2] then
  redis.call('rpush', KEYS[2], ARGV[3])
  redis.call('expire', KEYS[2], ARGV[1])
end
return redis.call('hgetall', KEYS[1])
"""
"""KEYS: claim hash[, reply list]; ARGV: TTL, ``take`` or ``start``[, notice]. A worker
starts a batch (again, if it was redelivered); its own client takes one only if no
worker has started it."""

PROGRESS_SCRIPT: Final = """
local done = tonumber(redis.call('hget', KEYS[2], 'done') or '0')
if tonumber(ARGV[2]) <= done then return 0 end
redis.call('rpush', KEYS[1], ARGV[1])
redis.call('expire', KEYS[1], ARGV[3])
redis.call('hset', KEYS[2], 'done', ARGV[2])
redis.call('expire', KEYS[2], ARGV[3])
return 1
"""
"""KEYS: reply list, claim hash; ARGV: reply, calls done with it, TTL. A reply that
brings nothing new (a late copy of the batch that another worker overtook) is dropped."""

_CANCEL = """
if redis.call('hexists', KEYS[1], 'started') == 1 then return 0 end
redis.call('hset', KEYS[1], ARGV[2], '1')
redis.call('expire', KEYS[1], ARGV[1])
return 1
"""


def call_field(index: int) -> str:
    return f"c{index}"


def cancelled_calls(fields: set[str]) -> frozenset[int]:
    """The indexes of the calls cancelled one by one, among a claim's ``fields``."""
    return frozenset(int(f[1:]) for f in fields if f[:1] == "c" and f[1:].isdigit())


def claim_key(batch_id: str) -> str:
    return names.CLAIM_KEY_PREFIX + batch_id


def stop_key(owner: str) -> str:
    return names.STOP_KEY_PREFIX + owner


def start(
    client: redis.Redis, batch_id: str, notify: tuple[str, bytes] | None = None
) -> tuple[set[str], int]:
    """Take the batch for running: the fields its client set first (``all``: skip it;
    ``held``: its client runs it), and how many of its calls an earlier delivery already
    answered. ``notify`` is a reply list and a message pushed to it in the same step,
    unless the batch is skipped."""
    flat = _claim(client, batch_id, notify, "start")
    if flat in ([WHOLE_BATCH], [HELD]):
        return set(flat), 0
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    done = int(fields.pop("done", 0))
    fields.pop("started", None)
    return set(fields), done


def take(
    client: redis.Redis, batch_id: str, notify: tuple[str, bytes] | None = None
) -> set[str] | None:
    """Take a batch no worker started, to run it in this process (its client's): the
    fields its client set (``c<index>``: skip that call); None if a worker started it
    or it was cancelled. ``notify`` as for :func:`start`."""
    flat = _claim(client, batch_id, notify, "take")
    if len(flat) == 1:  # all, held or started: not this process's to run
        return None
    return set(flat[::2]) - {"started", HELD, "done"}


def _claim(
    client: redis.Redis, batch_id: str, notify: tuple[str, bytes] | None, mode: str
) -> list[str]:
    keys: list[str] = [claim_key(batch_id)]
    args: list[bytes | int | str] = [TTL_SECONDS, mode]
    if notify is not None:
        keys.append(notify[0])
        args.append(notify[1])
    return [
        f.decode() if isinstance(f, bytes) else str(f)
        for f in client.eval(START_SCRIPT, len(keys), *keys, *args)
    ]


def record(client: redis.Redis, batch_id: str, reply_to: str, reply: bytes, done: int) -> bool:
    """Push ``reply`` and record ``done`` calls answered, unless a delivery got further.
    Behind Sentinels, only once a replica has them (raises :class:`NotReplicated`)."""
    keys = (reply_to, claim_key(batch_id))
    if not replicated(client):
        return bool(client.eval(PROGRESS_SCRIPT, 2, *keys, reply, done, TTL_SECONDS))
    with client.pipeline(transaction=False) as pipe:  # WAIT counts this connection's writes
        pipe.eval(PROGRESS_SCRIPT, 2, *keys, reply, done, TTL_SECONDS)
        pipe.execute_command(*WAIT_COMMAND)  # type: ignore[no-untyped-call]
        pushed, acks = pipe.execute()
    check_acks(acks)
    return bool(pushed)


def cancel(client: redis.Redis, batch_id: str, field: str = WHOLE_BATCH) -> bool:
    """Cancel the batch or one call of it; False if a worker already started it."""
    return bool(client.eval(_CANCEL, 1, claim_key(batch_id), TTL_SECONDS, field))


def stop(client: redis.Redis, owner: str, batch_ids: list[str]) -> None:
    """Stop ``owner``'s batches (a client's or a map's): those not started are skipped,
    running ones return after their current call."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(stop_key(owner), b"1", ex=TTL_SECONDS)
        for batch_id in batch_ids:
            pipe.eval(_CANCEL, 1, claim_key(batch_id), TTL_SECONDS, WHOLE_BATCH)
        pipe.execute()
