"""The thin Kafka runner of the scheduler (streams/scheduler.py owns the decisions).

Election, rebuilding the view and when to plan are streams/leader.py's; this runner
folds the event topics and remembers what it sent: a command not answered by an
event within ``resend_s`` is planned (and sent, same id) again, and an assignment in
flight holds a slot of its agent until the task's next event arrives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from commands.client import CommandClient
from domain import account as ac
from domain.agent import AGENT
from domain.recorded import RecordedEvent
from domain.task import TASK
from infra.clock import Clock
from infra.kafka import Kafka
from infra.mapper import event_ce_type
from infra.topics import Topics
from streams.leader import ElectedRunner
from streams.scheduler import Planned, Policy, SchedulerView, apply, plan
from streams.unbuilt import Unbuilt

_AGENT_EVENTS = event_ce_type(AGENT, "")
_TASK_EVENTS = event_ce_type(TASK, "")
_TIER_CHANGED = event_ce_type(ac.ACCOUNT, ac.TierChanged.event_type)


@dataclass
class _Inflight:
    sent_at: datetime
    planned: Planned
    task_version: int | None


class SchedulerRunner(ElectedRunner):
    """Runs the scheduler: elect, rebuild the view from the log, then plan.

    ``tick_s`` is the longest a read waits (seconds); a command not answered by an event
    within ``resend_s`` seconds is planned (and sent, same id) again.
    """

    name = "scheduler"

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        policy: Policy | None = None,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        resend_s: float = 3.0,
        source: str = "/swarmlog/scheduler",
    ) -> None:
        super().__init__(kafka, topics, clock=clock, tick_s=tick_s, source=source)
        self.policy = policy or Policy()
        self.resend_s = resend_s
        self.view = SchedulerView()
        self._inflight: dict[str, _Inflight] = {}

    def read_topics(self) -> Iterable[str]:
        """The agent and task topics, and the account topic for the agents' tiers."""
        return [self.topics.events(a) for a in ("agent", "task", "account")]

    def wants(self, ce_type: str) -> bool:
        """Agent and task events, and the accounts' tier changes (the tiers it scores by)."""
        return ce_type.startswith((_AGENT_EVENTS, _TASK_EVENTS)) or ce_type == _TIER_CHANGED

    def reset(self) -> None:
        """A fresh view; nothing in flight."""
        self.view = SchedulerView()
        self._inflight.clear()

    def apply(self, stored: RecordedEvent) -> None:
        """Fold one agent or task event into the view."""
        apply(self.view, stored)

    def describe(self) -> dict[str, int]:
        """Agents and unfinished tasks in the view."""
        return {"agents": len(self.view.agents), "tasks": len(self.view.tasks)}

    async def tick(self, client: CommandClient) -> None:
        """Plan, and send what is new."""
        now = self.clock.now()
        for cid, inf in list(self._inflight.items()):
            task = self.view.tasks.get(inf.planned.task_id or "")
            moved = inf.task_version is not None and (
                task is None or task.version != inf.task_version
            )
            if moved or (now - inf.sent_at).total_seconds() > self.resend_s:
                del self._inflight[cid]
        tentative = {
            i.planned.task_id: i.planned.agent_id
            for i in self._inflight.values()
            if i.planned.task_id and i.planned.agent_id
        }
        failures: list[Unbuilt] = []
        fresh = [
            p
            for p in plan(self.view, now, self.policy, tentative, self.skip(), failures)
            if p.command_id not in self._inflight
        ]
        self.unbuildable(failures)
        if not fresh:
            return
        written = await self.send(
            client, [(p.command_id, p.command, p.expected_version) for p in fresh]
        )
        for p, meta in zip(fresh, written, strict=True):
            if meta is None:
                continue  # dead-lettered, or planned again on a later tick
            task = self.view.tasks.get(p.task_id or "")
            self._inflight[p.command_id] = _Inflight(now, p, task.version if task else None)
