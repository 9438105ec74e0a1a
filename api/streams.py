"""Live SSE streams of CloudEvents read straight from the event topics.

Each SSE client gets its own Kafka consumer (no consumer group: ``assign`` + ``seek``,
read_committed). DESIGN.md describes one shared consumer per API process fanning out to
bounded per-client queues; we knowingly trade that for exact resume: a client's stream
is then simply "these partitions from these offsets", so a position vector (see
api/positions.py) resumes it with no gap and no duplicate however many partitions there
are. The cost is one consumer (a few connections, a fetch loop) per client, bounded by
``Settings.sse_max_clients``.

A message's SSE id is the vector of next offsets *after* it, over every partition of the
stream; records skipped by the filter or undecodable still advance their partition, so
an id always says exactly what the client has been offered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from api.metrics import Metrics
from api.positions import Layout
from api.problems import Problem
from infra import kafka
from infra.codec import DecodeError, StoredEvent, decode_event

Filter = Callable[[StoredEvent], bool]
#: A cheap first filter on a record's ``ce_type`` and ``ce_subject`` headers, before any
#: decoding: most records of a filtered stream are dropped without being parsed.
HeaderFilter = Callable[[str, str], bool]


def _header(record: Any, name: str) -> str:
    for key, value in record.headers or ():
        if key == name:
            return value.decode("utf-8", "replace")
    return ""


class EventStream:
    """One client's stream: its consumer, its partitions' next offsets and its filter."""

    def __init__(
        self,
        hub: StreamHub,
        bootstrap_servers: str,
        layout: Layout,
        keep: Filter,
        pre: HeaderFilter | None = None,
    ) -> None:
        self.hub = hub
        self.layout = layout
        self.keep = keep
        self.pre = pre
        self.offsets: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer = kafka.consumer(bootstrap_servers)
        self._closed = False

    async def open(self, start: dict[TopicPartition, int] | None, from_beginning: bool) -> None:
        """Assign every partition and seek: to ``start`` (a decoded vector), else to the
        beginning when ``from_beginning``, else to the current end. A vector past the end
        of a partition is a 400 problem."""
        c = self._consumer
        await c.start()
        tps = list(self.layout.partitions)
        c.assign(tps)
        if start is not None:
            ends = await c.end_offsets(tps)
            beyond = [tp for tp in tps if start[tp] > ends[tp]]
            if beyond:
                raise Problem(
                    400,
                    "bad_position",
                    "Last-Event-ID is past the end of "
                    + ", ".join(f"{tp.topic}/{tp.partition}" for tp in beyond),
                    field="Last-Event-ID",
                )
            for tp in tps:
                c.seek(tp, start[tp])
        elif from_beginning:
            await c.seek_to_beginning(*tps)
        else:
            await c.seek_to_end(*tps)
        for tp in tps:  # resolve "beginning"/"end" now: the stream starts here
            self.offsets[tp] = await c.position(tp)

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The stream's messages, forever; the consumer is closed when the client goes."""
        try:
            while True:
                batch = await self._consumer.getmany(timeout_ms=1000, max_records=500)
                for tp, records in batch.items():
                    for record in records:
                        self.offsets[tp] = record.offset + 1
                        if self.pre is not None and not self.pre(
                            _header(record, "ce_type"), _header(record, "ce_subject")
                        ):
                            continue
                        try:
                            stored = decode_event(record)
                        except DecodeError:
                            continue  # the projector dead-letters it; a stream only skips it
                        if not self.keep(stored):
                            continue
                        yield ServerSentEvent(
                            id=self.layout.encode(self.offsets),
                            event=stored.type,
                            data=orjson.dumps(stored.to_json()).decode(),
                        )
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def close(self) -> None:
        """Stop the consumer and free the client's slot (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.hub.release(self)
        with contextlib.suppress(Exception):
            await self._consumer.stop()


@dataclass
class StreamHub:
    """Counts and tracks the open streams of one API process; caps them at ``max_clients``."""

    bootstrap_servers: str
    max_clients: int
    metrics: Metrics
    retry_after_s: int = 5
    open_streams: set[EventStream] = field(default_factory=set)

    def stream(self, layout: Layout, keep: Filter, pre: HeaderFilter | None = None) -> EventStream:
        """A new stream, holding one client slot; 503 problem with Retry-After when full."""
        if len(self.open_streams) >= self.max_clients:
            raise Problem(
                503,
                "too_many_streams",
                f"this API process serves at most {self.max_clients} streams; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        s = EventStream(self, self.bootstrap_servers, layout, keep, pre)
        self.open_streams.add(s)
        self.metrics.sse_clients.set(len(self.open_streams))
        return s

    def release(self, s: EventStream) -> None:
        """Give back the slot of ``s``."""
        self.open_streams.discard(s)
        self.metrics.sse_clients.set(len(self.open_streams))

    async def close_all(self) -> None:
        """Close every open stream (app shutdown)."""
        streams: Iterable[EventStream] = list(self.open_streams)
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)


async def sse_response(
    hub: StreamHub,
    layout: Layout,
    keep: Filter,
    *,
    pre: HeaderFilter | None = None,
    last_event_id: str | None,
    from_beginning: bool,
    send_timeout_s: float,
    ping_s: float = 15.0,
) -> EventSourceResponse:
    """Open a stream over ``layout`` from ``last_event_id`` (a position vector; malformed
    is a 400 problem), else from the beginning or the current end, and answer it as SSE."""
    start: dict[TopicPartition, int] | None = None
    if last_event_id:
        try:
            start = layout.decode(last_event_id)
        except ValueError as exc:
            raise Problem(400, "bad_position", str(exc), field="Last-Event-ID") from None
    stream = hub.stream(layout, keep, pre)
    try:
        await stream.open(start, from_beginning)
    except BaseException:
        await stream.close()
        raise
    return EventSourceResponse(
        stream.events(),
        ping=ping_s,
        send_timeout=send_timeout_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(stream.close),
    )
