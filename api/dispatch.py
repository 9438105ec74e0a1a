"""From HTTP to a command and back: build the domain command, send it in its envelope,
wait (bounded) for the decider's outcome, and answer it as HTTP.

* accepted -> 201 with ``Location`` (creation) or 200, body ``CommandResult``, ``ETag``
  the aggregate version after the command;
* rejected -> problem+json, status from the Rejection's kind (api/problems.py);
* no outcome within ``Settings.command_wait_s`` -> 202 with
  ``Location: /commands/{command_id}`` (the command is on the log and will be decided).

A repeated command id (Idempotency-Key) gets the first outcome: the same status and
body as the first time, with the header ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.metrics import Metrics
from api.positions import format_position
from api.problems import Problem, validation_problem
from api.schemas.commands import (
    STATE_TYPES,
    BatchItemResult,
    CommandPending,
    CommandResult,
    EventRef,
)
from api.schemas.money import public_state
from commands.client import CommandClient
from domain.ids import derived_id
from domain.messages import Command
from infra.clock import Clock
from infra.envelope import CommandEnvelope
from infra.outcome import Outcome
from infra.settings import Settings

if TYPE_CHECKING:  # api/deps.py builds a Dispatcher per request (``DispatchDep``)
    from api.deps import CommandMeta

C = TypeVar("C", bound=Command)

#: Set on the answer to a repeated command id: the first outcome, replayed; the body is
#: the same as the first time.
REPLAYED = "Idempotent-Replayed"

#: OpenAPI documentation of the answers every command route may give.
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": CommandPending, "description": "the outcome did not come in time"},
    403: {"description": "rejected: forbidden (problem+json)"},
    404: {"description": "rejected: not found (problem+json)"},
    409: {"description": "rejected: conflict (problem+json)"},
    410: {"description": "rejected: gone (problem+json)"},
    412: {"description": "rejected: If-Match is not the aggregate version (problem+json)"},
    422: {"description": "invalid request (problem+json with errors)"},
}


def event_refs(outcome: Outcome) -> list[EventRef]:
    """The outcome's events, each with its position as ``?after=`` takes it."""
    refs = []
    for e in outcome.events:
        position = None if e.position is None else format_position(e.position)
        refs.append(EventRef(**e.model_dump(), position=position))
    return refs


def rejection_problem(outcome: Outcome) -> Problem:
    """The problem for a rejected outcome; its ETag is the aggregate's current version."""
    extra = {"command_id": outcome.command_id, "version": outcome.version}
    headers = {"ETag": f'"{outcome.version}"'} if outcome.version else None
    if outcome.rejection is None:
        return Problem(409, "rejected", "the command was rejected", headers=headers, extra=extra)
    return Problem.from_rejection(outcome.rejection, headers=headers, extra=extra)


def command_result(outcome: Outcome) -> CommandResult:
    """The body of an accepted command."""
    return CommandResult(
        id=outcome.aggregate_id,
        version=outcome.version,
        state=public_state(STATE_TYPES.get(outcome.aggregate_type), outcome.state),
        events=event_refs(outcome),
        command_id=outcome.command_id,
    )


class Dispatcher:
    """Sends the commands of one request and turns their outcomes into responses."""

    def __init__(
        self,
        client: CommandClient,
        settings: Settings,
        clock: Clock,
        metrics: Metrics,
        meta: CommandMeta,
    ) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.meta = meta

    def command(self, cls: type[C], **fields: Any) -> C:
        """``cls(at=now, **fields)``; a domain validation error is a 422 problem."""
        return self.command_at(("body",), cls, **fields)

    def command_at(self, loc: tuple[str | int, ...], cls: type[C], **fields: Any) -> C:
        """``command`` for fields found at ``loc`` in the request (``("body", "tasks", 3)``),
        so that a 422 names them where the client wrote them."""
        try:
            return cls(at=self.clock.now(), **fields)
        except ValidationError as exc:
            raise validation_problem(exc.errors(), prefix=loc) from None

    def new_id(self, purpose: str, *parts: object) -> str:
        """A fresh aggregate id: uuid4, or, with an Idempotency-Key, derived from the key
        (uuid5), so a retry addresses the same aggregate and partition and is recognised
        as a repeat."""
        key = self.meta.idempotency_key
        return derived_id("id", purpose, key, *parts) if key else str(uuid.uuid4())

    def command_id(self, command: Command) -> str:
        """The command id: with an Idempotency-Key, derived from the key, the command type
        and the aggregate (uuid5), so one key reused for another command or aggregate
        is a new command rather than a replay of someone else's outcome; else uuid4."""
        key = self.meta.idempotency_key
        if key is None:
            return self.meta.command_id
        return derived_id("command", key, type(command).__name__, command.aggregate_id)

    def _count(self, command: Command, outcome: Outcome | None) -> None:
        label = (
            "pending" if outcome is None else ("duplicate" if outcome.duplicate else outcome.status)
        )
        self.metrics.commands.labels(type(command).__name__, label).inc()

    async def execute(
        self,
        command: Command,
        *,
        created_at: str | None = None,
        expected_version: int | None = None,
    ) -> JSONResponse:
        """Send ``command`` and answer its outcome; ``created_at`` is the Location of the
        aggregate a creation command makes (the answer is then 201).
        ``expected_version`` applies when the request has no If-Match."""
        envelope, outcome = await self.send(command, expected_version=expected_version)
        return self.respond(envelope, outcome, created_at=created_at)

    async def send(
        self, command: Command, *, expected_version: int | None = None
    ) -> tuple[CommandEnvelope, Outcome | None]:
        """Send ``command`` and wait (bounded) for its outcome: (envelope, outcome or None).

        The request's If-Match wins over ``expected_version``.
        """
        envelope = CommandEnvelope(
            command_id=self.command_id(command),
            command=command,
            correlation_id=self.meta.correlation_id,
            expected_version=(
                self.meta.expected_version
                if self.meta.expected_version is not None
                else expected_version
            ),
        )
        outcome = await self.client.execute(envelope, self.settings.command_wait_s)
        self._count(command, outcome)
        return envelope, outcome

    def respond(
        self, envelope: CommandEnvelope, outcome: Outcome | None, *, created_at: str | None = None
    ) -> JSONResponse:
        """The answer to a sent command (see the module docstring)."""
        if outcome is None:
            location = f"/commands/{envelope.command_id}"
            return JSONResponse(
                CommandPending(command_id=envelope.command_id, location=location).model_dump(),
                status_code=202,
                headers={"Location": location},
            )
        if outcome.status != "accepted":
            response = rejection_problem(outcome).response()
            if outcome.duplicate:
                response.headers[REPLAYED] = "true"
            return response
        headers = {"ETag": f'"{outcome.version}"'}
        if outcome.duplicate:
            headers[REPLAYED] = "true"
        if created_at is not None:
            headers["Location"] = created_at
        return JSONResponse(
            command_result(outcome).model_dump(mode="json"),
            status_code=201 if created_at is not None else 200,
            headers=headers,
        )

    async def execute_many(
        self, commands: list[Command], *, created: bool = False
    ) -> list[BatchItemResult]:
        """Send ``commands`` together and describe each outcome (in order). With an
        Idempotency-Key each command id derives from the key, the command type and the
        aggregate (as ``command_id``), so a batch retried replays its outcomes while a
        key reused for another batch replays only the commands both batches hold (same
        type, same aggregate) and sends the others as new commands. Two commands of one
        batch must not share type and aggregate (the caller checks)."""
        if self.meta.expected_version is not None:
            raise Problem(
                422,
                "if_match_not_supported",
                "If-Match is not supported on a batch",
                field="If-Match",
            )
        key = self.meta.idempotency_key
        envelopes = [
            CommandEnvelope(
                command_id=self.command_id(c) if key else str(uuid.uuid4()),
                command=c,
                correlation_id=self.meta.correlation_id,
            )
            for c in commands
        ]
        outcomes = await self.client.execute_many(envelopes, self.settings.command_wait_s)
        results: list[BatchItemResult] = []
        for i, (env, outcome) in enumerate(zip(envelopes, outcomes, strict=True)):
            self._count(env.command, outcome)
            item = BatchItemResult(
                index=i,
                id=outcome.aggregate_id if outcome else env.command.aggregate_id,
                command_id=env.command_id,
                status="pending",
                http_status=202,
            )
            if outcome is not None and outcome.status == "accepted":
                item.status, item.http_status = "accepted", 201 if created else 200
                item.version, item.events = outcome.version, event_refs(outcome)
            elif outcome is not None:
                problem = rejection_problem(outcome)
                item.status, item.http_status = "rejected", problem.status
                item.version, item.problem = outcome.version, problem.body()
            results.append(item)
        return results
