"""Live CloudEvents of every aggregate over SSE, resumable by position vector."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Annotated

from fastapi import APIRouter, Query
from sse_starlette import EventSourceResponse

from api.deps import (
    HubDep,
    LastEventIdHeader,
    LastEventIdQuery,
    SettingsDep,
    StreamFrom,
    TopicsDep,
)
from api.live import sse_response
from api.positions import Layout
from domain.recorded import RecordedEvent
from domain.workflow_run import RUN
from infra.mapper import ce_type_of, event_ce_type

router = APIRouter(prefix="/events", tags=["live"])


@router.get(
    "",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE of CloudEvents"},
        400: {"description": "malformed Last-Event-ID, or past the end of the log"},
        503: {"description": "too many streams; see Retry-After (problem+json)"},
    },
)
async def follow_events(
    settings: SettingsDep,
    topics: TopicsDep,
    hub: HubDep,
    type: Annotated[
        list[str] | None,
        Query(
            max_length=20,
            description="CloudEvent type glob, e.g. io.swarmlog.task.*; repeatable (any)",
        ),
    ] = None,
    subject: Annotated[
        str | None, Query(min_length=1, max_length=128, description="only this aggregate id")
    ] = None,
    run_id: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=128,
            description="only the events of this workflow run (io.swarmlog.workflow_run.*)",
        ),
    ] = None,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id: LastEventIdQuery = None,
    from_: StreamFrom = "end",
) -> EventSourceResponse:
    """Every event of every aggregate as a CloudEvent (JSON structured form), SSE ``event``
    = its type, live from now unless ``?from=beginning``; filtered by ``type`` globs,
    ``subject`` (aggregate id) and/or ``run_id`` (a workflow run's events: its steps,
    their tasks' scheduling and outcomes, its end).

    Each SSE id is a position vector (``v1:<offset>.<offset>...``: the next offset of
    each partition of the event topics, topics sorted by name); send it back as
    ``Last-Event-ID`` (or ``?last_event_id=``) to resume with no gap and no duplicate.
    """
    globs = tuple(type or ())
    run_prefix = event_ce_type(RUN, "")

    def pre(ce_type: str, ce_subject: str) -> bool:
        if subject is not None and ce_subject != subject:
            return False
        if run_id is not None and not (ce_subject == run_id and ce_type.startswith(run_prefix)):
            return False
        return not globs or any(fnmatchcase(ce_type, g) for g in globs)

    def keep(stored: RecordedEvent) -> bool:
        return pre(ce_type_of(stored), stored.aggregate_id)

    return await sse_response(
        hub,
        Layout.of(topics.event_topics.values(), topics.partitions),
        keep,
        pre=pre,
        last_event_id=last_event_id or last_event_id_header,
        from_beginning=from_ == "beginning",
        send_timeout_s=settings.sse_send_timeout_s,
    )
