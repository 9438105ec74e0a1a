"""A hand-written event log for pure read-model tests: stored events with per-aggregate
versions and times, as the command processor writes them."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from domain.messages import Event
from domain.recorded import RecordedEvent

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def t(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


class Log:
    """Stored events with per-aggregate versions, as the processor writes them."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = defaultdict(int)
        self.events: list[RecordedEvent] = []

    def add(self, aggregate_id: str, at: float, event: Event) -> RecordedEvent:
        self.versions[aggregate_id] += 1
        stored = RecordedEvent(
            id=f"{aggregate_id}/{self.versions[aggregate_id]}",
            aggregate_type=event.aggregate_type,
            aggregate_id=aggregate_id,
            version=self.versions[aggregate_id],
            time=t(at),
            correlation_id="corr",
            causation_id="cause",
            event=event,
        )
        self.events.append(stored)
        return stored
