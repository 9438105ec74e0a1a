"""GET /deadletters: the dead letters with their reasons, newest first, paginated."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer

from domain import task as tk
from domain.ids import derived_id
from domain.recorded import RecordedEvent
from infra.mapper import encode_event
from tests.e2e.support import assert_problem
from tests.integration.helpers import now, wait_until

pytestmark = pytest.mark.e2e


def _submitted(task_id: str, type_: str) -> RecordedEvent:
    return RecordedEvent(
        id=derived_id("test-event", task_id, 1),
        aggregate_type=tk.TASK,
        aggregate_id=task_id,
        version=1,
        time=now(),
        correlation_id=task_id,
        causation_id=task_id,
        event=tk.TaskSubmitted(
            task_id=task_id,
            type=type_,
            payload={},
            required_capabilities=(),
            priority="normal",
            max_cost=None,
            lease_timeout_s=30.0,
            run_timeout_s=600.0,
            max_attempts=3,
        ),
    )


async def test_dead_letters_are_listed_newest_first_page_by_page(swarm) -> None:
    run = uuid.uuid4().hex[:6]
    ids = [f"nul-{run}-{i}" for i in range(3)]
    raw = AIOKafkaProducer(bootstrap_servers=swarm.bootstrap, enable_idempotence=True)
    await raw.start()
    try:
        for task_id in ids:  # past the API, as another producer could
            record = encode_event(swarm.topics.events(tk.TASK), _submitted(task_id, "a\x00b"))
            await raw.send_and_wait(
                record.topic, record.value, key=record.key, headers=record.headers
            )
    finally:
        await raw.stop()

    async def listed() -> list[dict]:
        r = await swarm.client.get("/deadletters", params={"limit": 500})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        return items if len(items) == 3 else []

    everything = await wait_until(listed, 30, what="three dead letters listed")
    assert {d["key"] for d in everything} == set(ids)
    assert all(d["topic"] == swarm.topics.events(tk.TASK) for d in everything)
    assert all("nul-" in d["reason"] and d["replayed_at"] is None for d in everything)
    stamps = [d["dead_lettered_at"] for d in everything]
    assert stamps == sorted(stamps, reverse=True)

    pages, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = (await swarm.client.get("/deadletters", params=params)).json()
        pages.append([d["id"] for d in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 1]
    assert [i for p in pages for i in p] == [d["id"] for d in everything]

    r = await swarm.client.get("/deadletters", params={"topic": swarm.topics.events("agent")})
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
    r = await swarm.client.get("/deadletters", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert_problem(r, 422, code="invalid_cursor", field="cursor")
    r = await swarm.client.get("/tasks", params={"limit": 500})
    assert not {t["task_id"] for t in r.json()["items"]} & set(ids)
    swarm.check_alive()


async def test_foreign_records_on_the_outcome_topic_do_not_stop_the_apis_outcome_follower(
    swarm,
) -> None:
    raw = AIOKafkaProducer(bootstrap_servers=swarm.bootstrap)
    await raw.start()
    try:  # another producer's records on the outcome topic: none of them an outcome
        for headers in (
            [],
            [("ce_subject", b"\xff\xfe"), ("ce_specversion", b"1.0")],
            [("ce_subject", b"not-a-command"), ("ce_specversion", b"1.0")],
        ):
            await raw.send_and_wait(
                swarm.topics.outcomes, b"\x00garbage", key=b"k", headers=headers
            )
    finally:
        await raw.stop()

    task_id = f"after-garbage-{uuid.uuid4().hex[:8]}"
    r = await swarm.client.post("/tasks", json={"task_id": task_id, "type": "noop"})
    assert r.status_code == 201, r.text  # an answer, not a 202: the follower is alive
    ready = await swarm.client.get("/ready")
    assert ready.status_code == 200, ready.text
    swarm.check_alive()
