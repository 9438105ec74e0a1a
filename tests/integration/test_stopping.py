"""Stopping is clean: every role drains on SIGTERM within 10 s and nothing is lost.

All four roles (processor, streams, projector, API) run as processes on the session's
services under a steady trickle of task submissions through the API (an Idempotency-Key
per task, retried as a real client retries: the API itself is among the roles stopped),
with a live SSE stream open on the API. Each role in turn gets SIGTERM mid-load, must
exit with code 0 within 10 s (it finishes or aborts its open transaction and commits what
it has), and is started again. Afterwards every task the API accepted is on the log once
and on the read models, and the log is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from infra import supervise
from infra.stack import StackInfo
from infra.topics import Topics
from tests.integration.helpers import ROOT, fresh_prefix, role_env, wait_until
from tests.integration.load import Trickle, follow_sse, is_ready

pytestmark = pytest.mark.integration

ROLES = ("processor", "streams", "projector", "api")
#: The bound the issue sets on a clean stop, in seconds.
STOP_BOUND_S = 10.0


async def _sigterm(proc: object, name: str) -> tuple[float, int]:
    """SIGTERM ``proc`` (by its pid); (seconds until it exited, its exit code)."""
    assert hasattr(proc, "pid") and hasattr(proc, "poll")
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    while proc.poll() is None:
        if time.monotonic() - started > 30:
            os.kill(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{name} did not exit 30 s after SIGTERM (killed)")
        await asyncio.sleep(0.05)
    return time.monotonic() - started, int(proc.poll())  # type: ignore[call-overload]


async def test_every_role_drains_on_sigterm_within_10_s_and_nothing_is_lost(
    services: StackInfo, tmp_path: Path
) -> None:
    prefix = fresh_prefix()
    port = supervise.free_port()
    env = role_env(services, prefix, SWARMLOG_API_PORT=str(port))
    children = supervise.Children(log_dir=tmp_path)
    base_url = f"http://127.0.0.1:{port}"
    exits: dict[str, tuple[float, int]] = {}
    try:
        for role in ROLES:
            children.start_role(role, env, cwd=ROOT)
        await supervise.wait_ready(base_url, children, timeout_s=120)
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            trickle = Trickle(http, prefix)
            load = asyncio.create_task(trickle.run(stop))
            seen: list[str] = []
            sse = asyncio.create_task(follow_sse(base_url, seen))
            await asyncio.sleep(3)
            for role in ROLES:
                before = len(trickle.accepted)
                await wait_until(
                    lambda b=before: len(trickle.accepted) > b + 5,  # type: ignore[misc]
                    30,
                    what=f"load before stopping {role}",
                )
                proc = children.procs.pop(role)
                exits[role] = await _sigterm(proc, role)
                children.start_role(role, env, name=f"{role}-again", cwd=ROOT)
                if role == "api":
                    await asyncio.wait_for(sse, 5)  # the stream ended with the server
                    assert seen, "the SSE stream carried no event before the stop"
                await wait_until(lambda: is_ready(http), 60, interval=0.3, what="/ready again")
            await asyncio.sleep(3)
            stop.set()
            await asyncio.wait_for(load, 60)
            for role, proc in children.procs.items():
                assert proc.poll() is None, f"{role} exited:\n" + children.log_tail(role)

            assert len(trickle.accepted) > 40
            await trickle.check_projected()
        await trickle.check_log(services.kafka_bootstrap_servers, Topics(prefix, partitions=3))
        for role, (seconds, code) in exits.items():
            assert code == 0, f"{role} exited {code} on SIGTERM ({exits}):\n" + children.log_tail(
                role
            )
            assert seconds < STOP_BOUND_S, f"{role} took {seconds:.1f} s to stop: {exits}"
            # Drained, not cut short: neither the drain timeout's cancel nor the hard exit.
            tail = children.log_tail(role)
            assert "not drained" not in tail and "exiting now" not in tail, tail
    finally:
        children.stop_all(timeout_s=15)
        with contextlib.suppress(Exception):
            await supervise.remove_run(services, Topics(prefix, partitions=3), prefix, prefix)
