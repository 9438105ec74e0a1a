"""The thin Kafka runner of the economy process manager (streams/economy.py decides).

Election, rebuilding the view and when to plan are streams/leader.py's (the same as the
scheduler's, in the consumer group ``<prefix>-economy``); this runner folds every event
topic into one ``EconomyView`` and sends what is new: a command not settled within
``resend_s`` seconds is sent again (same id, dropped by the deciders if it was applied).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from commands.client import CommandClient
from infra.clock import Clock
from infra.codec import StoredEvent
from infra.topics import Topics
from streams.economy import EconomyView, apply, plan
from streams.leader import ElectedRunner


class EconomyRunner(ElectedRunner):
    """Runs the economy process manager: elect, rebuild the view from the log, then plan."""

    name = "economy"

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Topics,
        *,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        resend_s: float = 10.0,
        source: str = "/swarmlog/economy",
    ) -> None:
        super().__init__(bootstrap_servers, topics, clock=clock, tick_s=tick_s, source=source)
        self.resend_s = resend_s
        self.view = EconomyView()
        self._inflight: dict[str, float] = {}  # command id -> monotonic time sent

    def read_topics(self) -> Iterable[str]:
        """The agent, task, account and proposal topics (what rewards, slashes, credits and
        governance timers follow)."""
        return [self.topics.events(a) for a in ("agent", "task", "account", "proposal")]

    def reset(self) -> None:
        """A fresh view; nothing in flight."""
        self.view = EconomyView()
        self._inflight.clear()

    def apply(self, stored: StoredEvent) -> None:
        """Fold one event into the view."""
        apply(self.view, stored)

    def describe(self) -> dict[str, int]:
        """Rewards and credits still due."""
        return {"rewards_due": len(self.view.rewards), "credits_due": len(self.view.debits)}

    async def tick(self, client: CommandClient) -> None:
        """Plan, and send what is new (or was sent more than ``resend_s`` ago)."""
        now = self.clock.now()
        # Resends go by the machine's monotonic time, not the (maybe manual) domain clock.
        mono = time.monotonic()
        for cid, sent_at in list(self._inflight.items()):
            if mono - sent_at > self.resend_s:
                del self._inflight[cid]
        fresh = plan(self.view, now, skip=self._inflight)
        if not fresh:
            return
        await self.send(client, [(p.command_id, p.command, p.expected_version) for p in fresh])
        for p in fresh:
            self._inflight[p.command_id] = mono
