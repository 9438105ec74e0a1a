"""Every role rides out an outage of Kafka, PostgreSQL or Redis, and nothing is lost or
doubled.

One private local stack for the module (these tests stop its services: the shared stack
must never be stopped) and one deployment on it: the processor, the process managers
(``streams``), the projector and the API, each its own process, started once and kept
through all three outages (so they ride out each in turn). Each test drives a steady
trickle of task submissions through the API as a real client does (an Idempotency-Key
per task, the same request again after a connection error, a timeout or a 5xx), stops
one service for 15 s with ``infra.stack.stop_service``, starts it again with
``infra.stack.up`` (same port) and then checks:

* every role process is still alive;
* ``/ready`` named the service as down during the outage, and is ready after;
* every task the API accepted is on the log exactly once (one ``TaskSubmitted``, one
  first outcome per command id), the log is clean (``assert_log_is_clean``: no event
  twice, each aggregate's versions 1..n), and the read models show every one of them;
* each role that uses the service logged the outage once (one warning when it went,
  one line when it was back) and not a line per retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from infra import supervise
from infra.stack import StackInfo, down, stop_service, up
from infra.topics import Topics
from tests.integration.helpers import ROOT, fresh_prefix, role_env, wait_until
from tests.integration.load import Trickle, follow_sse, is_ready

pytestmark = pytest.mark.integration

OUTAGE_S = 15.0
ROLES = ("processor", "streams", "projector", "api")
#: Which roles use which service (the processor and the process managers only Kafka).
#: The role started again while each service is out (it must wait, not exit): the API
#: needs PostgreSQL at start (its schema), every role needs Kafka (its topics).
LATE = {"kafka": "processor", "postgres": "api", "redis": "api"}
USERS = {
    "kafka": ROLES,
    "postgres": ("projector", "api"),
    "redis": ("projector", "api"),
}


def _up(state_dir: Path) -> StackInfo:
    """``infra.stack.up`` on ``state_dir`` even though the environment names the shared
    stack (``up`` would otherwise use that and start nothing)."""
    return up(state_dir, console=Console(stderr=True), own=True)


@dataclass
class Deployment:
    """The private stack and the four role processes on it."""

    state_dir: Path
    services: StackInfo
    topics: Topics
    base_url: str
    children: supervise.Children
    env: dict[str, str]

    def log_sizes(self) -> dict[str, int]:
        return {r: self.children.log_path(r).stat().st_size for r in ROLES}

    def log_since(self, role: str, offset: int) -> str:
        with open(self.children.log_path(role), "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    state_dir = tmp_path_factory.mktemp("outage-stack")
    try:
        services = _up(state_dir)
        prefix = fresh_prefix()
        port = supervise.free_port()
        env = role_env(services, prefix, SWARMLOG_API_PORT=str(port))
        children = supervise.Children(log_dir=tmp_path_factory.mktemp("outage-logs"))
        for role in ROLES:
            children.start_role(role, env, cwd=ROOT)
        base_url = f"http://127.0.0.1:{port}"
        asyncio.run(supervise.wait_ready(base_url, children, timeout_s=120))
        try:
            yield Deployment(
                state_dir, services, Topics(prefix=prefix, partitions=3), base_url, children, env
            )
        finally:
            children.stop_all(timeout_s=15)
    finally:
        down(state_dir, purge=True)


async def _read(http: httpx.AsyncClient, trickle: Trickle, stop: asyncio.Event) -> Counter[int]:
    """Reads from PostgreSQL (a task) and Redis (the leaderboard) while the trickle runs:
    the status codes answered (an outage is a 503, never a 500)."""
    codes: Counter[int] = Counter()
    while not stop.is_set():
        for path in (
            f"/tasks/{trickle.accepted[0]}" if trickle.accepted else "/tasks",
            "/leaderboard",
        ):
            with contextlib.suppress(httpx.HTTPError):
                codes[(await http.get(path)).status_code] += 1
        await asyncio.sleep(0.3)
    return codes


async def _poll_ready(http: httpx.AsyncClient, stop: asyncio.Event, out: list[tuple]) -> None:
    while not stop.is_set():
        try:
            r = await http.get("/ready", timeout=5)
            out.append((time.monotonic(), r.status_code, tuple(r.json().get("failed", ()))))
        except httpx.HTTPError as exc:
            out.append((time.monotonic(), type(exc).__name__, ()))
        await asyncio.sleep(0.5)


async def _ride_out(deployment: Deployment, service: str) -> None:
    offsets = deployment.log_sizes()
    stop = asyncio.Event()
    readiness: list[tuple] = []
    async with httpx.AsyncClient(base_url=deployment.base_url, timeout=10) as http:
        trickle = Trickle(http, f"{service}-{fresh_prefix()}")
        load = asyncio.create_task(trickle.run(stop))
        poller = asyncio.create_task(_poll_ready(http, stop, readiness))
        reader = asyncio.create_task(_read(http, trickle, stop))
        sse_lines: list[str] = []
        sse = asyncio.create_task(follow_sse(deployment.base_url, sse_lines, "data:"))
        await asyncio.sleep(3)
        stopped = await asyncio.to_thread(stop_service, deployment.state_dir, service)
        assert "stopped" in stopped, stopped
        outage_from = time.monotonic()
        await asyncio.sleep(2)
        # A role started during the outage waits for the service instead of exiting.
        late_role = LATE[service]
        late_port = supervise.free_port()
        late_env = {**deployment.env, "SWARMLOG_API_PORT": str(late_port)}
        late = deployment.children.start_role(
            late_role, late_env, name=f"{late_role}-late-{service}", cwd=ROOT
        )
        await asyncio.sleep(OUTAGE_S - 2)
        again = await asyncio.to_thread(_up, deployment.state_dir)
        outage_to = time.monotonic()
        assert again == deployment.services  # the same addresses: clients reconnect
        await asyncio.sleep(5)
        if late_role == "api":
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{late_port}") as late_http:
                await wait_until(
                    lambda: is_ready(late_http), 60, interval=0.5, what="the late API ready"
                )
        stop.set()
        await asyncio.wait_for(load, 60)
        await poller
        codes = await reader
        assert set(codes) <= {200, 404, 503}, codes  # 404: a task accepted, not yet projected
        if service != "kafka":  # reads need no Kafka
            assert codes[503], codes

        # every role rode it out, and the one started during the outage runs
        assert late.poll() is None, deployment.children.log_tail(f"{late_role}-late-{service}")
        deployment.children.stop_all(prefix=f"{late_role}-late-{service}", timeout_s=15)
        for role, proc in deployment.children.procs.items():
            assert proc.poll() is None, (
                f"{role} exited with {proc.returncode} during the {service} outage:\n"
                + deployment.children.log_tail(role)
            )

        # /ready said what was down, then ready again
        during = [r for r in readiness if outage_from + 3 < r[0] < outage_to]
        assert during and any(
            status == 503 and service in failed for _, status, failed in during
        ), during
        await wait_until(
            lambda: is_ready(http), 30, interval=0.5, what="/ready to answer 200 again"
        )

        # nothing accepted is lost: every task is on the read models
        assert len(trickle.accepted) > 20
        await trickle.check_projected()

        # the live stream opened before the outage still carries events after it
        last = trickle.accepted[-1]
        try:
            await wait_until(
                lambda: sse.done() or any(last in line for line in sse_lines),
                30,
                what=f"the SSE stream to carry {last}",
            )
            assert not sse.done(), f"the SSE stream ended: {sse}"
        finally:
            sse.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sse

    # ... nor doubled: one TaskSubmitted per task, one first outcome per command
    await trickle.check_log(deployment.services.kafka_bootstrap_servers, deployment.topics)

    # each role that uses the service said so once when it went and once when it came back
    for role in USERS[service]:
        text = deployment.log_since(role, offsets[role])
        lines = text.splitlines()
        assert sum(f"{service} is unreachable" in line for line in lines) == 1, text[-3000:]
        assert sum(f"{service} is back" in line for line in lines) == 1, text[-3000:]
        assert len(lines) < 40, f"{role} logged {len(lines)} lines:\n" + text[-3000:]


@pytest.mark.parametrize("service", ["redis", "postgres", "kafka"])
async def test_every_role_rides_out_an_outage(deployment: Deployment, service: str) -> None:
    await _ride_out(deployment, service)


async def test_every_role_stops_within_10_s_on_sigterm_while_kafka_is_down(
    deployment: Deployment,
) -> None:
    """Run last: it stops the module's roles. With the broker gone a role cannot finish
    its clients' goodbyes (leave the group, flush): it cancels them after a drain period
    and exits 0 within the bound anyway (an open transaction is aborted by the broker)."""
    stopped = await asyncio.to_thread(stop_service, deployment.state_dir, "kafka")
    assert "stopped" in stopped, stopped
    try:
        await asyncio.sleep(3)
        procs = dict(deployment.children.procs)
        started = time.monotonic()
        for proc in procs.values():
            os.kill(proc.pid, signal.SIGTERM)
        exits: dict[str, tuple[float, int | None]] = {}
        while len(exits) < len(procs) and time.monotonic() - started < 30:
            for role, proc in procs.items():
                if role not in exits and proc.poll() is not None:
                    exits[role] = (round(time.monotonic() - started, 1), proc.returncode)
            await asyncio.sleep(0.05)
        for role in procs:
            assert role in exits, f"{role} still runs 30 s after SIGTERM: {exits}"
            seconds, code = exits[role]
            assert code == 0, f"{role} exited {code}: {exits}\n" + deployment.children.log_tail(
                role
            )
            assert seconds < 10, f"{role} took {seconds} s to stop: {exits}"
    finally:
        await asyncio.to_thread(_up, deployment.state_dir)
