"""The dead-letter list: what a worker will not run, kept for an operator.

Workers put there each queue entry their intake refused
(:mod:`taskstack.worker.intake`) and each message given up after too many
deliveries (:mod:`taskstack.worker.deliveries`), as one JSON record: the entry
itself, its queue, the reason, the worker's node and the time. The
``taskstack-deadletters`` command lists, shows, requeues and purges them
(:mod:`taskstack.services.deadletters`).

The list is bounded twice, so that whoever can write to a queue cannot fill
Redis through it: an entry longer than :data:`ENTRY_CHARS` is kept truncated
(and can no longer be requeued), and only the newest ``DEAD_LETTERS_MAX``
records are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Final

import redis

from taskstack import names

ENTRY_CHARS: Final = 64 * 1024
"""Characters of an entry a record keeps: DEAD_LETTERS_MAX (1,000) records hold at most
~64 MB, whatever was pushed onto the queues."""

_REQUEUE = """
if redis.call('lrem', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('lpush', KEYS[2], ARGV[2])
  redis.call('del', KEYS[3])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class DeadLetter:
    """One record of the list."""

    entry: str
    """The queue entry as it was read (its first :data:`ENTRY_CHARS` characters)."""
    queue: str
    reason: str
    node: str
    """The worker that refused it or gave it up."""
    time: float
    """When, in seconds since the epoch."""
    size: int
    """Characters of the whole entry."""
    id: str | None = None
    """The task id its headers gave, if any."""
    task: str | None = None

    @property
    def truncated(self) -> bool:
        return self.size > len(self.entry)

    @classmethod
    def of(
        cls,
        entry: str,
        queue: str,
        reason: str,
        node: str,
        id: str | None = None,
        task: str | None = None,
    ) -> DeadLetter:
        """A record of ``entry``, refused now, kept within :data:`ENTRY_CHARS`."""
        return cls(entry[:ENTRY_CHARS], queue, reason, node, time.time(), len(entry), id, task)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | bytes) -> DeadLetter:
        return cls(**json.loads(text))


def push(client: redis.Redis, letter: DeadLetter, max_length: int) -> None:
    """Append ``letter``, dropping the oldest records beyond ``max_length``: one round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.rpush(names.DEAD_LETTERS_KEY, letter.dumps())
        pipe.ltrim(names.DEAD_LETTERS_KEY, -max_length, -1)
        pipe.execute()


def records(client: redis.Redis) -> list[bytes]:
    """Every record as stored, oldest first (what :func:`requeue` takes)."""
    stored = client.lrange(names.DEAD_LETTERS_KEY, 0, -1)
    return [record if isinstance(record, bytes) else record.encode() for record in stored]


def length(client: redis.Redis) -> int:
    return int(client.llen(names.DEAD_LETTERS_KEY))


def requeue(client: redis.Redis, record: bytes, letter: DeadLetter) -> bool:
    """Put ``letter``'s entry back on its queue and remove ``record`` from the list, at once;
    False if the record is gone (requeued or trimmed meanwhile). The entry's delivery count
    starts again."""
    keys = (names.DEAD_LETTERS_KEY, letter.queue, names.DELIVERIES_KEY_PREFIX + (letter.id or ""))
    return bool(client.eval(_REQUEUE, 3, *keys, record, letter.entry))


def purge(client: redis.Redis) -> int:
    """Delete the list; how many records it held."""
    with client.pipeline() as pipe:
        pipe.llen(names.DEAD_LETTERS_KEY)
        pipe.delete(names.DEAD_LETTERS_KEY)
        held, _ = pipe.execute()
    return int(held)
