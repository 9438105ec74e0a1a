"""Live SSE streams of CloudEvents read from the event topics.

One shared consumer per layout and API process (a ``Tap``) reads the topics from the
moment the first client came, keeps a window of the latest records (bounded in count
and in bytes: ``window`` records, ``window_bytes`` bytes), and fans them out:
each client walks the window at its own pace with its own filter, so a client that stops
reading holds nothing up; one that falls out of the window is dropped (it reconnects with
its Last-Event-ID). A client resuming from a position the window no longer covers, or
asking for ``from=beginning``, gets a consumer of its own (``assign`` + ``seek``) instead.

A message's SSE id is the vector of next offsets *after* it, over every partition of the
stream (api/positions.py); records skipped by the filter or undecodable still advance
their partition, so an id always says exactly what the client has been offered, and
resuming from it gives no gap and no duplicate whichever path serves the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
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
from api.sse import LiveResponse
from domain.recorded import RecordedEvent
from infra.cloudevents import DecodeError
from infra.kafka import Kafka, record_bytes, stop_client
from infra.mapper import ce_type_of, decode_event, event_json

Filter = Callable[[RecordedEvent], bool]
#: A cheap first filter on a record's ``ce_type`` and ``ce_subject`` headers, before any
#: decoding: most records of a filtered stream are dropped without being parsed.
HeaderFilter = Callable[[str, str], bool]

#: Default byte budget of each tap's window (``SWARMLOG_SSE_WINDOW_BYTES``).
WINDOW_BYTES = 16 * 1024 * 1024
#: What a decoded event costs beyond its record, besides twice its JSON value: measured
#: with tracemalloc, a RecordedEvent takes ~1.6 KiB plus one to four times its value.
DECODED_OVERHEAD_BYTES = 1536


def _decoded_bytes(record: Any) -> int:
    return DECODED_OVERHEAD_BYTES + 2 * len(record.value or b"")


def _header(record: Any, name: str) -> str:
    for key, value in record.headers or ():
        if key == name and isinstance(value, bytes):
            return value.decode("utf-8", "replace")
    return ""


@dataclass
class _Entry:
    """One record in a tap's window; decoded at most once, on first demand (Tap.event).
    ``size`` is what it costs in bytes: its record, and its decoded event once decoded."""

    seq: int
    tp: TopicPartition
    offset: int
    record: Any
    size: int
    decoded: RecordedEvent | None = None
    undecodable: bool = False


class Tap:
    """The shared consumer of one layout: reads from the end of the log as of its start,
    keeps the last records, at most ``window`` of them and ``window_bytes`` bytes
    (``kafka.record_bytes`` of each, plus its decoded event's estimated size once a
    client decoded it; the newest record is kept even when alone over the budget), and
    wakes the clients walking it. A client left behind by the window is dropped."""

    def __init__(
        self,
        kafka: Kafka,
        layout: Layout,
        window: int = 20_000,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        self.layout = layout
        self.window = window
        self.window_bytes = window_bytes
        #: What the window's entries cost now, in bytes.
        self.bytes = 0
        self.entries: deque[_Entry] = deque()
        self.next_seq = 0
        #: Per partition, the lowest offset the window still answers for.
        self.floor: dict[TopicPartition, int] = {}
        #: Per partition, the next offset after the last record taken in.
        self.position: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer = kafka.consumer()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign every partition at its end and start reading."""
        c = self._consumer
        await c.start()
        tps = list(self.layout.partitions)
        c.assign(tps)
        await c.seek_to_end(*tps)
        for tp in tps:
            self.position[tp] = self.floor[tp] = await c.position(tp)
        self._task = asyncio.create_task(self._read(), name=f"sse-tap-{len(tps)}")

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=1000, max_records=1000)
            if batch:
                self.take_in(batch)

    def take_in(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Append a fetched batch (consumer records per partition, in offset order) to the
        window, evict the oldest entries past either bound, and wake the clients."""
        for tp, records in batch.items():
            for record in records:
                size = record_bytes(record)
                self.entries.append(_Entry(self.next_seq, tp, record.offset, record, size))
                self.bytes += size
                self.next_seq += 1
                self.position[tp] = record.offset + 1
        self._evict()
        self._changed.set()
        self._changed = asyncio.Event()

    def _evict(self) -> None:
        while self.entries and (
            len(self.entries) > self.window
            or (self.bytes > self.window_bytes and len(self.entries) > 1)
        ):
            gone = self.entries.popleft()
            self.bytes -= gone.size
            self.floor[gone.tp] = gone.offset + 1

    def event(self, e: _Entry) -> RecordedEvent | None:
        """The event of entry ``e``, decoded on first demand and kept for the other
        clients (its size charged to the window, which may then evict); None when the
        record does not decode (the projector dead-letters it; streams skip it)."""
        if e.decoded is None and not e.undecodable:
            try:
                e.decoded = decode_event(e.record)
            except DecodeError:
                e.undecodable = True
                return None
            if self.entries and e.seq >= self.entries[0].seq:  # still in the window
                extra = _decoded_bytes(e.record)
                e.size += extra
                self.bytes += extra
                self._evict()
        return e.decoded

    def covers(self, start: dict[TopicPartition, int]) -> bool:
        """True when every record at or after ``start`` is still in (or yet to come to)
        the window."""
        return all(start[tp] >= self.floor[tp] for tp in self.layout.partitions)

    def since(self, seq: int) -> list[_Entry] | None:
        """The entries from ``seq`` on; None when ``seq`` has left the window."""
        if not self.entries:
            return [] if seq >= self.next_seq else None
        first = self.entries[0].seq
        if seq < first:
            return None
        return (
            list(itertools.islice(self.entries, seq - first, None)) if seq < self.next_seq else []
        )

    async def wait(self, seq: int) -> None:
        """Until an entry with ``seq`` (or later) exists."""
        while self.next_seq <= seq:
            await self._changed.wait()

    async def close(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await stop_client(self._consumer)


class TapStream:
    """One client served from a shared Tap: its own offsets vector and filter."""

    def __init__(
        self,
        hub: StreamHub,
        tap: Tap,
        keep: Filter,
        pre: HeaderFilter | None,
        start: dict[TopicPartition, int] | None,
    ) -> None:
        self.hub = hub
        self.tap = tap
        self.keep = keep
        self.pre = pre
        # Live: from the tap's position now; resumed: from the client's vector, walking
        # the whole window (entries below the vector are skipped by offset).
        self.offsets = dict(start) if start is not None else dict(tap.position)
        self.cursor = tap.entries[0].seq if start is not None and tap.entries else tap.next_seq
        self._closed = False

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The stream's messages until the client goes or falls out of the window."""
        layout = self.tap.layout
        try:
            while True:
                entries = self.tap.since(self.cursor)
                if entries is None:
                    return  # fell behind the window: dropped; it resumes from its last id
                if not entries:
                    await self.tap.wait(self.cursor)
                    continue
                self.cursor = entries[-1].seq + 1
                for e in entries:
                    if e.offset < self.offsets[e.tp]:
                        continue  # already offered before the client resumed
                    self.offsets[e.tp] = e.offset + 1
                    if self.pre is not None and not self.pre(
                        _header(e.record, "ce_type"), _header(e.record, "ce_subject")
                    ):
                        continue
                    stored = self.tap.event(e)
                    if stored is None or not self.keep(stored):
                        continue
                    yield ServerSentEvent(
                        id=layout.encode(self.offsets),
                        event=ce_type_of(stored),
                        data=orjson.dumps(event_json(stored)).decode(),
                    )
        finally:
            await self.close()

    async def close(self) -> None:
        """Free the client's slot (idempotent)."""
        if not self._closed:
            self._closed = True
            self.hub.release(self)


class EventStream:
    """One client's stream: its consumer, its partitions' next offsets and its filter."""

    def __init__(
        self,
        hub: StreamHub,
        kafka: Kafka,
        layout: Layout,
        keep: Filter,
        pre: HeaderFilter | None = None,
    ) -> None:
        self.hub = hub
        self.layout = layout
        self.keep = keep
        self.pre = pre
        self.offsets: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer = kafka.consumer()
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
            await _refuse_past_end(c, start)
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
                            event=ce_type_of(stored),
                            data=orjson.dumps(event_json(stored)).decode(),
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
            await stop_client(self._consumer)


@dataclass
class StreamHub:
    """The SSE side of one API process: the shared taps (each keeping a window of at most
    ``window`` records and ``window_bytes`` bytes), and the open streams, capped at
    ``max_clients``."""

    kafka: Kafka
    max_clients: int
    metrics: Metrics
    retry_after_s: int = 5
    window: int = 20_000
    window_bytes: int = WINDOW_BYTES
    open_streams: set[EventStream | TapStream] = field(default_factory=set)
    taps: dict[Layout, Tap] = field(default_factory=dict)
    _tap_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def tap(self, layout: Layout) -> Tap:
        """The shared tap of ``layout``, started on first use."""
        async with self._tap_lock:
            tap = self.taps.get(layout)
            if tap is None:
                tap = Tap(self.kafka, layout, self.window, self.window_bytes)
                await tap.start()
                self.taps[layout] = tap
            return tap

    async def open(
        self,
        layout: Layout,
        keep: Filter,
        pre: HeaderFilter | None,
        start: dict[TopicPartition, int] | None,
        from_beginning: bool,
    ) -> EventStream | TapStream:
        """A stream holding one client slot (503 problem with Retry-After when full):
        from the shared tap when it can serve ``start``, else with a consumer of its own.
        A ``start`` past the end of a partition is a 400 problem."""
        if len(self.open_streams) >= self.max_clients:
            raise Problem(
                503,
                "too_many_streams",
                f"this API process serves at most {self.max_clients} streams; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        stream: EventStream | TapStream
        if not from_beginning:
            tap = await self.tap(layout)
            if start is None or tap.covers(start):
                if start is not None:
                    await _refuse_past_end(tap._consumer, start, tap.position)
                stream = TapStream(self, tap, keep, pre, start)
                self._add(stream)
                return stream
        stream = EventStream(self, self.kafka, layout, keep, pre)
        self._add(stream)
        try:
            await stream.open(start, from_beginning)
        except BaseException:
            await stream.close()
            raise
        return stream

    def _add(self, s: EventStream | TapStream) -> None:
        self.open_streams.add(s)
        self.metrics.sse_clients.set(len(self.open_streams))

    def release(self, s: EventStream | TapStream) -> None:
        """Give back the slot of ``s``."""
        self.open_streams.discard(s)
        self.metrics.sse_clients.set(len(self.open_streams))

    async def close_all(self) -> None:
        """Close every open stream and tap (app shutdown)."""
        streams: Iterable[EventStream | TapStream] = list(self.open_streams)
        await asyncio.gather(*(s.close() for s in streams), return_exceptions=True)
        await asyncio.gather(*(t.close() for t in self.taps.values()), return_exceptions=True)
        self.taps.clear()


async def _refuse_past_end(
    consumer: AIOKafkaConsumer,
    start: dict[TopicPartition, int],
    known: dict[TopicPartition, int] | None = None,
) -> None:
    """400 problem when ``start`` is past the end of a partition: the consumer would
    otherwise reset to the earliest offset and send duplicates. ``known`` positions
    (already read, so certainly not past the end) spare the round trip."""
    suspect = [tp for tp in start if known is None or start[tp] > known.get(tp, -1)]
    if not suspect:
        return
    ends = await consumer.end_offsets(suspect)
    beyond = [tp for tp in suspect if start[tp] > ends[tp]]
    if beyond:
        raise Problem(
            400,
            "bad_position",
            "Last-Event-ID is past the end of "
            + ", ".join(f"{tp.topic}/{tp.partition}" for tp in beyond),
            field="Last-Event-ID",
        )


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
    stream = await hub.open(layout, keep, pre, start, from_beginning)
    return LiveResponse(  # ends quietly on a slow client: api/sse.py
        stream.events(),
        ping=ping_s,
        send_timeout=send_timeout_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(stream.close),
    )
