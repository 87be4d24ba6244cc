"""A running batch's outcomes, sent as its calls finish.

Each segment of finished calls, with how long the calls so far took (the
client sizes its next batches from it), is pushed to the client's reply list
together with the count of calls answered, in one Lua call
(:data:`taskstack.claims.PROGRESS_SCRIPT`).
A batch redelivered after its worker died resumes after the last call whose
outcome was sent, so a kill reruns only the calls that were running (and at
most :data:`~taskstack.names.PROGRESS_SECONDS` of finished quick ones).

Segments are sent without waiting for Redis's answer, which is read before the
next one goes: the calls run on meanwhile, and the round trip costs them
nothing. A segment that cannot be sent is not an error: its outcomes go with
the next one, tried :data:`RETRY_SECONDS` later (Redis restarting, or a failover
under way), or with the batch's last reply, which is sent as before. Behind
Sentinels a segment counts as sent once a replica has it (``WAIT``, read with
the answer), so a failover never loses outcomes the batch will not send again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from taskstack import claims, names
from taskstack.connections import WAIT_COMMAND, check_acks, drop, replicated
from taskstack.signing import Signer
from taskstack.worker.calls import pack_outcomes

logger = logging.getLogger(__name__)

RETRY_SECONDS = 2.0
"""After a segment could not be sent, the next waits this long: a failed attempt can
hold the calls up for a socket timeout, and a failover takes seconds."""


class Progress:
    """Sends the outcomes of a batch's calls from ``first`` on, as they accumulate."""

    def __init__(
        self, client: redis.Redis, signer: Signer, reply_to: str, batch_id: str, first: int
    ) -> None:
        self.client = client
        self.signer = signer
        self.keys = (reply_to, claims.claim_key(batch_id))
        self.batch_id = batch_id
        self.first = first
        self.sent = 0
        """Outcomes (of those this delivery produced) pushed, or on their way."""
        self.confirmed = 0
        """...and those Redis confirmed: all that counts if a send goes wrong."""
        self.started = time.perf_counter()
        """When the batch started: a reply says how long its calls took so far."""
        self.connection: Any = None
        self.awaiting = False
        self.retry_at = 0.0
        """No segment goes before this (``time.monotonic()``): one failed not long ago."""
        self.failures = 0
        self.replicated = replicated(client)

    def __call__(self, outcomes: list[names.Outcome]) -> None:
        """Send the outcomes not sent yet; :func:`~taskstack.worker.calls.run_calls`
        calls this when a reply is due."""
        if self.retry_at and time.monotonic() < self.retry_at:
            return
        try:
            self._settle()
            segment = outcomes[self.sent :]
            seconds = time.perf_counter() - self.started
            first = self.first + self.sent
            reply = pack_outcomes(
                self.signer, names.PROGRESS, self.batch_id, first, segment, seconds, len(outcomes)
            )
            done = self.first + len(outcomes)
            if self.connection is None:
                self.connection = self.client.connection_pool.get_connection()
            script = claims.PROGRESS_SCRIPT
            self.connection.send_command(
                "EVAL", script, 2, *self.keys, reply, done, claims.TTL_SECONDS
            )
            if self.replicated:
                self.connection.send_command(*WAIT_COMMAND)
            self.awaiting = True
            self.sent = len(outcomes)
            if self.failures:
                logger.warning("progress of %s sent again", self.keys)
                self.failures = 0
                self.retry_at = 0.0
        except (redis.RedisError, OSError) as exc:
            self._give_up(exc)

    def close(self) -> None:
        """Read the last answer and give the connection back; before the batch's last reply."""
        if self.connection is None:
            return
        try:
            self._settle()
        except (redis.RedisError, OSError) as exc:
            self._give_up(exc)
        if self.connection is not None:
            self.client.connection_pool.release(self.connection)
            self.connection = None

    def _settle(self) -> None:
        if self.awaiting:
            self.awaiting = False
            self.connection.read_response()
            if self.replicated:
                check_acks(self.connection.read_response())
            self.confirmed = self.sent

    def _give_up(self, exc: BaseException) -> None:
        if not self.failures:
            logger.warning(
                "progress of %s not sent (%s); trying again every %g s, or at its end",
                *(self.keys, exc, RETRY_SECONDS),
            )
        self.failures += 1
        self.retry_at = time.monotonic() + RETRY_SECONDS
        self.sent = self.confirmed
        if self.connection is not None:
            drop(self.client, self.connection)
            self.connection = None
