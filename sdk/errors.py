"""Errors the SDK raises, and the parsing of RFC 9457 problem+json bodies into them.

The API answers every error as ``application/problem+json``:
``{"type", "title", "status", "detail", "code", "field"}`` (plus ``errors`` for request
validation). :func:`problem_from_response` turns any error response, problem+json or not,
into a :class:`SwarmError`; it is pure (status, content type and body bytes in).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

PROBLEM_JSON = "application/problem+json"

#: Statuses worth retrying with the same Idempotency-Key: the server did not decide.
RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})


class SwarmError(Exception):
    """An error answer from the swarmlog API (or no answer at all, see subclasses).

    ``status`` is the HTTP status (0 when no response arrived), ``code`` the rule that
    was broken (``agent_already_registered``, ``not_assigned_agent`` ...), ``detail`` a
    sentence for people, ``field`` the offending field or header where there is one.
    ``problem`` is the whole problem+json body (``{}`` when there was none) and
    ``retry_after_s`` the server's Retry-After in seconds, when it sent one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        field: str | None = None,
        *,
        problem: Mapping[str, Any] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.problem: dict[str, Any] = dict(problem or {})
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str | None:
        """The problem type URI (``urn:swarmlog:problem:<code>``), if the body had one."""
        value = self.problem.get("type")
        return value if isinstance(value, str) else None

    @property
    def title(self) -> str | None:
        """The problem title (``Conflict`` ...), if the body had one."""
        value = self.problem.get("title")
        return value if isinstance(value, str) else None

    @property
    def retryable(self) -> bool:
        """True when nothing was decided (no answer, or 429/502/503/504): retrying may succeed."""
        return self.status == 0 or self.status in RETRYABLE_STATUSES


class SwarmConnectionError(SwarmError):
    """No answer: the API could not be reached, or the connection broke, after every retry.

    ``status`` is 0 and ``code`` is ``connection_error``; the httpx error is ``__cause__``.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(0, "connection_error", detail)


class DeadlineExceeded(SwarmError):
    """No definite answer before the caller's deadline (``until``), though retries went on.

    ``status`` is 0 and ``code`` is ``deadline_exceeded``. ``last_error`` is the last
    retryable error seen (a :class:`SwarmConnectionError`, a 429/502/503/504), or None
    when the last answer was a 202 (accepted, not yet decided: ``pending`` is then True).
    The command may or may not have been decided: the server's state says which.
    """

    def __init__(
        self, detail: str, *, last_error: SwarmError | None = None, pending: bool = False
    ) -> None:
        super().__init__(0, "deadline_exceeded", detail)
        self.last_error = last_error
        self.pending = pending


class NonRetryableError(Exception):
    """Raise from a task handler to fail the task for good (``retryable: false``).

    Any other exception fails the attempt as retryable: the task is retried while it has
    attempts left.
    """


class TaskRevoked(Exception):
    """The task is no longer this agent's (requeued elsewhere, cancelled or finished).

    Raised by :meth:`sdk.worker.TaskContext.progress` so a handler can stop early; the
    worker drops the task quietly when a handler lets it propagate.
    """

    def __init__(self, task_id: str, code: str, detail: str = "") -> None:
        super().__init__(f"task {task_id} revoked: {code}" + (f": {detail}" if detail else ""))
        self.task_id = task_id
        self.code = code
        self.detail = detail


#: Problem codes meaning "this task is not (or no longer) yours to act on".
REVOKED_CODES: frozenset[str] = frozenset(
    {
        "not_assigned_agent",
        "task_finished",
        "task_not_assigned",
        "task_not_running",
        "task_not_found",
        "task_moved_on",
    }
)


def is_revocation(error: SwarmError) -> bool:
    """True when ``error`` says the task was taken back or ended: drop it, don't crash.

    Any 403, and any 404/409/410 whose code is one of :data:`REVOKED_CODES`.
    """
    if error.status == 403:
        return True
    return error.status in (404, 409, 410) and error.code in REVOKED_CODES


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header (RFC 9110 §10.2.3) into seconds from ``now`` (>= 0).

    Accepts delta-seconds (``"7"``) or an HTTP-date; None when absent or unparseable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


def _code_for_status(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        410: "gone",
        412: "precondition_failed",
        422: "validation_error",
        429: "rate_limited",
        502: "bad_gateway",
        503: "unavailable",
        504: "gateway_timeout",
    }.get(status, f"http_{status}")


def problem_from_response(
    status: int,
    content_type: str | None,
    body: bytes,
    *,
    retry_after: str | None = None,
) -> SwarmError:
    """The :class:`SwarmError` for an error response.

    A problem+json (or any JSON object) body gives ``code``, ``detail`` and ``field``;
    missing members fall back to ``http_<status>``-style codes and the title. A body
    that is not JSON becomes the detail (first 500 characters). ``retry_after`` is the
    raw Retry-After header.
    """
    problem: dict[str, Any] = {}
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if body and (
        media == PROBLEM_JSON
        or media.endswith("+json")
        or media == "application/json"
        or body.lstrip()[:1] == b"{"
    ):
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            problem = parsed
    code = problem.get("code")
    if not isinstance(code, str) or not code:
        code = _code_for_status(status)
    detail = problem.get("detail")
    if not isinstance(detail, str) or not detail:
        if problem:
            title = problem.get("title")
            detail = title if isinstance(title, str) and title else f"HTTP {status}"
            # FastAPI's default error shape is {"detail": ...} with a non-string detail.
            if "detail" in problem and problem["detail"] is not None:
                detail = json.dumps(problem["detail"])[:500]
        else:
            text = body.decode("utf-8", errors="replace").strip()
            detail = text[:500] if text else f"HTTP {status}"
    field = problem.get("field")
    return SwarmError(
        status,
        code,
        detail,
        field if isinstance(field, str) else None,
        problem=problem,
        retry_after_s=retry_after_seconds(retry_after),
    )
