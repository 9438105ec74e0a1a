"""Properties of the deciders and the retry backoff, over generated command sequences.

Each example is a history of commands over a small pool of aggregate ids (two agents,
two tasks), so commands often hit the same aggregate, with ``at`` increasing. Accepted
commands' events are applied to that aggregate's state and kept in its stream.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, get_args

from hypothesis import event, given, settings
from hypothesis import strategies as st

from domain.agent import (
    AGENT_DECIDER,
    AgentState,
    Capability,
    DeregisterAgent,
    MarkAgentOffline,
    RecordHeartbeat,
    RegisterAgent,
    RestartAgent,
    StartAgent,
    StopAgent,
    UpdateCapabilities,
)
from domain.backoff import backoff_seconds
from domain.messages import Command, Decider, Event, Rejection, RejectionKind
from domain.task import (
    TASK_DECIDER,
    TERMINAL,
    AssignTask,
    CancelTask,
    CompleteTask,
    FailTask,
    ReportProgress,
    RequeueReason,
    RequeueTask,
    StartTask,
    SubmitTask,
    TaskAssigned,
    TaskDeadLettered,
    TaskRetryScheduled,
    TaskState,
    TimeOutTask,
)

PROPERTIES = settings(max_examples=200, deadline=None)
T0 = datetime(2024, 1, 1, tzinfo=UTC)
AGENT_IDS = st.sampled_from(["a1", "a2"])
TASK_IDS = st.sampled_from(["t1", "t2"])

# --- strategies ----------------------------------------------------------------------
#
# A history is drawn one command at a time, looking at the state so far: three times in
# four the command is one the aggregate's current state would plausibly get next (from
# its holder, for a task), otherwise any command at all. Uniformly random commands are
# almost all refused as not_found or not_running and rarely get past the first attempt.

capabilities = st.lists(
    st.builds(
        Capability,
        name=st.sampled_from(["python", "sql", "gpu"]),
        level=st.floats(0.0, 1.0, allow_nan=False),
    ),
    max_size=3,
    unique_by=lambda c: c.name,
).map(tuple)


def agent_command(cls: type[Command], aid: str, **fields: Any) -> st.SearchStrategy[Command]:
    return st.builds(cls, agent_id=st.just(aid), at=st.just(T0), **fields)


@cache
def any_agent_command(aid: str) -> st.SearchStrategy[Command]:
    """Any agent command addressed to ``aid``."""
    return st.one_of(
        agent_command(
            RegisterAgent,
            aid,
            name=st.just("worker"),
            capabilities=capabilities,
            max_concurrent_tasks=st.integers(1, 4),
            cost_per_task=st.integers(0, 10),
        ),
        agent_command(UpdateCapabilities, aid, capabilities=capabilities),
        *(
            agent_command(cls, aid)
            for cls in (
                StartAgent,
                StopAgent,
                RestartAgent,
                RecordHeartbeat,
                MarkAgentOffline,
                DeregisterAgent,
            )
        ),
    )


def likely_agent_command(aid: str, state: AgentState | None) -> st.SearchStrategy[Command]:
    """A command an agent in ``state`` would plausibly get next."""
    return _likely_agent_command(aid, None if state is None else state.lifecycle)


@cache
def _likely_agent_command(aid: str, lifecycle: str | None) -> st.SearchStrategy[Command]:
    if lifecycle is None or lifecycle == "deregistered":
        return any_agent_command(aid)
    next_commands: dict[str, tuple[type[Command], ...]] = {
        "registered": (StartAgent, UpdateCapabilities),
        "running": (RecordHeartbeat, MarkAgentOffline, StopAgent, RestartAgent),
        "offline": (RecordHeartbeat, RestartAgent, StopAgent),
        "stopped": (StartAgent, RestartAgent, UpdateCapabilities),
    }
    return st.one_of(
        *(
            agent_command(cls, aid, capabilities=capabilities)
            if cls is UpdateCapabilities
            else agent_command(cls, aid)
            for cls in next_commands[lifecycle]
        )
    )


def task_command(cls: type[Command], tid: str, **fields: Any) -> st.SearchStrategy[Command]:
    return st.builds(cls, task_id=st.just(tid), at=st.just(T0), **fields)


def task_commands_as(
    tid: str, agents: st.SearchStrategy[str]
) -> dict[str, st.SearchStrategy[Command]]:
    """Every task command for ``tid``, by class name, sent as one of ``agents``."""
    return {
        "SubmitTask": task_command(
            SubmitTask, tid, type=st.just("summarise"), max_attempts=st.integers(1, 3)
        ),
        "AssignTask": task_command(AssignTask, tid, agent_id=agents),
        "StartTask": task_command(StartTask, tid, agent_id=agents),
        "ReportProgress": task_command(
            ReportProgress, tid, agent_id=agents, progress=st.floats(0.0, 1.0)
        ),
        "CompleteTask": task_command(CompleteTask, tid, agent_id=agents),
        "FailTask": task_command(
            FailTask,
            tid,
            agent_id=agents,
            error=st.just("boom"),
            retryable=st.sampled_from([True, True, True, False]),
        ),
        "CancelTask": task_command(CancelTask, tid),
        "RequeueTask": task_command(
            RequeueTask, tid, agent_id=agents, reason=st.sampled_from(get_args(RequeueReason))
        ),
        "TimeOutTask": task_command(TimeOutTask, tid, agent_id=agents),
    }


@cache
def any_task_command(tid: str) -> st.SearchStrategy[Command]:
    """Any task command addressed to ``tid``, from any agent of the pool."""
    return st.one_of(*task_commands_as(tid, AGENT_IDS).values())


def likely_task_command(tid: str, state: TaskState | None) -> st.SearchStrategy[Command]:
    """A command a task in ``state`` would plausibly get next, from the agent holding it."""
    if state is None or state.status in TERMINAL:
        return any_task_command(tid)
    return _likely_task_command(tid, state.status, state.agent_id)


@cache
def _likely_task_command(tid: str, status: str, holder: str | None) -> st.SearchStrategy[Command]:
    commands = task_commands_as(tid, AGENT_IDS if holder is None else st.just(holder))
    next_commands = {
        "queued": ("AssignTask",) * 6 + ("CancelTask",),
        "assigned": ("StartTask", "StartTask", "FailTask", "RequeueTask", "TimeOutTask"),
        "running": (
            "ReportProgress",
            "CompleteTask",
            "FailTask",
            "FailTask",
            "RequeueTask",
            "TimeOutTask",
            "TimeOutTask",
        ),
    }[status]
    # sampled_from, unlike one_of, keeps the repeats above as weights.
    return st.sampled_from([commands[name] for name in next_commands]).flatmap(lambda c: c)


@st.composite
def histories(
    draw: st.DrawFn,
    decider: Decider[Any, Any, Any],
    ids: st.SearchStrategy[str],
    any_command: Callable[[str], st.SearchStrategy[Command]],
    likely_command: Callable[[str, Any], st.SearchStrategy[Command]],
) -> list[Command]:
    """5 to 50 commands over the ``ids`` pool, each up to 1.5 s after the one before.

    Delays of up to 1.5 s against backoffs of 0.5 s to 4 s make retries sometimes early
    (retry_not_due) and sometimes due.
    """
    states: dict[str, Any] = {}
    commands: list[Command] = []
    now = T0
    for _ in range(draw(st.integers(5, 50))):
        aid = draw(ids)
        state = states.get(aid)
        likely = draw(st.sampled_from([True, True, True, False]))
        template = draw(likely_command(aid, state) if likely else any_command(aid))
        now += timedelta(milliseconds=draw(st.integers(0, 1_500)))
        command = template.model_copy(update={"at": now})
        outcome = decider.decide(command, state)
        if not isinstance(outcome, Rejection):
            states[aid] = decider.fold(outcome, state)
        commands.append(command)
    return commands


agent_histories = histories(AGENT_DECIDER, AGENT_IDS, any_agent_command, likely_agent_command)
task_histories = histories(TASK_DECIDER, TASK_IDS, any_task_command, likely_task_command)


# --- running a history ---------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One decided command: the state it saw and what came of it."""

    command: Command
    before: Any
    outcome: list[Event] | Rejection


@dataclass
class Run:
    """Every aggregate's state and event stream after a sequence of commands."""

    states: dict[str, Any] = field(default_factory=dict)
    streams: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    decisions: list[Decision] = field(default_factory=list)


def run(decider: Decider[Any, Any, Any], commands: Sequence[Command]) -> Run:
    """Decide each command on its aggregate's state, applying the events of accepted ones."""
    result = Run()
    for command in commands:
        aid = command.aggregate_id
        before = result.states.get(aid)
        outcome = decider.decide(command, before)
        result.decisions.append(Decision(command, before, outcome))
        if isinstance(outcome, Rejection):
            event(f"rejected {outcome.code}")
        else:
            for e in outcome:
                event(type(e).__name__)
            result.streams[aid].extend(outcome)
            result.states[aid] = decider.fold(outcome, before)
    return result


# --- (a) state from events alone ------------------------------------------------------


@PROPERTIES
@given(agent_histories)
def test_agent_state_is_the_fold_of_its_events_alone(history: list[Command]) -> None:
    result = run(AGENT_DECIDER, history)
    for aid, state in result.states.items():
        assert AGENT_DECIDER.fold(result.streams[aid]) == state


@PROPERTIES
@given(task_histories)
def test_task_state_is_the_fold_of_its_events_alone(history: list[Command]) -> None:
    result = run(TASK_DECIDER, history)
    for tid, state in result.states.items():
        assert TASK_DECIDER.fold(result.streams[tid]) == state


# --- (b) decide always answers ----------------------------------------------------------

REJECTION_KINDS = set(get_args(RejectionKind))


def assert_well_formed(decider: Decider[Any, Any, Any], decision: Decision) -> None:
    """Events of this decider's types for the command's aggregate, or a typed Rejection."""
    outcome = decision.outcome
    if isinstance(outcome, Rejection):
        assert outcome.kind in REJECTION_KINDS
        assert outcome.code and outcome.detail
        return
    assert isinstance(outcome, list) and outcome, "decide returned no events and no rejection"
    id_field = type(decision.command).id_field
    for e in outcome:
        assert isinstance(e, decider.event_types)
        assert getattr(e, id_field) == decision.command.aggregate_id
    # Deciding again on the same state gives the same answer: no hidden clock or randomness.
    assert decider.decide(decision.command, decision.before) == outcome


@PROPERTIES
@given(agent_histories)
def test_agent_decide_returns_events_or_a_rejection_never_nothing(
    history: list[Command],
) -> None:
    for decision in run(AGENT_DECIDER, history).decisions:
        assert_well_formed(AGENT_DECIDER, decision)


@PROPERTIES
@given(task_histories)
def test_task_decide_returns_events_or_a_rejection_never_nothing(
    history: list[Command],
) -> None:
    for decision in run(TASK_DECIDER, history).decisions:
        assert_well_formed(TASK_DECIDER, decision)


# --- (c) attempts, retries and finished aggregates --------------------------------------


@PROPERTIES
@given(task_histories)
def test_task_attempts_are_the_assignments_and_never_exceed_max_attempts(
    history: list[Command],
) -> None:
    result = run(TASK_DECIDER, history)
    for tid, state in result.states.items():
        assignments = [e for e in result.streams[tid] if isinstance(e, TaskAssigned)]
        assert state.attempts == len(assignments) <= state.max_attempts
        assert [e.attempt for e in assignments] == list(range(1, len(assignments) + 1))


@PROPERTIES
@given(task_histories)
def test_retries_wait_their_backoff_and_dead_letters_use_every_attempt(
    history: list[Command],
) -> None:
    for d in run(TASK_DECIDER, history).decisions:
        if isinstance(d.outcome, Rejection):
            continue
        for e in d.outcome:
            if isinstance(e, TaskRetryScheduled):
                assert e.attempt == d.before.attempts + 1 <= d.before.max_attempts
                delay = backoff_seconds(e.task_id, d.before.attempts)
                assert e.not_before == d.command.at + timedelta(seconds=delay)
            if isinstance(e, TaskAssigned) and d.before.not_before is not None:
                assert d.command.at >= d.before.not_before
            if isinstance(e, TaskDeadLettered):
                assert d.before.attempts == d.before.max_attempts


@PROPERTIES
@given(task_histories)
def test_a_finished_task_rejects_every_command(history: list[Command]) -> None:
    for d in run(TASK_DECIDER, history).decisions:
        if d.before is not None and d.before.status in TERMINAL:
            assert isinstance(d.outcome, Rejection)
            expected = (
                "task_already_submitted" if isinstance(d.command, SubmitTask) else "task_finished"
            )
            assert d.outcome.code == expected


@PROPERTIES
@given(agent_histories)
def test_a_deregistered_agent_rejects_every_command_as_gone(
    history: list[Command],
) -> None:
    for d in run(AGENT_DECIDER, history).decisions:
        if d.before is not None and d.before.lifecycle == "deregistered":
            assert isinstance(d.outcome, Rejection)
            assert (d.outcome.kind, d.outcome.code) == ("gone", "agent_deregistered")


# --- (d) backoff -----------------------------------------------------------------------


def ceiling(attempt: int, base_s: float, cap_s: float) -> float:
    """The backoff's upper bound for ``attempt``: base doubled per attempt, capped."""
    return min(cap_s, base_s * float(2 ** max(0, attempt - 1)))


keys = st.text(min_size=1, max_size=20)
attempts = st.integers(1, 100)
bases = st.floats(0.001, 10.0)
caps = st.floats(0.001, 3_600.0)


@PROPERTIES
@given(keys, attempts, bases, caps)
def test_backoff_is_deterministic(key: str, attempt: int, base_s: float, cap_s: float) -> None:
    first = backoff_seconds(key, attempt, base_s=base_s, cap_s=cap_s)
    assert backoff_seconds(key, attempt, base_s=base_s, cap_s=cap_s) == first


@PROPERTIES
@given(keys, attempts, bases, caps)
def test_backoff_lies_between_half_the_ceiling_and_the_ceiling(
    key: str, attempt: int, base_s: float, cap_s: float
) -> None:
    top = ceiling(attempt, base_s, cap_s)
    assert top / 2 <= backoff_seconds(key, attempt, base_s=base_s, cap_s=cap_s) <= top


@PROPERTIES
@given(keys, st.integers(1, 99), bases, caps)
def test_backoff_ceiling_never_decreases_and_never_passes_the_cap(
    key: str, attempt: int, base_s: float, cap_s: float
) -> None:
    assert ceiling(attempt, base_s, cap_s) <= ceiling(attempt + 1, base_s, cap_s) <= cap_s
    # Observable: two attempts later the shortest delay is at least the previous longest,
    # until the cap is reached.
    if ceiling(attempt + 2, base_s, cap_s) < cap_s:
        later = backoff_seconds(key, attempt + 2, base_s=base_s, cap_s=cap_s)
        assert later >= backoff_seconds(key, attempt, base_s=base_s, cap_s=cap_s)


@PROPERTIES
@given(keys, attempts)
def test_default_backoff_is_between_half_a_second_and_a_minute(key: str, attempt: int) -> None:
    assert 0.5 <= backoff_seconds(key, attempt) <= 60.0


def test_backoff_differs_between_keys_so_retries_spread_out() -> None:
    delays = {backoff_seconds(f"task-{i}", 3) for i in range(50)}
    assert len(delays) > 40


def test_backoff_is_capped_for_any_attempt_number() -> None:
    assert 30.0 <= backoff_seconds("task-1", 2_000) <= 60.0
