"""The thin Kafka runner of the workflow process manager (streams/workflow.py decides).

Election, rebuilding the view and when to plan are streams/leader.py's (the consumer
group ``<prefix>-workflow``); this runner folds the workflow, workflow_run and task
event topics into one ``WorkflowView`` and sends what is new: a command not settled
within ``resend_s`` seconds is sent again (same id, dropped by the deciders if it was
applied). A sent command is on the command topic (acks=all) before ``send`` returns, so
a resend only covers a command the view has not yet seen settled because the processor
is behind; the default (30 s, ``Settings.workflow_resend_s``) keeps resends from adding
to such a backlog. Entries waiting on an event that may never come are dropped
``grace_s`` seconds (on the runner's clock) after the view first showed them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from commands.client import CommandClient
from domain import task as tk
from domain.recorded import RecordedEvent
from infra.clock import Clock
from infra.kafka import Kafka
from infra.mapper import event_ce_type
from infra.topics import Topics
from streams.leader import ElectedRunner
from streams.unbuilt import Unbuilt
from streams.workflow import WorkflowView, apply, expire, plan

_TASK_EVENTS = event_ce_type(tk.TASK, "")
_TASK_FOLDED = frozenset(
    event_ce_type(tk.TASK, cls.event_type)
    for cls in (
        tk.TaskSubmitted,
        tk.TaskCompleted,
        tk.TaskFailed,
        tk.TaskTimedOut,
        tk.TaskRequeued,
        tk.TaskDeadLettered,
        tk.TaskCancelled,
    )
)


class WorkflowRunner(ElectedRunner):
    """Runs the workflow process manager: elect, rebuild the view from the log, then plan.

    ``tick_s`` is the longest a read waits, ``resend_s`` how long a sent command may stay
    unsettled before it is sent again, ``grace_s`` how long an entry may wait for an
    event that may never come (all in seconds).
    """

    name = "workflow"

    def __init__(
        self,
        kafka: Kafka,
        topics: Topics,
        *,
        clock: Clock | None = None,
        tick_s: float = 0.2,
        resend_s: float = 30.0,
        grace_s: float = 60.0,
        source: str = "/swarmlog/workflow",
    ) -> None:
        super().__init__(kafka, topics, clock=clock, tick_s=tick_s, source=source)
        self.resend_s = resend_s
        self.grace_s = grace_s
        self.view = WorkflowView()
        self._inflight: dict[str, float] = {}  # command id -> monotonic time sent

    def read_topics(self) -> Iterable[str]:
        """The workflow, workflow_run and task event topics."""
        return [self.topics.events(t) for t in ("workflow", "workflow_run", "task")]

    def wants(self, ce_type: str) -> bool:
        """Every workflow and run event; of the tasks', only those that submit or end one
        (assignments, starts, progress and queueing are skipped before decoding)."""
        return not ce_type.startswith(_TASK_EVENTS) or ce_type in _TASK_FOLDED

    def reset(self) -> None:
        """A fresh view; nothing in flight."""
        self.view = WorkflowView()
        self._inflight.clear()

    def apply(self, stored: RecordedEvent) -> None:
        """Fold one event into the view."""
        apply(self.view, stored)

    def describe(self) -> dict[str, int]:
        """Runs and tasks held, and what is owed."""
        v = self.view
        return {
            "runs": len(v.runs),
            "tasks": len(v.tasks),
            "starts_due": len(v.starts),
            "submits_due": len(v.submits),
            "outcomes_due": len(v.outcomes),
            "cancels_due": len(v.cancels),
        }

    async def tick(self, client: CommandClient) -> None:
        """Expire, plan, and send what is new (or was sent more than ``resend_s`` ago)."""
        now = self.clock.now()
        # Resends go by the machine's monotonic time, not the (maybe manual) domain clock.
        mono = time.monotonic()
        for cid, sent_at in list(self._inflight.items()):
            if mono - sent_at > self.resend_s:
                del self._inflight[cid]
        expire(self.view, now, self.grace_s)
        failures: list[Unbuilt] = []
        fresh = plan(self.view, now, skip=self.skip(self._inflight), failures=failures)
        self.unbuildable(failures)
        if not fresh:
            return
        written = await self.send(
            client, [(p.command_id, p.command, p.expected_version) for p in fresh]
        )
        for p, meta in zip(fresh, written, strict=True):
            if meta is None:
                if p.command_id in self.dead_commands:  # a batch: so are the ids it covers
                    self.dead_commands.update(p.covers)
                continue  # dead-lettered, or planned again on a later tick
            self._inflight[p.command_id] = mono
            for covered in p.covers:
                self._inflight[covered] = mono
