"""The thin Kafka runner of the economy process manager (streams/economy.py decides).

Election, rebuilding the view and when to plan are streams/leader.py's (the same as the
scheduler's, in the consumer group ``<prefix>-economy``); this runner folds every event
topic into one ``EconomyView`` and sends what is new: a command not settled within
``resend_s`` seconds is sent again (same id, dropped by the deciders if it was applied).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from aiokafka import TopicPartition

from commands.client import CommandClient
from domain import agent as ag
from domain.recorded import RecordedEvent
from infra.clock import Clock
from infra.kafka import Kafka
from infra.mapper import event_ce_type
from infra.topics import Topics
from streams.economy import EconomyView, apply, plan
from streams.leader import ElectedRunner
from streams.unbuilt import Unbuilt

log = structlog.get_logger("swarmlog.streams")


_AGENT_EVENTS = event_ce_type(ag.AGENT, "")
_AGENT_REGISTERED = event_ce_type(ag.AGENT, ag.AgentRegistered.event_type)


@dataclass(frozen=True)
class _Sent:
    """When a command was sent (monotonic seconds) and where it is on the command topic."""

    at: float
    partition: int
    offset: int


class EconomyRunner(ElectedRunner):
    """Runs the economy process manager: elect, rebuild the view from the log, then plan."""

    name = "economy"

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        resend_s: float = 10.0,
        source: str = "/swarmlog/economy",
    ) -> None:
        super().__init__(kafka, topics, clock=clock, tick_s=tick_s, source=source)
        self.resend_s = resend_s
        self.view = EconomyView()
        # command id -> when and where it was sent, oldest first (sent_at only grows)
        self._inflight: dict[str, _Sent] = {}
        self._expired_at = 0.0
        self._planned_seq = 0  # the view.seq of the last plan

    def read_topics(self) -> Iterable[str]:
        """The agent, task, account and proposal topics (what rewards, slashes, credits and
        governance timers follow)."""
        return [self.topics.events(a) for a in ("agent", "task", "account", "proposal")]

    def wants(self, ce_type: str) -> bool:
        """Every event but the agents' own (heartbeats, starts ...), except registrations."""
        return not ce_type.startswith(_AGENT_EVENTS) or ce_type == _AGENT_REGISTERED

    def reset(self) -> None:
        """A fresh view; nothing in flight."""
        self.view = EconomyView()
        self._inflight.clear()
        self._planned_seq = 0

    def apply(self, stored: RecordedEvent) -> None:
        """Fold one event into the view."""
        apply(self.view, stored)

    def describe(self) -> dict[str, int]:
        """Rewards and credits still due."""
        return {"rewards_due": len(self.view.rewards), "credits_due": len(self.view.debits)}

    async def tick(self, client: CommandClient) -> None:
        """Plan, and send what is new (or is due again: see the module docstring)."""
        now = self.clock.now()
        # Resends go by the machine's monotonic time, not the (maybe manual) domain clock.
        mono = time.monotonic()
        since = self._planned_seq
        if mono - self._expired_at >= min(1.0, self.resend_s / 2):
            # At most once a second: forget what is due again and plan in full.
            self._expired_at = mono
            await self._expire(mono)
            since = 0
        self._planned_seq = self.view.seq
        failures: list[Unbuilt] = []
        fresh = plan(self.view, now, skip=self.skip(self._inflight), since=since, failures=failures)
        self.unbuildable(failures)
        if not fresh:
            return
        written = await self.send(
            client, [(p.command_id, p.command, p.expected_version) for p in fresh]
        )
        for p, meta in zip(fresh, written, strict=True):
            if meta is None:
                # Dead-lettered, or not sent (Kafka unavailable): plan in full next tick.
                self._expired_at = 0.0
                continue
            self._inflight.pop(p.command_id, None)  # a resend goes to the end: oldest first
            self._inflight[p.command_id] = _Sent(mono, meta.partition, meta.offset)

    async def _expire(self, mono: float) -> None:
        """Forget the commands sent more than ``resend_s`` ago that the processor has
        decided (so that ``plan`` sends again those still owed)."""
        old: list[tuple[str, _Sent]] = []
        for cid, sent in self._inflight.items():
            if mono - sent.at <= self.resend_s:
                break
            old.append((cid, sent))
        if not old:
            return
        decided = await self._decided_offsets()
        for cid, sent in old:
            if decided is None or decided.get(sent.partition, -1) > sent.offset:
                del self._inflight[cid]

    async def _decided_offsets(self) -> dict[int, int] | None:
        """The command processor's committed offset of each command partition, or None
        when they cannot be read."""
        admin = self.kafka.admin()
        try:
            await admin.start()
            committed = await admin.list_consumer_group_offsets(f"{self.topics.prefix}-processor")
        except Exception as exc:  # noqa: BLE001 - any failure: fall back on the time alone
            log.warning("processor offsets unreadable; resending by time", error=str(exc))
            return None
        finally:
            await admin.close()
        return {
            tp.partition: meta.offset
            for tp, meta in committed.items()
            if isinstance(tp, TopicPartition) and tp.topic == self.topics.commands
        }
