"""What an API process keeps in memory is bounded in bytes, not only in count: the
recent outcomes of a CommandClient and the window of a shared SSE consumer (Tap)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from api.live import StreamHub, Tap, TapStream
from api.metrics import Metrics
from api.positions import Layout
from commands.client import RecentOutcomes
from domain import task as tk
from domain.recorded import RecordedEvent
from infra import kafka
from infra.cloudevents import Record
from infra.mapper import encode_event
from infra.outcome import Outcome, encode_outcome

AT = datetime(2026, 1, 1, tzinfo=UTC)
TASKS = "t.events.task"
LAYOUT = Layout.of([TASKS], 2)
P0, P1 = LAYOUT.partitions


def consumer_record(r: Record, partition: int = 0, offset: int = 0) -> Any:
    """``r`` as a consumer would read it back (fresh header strs and bytes, as aiokafka)."""
    headers = tuple((str(k), bytes(v)) for k, v in r.headers)
    return ConsumerRecord(
        r.topic,
        partition,
        offset,
        0,
        0,
        bytes(r.key),
        bytes(r.value),
        None,
        len(r.key),
        len(r.value),
        headers,
    )


def outcome_record(command_id: str, note_bytes: int = 0) -> Any:
    outcome = Outcome(
        command_id=command_id,
        command_type="RecordHeartbeat",
        aggregate_type="agent",
        aggregate_id="agent-1",
        status="accepted",
        version=1,
        state={"note": "x" * note_bytes},
        decided_at=AT,
    )
    return consumer_record(encode_outcome("t.outcomes", outcome))


def event_record(task_id: str, partition: int, offset: int, payload_bytes: int = 0) -> Any:
    stored = RecordedEvent(
        id=f"ev-{task_id}",
        aggregate_type=tk.TASK,
        aggregate_id=task_id,
        version=1,
        time=AT,
        correlation_id=task_id,
        causation_id=task_id,
        event=tk.TaskSubmitted(
            task_id=task_id,
            type="work",
            payload={"blob": "x" * payload_bytes},
            required_capabilities=(),
            priority="normal",
            max_cost=None,
            lease_timeout_s=30.0,
            run_timeout_s=600.0,
            max_attempts=3,
        ),
    )
    return consumer_record(encode_event(TASKS, stored), partition, offset)


# --------------------------------------------------------------------------- sizes


def test_a_record_costs_its_key_value_and_headers_plus_a_fixed_overhead() -> None:
    r = outcome_record("c1")
    raw = len(r.key) + len(r.value) + sum(len(k) + len(v) for k, v in r.headers)
    overhead = kafka.RECORD_OVERHEAD_BYTES + len(r.headers) * kafka.HEADER_OVERHEAD_BYTES
    assert kafka.record_bytes(r) == raw + overhead
    assert kafka.record_bytes(outcome_record("c1", note_bytes=10_000)) >= raw + 10_000


# --------------------------------------------------------------------------- outcomes


def test_recent_outcomes_are_looked_up_by_command_id_and_decoded() -> None:
    recent = RecentOutcomes(max_bytes=1_000_000)
    recent.put("c1", outcome_record("c1"))

    got = recent.get("c1")
    assert got is not None and (got.command_id, got.status) == ("c1", "accepted")
    assert recent.get("c2") is None


def test_a_few_large_outcomes_evict_many_small_ones_by_bytes() -> None:
    small = kafka.record_bytes(outcome_record("s-99")) + len("s-99")  # the largest small one
    recent = RecentOutcomes(max_bytes=100 * small, max_count=100_000)
    for i in range(100):
        recent.put(f"s-{i}", outcome_record(f"s-{i}"))
    assert len(recent) == 100 and recent.bytes <= recent.max_bytes

    for i in range(3):
        recent.put(f"big-{i}", outcome_record(f"big-{i}", note_bytes=20 * small))

    assert recent.bytes <= recent.max_bytes
    assert all(f"big-{i}" in recent for i in range(3))
    kept_small = [i for i in range(100) if f"s-{i}" in recent]
    assert len(kept_small) < 45  # three records took the room of more than fifty
    assert kept_small == list(range(100 - len(kept_small), 100))  # the oldest went first
    assert recent.get("s-0") is None


def test_the_count_bound_still_holds_when_bytes_allow_more() -> None:
    recent = RecentOutcomes(max_bytes=10**9, max_count=5)
    for i in range(8):
        recent.put(f"c{i}", outcome_record(f"c{i}"))
    assert [f"c{i}" in recent for i in range(8)] == [False] * 3 + [True] * 5


def test_an_outcome_larger_than_the_whole_budget_is_not_kept_and_evicts_nothing() -> None:
    recent = RecentOutcomes(max_bytes=20_000)
    recent.put("small", outcome_record("small"))
    recent.put("huge", outcome_record("huge", note_bytes=50_000))
    assert "huge" not in recent
    assert recent.get("small") is not None


def test_an_outcome_seen_again_is_counted_once() -> None:
    recent = RecentOutcomes(max_bytes=1_000_000)
    recent.put("c1", outcome_record("c1"))
    once = recent.bytes
    recent.put("c1", outcome_record("c1"))
    assert (len(recent), recent.bytes) == (1, once)


# --------------------------------------------------------------------------- SSE window


TapFactory = Callable[..., Tap]


@pytest.fixture
async def taps() -> AsyncIterator[TapFactory]:
    """Makes taps at offsets 0 of both partitions, fed by hand with ``take_in`` (their
    consumers never start); closes them after the test."""
    made: list[Tap] = []

    def make(window: int = 20_000, window_bytes: int = 10**9) -> Tap:
        tap = Tap(kafka.Kafka("127.0.0.1:1"), LAYOUT, window, window_bytes)
        for tp in LAYOUT.partitions:
            tap.position[tp] = tap.floor[tp] = 0
        made.append(tap)
        return tap

    yield make
    for tap in made:
        await tap.close()


async def test_a_few_large_events_evict_many_small_ones_from_the_window(taps: TapFactory) -> None:
    small = kafka.record_bytes(event_record("s99", 1, 49))  # the largest small one
    tap = taps(window_bytes=100 * small)
    tap.take_in(
        {
            P0: [event_record(f"s{i}", 0, i) for i in range(50)],
            P1: [event_record(f"s{50 + i}", 1, i) for i in range(50)],
        }
    )
    assert len(tap.entries) == 100 and tap.floor == {P0: 0, P1: 0}

    tap.take_in(
        {P1: [event_record(f"big{i}", 1, 50 + i, payload_bytes=20 * small) for i in range(3)]}
    )

    assert tap.bytes <= tap.window_bytes
    assert len(tap.entries) < 45
    assert tap.floor[P0] == 50  # every small record of partition 0 is gone
    assert not tap.covers({P0: 0, P1: 0})  # a client resuming there needs its own consumer
    assert tap.covers({P0: 50, P1: 53})
    assert tap.since(0) is None  # a client still at the start fell out of the window


async def test_the_window_keeps_its_count_bound_too(taps: TapFactory) -> None:
    tap = taps(window=10)
    tap.take_in({P0: [event_record(f"s{i}", 0, i) for i in range(25)]})
    assert [e.offset for e in tap.entries] == list(range(15, 25))
    assert tap.floor[P0] == 15


async def test_the_newest_record_stays_even_when_alone_over_the_budget(taps: TapFactory) -> None:
    tap = taps(window_bytes=1_000)
    tap.take_in({P0: [event_record("s0", 0, 0), event_record("big", 0, 1, payload_bytes=5_000)]})
    assert [e.offset for e in tap.entries] == [1]
    assert tap.floor[P0] == 1


async def test_a_decoded_event_is_charged_to_the_window(taps: TapFactory) -> None:
    tap = taps()
    tap.take_in({P0: [event_record("s0", 0, 0, payload_bytes=1_000)]})
    before = tap.bytes
    (entry,) = tap.entries

    stored = tap.event(entry)
    assert stored is not None and stored.aggregate_id == "s0"
    assert tap.bytes > before + 2_000  # its decoded payload and objects count too
    tap.event(entry)
    assert tap.bytes == entry.size  # decoded once, charged once


async def test_a_client_left_behind_by_the_byte_bound_is_dropped_where_it_can_resume(
    taps: TapFactory,
) -> None:
    small = kafka.record_bytes(event_record("s0", 0, 0))
    tap = taps(window_bytes=30 * small)
    hub = StreamHub(kafka.Kafka("127.0.0.1:1"), max_clients=10, metrics=Metrics())
    tap.take_in({P0: [event_record(f"s{i}", 0, i) for i in range(5)]})
    slow = TapStream(hub, tap, keep=lambda e: True, pre=None, start={P0: 0, P1: 0})
    hub.open_streams.add(slow)
    messages = slow.events()
    first = await anext(messages)
    assert first.id == LAYOUT.encode({P0: 1, P1: 0})

    # While the client reads nothing more, a few large events push the window past it.
    tap.take_in({P1: [event_record(f"big{i}", 1, i, payload_bytes=10 * small) for i in range(4)]})
    assert tap.floor[P0] == 5

    rest = [m async for m in messages]  # what it already took, then the end of the stream
    assert [m.id for m in rest] == [LAYOUT.encode({P0: o, P1: 0}) for o in range(2, 6)]
    assert slow not in hub.open_streams  # dropped: its slot is free
    # Its last id is a vector the window no longer covers (the large events are past
    # it, its own records are gone): the hub serves it with a consumer of its own.
    assert not tap.covers(LAYOUT.decode(rest[-1].id))
