"""Unit tests of sdk/errors.py: problem+json parsing, revocations, Retry-After."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sdk.errors import (
    SwarmConnectionError,
    SwarmError,
    is_revocation,
    problem_from_response,
    retry_after_seconds,
)


def problem(status: int, code: str, detail: str, field: str | None = None) -> bytes:
    return json.dumps(
        {
            "type": f"urn:swarmlog:problem:{code}",
            "title": "Conflict",
            "status": status,
            "detail": detail,
            "code": code,
            "field": field,
        }
    ).encode()


def test_a_problem_body_gives_status_code_detail_and_field() -> None:
    error = problem_from_response(
        403,
        "application/problem+json",
        problem(403, "not_assigned_agent", "task t1 is not assigned to agent a1", "agent_id"),
    )
    assert isinstance(error, SwarmError)
    assert (error.status, error.code, error.field) == (403, "not_assigned_agent", "agent_id")
    assert error.detail == "task t1 is not assigned to agent a1"
    assert error.type == "urn:swarmlog:problem:not_assigned_agent"
    assert error.title == "Conflict"
    assert "not_assigned_agent" in str(error)


def test_validation_problems_keep_their_error_list() -> None:
    body = json.dumps(
        {
            "type": "urn:swarmlog:problem:validation_error",
            "title": "Unprocessable Content",
            "status": 422,
            "detail": "progress: too big",
            "code": "validation_error",
            "field": "progress",
            "errors": [{"field": "progress", "message": "too big"}],
        }
    ).encode()
    error = problem_from_response(422, "application/problem+json; charset=utf-8", body)
    assert error.code == "validation_error"
    assert error.problem["errors"] == [{"field": "progress", "message": "too big"}]


def test_a_body_that_is_not_json_becomes_the_detail_with_a_code_from_the_status() -> None:
    error = problem_from_response(502, "text/html", b"<h1>Bad Gateway</h1>")
    assert (error.status, error.code, error.field) == (502, "bad_gateway", None)
    assert error.detail == "<h1>Bad Gateway</h1>"
    assert error.problem == {}


def test_an_empty_body_still_gives_a_useful_error() -> None:
    error = problem_from_response(418, None, b"")
    assert (error.status, error.code, error.detail) == (418, "http_418", "HTTP 418")


def test_a_plain_json_error_without_code_falls_back_to_the_status() -> None:
    error = problem_from_response(404, "application/json", b'{"detail": "Not Found"}')
    assert (error.code, error.detail) == ("not_found", "Not Found")
    structured = problem_from_response(422, "application/json", b'{"detail": [{"loc": ["x"]}]}')
    assert structured.code == "validation_error"
    assert "loc" in structured.detail


def test_retry_after_is_read_from_the_header() -> None:
    error = problem_from_response(
        429, "application/problem+json", problem(429, "rate_limited", "slow down"), retry_after="3"
    )
    assert error.retry_after_s == 3.0
    assert error.retryable


def test_only_undecided_answers_are_retryable() -> None:
    assert SwarmConnectionError("refused").retryable
    assert SwarmConnectionError("refused").status == 0
    for status in (429, 502, 503, 504):
        assert SwarmError(status, "x", "y").retryable
    for status in (400, 403, 404, 409, 410, 412, 422, 500):
        assert not SwarmError(status, "x", "y").retryable


def test_retry_after_seconds_reads_delta_seconds_and_http_dates() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now=now) == 120.0
    assert retry_after_seconds("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert retry_after_seconds("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("") is None
    assert retry_after_seconds("soon") is None


def test_a_task_taken_back_is_a_revocation_but_other_conflicts_are_not() -> None:
    assert is_revocation(SwarmError(403, "not_assigned_agent", "x"))
    assert is_revocation(SwarmError(403, "forbidden", "x"))
    assert is_revocation(SwarmError(409, "task_finished", "x"))
    assert is_revocation(SwarmError(409, "task_not_running", "x"))
    assert is_revocation(SwarmError(409, "task_not_assigned", "x"))
    assert is_revocation(SwarmError(404, "task_not_found", "x"))
    assert not is_revocation(SwarmError(409, "agent_already_registered", "x"))
    assert not is_revocation(SwarmError(422, "validation_error", "x"))
    assert not is_revocation(SwarmConnectionError("down"))
