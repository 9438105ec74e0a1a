"""The API fuzzed from its own OpenAPI by schemathesis, on the real stack: no input is a
500, and every answer's status code, content type and body are the ones its OpenAPI
entry documents.

Schemathesis runs as its CLI (``python -m schemathesis.cli run``) in a subprocess against
the swarm's real uvicorn server, deterministically (``--generation-deterministic``: the
same cases on every run), through its examples, coverage (boundary values, NUL, huge
integers, wrong types, missing fields ...) and fuzzing phases, positive and negative
cases. The SSE routes never end, so they are excluded here and covered by
``test_every_sse_route_answers_bad_resume_points_with_a_4xx_problem``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.support import assert_problem

pytestmark = pytest.mark.e2e

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
#: Cases per operation in the fuzzing phase; the coverage phase adds its own.
MAX_EXAMPLES = 10
MIN_CASES = 2000
SSE_ROUTES = r"^/events$|/assignments$"
TIMEOUT_S = 400.0


async def test_schemathesis_finds_no_failure(swarm, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run",
        f"{swarm.base_url}/openapi.json",
        "--checks", ",".join(CHECKS),
        "--generation-deterministic",
        "--max-examples", str(MAX_EXAMPLES),
        "--phases", "examples,coverage,fuzzing",
        "--mode", "all",
        "--exclude-path-regex", SSE_ROUTES,
        "--workers", "2",
        "--request-timeout", "30",
        "--no-color",
        "--report", "json",
        "--report-json-path", str(report),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    output = out.decode(errors="replace")
    result = json.loads(report.read_text())
    assert result["complete"], output[-5000:]
    assert result["operations"]["tested"] >= 45, result["operations"]
    assert result["test_cases"]["generated"] >= MIN_CASES, result["test_cases"]
    assert result["failures"] == [] and result["errors"] == [], output[:60000]
    assert process.returncode == 0, output[-5000:]
    swarm.check_alive()


# Each SSE route with a malformed, forged or out-of-range resume point or parameter.
SSE_BAD_REQUESTS: list[tuple[str, dict[str, str], dict[str, str], int, str]] = [
    ("/events", {}, {"Last-Event-ID": "nonsense"}, 400, "Last-Event-ID"),
    ("/events", {"last_event_id": "v1:1.2"}, {}, 400, "Last-Event-ID"),
    ("/events", {"last_event_id": "v1:" + ".".join(["99999999999999999999"] * 21)}, {},
     400, "Last-Event-ID"),
    ("/events", {"from": "middle"}, {}, 422, "from"),
    ("/events", {"subject": "a\x00b"}, {}, 422, "subject"),
    ("/events", {"type": "io.swarmlog.\x00"}, {}, 422, "type"),
    ("/events", {"run_id": "x" * 129}, {}, 422, "run_id"),
    ("/agents/a1/assignments", {}, {"Last-Event-ID": "v1:x.y.z"}, 400, "Last-Event-ID"),
    ("/agents/a1/assignments", {"last_event_id": "v2:0.0.0"}, {}, 400, "Last-Event-ID"),
    ("/agents/a1/assignments", {"last_event_id": "v1:9223372036854775808.0.0"}, {},
     400, "Last-Event-ID"),
    ("/agents/a1/assignments", {"last_event_id": "v1:99999999.0.0"}, {}, 400, "Last-Event-ID"),
    ("/agents/a1/assignments", {"from": "nowhere"}, {}, 422, "from"),
    ("/agents/a%00b/assignments", {}, {}, 422, "agent_id"),
    ("/agents/a1/assignments", {"last_event_id": "v1:\x00"}, {}, 422, "last_event_id"),
]


async def test_every_sse_route_answers_bad_resume_points_with_a_4xx_problem(swarm) -> None:
    for path, params, headers, status, field in SSE_BAD_REQUESTS:
        # A hang would be a stream opened: the timeout makes it a failure, not a stall.
        async with swarm.client.stream(
            "GET", path, params=params, headers=headers, timeout=httpx.Timeout(10.0)
        ) as r:
            await r.aread()
            assert_problem(r, status, field=field)
    # And the routes still serve a good stream afterwards.
    async with swarm.client.stream("GET", "/events", timeout=httpx.Timeout(10.0)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
