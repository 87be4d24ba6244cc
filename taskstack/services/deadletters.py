"""``taskstack-deadletters``: list, show, requeue or purge the stack's dead letters.

Workers put in the dead-letter list each queue entry they refused and each
message they gave up after too many deliveries (docs/reliability.md). This
command reads it with the stack's settings from the environment, as every
entrypoint does (``REDIS_URL``, or ``REDIS_PORT`` and ``REDIS_PASSWORD``):

    taskstack-deadletters list               # one line per record, oldest first
    taskstack-deadletters show 3             # record 3: its reason, where from, the entry
    taskstack-deadletters requeue 3          # entry 3 back on its queue, if a valid message
    taskstack-deadletters requeue --all      # every valid one; the rest stay
    taskstack-deadletters purge              # delete the list
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import time
from collections.abc import Sequence

import redis

from taskstack import names
from taskstack.connections import connect
from taskstack.settings import Settings
from taskstack.worker import deadletters
from taskstack.worker.deadletters import DeadLetter
from taskstack.worker.entries import Refused, check_task

SHOWN_BODY_CHARS = 10_000
"""Characters of a decoded message body ``show`` prints."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="taskstack-deadletters",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="one line per record, oldest first, numbered from 1")
    show = commands.add_parser("show", help="one record in full")
    show.add_argument("number", type=int)
    requeue = commands.add_parser("requeue", help="entries back on their queues")
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("number", type=int, nargs="?")
    which.add_argument("--all", action="store_true", help="every record that is a valid message")
    commands.add_parser("purge", help="delete every record")
    args = parser.parse_args(argv)
    settings = Settings.for_service("taskstack-deadletters")
    client = connect(settings.redis_address)
    try:
        if args.command == "list":
            list_letters(client)
        elif args.command == "show":
            show_letter(client, args.number)
        elif args.command == "requeue":
            numbers = None if args.all else [args.number]
            sys.exit(0 if requeue_letters(client, settings, numbers) else 1)
        else:
            print(f"purged {deadletters.purge(client)} dead letters")
    except redis.RedisError as exc:
        raise SystemExit(f"taskstack-deadletters: {exc}") from None
    finally:
        client.close()


def list_letters(client: redis.Redis) -> None:
    letters = [DeadLetter.loads(record) for record in deadletters.records(client)]
    if not letters:
        print("no dead letters")
        return
    print(f"{'#':>4}  {'time (UTC)':19}  {'queue':6}  {'task':30}  reason")
    for number, letter in enumerate(letters, 1):
        task = letter.task or "-"
        print(f"{number:>4}  {_when(letter)}  {letter.queue:6}  {task:30}  {letter.reason}")


def show_letter(client: redis.Redis, number: int) -> None:
    _, letter = _record(client, number)
    print(f"time     {_when(letter)} UTC")
    print(f"queue    {letter.queue}")
    print(f"node     {letter.node}")
    print(f"task     {letter.task or '-'}  id {letter.id or '-'}")
    print(f"reason   {letter.reason}")
    kept = f", truncated to {len(letter.entry):,}" if letter.truncated else ""
    print(f"entry    {letter.size:,} characters{kept}:")
    try:
        envelope = json.loads(letter.entry)
    except ValueError:
        print(letter.entry)
        return
    print(json.dumps(envelope, indent=2))
    body = _decoded_body(envelope)
    if body is not None:
        more = len(body) > SHOWN_BODY_CHARS
        print(f"body, decoded{' (the start)' if more else ''}:\n{body[:SHOWN_BODY_CHARS]}")


def requeue_letters(client: redis.Redis, settings: Settings, numbers: list[int] | None) -> bool:
    """Put the entries of records ``numbers`` (all if None) back on their queues; whether every
    one of them was."""
    stored = deadletters.records(client)
    if numbers is None:
        chosen = list(enumerate(stored, 1))
    else:
        chosen = [(number, _record(client, number, stored)[0]) for number in numbers]
    done = True
    for number, record in chosen:
        letter = DeadLetter.loads(record)
        problem = _not_requeueable(letter, settings)
        if problem is None and not deadletters.requeue(client, record, letter):
            problem = "it left the list meanwhile"
        if problem is not None:
            print(f"{number}: not requeued: {problem}")
            done = False
        else:
            print(f"{number}: requeued on {letter.queue} ({letter.task} {letter.id})")
    return done


def _not_requeueable(letter: DeadLetter, settings: Settings) -> str | None:
    if letter.truncated:
        return f"only the first {len(letter.entry):,} of its {letter.size:,} characters were kept"
    if letter.queue not in names.QUEUES:
        return f"it came from {letter.queue!r}, not a task queue ({', '.join(names.QUEUES)})"
    try:
        check_task(json.loads(letter.entry), settings.max_payload_bytes)
    except ValueError as exc:  # Refused too
        return str(exc) if isinstance(exc, Refused) else f"not JSON: {exc}"
    return None


def _record(
    client: redis.Redis, number: int, stored: list[bytes] | None = None
) -> tuple[bytes, DeadLetter]:
    stored = deadletters.records(client) if stored is None else stored
    if not 1 <= number <= len(stored):
        raise SystemExit(f"taskstack-deadletters: no record {number} (there are {len(stored)})")
    return stored[number - 1], DeadLetter.loads(stored[number - 1])


def _decoded_body(envelope: object) -> str | None:
    if not isinstance(envelope, dict) or not isinstance(envelope.get("body"), str):
        return None
    properties = envelope.get("properties")
    if not isinstance(properties, dict) or properties.get("body_encoding") != "base64":
        return None
    try:
        return base64.b64decode(envelope["body"], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def _when(letter: DeadLetter) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.time))


if __name__ == "__main__":
    main()
