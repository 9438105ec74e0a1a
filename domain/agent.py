"""The Agent aggregate: a worker of the swarm, its capabilities, capacity and lifecycle.

Lifecycle: registered -> running <-> offline, running/offline -> stopped -> running
(restart), any -> deregistered (terminal). The operational status a user sees
(idle / busy / offline / stopped) is derived by the read side from the lifecycle and
the agent's load (its assigned and running tasks); it is not stored twice here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AwareDatetime, Field, field_validator

from domain.messages import Command, Decider, Event, Message, Rejection, Upcaster, rejected
from domain.money import MAX_PRICE, MicroTokens

AGENT = "agent"

Lifecycle = Literal["registered", "running", "stopped", "offline", "deregistered"]


# The fields of the agent commands, declared once: the commands below and the HTTP API's
# request bodies (api/schemas/agents.py) both use them, so a bound or default cannot drift.

CapabilityName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
"""A capability's name: 1 to 64 of ``[A-Za-z0-9_.:-]``."""

CapabilityLevel = Annotated[float, Field(ge=0.0, le=1.0)]
"""How good an agent is at a capability, in [0, 1] (1 = expert)."""

AgentName = Annotated[str, Field(min_length=1, max_length=200)]
"""An agent's display name."""

MaxConcurrentTasks = Annotated[int, Field(ge=1, le=1000)]
"""How many tasks an agent may hold (assigned or running) at once."""
DEFAULT_MAX_CONCURRENT_TASKS = 1

CostPerTask = Annotated[int, Field(ge=0, le=MAX_PRICE)]
"""What an agent charges per task, in micro-tokens."""


class Capability(Message):
    """A named skill with a level in [0, 1] (1 = expert)."""

    name: CapabilityName
    level: CapabilityLevel


def _unique_capabilities(value: tuple[Capability, ...]) -> tuple[Capability, ...]:
    names = [c.name for c in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate capability names: {', '.join(dupes)}")
    return value


class AgentCommand(Command):
    """A command addressed to one Agent aggregate, keyed by ``agent_id``."""

    aggregate_type: ClassVar[str] = AGENT
    id_field: ClassVar[str] = "agent_id"
    agent_id: str = Field(min_length=1, max_length=128)


class RegisterAgent(AgentCommand):
    """Register a new agent. ``cost_per_task`` is in micro-tokens."""

    name: AgentName
    capabilities: tuple[Capability, ...] = ()
    max_concurrent_tasks: MaxConcurrentTasks = DEFAULT_MAX_CONCURRENT_TASKS
    cost_per_task: CostPerTask = 0

    _unique = field_validator("capabilities")(_unique_capabilities)


class StartAgent(AgentCommand):
    """Start a registered, stopped or offline agent: it may now be assigned tasks."""


class StopAgent(AgentCommand):
    """Stop an agent: it gets no new tasks (the scheduler requeues its unstarted ones)."""


class RestartAgent(AgentCommand):
    """Restart a running, stopped or offline agent."""


class RecordHeartbeat(AgentCommand):
    """Record that the agent is alive at ``at``; an offline agent comes back online.

    ``at`` is when the agent sent the heartbeat (the API clamps the agent's ``sent_at``
    to a few seconds before it received it, api/routes/agents.py), not when it is
    decided: the heartbeat timeout is measured from it.
    """


class MarkAgentOffline(AgentCommand):
    """Mark a running agent offline (sent by the scheduler when heartbeats stop).

    With ``timeout_s`` (seconds) the decider refuses (``agent_alive``) while the last
    heartbeat the agent sent is less than ``timeout_s`` before ``at``: a scheduler whose
    view lags the log cannot take a live agent offline. Without it (commands written
    before it existed) only the lifecycle is checked.
    """

    reason: str = "heartbeat_timeout"
    timeout_s: float | None = Field(default=None, ge=0)


class UpdateCapabilities(AgentCommand):
    """Replace the agent's capabilities."""

    capabilities: tuple[Capability, ...]

    _unique = field_validator("capabilities")(_unique_capabilities)


class DeregisterAgent(AgentCommand):
    """Remove the agent for good; its id can never be registered again."""


class AgentEvent(Event):
    """An event of one Agent aggregate."""

    aggregate_type: ClassVar[str] = AGENT
    agent_id: str


class AgentRegistered(AgentEvent):
    """An agent was registered (``cost_per_task`` in micro-tokens)."""

    event_type: ClassVar[str] = "registered"
    name: str
    capabilities: tuple[Capability, ...]
    max_concurrent_tasks: int
    cost_per_task: int


class AgentStarted(AgentEvent):
    """The agent was started."""

    event_type: ClassVar[str] = "started"


class AgentStopped(AgentEvent):
    """The agent was stopped."""

    event_type: ClassVar[str] = "stopped"


class AgentRestarted(AgentEvent):
    """The agent was restarted and is running."""

    event_type: ClassVar[str] = "restarted"


def _sent_at_unknown(data: dict[str, Any]) -> dict[str, Any]:
    """HeartbeatRecorded v1 -> v2: the send time was not recorded (``sent_at`` None)."""
    return {**data, "sent_at": None}


class HeartbeatRecorded(AgentEvent):
    """A heartbeat arrived; ``resumed`` is true when it brought an offline agent back.

    ``sent_at`` is when the agent sent it (the command's ``at``, clamped by the API to at
    most ``heartbeat_max_skew_s`` before it was received), and so also the event's
    CloudEvents ``time``: within one agent, heartbeats' times follow when they were sent,
    not the order they were decided in. Schema version 2 added it; version-1 records
    (before 2026-12-08) are upcast with ``sent_at`` None, and a
    state folded from them knows no heartbeat time (``MarkAgentOffline`` is then decided
    on the lifecycle alone, as it was when they were written).
    """

    event_type: ClassVar[str] = "heartbeat_recorded"
    schema_version: ClassVar[int] = 2
    upcasters: ClassVar[tuple[Upcaster, ...]] = (_sent_at_unknown,)
    resumed: bool = False
    sent_at: AwareDatetime | None = None


class AgentMarkedOffline(AgentEvent):
    """The agent was marked offline (its heartbeats stopped)."""

    event_type: ClassVar[str] = "marked_offline"
    reason: str


class CapabilitiesUpdated(AgentEvent):
    """The agent's capabilities were replaced."""

    event_type: ClassVar[str] = "capabilities_updated"
    capabilities: tuple[Capability, ...]


class AgentDeregistered(AgentEvent):
    """The agent was deregistered (terminal)."""

    event_type: ClassVar[str] = "deregistered"


class AgentState(Message):
    """The write-side state of one agent; ``cost_per_task`` in micro-tokens."""

    agent_id: str
    name: str
    capabilities: tuple[Capability, ...]
    max_concurrent_tasks: int
    cost_per_task: MicroTokens
    lifecycle: Lifecycle
    last_heartbeat_at: datetime | None = None
    """When the agent sent its last recorded heartbeat (None: none recorded with a time)."""


def decide(command: AgentCommand, state: AgentState | None) -> list[AgentEvent] | Rejection:
    """Decide the events for ``command`` given the agent's ``state`` (None: not registered).

    Returns a non-empty list of events, or a Rejection: ``agent_not_found`` (not_found),
    ``agent_already_registered``, ``agent_deregistered`` (gone), ``agent_not_running``,
    ``agent_already_running``, ``agent_already_stopped``, ``agent_alive`` (conflict).
    """
    aid = command.agent_id
    match command, state:
        case RegisterAgent(), None:
            return [
                AgentRegistered(
                    agent_id=aid,
                    name=command.name,
                    capabilities=command.capabilities,
                    max_concurrent_tasks=command.max_concurrent_tasks,
                    cost_per_task=command.cost_per_task,
                )
            ]
        case RegisterAgent(), AgentState(lifecycle="deregistered"):
            return rejected("gone", "agent_deregistered", f"agent {aid} was deregistered")
        case RegisterAgent(), AgentState():
            return rejected("conflict", "agent_already_registered", f"agent {aid} exists")
        case _, None:
            return rejected("not_found", "agent_not_found", f"no agent {aid}")
        case _, AgentState(lifecycle="deregistered"):
            return rejected("gone", "agent_deregistered", f"agent {aid} was deregistered")
        case StartAgent(), AgentState(lifecycle="registered" | "stopped" | "offline"):
            return [AgentStarted(agent_id=aid)]
        case StartAgent(), AgentState():
            return rejected(
                "conflict", "agent_already_running", f"agent {aid} is {state.lifecycle}"
            )
        case StopAgent(), AgentState(lifecycle="running" | "offline"):
            return [AgentStopped(agent_id=aid)]
        case StopAgent(), AgentState(lifecycle="stopped"):
            return rejected("conflict", "agent_already_stopped", f"agent {aid} is stopped")
        case RestartAgent(), AgentState(lifecycle="running" | "stopped" | "offline"):
            return [AgentRestarted(agent_id=aid)]
        case RecordHeartbeat(), AgentState(lifecycle="running"):
            return [HeartbeatRecorded(agent_id=aid, sent_at=command.at)]
        case RecordHeartbeat(), AgentState(lifecycle="offline"):
            return [HeartbeatRecorded(agent_id=aid, resumed=True, sent_at=command.at)]
        case MarkAgentOffline(), AgentState(lifecycle="running"):
            last = state.last_heartbeat_at
            if command.timeout_s is not None and last is not None:
                silent_s = (command.at - last).total_seconds()
                if silent_s < command.timeout_s:
                    return rejected(
                        "conflict",
                        "agent_alive",
                        f"agent {aid} sent a heartbeat {silent_s:.3f} s before this command,"
                        f" within its {command.timeout_s:g} s timeout",
                    )
            return [AgentMarkedOffline(agent_id=aid, reason=command.reason)]
        case UpdateCapabilities(), AgentState():
            return [CapabilitiesUpdated(agent_id=aid, capabilities=command.capabilities)]
        case DeregisterAgent(), AgentState():
            return [AgentDeregistered(agent_id=aid)]
        case _, AgentState():
            return rejected(
                "conflict",
                "agent_not_running",
                f"{type(command).__name__} needs a running agent; agent {aid} is {state.lifecycle}",
            )


def evolve(state: AgentState | None, event: AgentEvent) -> AgentState | None:
    """Apply ``event`` to ``state``; never raises, never checks rules."""
    match event:
        case AgentRegistered():
            return AgentState(
                agent_id=event.agent_id,
                name=event.name,
                capabilities=event.capabilities,
                max_concurrent_tasks=event.max_concurrent_tasks,
                cost_per_task=event.cost_per_task,
                lifecycle="registered",
            )
    if state is None:
        return None
    match event:
        case AgentStarted() | AgentRestarted():
            return state.model_copy(update={"lifecycle": "running"})
        case HeartbeatRecorded():
            update: dict[str, Any] = {"lifecycle": "running"} if event.resumed else {}
            last = state.last_heartbeat_at
            if event.sent_at is not None and (last is None or event.sent_at > last):
                update["last_heartbeat_at"] = event.sent_at
            return state.model_copy(update=update) if update else state
        case AgentStopped():
            return state.model_copy(update={"lifecycle": "stopped"})
        case AgentMarkedOffline():
            return state.model_copy(update={"lifecycle": "offline"})
        case CapabilitiesUpdated():
            return state.model_copy(update={"capabilities": event.capabilities})
        case AgentDeregistered():
            return state.model_copy(update={"lifecycle": "deregistered"})
    return state


AGENT_DECIDER: Decider[AgentCommand, AgentState, AgentEvent] = Decider(
    aggregate_type=AGENT,
    command_types=(
        RegisterAgent,
        StartAgent,
        StopAgent,
        RestartAgent,
        RecordHeartbeat,
        MarkAgentOffline,
        UpdateCapabilities,
        DeregisterAgent,
    ),
    event_types=(
        AgentRegistered,
        AgentStarted,
        AgentStopped,
        AgentRestarted,
        HeartbeatRecorded,
        AgentMarkedOffline,
        CapabilitiesUpdated,
        AgentDeregistered,
    ),
    decide=decide,
    evolve=evolve,
)
