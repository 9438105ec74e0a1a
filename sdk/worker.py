"""Worker: runs one agent of the swarm over HTTP and SSE, calling your handler per task.

What :meth:`Worker.run` does, in order:

1. registers the agent (``agent_already_registered`` is fine) and starts it
   (``agent_already_running`` is fine: an offline agent comes back with its heartbeat);
2. sends a heartbeat every ``heartbeat_interval_s`` seconds, on a client of its own
   (its own connections, so it never waits behind the work's calls), each stamped with
   when it was sent and not abandoned after one interval (a few may be in flight);
3. follows ``GET /agents/{id}/assignments`` (SSE), remembering the last event id and
   reconnecting with exponential backoff; on every (re)connect, and after a failed one,
   it also lists ``GET /tasks?agent_id=<me>&status=assigned`` to pick up assignments it
   missed while away;
4. runs each new assignment (at most ``max_concurrent_tasks`` at a time): ``POST start``,
   the handler, then ``POST complete`` or ``POST fail``. An assignment seen twice runs
   once (:class:`~sdk.tracker.AssignmentTracker`). If the API says the task is no longer
   this agent's (403, or 409 ``task_finished`` ...: it was requeued elsewhere, timed out or
   cancelled), the task is logged and dropped;
5. when ``stop`` is set: takes nothing new, cancels the handlers in flight (each reports a
   retryable failure, so its task is retried at once rather than after its run timeout),
   and sends ``POST /agents/{id}/stop``.

Commands about a task carry idempotency keys derived from (agent, task, attempt, step),
so a retry, or a worker restarted mid-task, never doubles a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeAlias

import structlog

from sdk.backoff import Backoff
from sdk.client import SwarmClient
from sdk.errors import (
    NonRetryableError,
    SwarmError,
    TaskRevoked,
    is_revocation,
)
from sdk.models import (
    Assignment,
    assignment_from_task,
    derived_key,
    parse_assignment,
)
from sdk.tracker import AssignmentTracker

HandlerResult: TypeAlias = tuple[dict[str, Any], float]
"""What a handler returns: ``(result, quality)``, a JSON object and a quality in [0, 1]."""

Handler: TypeAlias = Callable[["TaskContext"], Awaitable[HandlerResult] | HandlerResult]
"""``async def handler(ctx) -> (result, quality)``, or a plain function (run in a thread)."""

MAX_ERROR_CHARS = 10_000
"""The API's limit on a failure's ``error`` text."""

MAX_MESSAGE_CHARS = 2_000
"""The API's limit on a progress message (longer ones are cut)."""

MAX_HEARTBEATS_IN_FLIGHT = 3
"""Heartbeats of one worker sent and not yet answered, at most (one more is skipped)."""


@dataclass
class TaskContext:
    """One attempt of one task, as handed to a handler.

    ``task_id``, ``type`` and ``payload`` come from the task; ``attempt`` is 1-based (None
    if the API did not say); ``task`` is the whole task item. ``await ctx.progress(0.5,
    "halfway")`` reports progress; a sync handler calls ``ctx.progress_sync`` instead.
    The worker builds it; a handler's own test may build one without the private fields
    (progress is then a no-op).
    """

    task_id: str
    type: str
    payload: dict[str, Any]
    attempt: int | None
    agent_id: str
    task: dict[str, Any] = field(default_factory=dict, repr=False)
    _client: SwarmClient | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _reports: int = field(default=0, repr=False)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress ``fraction`` in [0, 1] with an optional message.

        Raises :class:`~sdk.errors.TaskRevoked` when the task is no longer this agent's
        (stop working on it; the worker drops it quietly). Other failures to report are
        logged and ignored: progress is advisory.
        """
        if self._client is None:
            return
        self._reports += 1
        key = derived_key(self.agent_id, self.task_id, self.attempt, "progress", self._reports)
        try:
            await self._client.report_progress(
                self.task_id,
                self.agent_id,
                fraction,
                None if message is None else message[:MAX_MESSAGE_CHARS],
                idempotency_key=key,
            )
        except SwarmError as exc:
            if is_revocation(exc):
                raise TaskRevoked(self.task_id, exc.code, exc.detail) from exc
            structlog.get_logger("swarmlog.sdk.worker").warning(
                "task.progress_not_reported",
                task_id=self.task_id,
                status=exc.status,
                code=exc.code,
                detail=exc.detail,
            )

    def progress_sync(
        self, fraction: float, message: str | None = None, timeout_s: float = 30.0
    ) -> None:
        """:meth:`progress` for a sync handler running in a worker thread (blocks up to
        ``timeout_s`` seconds); raises TaskRevoked likewise."""
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self.progress(fraction, message), self._loop)
        future.result(timeout=timeout_s)


def normalize_result(value: Any) -> HandlerResult:
    """A handler's return value as ``(result, quality)``.

    Accepts ``(dict, quality)`` (a 2-item tuple or list) or a bare dict (quality 1.0).
    TypeError for another shape, ValueError for a quality outside [0, 1].
    """
    if isinstance(value, Mapping):
        return dict(value), 1.0
    if isinstance(value, (tuple, list)) and len(value) == 2:
        result, quality = value
        if not isinstance(result, Mapping):
            raise TypeError(f"handler result must be a dict, got {type(result).__name__}")
        if isinstance(quality, bool) or not isinstance(quality, (int, float, Decimal)):
            raise TypeError(f"handler quality must be a number, got {type(quality).__name__}")
        q = float(quality)
        if math.isnan(q) or not 0.0 <= q <= 1.0:
            raise ValueError(f"handler quality must be in [0, 1], got {quality}")
        return dict(result), q
    raise TypeError(
        f"handler must return (result: dict, quality: float), got {type(value).__name__}"
    )


def error_text(exc: BaseException) -> str:
    """The ``error`` text of a failure report: ``Type: message``, at most 10,000 characters."""
    message = str(exc).strip()
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


class Worker:
    """One agent of the swarm: registers, heartbeats, follows its assignments, runs tasks.

    ``capabilities`` maps a capability name to a level in [0, 1]; ``cost_per_task`` is a
    decimal string of tokens (``"0.5"``; the log keeps micro-tokens); intervals are in
    seconds. ``handler`` gets a :class:`TaskContext` and returns ``(result, quality)``;
    raising fails the attempt (retryable unless it is :class:`NonRetryableError`). Pass
    ``client`` to share a :class:`SwarmClient` (the worker then does not close it).
    Heartbeats go on ``heartbeat_client`` if given, else on a client the worker makes
    for them alone (``base_url``, ``token``, its own connection pool).
    """

    def __init__(
        self,
        base_url: str,
        *,
        agent_id: str,
        name: str,
        capabilities: Mapping[str, float],
        handler: Handler,
        max_concurrent_tasks: int = 1,
        cost_per_task: str | Decimal | int = "0",
        heartbeat_interval_s: float = 2.0,
        token: str | None = None,
        client: SwarmClient | None = None,
        heartbeat_client: SwarmClient | None = None,
        reconnect_base_s: float = 0.5,
        reconnect_cap_s: float = 30.0,
        stream_read_timeout_s: float | None = 60.0,
        shutdown_timeout_s: float = 5.0,
        fail_on_stop: bool = True,
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        if max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks must be at least 1")
        if heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        self.base_url = base_url
        self.agent_id = agent_id
        self.name = name
        self.capabilities = dict(capabilities)
        self.handler = handler
        self.max_concurrent_tasks = max_concurrent_tasks
        self.cost_per_task = cost_per_task
        self.heartbeat_interval_s = heartbeat_interval_s
        self.reconnect_base_s = reconnect_base_s
        self.reconnect_cap_s = reconnect_cap_s
        self.stream_read_timeout_s = stream_read_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.fail_on_stop = fail_on_stop
        self._token = token
        self._shared_client = client
        self._client: SwarmClient | None = client
        self._heartbeat_client = heartbeat_client
        self._tracker = AssignmentTracker()
        self._orphans_checked = False
        self._slots = asyncio.Semaphore(max_concurrent_tasks)
        self._runners: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._own_beats: SwarmClient | None = None
        self._beat_failing = False
        self._last_event_id: str | None = None
        self._server_retry_s: float | None = None
        self._log = structlog.get_logger("swarmlog.sdk.worker").bind(agent_id=agent_id)

    # -- public ---------------------------------------------------------------------------

    @property
    def last_event_id(self) -> str | None:
        """The position of the last assignment-stream message seen (resume point)."""
        return self._last_event_id

    @property
    def in_flight(self) -> frozenset[tuple[str, int | None]]:
        """The (task id, attempt) pairs taken on and not yet finished."""
        return self._tracker.active

    async def run(self, stop: asyncio.Event) -> None:
        """Run the agent until ``stop`` is set (see the module docstring for the steps).

        Raises :class:`SwarmError` when registering or starting is refused for good
        (e.g. 410 ``agent_deregistered``, 422, 401/403); outages are retried instead.
        """
        self._stopping = False
        client = self._client or SwarmClient(self.base_url, token=self._token)
        self._client = client
        startup = asyncio.create_task(self._startup(client, stop))
        stopped: asyncio.Task[bool | None] = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([startup, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not startup.done() or not startup.result():
                return  # stopped while the API was still unreachable
            beats = self._heartbeat_client or SwarmClient(
                self.base_url, token=self._token, retries=0, pending_resends=0
            )
            self._own_beats = None if self._heartbeat_client else beats
            loops = [
                asyncio.create_task(self._heartbeat_loop(beats), name="swarmlog-heartbeat"),
                asyncio.create_task(self._follow_assignments(client), name="swarmlog-assignments"),
            ]
            try:
                done, _ = await asyncio.wait([*loops, stopped], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = None if task is stopped or task.cancelled() else task.exception()
                    if error is not None:
                        raise error
            finally:
                await self._shutdown(client, loops)
        finally:
            for task in (startup, stopped):
                task.cancel()
            await asyncio.gather(startup, stopped, return_exceptions=True)
            if self._own_beats is not None:
                await self._own_beats.aclose()
                self._own_beats = None
            if self._shared_client is None:
                await client.aclose()
                self._client = None

    # -- lifecycle ------------------------------------------------------------------------

    async def _startup(self, client: SwarmClient, stop: asyncio.Event) -> bool:
        """Register and start the agent, retrying outages until ``stop``; False if stopped."""
        backoff = Backoff(base_s=self.reconnect_base_s, cap_s=self.reconnect_cap_s)
        while not stop.is_set():
            try:
                await self._register(client)
                await self._start(client)
                self._log.info(
                    "worker.started",
                    capabilities=self.capabilities,
                    max_concurrent_tasks=self.max_concurrent_tasks,
                )
                return True
            except SwarmError as exc:
                if not exc.retryable:
                    raise
                delay = backoff.next_delay()
                self._log.warning(
                    "worker.startup_retry",
                    status=exc.status,
                    code=exc.code,
                    detail=exc.detail,
                    delay_s=round(delay, 3),
                )
                await _wait(stop, delay)
        return False

    async def _register(self, client: SwarmClient) -> None:
        try:
            await client.register_agent(
                agent_id=self.agent_id,
                name=self.name,
                capabilities=self.capabilities,
                max_concurrent_tasks=self.max_concurrent_tasks,
                cost_per_task=self.cost_per_task,
                idempotency_key=derived_key(self.agent_id, "register"),
            )
            self._log.info("agent.registered")
        except SwarmError as exc:
            if exc.status == 409 and exc.code == "agent_already_registered":
                self._log.info("agent.already_registered")
                return
            raise

    async def _start(self, client: SwarmClient) -> None:
        try:
            await client.start_agent(self.agent_id)
            self._log.info("agent.started")
        except SwarmError as exc:
            # "already running" also answers an offline agent; the heartbeat revives it.
            if exc.status == 409 and exc.code == "agent_already_running":
                self._log.info("agent.already_running", detail=exc.detail)
                return
            raise

    async def _shutdown(self, client: SwarmClient, loops: list[asyncio.Task[Any]]) -> None:
        self._stopping = True
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        runners = list(self._runners)
        for task in runners:
            task.cancel()
        if runners:
            # Each cancelled runner reports its failure, bounded by shutdown_timeout_s.
            await asyncio.wait(runners, timeout=self.shutdown_timeout_s * 2)
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        try:
            await asyncio.wait_for(
                client.stop_agent(self.agent_id), timeout=self.shutdown_timeout_s
            )
            self._log.info("agent.stopped")
        except SwarmError as exc:
            if exc.status == 409 and exc.code == "agent_already_stopped":
                self._log.info("agent.already_stopped")
            else:
                self._log.warning(
                    "agent.stop_failed", status=exc.status, code=exc.code, detail=exc.detail
                )
        except TimeoutError:
            self._log.warning("agent.stop_timed_out", timeout_s=self.shutdown_timeout_s)

    async def _heartbeat_loop(self, client: SwarmClient) -> None:
        """Send a heartbeat every ``heartbeat_interval_s`` seconds, whether or not the
        previous ones were answered: each is stamped with when it was sent and may take
        up to :attr:`heartbeat_call_timeout_s` (a slow API still records it, counted from
        its send time); at most ``MAX_HEARTBEATS_IN_FLIGHT`` are in flight. Failures are
        logged once until a heartbeat succeeds again, never fatal."""
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                sent = loop.time()
                if len(in_flight) < MAX_HEARTBEATS_IN_FLIGHT:
                    beat = asyncio.create_task(self._beat(client, datetime.now(UTC)))
                    in_flight.add(beat)
                    beat.add_done_callback(in_flight.discard)
                else:
                    self._log.debug("agent.heartbeat_skipped", in_flight=len(in_flight))
                await asyncio.sleep(max(0.0, sent + self.heartbeat_interval_s - loop.time()))
        finally:
            for beat in in_flight:
                beat.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    @property
    def heartbeat_call_timeout_s(self) -> float:
        """How long one heartbeat call may take, seconds: 3 intervals, at least 10 s."""
        return max(3 * self.heartbeat_interval_s, 10.0)

    async def _beat(self, client: SwarmClient, sent_at: datetime) -> None:
        try:
            await asyncio.wait_for(
                client.heartbeat(self.agent_id, retries=0, sent_at=sent_at),
                timeout=self.heartbeat_call_timeout_s,
            )
            if self._beat_failing:
                self._log.info("agent.heartbeat_ok")
            self._beat_failing = False
        except SwarmError as exc:
            if not self._beat_failing:
                # agent_not_running: stopped by an operator; we do not overrule that.
                self._log.warning(
                    "agent.heartbeat_failed", status=exc.status, code=exc.code, detail=exc.detail
                )
            self._beat_failing = True
        except TimeoutError:
            if not self._beat_failing:
                self._log.warning(
                    "agent.heartbeat_timed_out", timeout_s=self.heartbeat_call_timeout_s
                )
            self._beat_failing = True

    # -- assignments ----------------------------------------------------------------------

    async def _follow_assignments(self, client: SwarmClient) -> None:
        """Follow the assignment stream forever, reconnecting with backoff."""
        backoff = Backoff(base_s=self.reconnect_base_s, cap_s=self.reconnect_cap_s)
        loop = asyncio.get_running_loop()
        while True:
            connected_at: float | None = None
            reason: str
            try:
                async with client.assignment_stream(
                    self.agent_id,
                    last_event_id=self._last_event_id,
                    read_timeout_s=self.stream_read_timeout_s,
                ) as messages:
                    connected_at = loop.time()
                    self._log.info("assignments.connected", last_event_id=self._last_event_id)
                    # Subscribed first, then listed: nothing can fall between the two.
                    self._spawn_poll(client)
                    async for message in messages:
                        self._on_message(message.event, message.data, message.id, message.retry)
                reason = "stream ended"
            except SwarmError as exc:
                reason = f"{exc.status} {exc.code}: {exc.detail}"
                if (
                    exc.status == 400
                    and self._last_event_id
                    and (exc.code == "bad_position" or exc.field == "Last-Event-ID")
                ):
                    # The position is unusable (e.g. the topic was recreated): follow from
                    # now on; the poll on connect picks up whatever is assigned already.
                    self._log.warning(
                        "assignments.position_dropped", last_event_id=self._last_event_id
                    )
                    self._last_event_id = None
            except Exception as exc:  # noqa: BLE001 - any read error means: reconnect
                reason = f"{type(exc).__name__}: {exc}"
            if connected_at is None:
                # Could not subscribe: still pick up what was assigned meanwhile.
                self._spawn_poll(client)
            elif loop.time() - connected_at >= 10.0:
                backoff.reset()
            delay = backoff.next_delay()
            if self._server_retry_s is not None:
                delay = max(delay, self._server_retry_s)
            self._log.warning("assignments.disconnected", reason=reason, delay_s=round(delay, 3))
            await asyncio.sleep(delay)

    def _on_message(self, event: str, data: str, event_id: str, retry_ms: int | None) -> None:
        if retry_ms is not None:
            self._server_retry_s = retry_ms / 1000
        try:
            assignment = parse_assignment(event, data, event_id or None)
        except ValueError as exc:
            self._log.warning("assignments.bad_message", error=str(exc), event_id=event_id)
            assignment = None
        if event_id:
            self._last_event_id = event_id
        if assignment is not None:
            self.offer(assignment)

    def _spawn_poll(self, client: SwarmClient) -> None:
        task = asyncio.create_task(self._poll_assigned(client))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _poll_assigned(self, client: SwarmClient) -> None:
        """Offer every task the read model lists as assigned to this agent; and, once,
        hand back the tasks it lists as *running* on this agent that this process is not
        running: a previous process of this agent died with them, and nobody else will
        give them up before their run timeout. They are failed as retryable, so they
        are retried (an agent id is one worker process at a time)."""
        found = 0
        try:
            if not self._orphans_checked:
                self._orphans_checked = True
                mine = {task_id for task_id, _ in self._tracker.active}
                async for item in client.iter_tasks(agent_id=self.agent_id, status="running"):
                    task_id = item.get("task_id")
                    if isinstance(task_id, str) and task_id not in mine:
                        self._log.warning("task.orphan_returned", task_id=task_id)
                        try:
                            await client.fail_task(
                                task_id,
                                self.agent_id,
                                "the agent restarted while running it",
                                retryable=True,
                            )
                        except SwarmError as exc:
                            self._log.info(
                                "task.orphan_not_returned", task_id=task_id, code=exc.code
                            )
            async for item in client.iter_tasks(agent_id=self.agent_id, status="assigned"):
                assignment = assignment_from_task(item)
                if assignment is not None:
                    found += 1
                    self.offer(assignment)
            self._log.debug("assignments.polled", found=found)
        except SwarmError as exc:
            self._log.warning(
                "assignments.poll_failed", status=exc.status, code=exc.code, detail=exc.detail
            )

    def offer(self, assignment: Assignment) -> bool:
        """Take on ``assignment`` unless stopping, someone else's, or already seen.

        Returns True when a runner was started for it. Called by the stream and the poll;
        public so tests and embedders can hand assignments in directly.
        """
        if self._stopping:
            return False
        if assignment.agent_id != self.agent_id:
            self._log.debug(
                "assignments.not_mine", task_id=assignment.task_id, to=assignment.agent_id
            )
            return False
        if not self._tracker.claim(assignment.task_id, assignment.attempt):
            self._log.debug(
                "assignments.duplicate", task_id=assignment.task_id, attempt=assignment.attempt
            )
            return False
        task = asyncio.create_task(
            self._run_assignment(assignment), name=f"swarmlog-task-{assignment.task_id}"
        )
        self._runners.add(task)
        task.add_done_callback(self._runners.discard)
        return True

    # -- running a task -------------------------------------------------------------------

    async def _run_assignment(self, assignment: Assignment) -> None:
        log = self._log.bind(task_id=assignment.task_id, attempt=assignment.attempt)
        try:
            async with self._slots:
                if self._stopping:
                    return
                await self._execute(assignment, log)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one task must never take the worker down
            log.exception("task.runner_crashed")
        finally:
            self._tracker.release(assignment.task_id, assignment.attempt)

    async def _fetch_task(self, task_id: str, log: Any) -> dict[str, Any] | None:
        """``GET /tasks/{id}``, waiting briefly for a lagging read model (404)."""
        backoff = Backoff(base_s=0.2, cap_s=2.0)
        assert self._client is not None
        for _ in range(6):
            try:
                return await self._client.get_task(task_id)
            except SwarmError as exc:
                if exc.status != 404:
                    log.warning("task.fetch_failed", status=exc.status, code=exc.code)
                    return None
            await asyncio.sleep(backoff.next_delay())
        log.warning("task.not_found")
        return None

    async def _execute(self, assignment: Assignment, log: Any) -> None:
        client = self._client
        assert client is not None
        tid, aid = assignment.task_id, self.agent_id
        task = assignment.task if assignment.task and "payload" in assignment.task else None
        if task is None:
            task = await self._fetch_task(tid, log)
            if task is None:
                return  # the lease runs out and the scheduler requeues it
        attempt = assignment.attempt if assignment.attempt is not None else task.get("attempts")
        try:
            await client.start_task(
                tid, aid, idempotency_key=derived_key(aid, tid, attempt, "start")
            )
        except SwarmError as exc:
            if is_revocation(exc):
                log.info("task.dropped", step="start", status=exc.status, code=exc.code)
            else:
                log.warning(
                    "task.start_failed", status=exc.status, code=exc.code, detail=exc.detail
                )
            return
        log.info("task.started", type=task.get("type"))
        ctx = TaskContext(
            task_id=tid,
            type=str(task.get("type", "")),
            payload=dict(task.get("payload") or {}),
            attempt=attempt if isinstance(attempt, int) else None,
            agent_id=aid,
            task=task,
            _client=client,
            _loop=asyncio.get_running_loop(),
        )
        try:
            raw = await self._invoke(ctx)
        except TaskRevoked as exc:
            log.info("task.dropped", step="progress", code=exc.code)
        except asyncio.CancelledError:
            if self.fail_on_stop:
                await self._report_fail(
                    ctx,
                    "worker stopped before the task finished",
                    retryable=True,
                    log=log,
                    timeout_s=self.shutdown_timeout_s,
                )
            raise
        except NonRetryableError as exc:
            await self._report_fail(ctx, error_text(exc), retryable=False, log=log)
        except Exception as exc:  # noqa: BLE001 - a handler error is a failed attempt
            log.warning("task.handler_raised", error=error_text(exc)[:200])
            await self._report_fail(ctx, error_text(exc), retryable=True, log=log)
        else:
            try:
                result, quality = normalize_result(raw)
            except (TypeError, ValueError) as exc:
                # A bad return shape is a bug in the handler: retrying will not fix it.
                await self._report_fail(ctx, f"bad handler result: {exc}", retryable=False, log=log)
            else:
                await self._report_complete(ctx, result, quality, log=log)

    async def _invoke(self, ctx: TaskContext) -> Any:
        if inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(
            getattr(self.handler, "__call__", None)  # noqa: B004 (a callable object's async __call__)
        ):
            return await self.handler(ctx)  # type: ignore[misc]  # iscoroutinefunction does not narrow
        value = await asyncio.to_thread(self.handler, ctx)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _report_complete(
        self, ctx: TaskContext, result: dict[str, Any], quality: float, *, log: Any
    ) -> None:
        assert self._client is not None
        try:
            await self._client.complete_task(
                ctx.task_id,
                ctx.agent_id,
                result,
                quality,
                idempotency_key=derived_key(ctx.agent_id, ctx.task_id, ctx.attempt, "complete"),
            )
            log.info("task.completed", quality=quality)
        except SwarmError as exc:
            if is_revocation(exc):
                log.info("task.dropped", step="complete", status=exc.status, code=exc.code)
            else:
                log.warning(
                    "task.complete_failed", status=exc.status, code=exc.code, detail=exc.detail
                )

    async def _report_fail(
        self,
        ctx: TaskContext,
        error: str,
        *,
        retryable: bool,
        log: Any,
        timeout_s: float | None = None,
    ) -> None:
        assert self._client is not None
        call = self._client.fail_task(
            ctx.task_id,
            ctx.agent_id,
            error,
            retryable,
            idempotency_key=derived_key(ctx.agent_id, ctx.task_id, ctx.attempt, "fail"),
            retries=0 if timeout_s is not None else None,
        )
        try:
            await (asyncio.wait_for(call, timeout_s) if timeout_s is not None else call)
            log.info("task.failed", retryable=retryable, error=error[:200])
        except SwarmError as exc:
            if is_revocation(exc):
                log.info("task.dropped", step="fail", status=exc.status, code=exc.code)
            else:
                log.warning(
                    "task.fail_not_reported", status=exc.status, code=exc.code, detail=exc.detail
                )
        except TimeoutError:
            log.warning("task.fail_not_reported", timeout_s=timeout_s)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
