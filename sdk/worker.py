"""Worker: runs one agent of the swarm over HTTP and SSE, calling your handler per task.

What :meth:`Worker.run` does, in order:

1. registers the agent (``agent_already_registered`` is fine) and starts it
   (``agent_already_running`` is fine: an offline agent comes back with its heartbeat);
2. sends a heartbeat every ``heartbeat_interval_s`` seconds, on a client of its own
   (its own connections, so it never waits behind the work's calls), each stamped with
   when it was sent and not abandoned after one interval (a few may be in flight);
3. follows ``GET /agents/{id}/assignments`` (SSE), remembering the last event id and
   reconnecting with exponential backoff; on every (re)connect, and after a failed one,
   it reconciles with the server (:meth:`Worker.reconcile`): of the tasks the server
   says this agent holds, an *assigned* one is offered (picking up what it missed while
   away), a *running* one that this process runs is kept, and a *running* one that it
   does not run (its previous process died with it, or gave up reporting on it) is
   handed back at once: failed as retryable, with the reason, so it is retried now
   rather than after its run timeout;
4. runs each new assignment (at most ``max_concurrent_tasks`` at a time): ``POST start``,
   the handler, then ``POST complete`` or ``POST fail``. An assignment seen twice runs
   once (:class:`~sdk.tracker.AssignmentTracker`). If the API says the task is no longer
   this agent's (403, or 409 ``task_finished`` ...: it was requeued elsewhere, timed out or
   cancelled), the task is logged and dropped;
5. when ``stop`` is set: takes nothing new, cancels the handlers in flight (each reports a
   retryable failure, so its task is retried at once rather than after its run timeout),
   and sends ``POST /agents/{id}/stop``.

Reports are delivered exactly once, however long the API is away: start, progress,
complete and fail carry idempotency keys derived from (agent, task, attempt, step), so a
retry, or a worker restarted mid-task, never doubles a command; and each is resent with
its key (capped exponential backoff with jitter, :mod:`sdk.backoff`) on no answer,
429, any 5xx and 202 until a definite answer, or until the task's own deadline:
for the start, when it was first sent + the lease timeout + the run timeout (a start
decided in time runs at most that long); for the reports after it, when the start was
acknowledged + the run timeout. Past it the server has timed the task out, and a report
is moot. The timeouts come from the task item when the assignment carries them (a
poll's does; the stream's carries none), else from ``default_lease_timeout_s`` and
``default_run_timeout_s``. A report given up at its deadline leaves the task to the
server's timeout, or to the hand-back of the next reconciliation.

The hand-back is race-free with the worker's own starts: an assignment is claimed in
the tracker before its start is sent, and each hand-back is decided against the tracker
at the moment it is sent (:meth:`~sdk.tracker.AssignmentTracker.take_back`), so a task
this process is starting or running is never failed. The fail carries ``If-Match`` with
the task version the listing showed (a fail names no attempt): if the task moved on
meanwhile, the API answers 412 and the worker reads the task again before deciding.
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
    DeadlineExceeded,
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

DEFAULT_LEASE_TIMEOUT_S = 30.0
"""The API's default lease timeout (seconds an assigned task may wait to be started)."""

DEFAULT_RUN_TIMEOUT_S = 600.0
"""The API's default run timeout (seconds a started task may run)."""

PROGRESS_RETRY_S = 30.0
"""Seconds a progress report is resent for at most (within the task's deadline): progress
is advisory, so a handler is not held up by a long outage; the next report supersedes."""

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
    _until: float | None = field(default=None, repr=False)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress ``fraction`` in [0, 1] with an optional message.

        Like every report it is resent with one idempotency key until a definite answer
        (so it is never lost to a short outage, nor recorded twice), but for at most
        ``PROGRESS_RETRY_S`` (30 s) within the task's deadline: progress is advisory, and
        the handler should not wait out a long outage for it. Raises
        :class:`~sdk.errors.TaskRevoked` when the task is no longer this agent's (stop
        working on it; the worker drops it quietly). Other failures to report are
        logged and ignored: progress is advisory.
        """
        if self._client is None:
            return
        self._reports += 1
        key = derived_key(self.agent_id, self.task_id, self.attempt, "progress", self._reports)
        until = self._client.clock() + PROGRESS_RETRY_S
        if self._until is not None:
            until = min(until, self._until)
        try:
            await self._client.report_progress(
                self.task_id,
                self.agent_id,
                fraction,
                None if message is None else message[:MAX_MESSAGE_CHARS],
                idempotency_key=key,
                until=until,
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
        self, fraction: float, message: str | None = None, timeout_s: float = 40.0
    ) -> None:
        """:meth:`progress` for a sync handler running in a worker thread; raises
        TaskRevoked likewise. Blocks up to ``timeout_s`` seconds; a report still
        unanswered then (the API is away) goes on being retried in the background, with
        its key, and this returns."""
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self.progress(fraction, message), self._loop)
        try:
            future.result(timeout=timeout_s)
        except TimeoutError:
            structlog.get_logger("swarmlog.sdk.worker").info(
                "task.progress_pending", task_id=self.task_id, waited_s=timeout_s
            )


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


def task_timeouts(
    task: Mapping[str, Any] | None,
    *,
    default_lease_s: float = DEFAULT_LEASE_TIMEOUT_S,
    default_run_s: float = DEFAULT_RUN_TIMEOUT_S,
) -> tuple[float, float]:
    """``(lease_timeout_s, run_timeout_s)`` of a task item (``GET /tasks/{id}``), in seconds.

    A value that is missing, not a number, or not positive falls back to the default.
    """

    def pick(name: str, default: float) -> float:
        value = (task or {}).get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return default
        return float(value) if value > 0 and math.isfinite(value) else default

    return pick("lease_timeout_s", default_lease_s), pick("run_timeout_s", default_run_s)


@dataclass(frozen=True)
class Reconciliation:
    """What one :meth:`Worker.reconcile` did, in tasks: ``kept`` (running on the server
    and here), ``handed_back`` (running on the server, not here: failed as retryable),
    ``moot`` (the hand-back found the task had moved on), ``not_handed_back`` (the
    hand-back got no definite answer; the next reconciliation tries again),
    ``offered`` (assigned, and new to this process: started); ``complete`` is False when
    a listing failed (nothing is handed back without the running list)."""

    kept: int = 0
    handed_back: int = 0
    moot: int = 0
    not_handed_back: int = 0
    offered: int = 0
    complete: bool = True


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
    ``default_lease_timeout_s`` and ``default_run_timeout_s`` (seconds, the API's
    defaults) bound how long a report is retried when the assignment does not carry
    the task's own timeouts (see the module docstring).
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
        default_lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S,
        default_run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        if max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks must be at least 1")
        if heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if default_lease_timeout_s <= 0 or default_run_timeout_s <= 0:
            raise ValueError("default_lease_timeout_s and default_run_timeout_s must be positive")
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
        self.default_lease_timeout_s = default_lease_timeout_s
        self.default_run_timeout_s = default_run_timeout_s
        self._token = token
        self._shared_client = client
        self._client: SwarmClient | None = client
        self._heartbeat_client = heartbeat_client
        self._tracker = AssignmentTracker()
        self._slots = asyncio.Semaphore(max_concurrent_tasks)
        self._runners: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._reconciling: asyncio.Task[None] | None = None
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
                    self._spawn_reconcile(always=True)
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
                # Could not subscribe: still pick up what was assigned meanwhile (unless a
                # reconciliation is still at it: an outage would pile them up).
                self._spawn_reconcile(always=False)
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

    def _spawn_reconcile(self, *, always: bool) -> None:
        if not always and self._reconciling is not None and not self._reconciling.done():
            return
        task = asyncio.create_task(self._reconcile_logged(), name="swarmlog-reconcile")
        self._reconciling = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reconcile_logged(self) -> None:
        try:
            await self.reconcile()
        except Exception:  # noqa: BLE001 - the next (re)connect reconciles again
            self._log.exception("assignments.reconcile_crashed")

    async def reconcile(self) -> Reconciliation:
        """Make this process and the server agree on what this agent holds.

        Lists ``GET /tasks?agent_id=<me>&status=running`` and ``...&status=assigned``.
        Each *assigned* task is offered (a repeat is ignored). Each *running* task is
        decided at the moment of handing back, against the tracker: running here, it is
        kept; not running here, it is handed back (``POST /tasks/{id}/fail``, retryable,
        with ``If-Match`` its listed version and a reason naming this agent), the report
        retried until a definite answer or the task's run timeout from now. Run on every
        (re)connect of the assignment stream, so also at startup: a process restarted
        under the same agent id hands back what its dead predecessor held. Listing
        failures are logged, not raised (``complete`` is then False, and the next
        reconnect reconciles again).
        RuntimeError when there is no client (neither ``client=`` nor :meth:`run`).
        """
        client = self._client
        if client is None:
            raise RuntimeError("reconcile needs a client: pass client= or call it during run()")
        running: list[dict[str, Any]] = []
        try:
            async for item in client.iter_tasks(agent_id=self.agent_id, status="running"):
                running.append(item)
        except SwarmError as exc:
            self._log.warning(
                "assignments.reconcile_failed",
                status_listed="running",
                status=exc.status,
                code=exc.code,
                detail=exc.detail,
            )
            return Reconciliation(complete=False)
        complete = True
        offered = 0
        try:
            async for item in client.iter_tasks(agent_id=self.agent_id, status="assigned"):
                assignment = assignment_from_task(item)
                if assignment is not None and self.offer(assignment):
                    offered += 1
        except SwarmError as exc:
            complete = False
            self._log.warning(
                "assignments.list_failed",
                status_listed="assigned",
                status=exc.status,
                code=exc.code,
                detail=exc.detail,
            )
        outcomes = await asyncio.gather(*(self._hand_back(client, item) for item in running))
        result = Reconciliation(
            kept=outcomes.count("kept"),
            handed_back=outcomes.count("handed_back"),
            moot=outcomes.count("moot"),
            not_handed_back=outcomes.count("not_handed_back"),
            offered=offered,
            complete=complete,
        )
        self._log.info(
            "assignments.reconciled",
            kept=result.kept,
            handed_back=result.handed_back,
            moot=result.moot,
            not_handed_back=result.not_handed_back,
            offered=result.offered,
            complete=result.complete,
        )
        return result

    async def _hand_back(self, client: SwarmClient, item: Mapping[str, Any]) -> str:
        """Hand back one task the server lists as running on this agent, unless it runs
        here; returns ``kept``, ``handed_back``, ``moot`` or ``not_handed_back``."""
        listed = assignment_from_task(item)
        if listed is None or listed.agent_id != self.agent_id:
            return "moot"
        tid, attempt, aid = listed.task_id, listed.attempt, self.agent_id
        log = self._log.bind(task_id=tid, attempt=attempt)
        # The decision, made here against the tracker with no await before it is marked.
        if not self._tracker.take_back(tid, attempt):
            log.info("task.kept", reason="running in this process (or listed stale)")
            return "kept"
        try:
            _, run_s = task_timeouts(
                item,
                default_lease_s=self.default_lease_timeout_s,
                default_run_s=self.default_run_timeout_s,
            )
            until = client.clock() + run_s
            version = _version(item.get("version"))
            reason = (
                f"agent {aid} restarted or reconnected and is not running this task "
                f"(attempt {attempt}): handed back for a retry"
            )
            backoff = Backoff(base_s=0.2, cap_s=2.0)
            while True:
                try:
                    await client.fail_task(
                        tid,
                        aid,
                        reason,
                        True,
                        idempotency_key=derived_key(aid, tid, attempt, "hand-back", version),
                        until=until,
                        expected_version=version,
                    )
                except DeadlineExceeded as exc:
                    log.warning("task.hand_back_abandoned", detail=exc.detail)
                    return "not_handed_back"
                except SwarmError as exc:
                    if exc.status == 412 and client.clock() < until:
                        # The task moved on since it was listed: look again before deciding.
                        fresh = await self._still_running_here(client, tid, attempt, log)
                        if fresh is None:
                            return "moot"
                        version = _version(fresh.get("version"))
                        await asyncio.sleep(backoff.next_delay())
                        continue
                    if is_revocation(exc):
                        log.info("task.hand_back_moot", status=exc.status, code=exc.code)
                        return "moot"
                    log.warning(
                        "task.hand_back_failed",
                        status=exc.status,
                        code=exc.code,
                        detail=exc.detail,
                    )
                    return "not_handed_back"
                log.warning("task.handed_back", version=version, reason=reason)
                return "handed_back"
        finally:
            self._tracker.release(tid, attempt)

    async def _still_running_here(
        self, client: SwarmClient, task_id: str, attempt: int | None, log: Any
    ) -> dict[str, Any] | None:
        """The task item if it is still attempt ``attempt`` running on this agent, else None."""
        try:
            item = await client.get_task(task_id)
        except SwarmError as exc:
            log.warning("task.hand_back_unchecked", status=exc.status, code=exc.code)
            return None
        if (
            item.get("status") != "running"
            or item.get("agent_id") != self.agent_id
            or (attempt is not None and item.get("attempts") != attempt)
        ):
            log.info(
                "task.hand_back_moot",
                status_now=item.get("status"),
                agent_now=item.get("agent_id"),
                attempt_now=item.get("attempts"),
            )
            return None
        return item

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
        lease_s, run_s = task_timeouts(
            task,
            default_lease_s=self.default_lease_timeout_s,
            default_run_s=self.default_run_timeout_s,
        )
        # This attempt was claimed in the tracker when it was offered, before this start is
        # sent: a reconciliation running meanwhile keeps it rather than handing it back.
        try:
            await client.start_task(
                tid,
                aid,
                idempotency_key=derived_key(aid, tid, attempt, "start"),
                until=client.clock() + lease_s + run_s,
            )
        except DeadlineExceeded as exc:
            log.warning("task.start_abandoned", detail=exc.detail)
            return
        except SwarmError as exc:
            if is_revocation(exc):
                log.info("task.dropped", step="start", status=exc.status, code=exc.code)
            else:
                log.warning(
                    "task.start_failed", status=exc.status, code=exc.code, detail=exc.detail
                )
            return
        until = client.clock() + run_s
        log.info("task.started", type=task.get("type"), run_timeout_s=run_s)
        ctx = TaskContext(
            task_id=tid,
            type=str(task.get("type", "")),
            payload=dict(task.get("payload") or {}),
            attempt=attempt if isinstance(attempt, int) else None,
            agent_id=aid,
            task=task,
            _client=client,
            _loop=asyncio.get_running_loop(),
            _until=until,
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
                until=ctx._until,
            )
            log.info("task.completed", quality=quality)
        except DeadlineExceeded as exc:
            # The run timeout has passed: the server timed the task out (or will).
            log.warning("task.report_abandoned", step="complete", detail=exc.detail)
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
        client = self._client
        assert client is not None
        until = ctx._until
        if timeout_s is not None:
            # Stopping: bounded; what is not delivered the next process hands back.
            soon = client.clock() + timeout_s
            until = soon if until is None else min(until, soon)
        call = client.fail_task(
            ctx.task_id,
            ctx.agent_id,
            error,
            retryable,
            idempotency_key=derived_key(ctx.agent_id, ctx.task_id, ctx.attempt, "fail"),
            until=until,
        )
        try:
            await (asyncio.wait_for(call, timeout_s) if timeout_s is not None else call)
            log.info("task.failed", retryable=retryable, error=error[:200])
        except DeadlineExceeded as exc:
            log.warning("task.report_abandoned", step="fail", detail=exc.detail)
        except SwarmError as exc:
            if is_revocation(exc):
                log.info("task.dropped", step="fail", status=exc.status, code=exc.code)
            else:
                log.warning(
                    "task.fail_not_reported", status=exc.status, code=exc.code, detail=exc.detail
                )
        except TimeoutError:
            log.warning("task.fail_not_reported", timeout_s=timeout_s)


def _version(value: Any) -> int | None:
    """An aggregate version from a task item (None when absent or not an int)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
