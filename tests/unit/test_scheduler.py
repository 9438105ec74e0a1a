"""The scheduler process manager, pure: given these events, when it plans at time T,
then these commands.

Each test builds the log the scheduler would read (``RecordedEvent`` objects with
per-aggregate versions and times in seconds after ``BASE``), folds it with
``streams.scheduler.apply`` and calls ``plan``. No IO, no clock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from domain import account as ac
from domain import agent as ag
from domain import task as tk
from domain.messages import Event
from domain.recorded import RecordedEvent
from streams.scheduler import Planned, Policy, SchedulerView, apply, plan

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
#: Heartbeats never time out unless a test says so.
PATIENT = Policy(heartbeat_timeout_s=1e9, aging_interval_s=30.0)


def t(seconds: float) -> datetime:
    """``seconds`` after BASE."""
    return BASE + timedelta(seconds=seconds)


class Swarm:
    """A log of agent and task events being written, and the scheduler's view of it."""

    def __init__(self) -> None:
        self.view = SchedulerView()
        self.versions: dict[tuple[str, str], int] = defaultdict(int)
        self.log: list[RecordedEvent] = []

    def _emit(self, aggregate_type: str, aggregate_id: str, at: float, *events: Event) -> None:
        for event in events:
            key = (aggregate_type, aggregate_id)
            self.versions[key] += 1
            stored = RecordedEvent(
                id=f"{aggregate_id}-{self.versions[key]}",
                aggregate_type=aggregate_type,
                aggregate_id=aggregate_id,
                version=self.versions[key],
                time=t(at),
                correlation_id="c",
                causation_id="c",
                event=event,
            )
            self.log.append(stored)
            apply(self.view, stored)

    # agents ---------------------------------------------------------------------------

    def agent(
        self,
        agent_id: str,
        *,
        skills: Mapping[str, float] | None = None,
        max_concurrent: int = 1,
        cost: int = 0,
        at: float = 0.0,
        start: bool = True,
    ) -> Swarm:
        """Register (and by default start) an agent."""
        caps = tuple(
            ag.Capability(name=n, level=lvl) for n, lvl in (skills or {"python": 0.8}).items()
        )
        self._emit(
            "agent",
            agent_id,
            at,
            ag.AgentRegistered(
                agent_id=agent_id,
                name=agent_id,
                capabilities=caps,
                max_concurrent_tasks=max_concurrent,
                cost_per_task=cost,
            ),
        )
        if start:
            self._emit("agent", agent_id, at, ag.AgentStarted(agent_id=agent_id))
        return self

    def heartbeat(
        self, agent_id: str, at: float, *, resumed: bool = False, sent: float | None = None
    ) -> Swarm:
        """A heartbeat decided at ``at``, sent at ``sent`` (None: a v1 record, no send time)."""
        sent_at = None if sent is None else t(sent)
        self._emit(
            "agent",
            agent_id,
            at,
            ag.HeartbeatRecorded(agent_id=agent_id, resumed=resumed, sent_at=sent_at),
        )
        return self

    def stop(self, agent_id: str, at: float) -> Swarm:
        self._emit("agent", agent_id, at, ag.AgentStopped(agent_id=agent_id))
        return self

    def offline(self, agent_id: str, at: float) -> Swarm:
        self._emit("agent", agent_id, at, ag.AgentMarkedOffline(agent_id=agent_id, reason="x"))
        return self

    def deregister(self, agent_id: str, at: float) -> Swarm:
        self._emit("agent", agent_id, at, ag.AgentDeregistered(agent_id=agent_id))
        return self

    # tasks ----------------------------------------------------------------------------

    def task(
        self,
        task_id: str,
        *,
        required: Iterable[str] = (),
        priority: tk.Priority = "normal",
        max_cost: int | None = None,
        lease: float = 30.0,
        run: float = 600.0,
        at: float = 0.0,
    ) -> Swarm:
        """Submit (and queue) a task."""
        self._emit(
            "task",
            task_id,
            at,
            tk.TaskSubmitted(
                task_id=task_id,
                type="work",
                payload={},
                required_capabilities=tuple(required),
                priority=priority,
                max_cost=max_cost,
                lease_timeout_s=lease,
                run_timeout_s=run,
                max_attempts=3,
            ),
            tk.TaskQueued(task_id=task_id),
        )
        return self

    def assign(self, task_id: str, agent_id: str, at: float, attempt: int = 1) -> Swarm:
        self._emit(
            "task",
            task_id,
            at,
            tk.TaskAssigned(task_id=task_id, agent_id=agent_id, attempt=attempt),
        )
        return self

    def start(self, task_id: str, agent_id: str, at: float) -> Swarm:
        self._emit("task", task_id, at, tk.TaskStarted(task_id=task_id, agent_id=agent_id))
        return self

    def complete(self, task_id: str, agent_id: str, at: float) -> Swarm:
        self._emit(
            "task",
            task_id,
            at,
            tk.TaskCompleted(task_id=task_id, agent_id=agent_id, result={}, quality=1.0),
        )
        return self

    def requeued(self, task_id: str, agent_id: str, at: float, reason: str) -> Swarm:
        self._emit(
            "task",
            task_id,
            at,
            tk.TaskRequeued(task_id=task_id, agent_id=agent_id, reason=reason),
            tk.TaskQueued(task_id=task_id, reason="requeued"),
        )
        return self

    def failed_with_retry(self, task_id: str, agent_id: str, at: float, not_before: float) -> Swarm:
        self._emit(
            "task",
            task_id,
            at,
            tk.TaskFailed(task_id=task_id, agent_id=agent_id, error="boom", retryable=True),
            tk.TaskRetryScheduled(task_id=task_id, attempt=2, not_before=t(not_before)),
        )
        return self

    # when -----------------------------------------------------------------------------

    def plan(
        self, at: float, policy: Policy = PATIENT, tentative: Mapping[str, str] | None = None
    ) -> list[Planned]:
        return plan(self.view, t(at), policy, tentative)


def assignments(planned: list[Planned]) -> dict[str, str]:
    """task id -> agent id of every AssignTask planned."""
    return {
        p.command.task_id: p.command.agent_id
        for p in planned
        if isinstance(p.command, tk.AssignTask)
    }


def of_type(planned: list[Planned], cls: type) -> list:  # type: ignore[type-arg]
    return [p.command for p in planned if isinstance(p.command, cls)]


# capability matching ------------------------------------------------------------------


def test_never_assigns_a_task_to_an_agent_missing_a_required_capability() -> None:
    swarm = (
        Swarm()
        .agent("a-python", skills={"python": 1.0})
        .agent("b-rust", skills={"rust": 0.2, "python": 0.1})
        .task("t1", required=("rust",))
    )

    assert assignments(swarm.plan(1)) == {"t1": "b-rust"}


def test_a_task_no_agent_can_do_stays_queued() -> None:
    swarm = Swarm().agent("a", skills={"python": 1.0}).task("t1", required=("python", "go"))

    assert swarm.plan(1) == []


def test_a_capability_at_level_zero_does_not_count() -> None:
    swarm = Swarm().agent("a", skills={"go": 0.0}).task("t1", required=("go",))

    assert assignments(swarm.plan(1)) == {}


# capacity -----------------------------------------------------------------------------


def test_an_agent_gets_no_more_tasks_than_its_max_concurrent_tasks() -> None:
    swarm = Swarm().agent("a", max_concurrent=2)
    for i in range(5):
        swarm.task(f"t{i}", at=i)

    planned = assignments(swarm.plan(10))

    assert planned == {"t0": "a", "t1": "a"}


def test_tasks_already_held_count_against_capacity() -> None:
    swarm = Swarm().agent("a", max_concurrent=2).task("t0").task("t1", at=1).task("t2", at=2)
    swarm.assign("t0", "a", at=3).start("t0", "a", at=4)

    assert assignments(swarm.plan(5)) == {"t1": "a"}


def test_a_completed_task_frees_its_slot() -> None:
    swarm = Swarm().agent("a").task("t0").task("t1", at=1)
    swarm.assign("t0", "a", at=2)
    assert assignments(swarm.plan(3)) == {}

    swarm.start("t0", "a", at=3).complete("t0", "a", at=4)

    assert assignments(swarm.plan(5)) == {"t1": "a"}


def test_tentative_assignments_hold_a_slot_and_are_not_planned_again() -> None:
    swarm = Swarm().agent("a", max_concurrent=2).agent("b").task("t0").task("t1", at=1)
    swarm.task("t2", at=2)

    # t0 was sent to a, not yet on the log: a has one slot left, t0 is not planned again.
    planned = assignments(swarm.plan(5, tentative={"t0": "a"}))

    assert "t0" not in planned
    assert sorted(planned) == ["t1", "t2"]
    assert list(planned.values()).count("a") == 1
    assert list(planned.values()).count("b") == 1


def test_a_full_agent_with_a_tentative_task_gets_nothing() -> None:
    swarm = Swarm().agent("a").task("t0").task("t1", at=1)

    assert assignments(swarm.plan(5, tentative={"t0": "a"})) == {}


# priority and aging -------------------------------------------------------------------


def test_critical_task_is_assigned_before_an_older_low_one() -> None:
    swarm = (
        Swarm().agent("a").task("low", priority="low", at=0).task("crit", priority="critical", at=5)
    )

    assert assignments(swarm.plan(6)) == {"crit": "a"}


def test_priorities_are_served_in_rank_order() -> None:
    swarm = Swarm().agent("a", max_concurrent=1)
    for i, p in enumerate(("low", "normal", "high", "urgent", "critical")):
        swarm.task(p, priority=p, at=i)  # type: ignore[arg-type]

    order = []
    for step in range(5):
        chosen = assignments(swarm.plan(10 + step * 2))
        assert len(chosen) == 1
        (task_id,) = chosen
        order.append(task_id)
        swarm.assign(task_id, "a", at=10 + step * 2).start(task_id, "a", at=10 + step * 2)
        swarm.complete(task_id, "a", at=11 + step * 2)

    assert order == ["critical", "urgent", "high", "normal", "low"]


def test_a_fresh_normal_task_beats_a_low_one_that_has_not_aged_enough() -> None:
    swarm = Swarm().agent("a").task("low", priority="low", at=0).task("normal", at=20)

    # low has aged 20/30 of a level: 0.67 < normal's 1.
    assert assignments(swarm.plan(20)) == {"normal": "a"}


def test_an_old_low_task_overtakes_a_fresh_normal_one_after_enough_aging() -> None:
    swarm = Swarm().agent("a").task("low", priority="low", at=0).task("normal", at=100)

    # low has waited 100 s = 3.3 aging intervals: 3.3 > normal's 1.
    assert assignments(swarm.plan(100)) == {"low": "a"}


def test_equal_priorities_are_served_oldest_first() -> None:
    swarm = Swarm().agent("a").task("newer", at=5).task("older", at=1)

    assert assignments(swarm.plan(6)) == {"older": "a"}


# cost and score -----------------------------------------------------------------------


def test_an_agent_costing_more_than_max_cost_is_excluded() -> None:
    swarm = (
        Swarm()
        .agent("pricey-expert", skills={"python": 1.0}, cost=5_000_000)
        .agent("cheap-novice", skills={"python": 0.1}, cost=1_000_000)
        .task("t1", required=("python",), max_cost=2_000_000)
    )

    assert assignments(swarm.plan(1)) == {"t1": "cheap-novice"}


def test_no_agent_within_max_cost_leaves_the_task_queued() -> None:
    swarm = Swarm().agent("a", cost=3).task("t1", max_cost=2)

    assert swarm.plan(1) == []


def test_the_agent_with_the_higher_skill_wins() -> None:
    swarm = (
        Swarm()
        .agent("a-weak", skills={"python": 0.3})
        .agent("b-strong", skills={"python": 0.9})
        .task("t1", required=("python",))
    )

    assert assignments(swarm.plan(1)) == {"t1": "b-strong"}


def test_a_higher_staking_tier_raises_an_agent_s_standing() -> None:
    def swarm_with(tier: str | None) -> Swarm:
        swarm = Swarm().agent("a-staker").agent("b-plain")
        if tier is not None:
            swarm._emit(
                "account",
                "a-staker",
                0,
                ac.TierChanged(account_id="a-staker", previous="none", tier=tier),
            )
        return swarm.task("t1")

    # Equal fits: the tie goes to the higher id, unless a tier lifts the other.
    assert assignments(swarm_with(None).plan(1)) == {"t1": "b-plain"}
    assert assignments(swarm_with("bronze").plan(1)) == {"t1": "a-staker"}


def test_standing_does_not_outweigh_a_much_better_skill() -> None:
    swarm = (
        Swarm()
        .agent("a-diamond", skills={"python": 0.2})
        .agent("b-skilled", skills={"python": 0.9})
    )
    swarm._emit(
        "account",
        "a-diamond",
        0,
        ac.TierChanged(account_id="a-diamond", previous="none", tier="diamond"),
    )
    swarm.task("t1", required=("python",))
    assert assignments(swarm.plan(1)) == {"t1": "b-skilled"}


def test_work_is_spread_to_the_agent_with_more_headroom() -> None:
    swarm = Swarm().agent("a", max_concurrent=4).agent("b", max_concurrent=4)
    swarm.task("t0").assign("t0", "b", at=1).task("t1", at=2)

    assert assignments(swarm.plan(3)) == {"t1": "a"}


def test_a_registered_but_not_started_agent_gets_no_work() -> None:
    swarm = Swarm().agent("a", start=False).task("t1")

    assert swarm.plan(1) == []


# leases, run timeouts, heartbeats -----------------------------------------------------


def test_an_unstarted_assignment_is_requeued_when_its_lease_expires() -> None:
    swarm = Swarm().agent("a").task("t1", lease=30).assign("t1", "a", at=10)

    assert swarm.plan(40) == []  # exactly the lease: not yet
    planned = swarm.plan(40.5)

    assert of_type(planned, tk.RequeueTask) == [
        tk.RequeueTask(task_id="t1", agent_id="a", reason="lease_expired", at=t(40.5))
    ]


def test_every_planned_command_expects_the_version_it_was_decided_on() -> None:
    # A requeue decided before the agent's StartTask is applied must then be refused
    # (412), not take the started task away: the command carries the version it saw.
    swarm = Swarm().agent("a").task("t1", lease=30).assign("t1", "a", at=10)
    task_version = swarm.view.tasks["t1"].version

    planned = swarm.plan(100)

    assert [(type(p.command).__name__, p.expected_version) for p in planned] == [
        ("RequeueTask", task_version)
    ]


def test_a_started_task_has_no_lease() -> None:
    swarm = Swarm().agent("a").task("t1", lease=30, run=600).assign("t1", "a", at=10)
    swarm.start("t1", "a", at=11)

    assert swarm.plan(100) == []


def test_a_running_task_past_its_run_timeout_is_timed_out() -> None:
    swarm = Swarm().agent("a").task("t1", run=60).assign("t1", "a", at=1).start("t1", "a", at=10)

    assert swarm.plan(70) == []
    planned = swarm.plan(70.1)

    assert of_type(planned, tk.TimeOutTask) == [
        tk.TimeOutTask(task_id="t1", agent_id="a", at=t(70.1))
    ]
    assert of_type(planned, tk.RequeueTask) == []


def test_an_agent_whose_heartbeats_stop_is_marked_offline() -> None:
    policy = Policy(heartbeat_timeout_s=15)
    swarm = Swarm().agent("a", at=0).agent("b", at=0).heartbeat("a", at=5).heartbeat("b", at=20)

    assert swarm.plan(20, policy) == []
    planned = swarm.plan(20.5, policy)

    assert of_type(planned, ag.MarkAgentOffline) == [
        ag.MarkAgentOffline(agent_id="a", reason="heartbeat_timeout", timeout_s=15, at=t(20.5))
    ]


def test_the_heartbeat_timeout_counts_from_when_the_heartbeat_was_sent() -> None:
    policy = Policy(heartbeat_timeout_s=15)
    # Sent at 5, decided (and stamped) at 12: the agent went silent at 5, not 12.
    swarm = Swarm().agent("a", at=0).heartbeat("a", at=12, sent=5)

    assert of_type(swarm.plan(20, policy), ag.MarkAgentOffline) == []
    assert of_type(swarm.plan(20.5, policy), ag.MarkAgentOffline) == [
        ag.MarkAgentOffline(agent_id="a", reason="heartbeat_timeout", timeout_s=15, at=t(20.5))
    ]


def test_an_agent_with_stale_heartbeats_gets_no_new_work() -> None:
    policy = Policy(heartbeat_timeout_s=15)
    swarm = Swarm().agent("a", at=0).agent("b", skills={"python": 0.1}, at=0)
    swarm.heartbeat("b", at=25).task("t1", at=25)

    assert assignments(swarm.plan(26, policy)) == {"t1": "b"}


def test_progress_counts_as_a_sign_of_life() -> None:
    policy = Policy(heartbeat_timeout_s=15)
    swarm = Swarm().agent("a", at=0).task("t1", run=600).assign("t1", "a", at=1)
    swarm.start("t1", "a", at=2)
    swarm._emit("task", "t1", 14, tk.TaskProgressed(task_id="t1", agent_id="a", progress=0.5))

    assert of_type(swarm.plan(25, policy), ag.MarkAgentOffline) == []


def test_an_offline_agents_assigned_and_running_tasks_are_requeued() -> None:
    swarm = Swarm().agent("a", max_concurrent=3).agent("b")
    swarm.task("assigned").task("running", at=1).assign("assigned", "a", at=2)
    swarm.assign("running", "a", at=2).start("running", "a", at=3)
    swarm.offline("a", at=4)

    requeues = of_type(swarm.plan(5), tk.RequeueTask)

    assert sorted((r.task_id, r.agent_id, r.reason) for r in requeues) == [
        ("assigned", "a", "agent_offline"),
        ("running", "a", "agent_offline"),
    ]


def test_a_stopped_agents_unstarted_tasks_are_requeued_and_running_ones_kept() -> None:
    swarm = Swarm().agent("a", max_concurrent=3)
    swarm.task("assigned").task("running", at=1).assign("assigned", "a", at=2)
    swarm.assign("running", "a", at=2).start("running", "a", at=3)
    swarm.stop("a", at=4)

    planned = swarm.plan(5)

    assert [(c.task_id, c.reason) for c in of_type(planned, tk.RequeueTask)] == [
        ("assigned", "agent_stopped")
    ]
    assert of_type(planned, tk.TimeOutTask) == []


def test_a_deregistered_agents_tasks_are_requeued() -> None:
    swarm = Swarm().agent("a", max_concurrent=2).task("t1").assign("t1", "a", at=1)
    swarm.start("t1", "a", at=2).deregister("a", at=3)

    assert [(c.task_id, c.reason) for c in of_type(swarm.plan(4), tk.RequeueTask)] == [
        ("t1", "agent_deregistered")
    ]


def test_a_requeued_task_goes_to_another_agent_once_the_first_is_offline() -> None:
    swarm = Swarm().agent("a").agent("b", skills={"python": 0.1}).task("t1")
    swarm.assign("t1", "a", at=1).offline("a", at=2).requeued(
        "t1", "a", at=3, reason="agent_offline"
    )

    assert assignments(swarm.plan(4)) == {"t1": "b"}


def test_a_retry_is_not_assigned_before_its_not_before() -> None:
    swarm = Swarm().agent("a").task("t1").assign("t1", "a", at=1).start("t1", "a", at=2)
    swarm.failed_with_retry("t1", "a", at=3, not_before=50)

    assert assignments(swarm.plan(49.9)) == {}
    assert assignments(swarm.plan(50)) == {"t1": "a"}


# deterministic command ids -------------------------------------------------------------


def _busy_swarm() -> Swarm:
    swarm = Swarm().agent("a", max_concurrent=2).agent("b").agent("c", at=0)
    swarm.task("queued", at=1).task("leased", lease=5, at=1).assign("leased", "a", at=2)
    swarm.task("long", run=5, at=1).assign("long", "a", at=2).start("long", "a", at=3)
    return swarm.heartbeat("b", at=19)


def test_planning_the_same_view_twice_gives_the_same_command_ids() -> None:
    policy = Policy(heartbeat_timeout_s=15)
    first = _busy_swarm().plan(20, policy)
    again = _busy_swarm().plan(20, policy)

    kinds = sorted(type(p.command).__name__ for p in first)
    assert kinds == [
        "AssignTask",
        "MarkAgentOffline",
        "MarkAgentOffline",
        "RequeueTask",
        "TimeOutTask",
    ]
    assert [p.command_id for p in first] == [p.command_id for p in again]
    assert len({p.command_id for p in first}) == len(first)


def test_the_same_view_planned_later_keeps_its_ids() -> None:
    swarm = Swarm().agent("a").task("t1").assign("t1", "a", at=1)

    early = {type(p.command).__name__: p.command_id for p in swarm.plan(40)}
    later = {type(p.command).__name__: p.command_id for p in swarm.plan(400)}

    assert early == later and "RequeueTask" in early


def test_a_new_task_version_gets_a_new_assignment_id() -> None:
    swarm = Swarm().agent("a").agent("b").task("t1")
    before = [p.command_id for p in swarm.plan(1)]

    swarm.assign("t1", "a", at=2).requeued("t1", "a", at=3, reason="lease_expired")
    after = [p.command_id for p in swarm.plan(4) if isinstance(p.command, tk.AssignTask)]

    assert len(before) == 1 and len(after) == 1
    assert before != after


def test_a_heartbeat_gives_the_offline_command_a_new_id() -> None:
    policy = Policy(heartbeat_timeout_s=15)
    swarm = Swarm().agent("a", at=0)
    first = [p.command_id for p in swarm.plan(16, policy)]

    swarm.heartbeat("a", at=1)
    second = [p.command_id for p in swarm.plan(17, policy)]

    assert len(first) == len(second) == 1
    assert first != second


# reading order ---------------------------------------------------------------------------


def _refold(log: list[RecordedEvent], first: str) -> SchedulerView:
    """The view after reading every ``first``-type event before the other topic's: a legal
    order for a reader of two topics (each aggregate's events stay in order)."""
    view = SchedulerView()
    for stored in sorted(log, key=lambda s: s.aggregate_type != first):
        apply(view, stored)
    return view


def test_the_plan_does_not_depend_on_which_event_topic_is_read_first() -> None:
    # The runner reads the agent and task topics independently (a rebuild after failover
    # may get a task partition's records before the agent partition's), so the view must
    # come out the same either way.
    swarm = Swarm().agent("a", skills={"python": 0.9}).agent("b", skills={"python": 0.5})
    swarm.task("held", at=1).assign("held", "a", at=2).start("held", "a", at=3)
    swarm.task("done", at=1).assign("done", "b", at=2).start("done", "b", at=3)
    swarm.complete("done", "b", at=4)
    swarm.task("next", required=("python",), at=5)
    expected = plan(swarm.view, t(6), PATIENT)
    assert assignments(expected) == {"next": "b"}  # a is better, but full

    tasks_first = _refold(swarm.log, first="task")

    assert assignments(plan(tasks_first, t(6), PATIENT)) == {"next": "b"}
    load = tasks_first.load()
    assert {a: (load.get(a, 0), tasks_first.completed.get(a, 0)) for a in tasks_first.agents} == {
        "a": (1, 0),
        "b": (0, 1),
    }
