"""Whether the services a role uses answer, logged once per outage.

A role rides out an outage of Kafka, PostgreSQL or Redis: its parts retry with backoff
(the processor takes a partition over afresh, the projector retries its batch, the
clients reconnect). What an operator needs then is one line when a service goes and one
when it is back, not the client libraries' line per retry (aiokafka logs every failed
connection attempt, asyncpg every failed attempt to refill a pool): ``ServiceWatch``
writes those two lines, and ``QuietReconnects`` (installed by
``infra.bootstrap.configure_logging``) drops the libraries' per-retry chatter.

Reachability is a TCP connect to the service's address (any one of Kafka's bootstrap
servers), every ``interval_s``: cheap, and what every client needs first. A service
that accepts connections but fails requests is reported by the part that meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("swarmlog.watch")

Address = tuple[str, int]

#: Seconds a TCP connect gets before the service counts as not answering.
CONNECT_TIMEOUT_S = 1.0

#: Failed checks in a row before an outage is declared (one lost SYN is not an outage).
CONFIRM_FAILURES = 2


def kafka_addresses(bootstrap_servers: str) -> list[Address]:
    """``"h1:9092,h2:9093"`` -> ``[("h1", 9092), ("h2", 9093)]`` (port 9092 if none).

    Raises ValueError for an entry whose port is not a number."""
    out: list[Address] = []
    for entry in bootstrap_servers.split(","):
        entry = entry.strip()
        if not entry:
            continue
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "9092")
        out.append((host.strip("[]"), int(port)))
    return out


def url_address(url: str, default_port: int) -> Address:
    """The (host, port) of a ``postgresql://`` or ``redis://`` URL; ``default_port`` when
    the URL names none (5432 for PostgreSQL, 6379 for Redis)."""
    parts = urlsplit(url)
    return (parts.hostname or "localhost", parts.port or default_port)


async def answers(addresses: Sequence[Address], timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
    """True if a TCP connect to any of ``addresses`` succeeds within ``timeout_s`` s."""
    for host, port in addresses:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (OSError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


@dataclass
class _State:
    addresses: Sequence[Address]
    failures: int = 0
    down_since: float | None = None


@dataclass
class ServiceWatch:
    """Checks each service (name -> its addresses, e.g. ``{"kafka": [("127.0.0.1",
    9092)]}``) every ``interval_s`` seconds; logs a warning when one stops answering
    (after ``CONFIRM_FAILURES`` failed checks in a row) and an info line when it answers
    again, with the outage's length in seconds. ``down`` names the services out now.
    """

    services: Mapping[str, Sequence[Address]]
    role: str
    interval_s: float = 1.0
    _states: dict[str, _State] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._states = {name: _State(addresses) for name, addresses in self.services.items()}

    @property
    def down(self) -> list[str]:
        """The services in an outage now, by name."""
        return [name for name, state in self._states.items() if state.down_since is not None]

    async def check(self) -> None:
        """Check every service once, logging what changed."""
        results = await asyncio.gather(*(answers(s.addresses) for s in self._states.values()))
        for (name, state), ok in zip(self._states.items(), results, strict=True):
            if ok:
                state.failures = 0
                if state.down_since is not None:
                    log.info(
                        f"{name} is back",
                        role=self.role,
                        outage_s=round(time.monotonic() - state.down_since, 1),
                    )
                    state.down_since = None
                continue
            state.failures += 1
            if state.failures == CONFIRM_FAILURES and state.down_since is None:
                state.down_since = time.monotonic() - self.interval_s
                where = ",".join(f"{host}:{port}" for host, port in state.addresses)
                log.warning(
                    f"{name} is unreachable; waiting for it, retrying with backoff",
                    role=self.role,
                    address=where,
                )

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)


# The client libraries' per-retry lines during an outage (aiokafka logs them at ERROR,
# asyncpg's pool at WARNING with a traceback), matched on their message templates.
_CHATTER = (
    "Unable connect to",
    "Unable to update metadata",
    "Unable to request metadata",
    "Failed fetch messages from",
    "Failed fetch offsets from",
    "Group Coordinator Request failed",
    "FindCoordinator Request failed",
    "Heartbeat session expired",
    "Heartbeat send request failed",
    "-- marking coordinator dead",
    "Heartbeat failed: %r",
    "Failed to restore the pool connection floor",
)


class QuietReconnects(logging.Filter):
    """Drops aiokafka's and asyncpg's line-per-retry connection messages (see
    ``_CHATTER``); ``ServiceWatch`` says once that a service is out and once that it is
    back. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a connection-retry message of aiokafka or asyncpg."""
        if not record.name.startswith(("aiokafka", "asyncpg")):
            return True
        message = str(record.msg)
        return not any(pattern in message for pattern in _CHATTER)
