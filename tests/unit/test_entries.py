"""What a queue entry must be before Celery parses it (taskstack/worker/entries.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskstack import names
from taskstack.worker.entries import (
    REASONS,
    Refused,
    body_limit,
    check_envelope,
    check_task,
    entry_limit,
)
from tests.support.entries import BAD_ENTRIES, BadEntry, body, envelope

LIMIT = 1024 * 1024
TASKS = {names.COUNT_PRIMES}


def test_a_message_as_celery_sends_it_passes() -> None:
    task = check_task(envelope(), LIMIT, TASKS)
    assert (task.name, task.args, task.kwargs) == (names.COUNT_PRIMES, [0, 100], {})


def test_a_message_celery_itself_built_passes() -> None:
    from celery import Celery

    app = Celery(set_as_current=False)
    message = app.amqp.as_task_v2("an-id", names.COUNT_PRIMES, args=(1, 2), countdown=30)
    # kombu adds the delivery tag and info and the body's encoding as it publishes.
    properties = {**message.properties, "delivery_tag": "t", "delivery_info": {}}
    entry = {
        "body": body(message.body),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": json.loads(json.dumps(message.headers, default=str)),
        "properties": {**properties, "body_encoding": "base64"},
    }
    assert check_task(entry, LIMIT, TASKS).id == "an-id"


@pytest.mark.parametrize(
    "bad", [b for b in BAD_ENTRIES if b.name != "not JSON"], ids=lambda b: b.name
)
def test_each_bad_entry_of_the_issue_is_refused_with_its_reason(bad: BadEntry) -> None:
    with pytest.raises(Refused) as refused:
        check_task(json.loads(bad.build()), LIMIT, TASKS)
    assert str(refused.value).startswith(bad.reason)
    assert str(refused.value).startswith(REASONS)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m["headers"].update(compression="application/x-bz2"), "compressed"),
        (lambda m: m["headers"].update(retries="1"), "bad headers: retries is a JSON string"),
        (lambda m: m["headers"].update(retries=True), "bad headers: retries"),
        (lambda m: m["headers"].update(retries=-1), "bad headers: retries"),
        (lambda m: m["headers"].update(timelimit=[1, 2, 3]), "bad headers: timelimit"),
        (lambda m: m["headers"].update(timelimit=[-1, None]), "bad headers: timelimit"),
        (lambda m: m["headers"].update(eta="tomorrow"), "bad headers: eta 'tomorrow'"),
        (lambda m: m["headers"].update(expires=3600), "bad headers: expires"),
        (lambda m: m["headers"].update(id=7), "bad headers: id is a JSON number"),
        (lambda m: m["headers"].update(task=None), "bad headers: task"),
        (lambda m: m["headers"].update(stamps=[]), "bad headers: stamps"),
        (lambda m: m["properties"].update(delivery_tag=1), "bad properties: delivery_tag"),
        (lambda m: m["properties"].update(priority="high"), "bad properties: priority"),
        (lambda m: m["properties"]["delivery_info"].update(routing_key=1), "bad properties"),
        (lambda m: m["properties"].pop("delivery_info"), "bad properties: no delivery_info"),
        (lambda m: m.update(properties=[]), "bad properties"),
        (lambda m: m.update(body=None), "not a message envelope: body is a JSON null"),
        (lambda m: m.pop("body"), "not a message envelope: no body"),
        (lambda m: m.update({"content-encoding": "binary"}), "not JSON content"),
        (lambda m: m.update(body=body([[], {}, {"callbacks": "x"}])), "bad body: embed.callbacks"),
        (lambda m: m.update(body=body([{}, [], {}])), "bad body: [object, array, object]"),
        (lambda m: m.update(body="bm90IGpzb24="), "bad body: not JSON"),
        (lambda m: m["properties"].update(body_encoding="BASE64"), "unknown body encoding"),
        (lambda m: m["properties"].update(body_encoding=64), "unknown body encoding"),
    ],
)
def test_every_field_celery_reads_has_the_type_it_assumes(change: Any, reason: str) -> None:
    message = envelope()
    change(message)
    with pytest.raises(Refused, match="^" + reason.replace("[", r"\[").replace("]", r"\]")):
        check_task(message, LIMIT, TASKS)


def test_a_body_is_refused_by_its_size_before_it_is_decoded() -> None:
    message = envelope()
    message["body"] = "!" * (body_limit(LIMIT) * 4 // 3 + 8)  # not even base64
    with pytest.raises(Refused, match=r"^too large: a body of about"):
        check_task(message, LIMIT, TASKS)
    # The largest batch a client may send gets through, in base64 inside the JSON body.
    batch = "A" * (LIMIT * 4 // 3)
    message["body"] = body([[], {"payload": batch, "reply_to": "r"}, {}])
    assert check_task(message, LIMIT, TASKS).kwargs["payload"] == batch
    assert len(json.dumps(message)) < entry_limit(LIMIT)


def test_an_unknown_task_is_refused_only_when_the_registry_is_given() -> None:
    message = envelope("no.such.task")
    with pytest.raises(Refused, match=r"^unknown task: 'no\.such\.task'"):
        check_task(message, LIMIT, TASKS)
    assert check_task(message, LIMIT).name == "no.such.task"


def test_a_broadcast_is_checked_as_an_envelope_only() -> None:
    broadcast = envelope()
    broadcast["headers"] = {"clock": 1, "expires": 1e12}
    broadcast["body"] = body({"method": "ping", "arguments": {}})
    assert check_envelope(broadcast, LIMIT) is broadcast
    with pytest.raises(Refused, match=r"^bad headers"):
        check_task(broadcast, LIMIT, TASKS)
