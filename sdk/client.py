"""SwarmClient: an async client of the swarmlog HTTP API (commands, queries, SSE streams).

Every command is sent with an ``Idempotency-Key`` (the caller's, or one made once per
logical call), so when the connection breaks or the API answers 429/502/503/504 the call
is sent again with the same key and the API returns the first outcome instead of
deciding the command twice. Error answers (RFC 9457 problem+json) raise
:class:`~sdk.errors.SwarmError`; no answer after every retry raises
:class:`~sdk.errors.SwarmConnectionError`. A command given ``until`` (a deadline on the
client's monotonic clock) is retried until a definite answer instead, however many tries
that takes, and raises :class:`~sdk.errors.DeadlineExceeded` if the deadline comes first.

Units: times in seconds; token amounts as decimal strings of tokens (``"0.5"``), which
the API turns into micro-tokens (1 token = 1,000,000).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from httpx_sse import ServerSentEvent, aconnect_sse

from sdk.backoff import Backoff
from sdk.errors import (
    DeadlineExceeded,
    SwarmConnectionError,
    SwarmError,
    problem_from_response,
)
from sdk.models import CommandResult, TaskPage, capabilities_body, format_tokens

USER_AGENT = "swarmlog-sdk/0.1"

log = structlog.get_logger("swarmlog.sdk.client")

MAX_SERVER_ERROR_RESENDS = 5
"""A command call given ``until`` resends a 500 (or another 5xx that is not an outage's
502/503/504) at most this many times in a row, then raises it: the API failed around the
command, and the same key makes a resend safe, but one that keeps failing is a bug."""


def _seg(value: str) -> str:
    """One path segment, percent-encoded (ids may hold ``/`` or ``:``)."""
    if not value:
        raise ValueError("an id in a URL path must not be empty")
    return quote(value, safe="")


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class SwarmClient:
    """Async client of the swarmlog API; use as ``async with SwarmClient(url) as client``.

    ``token`` is a JWT sent as ``Authorization: Bearer``; ``timeout`` is the per-request
    timeout in seconds. ``transport`` replaces httpx's network transport (e.g.
    ``httpx.ASGITransport(app)``). Nothing connects until the first call.

    Two retry modes, both resending a command with the same Idempotency-Key and both
    waiting a capped exponential backoff with jitter between tries (``backoff_base_s``
    doubling up to ``backoff_cap_s`` seconds, scaled by a draw of ``rng`` in [0.5, 1],
    see :mod:`sdk.backoff`; or the server's Retry-After when longer, up to
    ``max_retry_after_s``):

    - **by count** (the default): a call is sent at most ``1 + retries`` times on no
      answer or 429/502/503/504, and a 202 (accepted, not yet decided) is asked again
      up to ``pending_resends`` times, after which the 202 is returned;
    - **until a deadline**: a command call given ``until`` (a point on ``clock``, by
      default :func:`time.monotonic`, in seconds) is resent on no answer, on
      429, on any 5xx (a 500 at most ``MAX_SERVER_ERROR_RESENDS`` times in a row) and on
      202 for as long as it takes to get a definite answer (2xx
      other than 202, or an error that retrying cannot change), and raises
      :class:`~sdk.errors.DeadlineExceeded` once ``until`` has passed without one. A
      try in flight at the deadline is let finish (it is bounded by ``timeout``).

    ``clock`` (seconds, monotonic), ``sleep`` and ``rng`` (draws in [0, 1)) are injected
    so tests can drive the schedule without waiting.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 5.0,
        max_retry_after_s: float = 30.0,
        pending_resends: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_retry_after_s = max_retry_after_s
        self.pending_resends = max(0, pending_resends)
        self.clock = clock
        self._sleep = sleep
        self._rng = rng
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> SwarmClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # -- transport ------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        retries: int | None = None,
        until: float | None = None,
        resend_pending: bool = False,
    ) -> httpx.Response:
        """Send one logical request, retrying while nothing was decided (see the class
        docstring for the two modes); raise on an error answer.

        ``resend_pending`` asks again on a 202 (commands only: the same key returns the
        decision once there is one, and a repeated command id writes nothing).
        """
        tries = 1 + (self.retries if retries is None else max(0, retries))
        backoff = Backoff(base_s=self.backoff_base_s, cap_s=self.backoff_cap_s, rng=self._rng)
        query = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        resends = 0
        server_errors = 0  # 5xx answers in a row
        while True:
            attempt += 1
            error: SwarmError | None = None
            try:
                response = await self._http.request(
                    method, path, json=json, params=query or None, headers=headers
                )
            except httpx.TransportError as exc:
                error = SwarmConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
            else:
                if response.status_code == 202 and resend_pending:
                    if until is None:
                        if resends >= self.pending_resends:
                            return response
                        resends += 1
                        attempt -= 1  # a 202 is an answer: it does not use up a retry
                elif response.status_code < 400:
                    return response
                else:
                    error = problem_from_response(
                        response.status_code,
                        response.headers.get("content-type"),
                        response.content,
                        retry_after=response.headers.get("retry-after"),
                    )
                    # Before a deadline a 5xx is no answer either: the API failed around
                    # the command, which the same key makes safe to send again; but a
                    # 500 that keeps coming is a bug, not an outage: raised after a few.
                    server_errors = server_errors + 1 if error.status >= 500 else 0
                    resend = error.retryable or (
                        until is not None
                        and error.status >= 500
                        and server_errors <= MAX_SERVER_ERROR_RESENDS
                    )
                    if not resend:
                        raise error
            if until is None and attempt >= tries and error is not None:
                if isinstance(error, SwarmConnectionError):
                    raise SwarmConnectionError(f"{error.detail} (after {tries} tries)") from (
                        error.__cause__
                    )
                raise error
            delay = backoff.next_delay()
            if error is not None and error.retry_after_s is not None:
                delay = max(delay, min(error.retry_after_s, self.max_retry_after_s))
            if until is not None:
                remaining = until - self.clock()
                if remaining <= 0:
                    log.warning(
                        "api.deadline_exceeded",
                        method=method,
                        path=path,
                        tries=attempt,
                        last=_what(error),
                    )
                    raise DeadlineExceeded(
                        f"{method} {path}: no definite answer in {attempt} tries before the "
                        f"deadline (last: {_what(error)})",
                        last_error=error,
                        pending=error is None,
                    ) from error
                delay = min(delay, remaining)
            log.info(
                "api.retry",
                method=method,
                path=path,
                status=202 if error is None else error.status,
                code="pending" if error is None else error.code,
                attempt=attempt,
                delay_s=round(delay, 3),
                **({} if until is None else {"deadline_in_s": round(until - self.clock(), 1)}),
            )
            await self._sleep(delay)

    async def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return _body(await self._request("GET", path, params=params))

    async def _command(
        self,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        retries: int | None = None,
        until: float | None = None,
        expected_version: int | None = None,
    ) -> CommandResult:
        """POST a command with one Idempotency-Key for every try of this logical call.

        ``until`` (on :attr:`clock`) switches to retrying until a definite answer or that
        deadline; ``expected_version`` is sent as ``If-Match`` (a mismatch is a 412
        ``version_mismatch``).
        """
        key = idempotency_key or str(uuid.uuid4())
        headers = {"Idempotency-Key": key}
        if expected_version is not None:
            headers["If-Match"] = f'"{expected_version}"'
        response = await self._request(
            "POST",
            path,
            json=dict(body or {}),
            headers=headers,
            retries=retries,
            until=until,
            resend_pending=True,
        )
        return CommandResult(response.status_code, _body(response), key)

    # -- agents ---------------------------------------------------------------------------

    async def register_agent(
        self,
        *,
        name: str,
        agent_id: str | None = None,
        capabilities: Mapping[str, float] | Iterable[Mapping[str, Any]] = (),
        max_concurrent_tasks: int = 1,
        cost_per_task: str | Decimal | int = "0",
        idempotency_key: str | None = None,
        until: float | None = None,
    ) -> CommandResult:
        """``POST /agents``: register an agent (201); the body has ``id``, ``version``, ``state``.

        ``capabilities`` maps a name to a level in [0, 1]; ``cost_per_task`` is in tokens
        (decimal string, Decimal, or whole tokens as int). 409 ``agent_already_registered``
        when the id exists. ``until`` as for :meth:`start_task`.
        """
        body: dict[str, Any] = {
            "name": name,
            "capabilities": capabilities_body(capabilities),
            "max_concurrent_tasks": max_concurrent_tasks,
            "cost_per_task": format_tokens(cost_per_task),
        }
        if agent_id is not None:
            body["agent_id"] = agent_id
        return await self._command("/agents", body, idempotency_key=idempotency_key, until=until)

    async def start_agent(
        self, agent_id: str, *, idempotency_key: str | None = None, until: float | None = None
    ) -> CommandResult:
        """``POST /agents/{id}/start``; 409 ``agent_already_running`` when running or
        offline. ``until`` as for :meth:`start_task`."""
        return await self._command(
            f"/agents/{_seg(agent_id)}/start", idempotency_key=idempotency_key, until=until
        )

    async def stop_agent(
        self, agent_id: str, *, idempotency_key: str | None = None, until: float | None = None
    ) -> CommandResult:
        """``POST /agents/{id}/stop``; 409 ``agent_already_stopped``. ``until`` as for
        :meth:`start_task`."""
        return await self._command(
            f"/agents/{_seg(agent_id)}/stop", idempotency_key=idempotency_key, until=until
        )

    async def restart_agent(
        self, agent_id: str, *, idempotency_key: str | None = None, until: float | None = None
    ) -> CommandResult:
        """``POST /agents/{id}/restart``. ``until`` as for
        :meth:`start_task`."""
        return await self._command(
            f"/agents/{_seg(agent_id)}/restart", idempotency_key=idempotency_key, until=until
        )

    async def heartbeat(
        self,
        agent_id: str,
        *,
        idempotency_key: str | None = None,
        retries: int | None = None,
        sent_at: datetime | None = None,
    ) -> CommandResult:
        """``POST /agents/{id}/heartbeat`` with ``sent_at`` (default: now, UTC); brings an
        offline agent back. Every try of the call sends the same ``sent_at``, so the
        heartbeat counts from when it was first sent (the API clamps it to a few seconds
        before it received it). ValueError for a naive ``sent_at``.

        409 ``agent_not_running`` when the agent is registered or stopped.
        """
        sent = sent_at if sent_at is not None else datetime.now(UTC)
        if sent.tzinfo is None or sent.utcoffset() is None:
            raise ValueError("sent_at must be timezone-aware")
        return await self._command(
            f"/agents/{_seg(agent_id)}/heartbeat",
            {"sent_at": sent.isoformat()},
            idempotency_key=idempotency_key,
            retries=retries,
        )

    async def get_agent(self, agent_id: str) -> dict[str, Any]:
        """``GET /agents/{id}``: the agent's read model."""
        return dict(await self._get(f"/agents/{_seg(agent_id)}"))

    # -- tasks ----------------------------------------------------------------------------

    async def submit_task(
        self,
        type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        idempotency_key: str | None = None,
        until: float | None = None,
        **options: Any,
    ) -> CommandResult:
        """``POST /tasks``: submit a task of ``type`` with ``payload``.

        ``options`` are passed as they are (``required_capabilities``, ``priority``,
        ``max_cost`` in tokens, ``lease_timeout_s``, ``run_timeout_s``, ``max_attempts``).
        ``until`` as for :meth:`start_task`.
        """
        body: dict[str, Any] = {"type": type, "payload": dict(payload or {}), **options}
        if task_id is not None:
            body["task_id"] = task_id
        return await self._command("/tasks", body, idempotency_key=idempotency_key, until=until)

    async def get_task(self, task_id: str) -> dict[str, Any]:
        """``GET /tasks/{id}``: the task item (``task_id``, ``type``, ``payload``, ``status``,
        ``agent_id``, ``attempts``, ``version`` ...)."""
        return dict(await self._get(f"/tasks/{_seg(task_id)}"))

    async def list_tasks(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        **filters: Any,
    ) -> TaskPage:
        """``GET /tasks``: one page of task items, filtered; follow ``next_cursor`` for more."""
        body = await self._get(
            "/tasks",
            {"agent_id": agent_id, "status": status, "limit": limit, "cursor": cursor, **filters},
        )
        items = body.get("items", []) if isinstance(body, dict) else []
        cursor_out = body.get("next_cursor") if isinstance(body, dict) else None
        return TaskPage(
            [dict(i) for i in items if isinstance(i, dict)],
            cursor_out if isinstance(cursor_out, str) and cursor_out else None,
        )

    async def iter_tasks(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        page_size: int = 100,
        max_pages: int = 1000,
        **filters: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every task item matching the filters, page by page (at most ``max_pages`` pages)."""
        cursor: str | None = None
        for _ in range(max_pages):
            page = await self.list_tasks(
                agent_id=agent_id, status=status, limit=page_size, cursor=cursor, **filters
            )
            for item in page.items:
                yield item
            if page.next_cursor is None or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    async def start_task(
        self,
        task_id: str,
        agent_id: str,
        *,
        idempotency_key: str | None = None,
        until: float | None = None,
    ) -> CommandResult:
        """``POST /tasks/{id}/start`` as ``agent_id``; 403 ``not_assigned_agent``, 409
        ``task_not_assigned``/``task_finished`` when the task is no longer this agent's.

        ``until`` is the deadline of this report, a point on :attr:`clock` (by default
        ``time.monotonic()``, seconds): the call is resent with the same Idempotency-Key
        on no answer, 429, any 5xx and 202 until a definite answer, and raises
        :class:`~sdk.errors.DeadlineExceeded` once ``until`` has passed without one.
        Give it the task's own deadline (the Worker uses: when the start was first sent
        + the lease timeout + the run timeout; for the reports after it, when the start
        was acknowledged + the run timeout), past which the server has timed the task
        out and any answer would be moot. None (the default) retries by count
        (``retries``, ``pending_resends``) as every other call does.
        """
        return await self._command(
            f"/tasks/{_seg(task_id)}/start",
            {"agent_id": agent_id},
            idempotency_key=idempotency_key,
            until=until,
        )

    async def report_progress(
        self,
        task_id: str,
        agent_id: str,
        progress: float,
        message: str | None = None,
        *,
        idempotency_key: str | None = None,
        until: float | None = None,
    ) -> CommandResult:
        """``POST /tasks/{id}/progress``: ``progress`` is a fraction in [0, 1]; ``until`` as
        for :meth:`start_task`."""
        body: dict[str, Any] = {"agent_id": agent_id, "progress": _fraction("progress", progress)}
        if message is not None:
            body["message"] = message
        return await self._command(
            f"/tasks/{_seg(task_id)}/progress", body, idempotency_key=idempotency_key, until=until
        )

    async def complete_task(
        self,
        task_id: str,
        agent_id: str,
        result: Mapping[str, Any],
        quality: float = 1.0,
        *,
        idempotency_key: str | None = None,
        until: float | None = None,
    ) -> CommandResult:
        """``POST /tasks/{id}/complete`` with a JSON ``result`` and ``quality`` in [0, 1];
        ``until`` as for :meth:`start_task`."""
        body = {
            "agent_id": agent_id,
            "result": dict(result),
            "quality": _fraction("quality", quality),
        }
        return await self._command(
            f"/tasks/{_seg(task_id)}/complete", body, idempotency_key=idempotency_key, until=until
        )

    async def fail_task(
        self,
        task_id: str,
        agent_id: str,
        error: str,
        retryable: bool = True,
        *,
        idempotency_key: str | None = None,
        retries: int | None = None,
        until: float | None = None,
        expected_version: int | None = None,
    ) -> CommandResult:
        """``POST /tasks/{id}/fail``; a ``retryable`` failure is retried while attempts remain.

        ``until`` as for :meth:`start_task` (it overrides ``retries``).
        ``expected_version`` is sent as ``If-Match`` (RFC 9110 §13.1.1): the failure is
        decided only if the task is still at that version, else 412 ``version_mismatch``
        (a fail names no attempt, so this is how a hand-back avoids failing a later one).
        """
        body = {"agent_id": agent_id, "error": error or "failed", "retryable": retryable}
        return await self._command(
            f"/tasks/{_seg(task_id)}/fail",
            body,
            idempotency_key=idempotency_key,
            retries=retries,
            until=until,
            expected_version=expected_version,
        )

    # -- streams --------------------------------------------------------------------------

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        last_event_id: str | None = None,
        read_timeout_s: float | None = 60.0,
    ) -> AsyncIterator[AsyncIterator[ServerSentEvent]]:
        """Open an SSE stream; yields an async iterator of its messages.

        ``last_event_id`` resumes after that position (header ``Last-Event-ID``).
        ``read_timeout_s`` is the longest silence tolerated (keep-alives count) before the
        connection is deemed dead; None waits forever. An error answer raises
        :class:`SwarmError`; a broken connection, while opening or reading, raises
        :class:`SwarmConnectionError`. One connection, no reconnect: see the Worker.
        """
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        query = {k: v for k, v in (params or {}).items() if v is not None}
        timeout = httpx.Timeout(self.timeout, read=read_timeout_s)
        try:
            async with aconnect_sse(
                self._http, "GET", path, params=query or None, headers=headers, timeout=timeout
            ) as source:
                response = source.response
                if response.status_code >= 400:
                    await response.aread()
                    raise problem_from_response(
                        response.status_code,
                        response.headers.get("content-type"),
                        response.content,
                        retry_after=response.headers.get("retry-after"),
                    )
                media = response.headers.get("content-type", "").split(";", 1)[0].strip()
                if media != "text/event-stream":
                    raise SwarmError(
                        response.status_code,
                        "not_an_event_stream",
                        f"GET {path} answered {media or 'no content type'}, not text/event-stream",
                    )
                yield source.aiter_sse()
        except httpx.TransportError as exc:
            raise SwarmConnectionError(f"GET {path} (stream): {type(exc).__name__}: {exc}") from exc

    def assignment_stream(
        self,
        agent_id: str,
        *,
        last_event_id: str | None = None,
        read_timeout_s: float | None = 60.0,
    ) -> AbstractAsyncContextManager[AsyncIterator[ServerSentEvent]]:
        """``GET /agents/{id}/assignments`` as an SSE stream (see :meth:`stream`).

        Each message: ``event: io.swarmlog.task.assigned``, ``id:`` a position, ``data:`` a
        CloudEvent whose data is ``{"task_id", "agent_id", "attempt"}``; parse it with
        :func:`sdk.models.parse_assignment`.
        """
        return self.stream(
            f"/agents/{_seg(agent_id)}/assignments",
            last_event_id=last_event_id,
            read_timeout_s=read_timeout_s,
        )


def _what(error: SwarmError | None) -> str:
    """A short name of the last retryable answer, for logs and errors."""
    if error is None:
        return "202 pending"
    return f"{error.status} {error.code}" if error.status else error.code


def _body(response: httpx.Response) -> Any:
    """The JSON body of a success answer ({} when empty or not JSON)."""
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:
        return {}
