"""Plain shapes the SDK hands out, and pure helpers to build requests and read answers.

Money: the API shows token amounts as decimal strings of tokens (``"0.5"``); the log
keeps integers of micro-tokens (1 token = 1,000,000 micro-tokens). Times are seconds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

MICRO = 1_000_000
"""Micro-tokens per token."""

ASSIGNED_TYPE = "io.swarmlog.task.assigned"
"""The CloudEvent type (and SSE ``event:`` name) of an assignment."""

#: Namespace of the SDK's derived idempotency keys (uuid5); any fixed UUID would do.
KEY_NAMESPACE = uuid.UUID("0b6f6a52-8a1e-5c55-9b0e-2d7a3f3c4e11")


@dataclass(frozen=True)
class CommandResult:
    """The answer to a command route.

    ``status`` is 200/201, or 202 when the API accepted the command but could not wait
    for the decision (``pending``). ``body`` is the JSON answer (``{"id", "version",
    "events", "command_id", ...}``); ``idempotency_key`` the key the call was sent with.
    """

    status: int
    body: dict[str, Any]
    idempotency_key: str

    @property
    def pending(self) -> bool:
        """True when the command was accepted but not yet decided (HTTP 202)."""
        return self.status == 202

    @property
    def command_id(self) -> str | None:
        """The command id the API gave the command, if it said."""
        value = self.body.get("command_id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TaskPage:
    """One page of ``GET /tasks``: task items and the cursor of the next page (None: last)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True)
class Assignment:
    """A task assigned to an agent, from the assignment stream or from a poll.

    ``attempt`` is 1-based (None when the source did not say); ``position`` is the SSE id
    to resume after (None for a poll); ``task`` is the full task item when a poll gave
    it (it has the payload), else None and the worker fetches ``GET /tasks/{id}``.
    """

    task_id: str
    agent_id: str
    attempt: int | None
    position: str | None = None
    task: dict[str, Any] | None = field(default=None, compare=False, repr=False)


def capabilities_body(
    capabilities: Mapping[str, float] | Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """``{"python": 0.9}`` (or a list of ``{"name", "level"}``) as the API's capability list.

    Levels must be numbers in [0, 1]; ValueError names the bad capability.
    """
    items: list[tuple[str, Any]]
    if isinstance(capabilities, Mapping):
        items = list(capabilities.items())
    else:
        items = [(c["name"], c.get("level", 1.0)) for c in capabilities]
    out: list[dict[str, Any]] = []
    for name, level in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"capability name must be a non-empty string, got {name!r}")
        if isinstance(level, bool) or not isinstance(level, (int, float)):
            raise ValueError(f"capability {name!r}: level must be a number, got {level!r}")
        if not 0.0 <= float(level) <= 1.0:
            raise ValueError(f"capability {name!r}: level must be in [0, 1], got {level}")
        out.append({"name": name, "level": float(level)})
    return out


def format_tokens(amount: str | Decimal | int) -> str:
    """A token amount as the API's decimal string (``"0.5"``, ``"12"``).

    Accepts a decimal string or Decimal of tokens, or an int of whole tokens (not
    micro-tokens). ValueError when negative, not a number, or finer than a micro-token.
    """
    if isinstance(amount, (bool, float)):
        raise ValueError(f"token amounts must be exact (str, Decimal or int), got {amount!r}")
    try:
        value = Decimal(str(amount).strip()) if not isinstance(amount, Decimal) else amount
    except InvalidOperation:
        raise ValueError(f"{amount!r} is not a decimal number of tokens") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"token amount must be a non-negative number, got {amount!r}")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise ValueError(f"{amount!r} is finer than one micro-token (6 decimal places)")
    return micro_to_tokens(int(micro))


def micro_to_tokens(micro: int) -> str:
    """Micro-tokens (int) as a decimal string of tokens: 1_500_000 -> ``"1.5"``."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return sign + text


def tokens_to_micro(tokens: str | Decimal | int) -> int:
    """A decimal string of tokens as integer micro-tokens: ``"1.5"`` -> 1_500_000."""
    value = Decimal(format_tokens(tokens))
    return int(value * MICRO)


def derived_key(*parts: object) -> str:
    """A stable Idempotency-Key (a UUID string) for one logical command.

    The same parts always give the same key, so the same logical call sent again (by a
    retry, or by a restarted worker) is the same command to the API.
    """
    return str(uuid.uuid5(KEY_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def parse_assignment(
    event_type: str | None, data: str, event_id: str | None = None
) -> Assignment | None:
    """The :class:`Assignment` in one SSE message of the assignment stream.

    ``event_type`` is the SSE ``event:`` name, ``data`` the CloudEvent JSON (structured
    mode: ``{"type", "subject", "data": {"task_id", "agent_id", "attempt", "type",
    "payload"}, ...}``; with a payload, ``Assignment.task`` holds it) and
    ``event_id`` the SSE id (the stream position). Returns None for any other kind of
    message (keep-alives, other event types); ValueError for a malformed assignment.
    """
    if event_type not in (None, "", "message", ASSIGNED_TYPE):
        return None
    if not data.strip():
        return None
    try:
        cloud_event = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"assignment {event_id}: data is not JSON: {exc}") from None
    if not isinstance(cloud_event, dict):
        raise ValueError(f"assignment {event_id}: data is not a JSON object")
    ce_type = cloud_event.get("type")
    if ce_type != ASSIGNED_TYPE and event_type != ASSIGNED_TYPE:
        return None
    body = cloud_event.get("data")
    if isinstance(body, str):  # a producer that double-encoded the data
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    if not isinstance(body, dict):
        raise ValueError(f"assignment {event_id}: CloudEvent has no data object")
    task_id = body.get("task_id") or cloud_event.get("subject")
    agent_id = body.get("agent_id")
    if not isinstance(task_id, str) or not task_id:
        raise ValueError(f"assignment {event_id}: no task_id")
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError(f"assignment {event_id}: no agent_id")
    attempt = _attempt(body.get("attempt"))
    # The assignment carries the task's type and payload: the worker needs no GET.
    task = (
        {
            "task_id": task_id,
            "agent_id": agent_id,
            "type": body.get("type"),
            "payload": body["payload"],
            "attempts": attempt,
        }
        if isinstance(body.get("payload"), dict)
        else None
    )
    return Assignment(
        task_id=task_id,
        agent_id=agent_id,
        attempt=attempt,
        position=event_id or None,
        task=task,
    )


def assignment_from_task(item: Mapping[str, Any]) -> Assignment | None:
    """The :class:`Assignment` a ``GET /tasks`` item stands for; None without task/agent id.

    The attempt is the item's ``attempts`` (the number of the current attempt).
    """
    task_id = item.get("task_id") or item.get("id")
    agent_id = item.get("agent_id")
    if not isinstance(task_id, str) or not isinstance(agent_id, str) or not task_id:
        return None
    return Assignment(
        task_id=task_id,
        agent_id=agent_id,
        attempt=_attempt(item.get("attempts", item.get("attempt"))),
        task=dict(item),
    )


def _attempt(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None
