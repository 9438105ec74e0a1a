"""The Agent decider, given/when/then: every transition and every rejection code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from domain.agent import (
    AGENT_DECIDER,
    AgentCommand,
    AgentDeregistered,
    AgentEvent,
    AgentMarkedOffline,
    AgentRegistered,
    AgentRestarted,
    AgentStarted,
    AgentStopped,
    CapabilitiesUpdated,
    Capability,
    DeregisterAgent,
    HeartbeatRecorded,
    MarkAgentOffline,
    RecordHeartbeat,
    RegisterAgent,
    RestartAgent,
    StartAgent,
    StopAgent,
    UpdateCapabilities,
)
from tests.unit.gwt import given

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
AID = "agent-1"
PYTHON = Capability(name="python", level=0.9)
SQL = Capability(name="sql", level=0.4)

registered = AgentRegistered(
    agent_id=AID, name="Ada", capabilities=(PYTHON,), max_concurrent_tasks=2, cost_per_task=5
)
started = AgentStarted(agent_id=AID)
stopped = AgentStopped(agent_id=AID)
offline = AgentMarkedOffline(agent_id=AID, reason="heartbeat_timeout")
deregistered = AgentDeregistered(agent_id=AID)

# Histories that leave the agent in each lifecycle.
LIFECYCLES: dict[str, tuple[AgentEvent, ...]] = {
    "registered": (registered,),
    "running": (registered, started),
    "stopped": (registered, started, stopped),
    "offline": (registered, started, offline),
    "deregistered": (registered, started, deregistered),
}
LIVE = ("registered", "running", "stopped", "offline")


def at(seconds: float = 0) -> datetime:
    """A command time ``seconds`` after T0."""
    return T0 + timedelta(seconds=seconds)


def register(**fields: Any) -> RegisterAgent:
    return RegisterAgent(
        **{
            "agent_id": AID,
            "at": at(),
            "name": "Ada",
            "capabilities": (PYTHON,),
            "max_concurrent_tasks": 2,
            "cost_per_task": 5,
            **fields,
        }
    )


def every_command_but_register() -> list[AgentCommand]:
    return [
        StartAgent(agent_id=AID, at=at()),
        StopAgent(agent_id=AID, at=at()),
        RestartAgent(agent_id=AID, at=at()),
        RecordHeartbeat(agent_id=AID, at=at()),
        MarkAgentOffline(agent_id=AID, at=at()),
        UpdateCapabilities(agent_id=AID, at=at(), capabilities=(SQL,)),
        DeregisterAgent(agent_id=AID, at=at()),
    ]


def command_id(command: AgentCommand) -> str:
    return type(command).__name__


# --- registering ---------------------------------------------------------------------


def test_registering_a_new_agent_records_its_profile() -> None:
    given(AGENT_DECIDER).when(register()).then(registered).and_state(
        agent_id=AID,
        name="Ada",
        capabilities=(PYTHON,),
        max_concurrent_tasks=2,
        cost_per_task=5,
        lifecycle="registered",
    )


def test_registering_uses_defaults_for_capacity_capabilities_and_cost() -> None:
    given(AGENT_DECIDER).when(RegisterAgent(agent_id=AID, at=at(), name="Bo")).then(
        AgentRegistered(
            agent_id=AID, name="Bo", capabilities=(), max_concurrent_tasks=1, cost_per_task=0
        )
    )


@pytest.mark.parametrize("lifecycle", LIVE)
def test_registering_an_existing_agent_is_rejected(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(register()).then_rejected(
        "agent_already_registered", kind="conflict"
    )


def test_registering_a_deregistered_agent_id_again_is_rejected_as_gone() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["deregistered"]).when(register()).then_rejected(
        "agent_deregistered", kind="gone"
    )


@pytest.mark.parametrize("command", every_command_but_register(), ids=command_id)
def test_any_command_to_an_unregistered_agent_is_rejected_as_not_found(
    command: AgentCommand,
) -> None:
    given(AGENT_DECIDER).when(command).then_rejected("agent_not_found", kind="not_found")


@pytest.mark.parametrize("command", every_command_but_register(), ids=command_id)
def test_any_command_to_a_deregistered_agent_is_rejected_as_gone(command: AgentCommand) -> None:
    given(AGENT_DECIDER, *LIFECYCLES["deregistered"]).when(command).then_rejected(
        "agent_deregistered", kind="gone"
    )


# --- starting ------------------------------------------------------------------------


@pytest.mark.parametrize("lifecycle", ["registered", "stopped", "offline"])
def test_starting_a_registered_stopped_or_offline_agent_makes_it_running(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(StartAgent(agent_id=AID, at=at())).then(
        AgentStarted(agent_id=AID)
    ).and_state(lifecycle="running")


def test_starting_a_running_agent_is_rejected() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["running"]).when(
        StartAgent(agent_id=AID, at=at())
    ).then_rejected("agent_already_running", kind="conflict")


# --- stopping ------------------------------------------------------------------------


@pytest.mark.parametrize("lifecycle", ["running", "offline"])
def test_stopping_a_running_or_offline_agent_makes_it_stopped(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(StopAgent(agent_id=AID, at=at())).then(
        AgentStopped(agent_id=AID)
    ).and_state(lifecycle="stopped")


def test_stopping_a_stopped_agent_is_rejected_as_already_stopped() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["stopped"]).when(
        StopAgent(agent_id=AID, at=at())
    ).then_rejected("agent_already_stopped", kind="conflict")


def test_stopping_an_agent_that_never_started_is_rejected_as_not_running() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["registered"]).when(
        StopAgent(agent_id=AID, at=at())
    ).then_rejected("agent_not_running", kind="conflict")


# --- restarting ----------------------------------------------------------------------


@pytest.mark.parametrize("lifecycle", ["running", "stopped", "offline"])
def test_restarting_a_running_stopped_or_offline_agent_makes_it_running(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(RestartAgent(agent_id=AID, at=at())).then(
        AgentRestarted(agent_id=AID)
    ).and_state(lifecycle="running")


def test_restarting_an_agent_that_was_never_started_is_rejected() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["registered"]).when(
        RestartAgent(agent_id=AID, at=at())
    ).then_rejected("agent_not_running", kind="conflict")


# --- heartbeats ----------------------------------------------------------------------


def test_a_heartbeat_from_a_running_agent_is_recorded() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["running"]).when(RecordHeartbeat(agent_id=AID, at=at(5))).then(
        HeartbeatRecorded(agent_id=AID, resumed=False, sent_at=at(5))
    ).and_state(lifecycle="running", last_heartbeat_at=at(5))


def test_a_heartbeat_from_an_offline_agent_resumes_it() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["offline"]).when(RecordHeartbeat(agent_id=AID, at=at(5))).then(
        HeartbeatRecorded(agent_id=AID, resumed=True, sent_at=at(5))
    ).and_state(lifecycle="running", last_heartbeat_at=at(5))


@pytest.mark.parametrize("lifecycle", ["registered", "stopped"])
def test_a_heartbeat_from_an_agent_that_is_not_running_is_rejected(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(
        RecordHeartbeat(agent_id=AID, at=at())
    ).then_rejected("agent_not_running", kind="conflict")


# --- going offline -------------------------------------------------------------------


def test_marking_a_running_agent_offline_records_the_reason() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["running"]).when(
        MarkAgentOffline(agent_id=AID, at=at(), reason="network_partition")
    ).then(AgentMarkedOffline(agent_id=AID, reason="network_partition")).and_state(
        lifecycle="offline"
    )


def test_marking_an_agent_offline_defaults_to_heartbeat_timeout() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["running"]).when(MarkAgentOffline(agent_id=AID, at=at())).then(
        AgentMarkedOffline(agent_id=AID, reason="heartbeat_timeout")
    )


def beat(sent: float) -> HeartbeatRecorded:
    """A heartbeat the agent sent ``sent`` seconds after T0."""
    return HeartbeatRecorded(agent_id=AID, sent_at=at(sent))


def test_an_agent_that_sent_a_heartbeat_within_the_timeout_is_not_marked_offline() -> None:
    rejection = (
        given(AGENT_DECIDER, *LIFECYCLES["running"], beat(10))
        .when(MarkAgentOffline(agent_id=AID, at=at(24.9), timeout_s=15))
        .then_rejected("agent_alive", kind="conflict")
    )
    assert "14.900 s" in rejection.detail


def test_an_agent_silent_for_the_whole_timeout_is_marked_offline() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["running"], beat(10)).when(
        MarkAgentOffline(agent_id=AID, at=at(25), timeout_s=15)
    ).then(AgentMarkedOffline(agent_id=AID, reason="heartbeat_timeout")).and_state(
        lifecycle="offline", last_heartbeat_at=at(10)
    )


def test_the_latest_sent_heartbeat_counts_even_when_an_older_one_is_decided_last() -> None:
    # Two heartbeats in flight: the one sent at 12 was decided before the one sent at 3.
    history = given(AGENT_DECIDER, *LIFECYCLES["running"], beat(12), beat(3))
    assert history.state.last_heartbeat_at == at(12)
    history.when(MarkAgentOffline(agent_id=AID, at=at(20), timeout_s=15)).then_rejected(
        "agent_alive", kind="conflict"
    )


def test_an_offline_command_without_a_timeout_or_heartbeats_without_a_time_go_by_lifecycle() -> (
    None
):
    given(AGENT_DECIDER, *LIFECYCLES["running"], beat(10)).when(
        MarkAgentOffline(agent_id=AID, at=at(11))
    ).then(AgentMarkedOffline(agent_id=AID, reason="heartbeat_timeout"))
    v1 = HeartbeatRecorded(agent_id=AID)  # a schema-version-1 record: no send time
    given(AGENT_DECIDER, *LIFECYCLES["running"], v1).when(
        MarkAgentOffline(agent_id=AID, at=at(11), timeout_s=15)
    ).then(AgentMarkedOffline(agent_id=AID, reason="heartbeat_timeout"))


def test_a_heartbeat_v1_record_is_upcast_with_no_send_time() -> None:
    from infra.mapper import EVENTS  # noqa: PLC0415 - the reader that applies upcasters

    data = EVENTS.upcast(HeartbeatRecorded, 1, {"agent_id": AID, "resumed": True})
    assert HeartbeatRecorded.model_validate(data) == HeartbeatRecorded(
        agent_id=AID, resumed=True, sent_at=None
    )


@pytest.mark.parametrize("lifecycle", ["registered", "stopped", "offline"])
def test_marking_an_agent_that_is_not_running_offline_is_rejected(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(
        MarkAgentOffline(agent_id=AID, at=at())
    ).then_rejected("agent_not_running", kind="conflict")


# --- capabilities and deregistration -------------------------------------------------


@pytest.mark.parametrize("lifecycle", LIVE)
def test_updating_capabilities_replaces_them_in_any_live_lifecycle(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(
        UpdateCapabilities(agent_id=AID, at=at(), capabilities=(SQL,))
    ).then(CapabilitiesUpdated(agent_id=AID, capabilities=(SQL,))).and_state(
        capabilities=(SQL,), lifecycle=lifecycle
    )


def test_updating_to_no_capabilities_is_allowed() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["running"]).when(
        UpdateCapabilities(agent_id=AID, at=at(), capabilities=())
    ).then(CapabilitiesUpdated(agent_id=AID, capabilities=())).and_state(capabilities=())


@pytest.mark.parametrize("lifecycle", LIVE)
def test_deregistering_a_live_agent_is_terminal(lifecycle: str) -> None:
    given(AGENT_DECIDER, *LIFECYCLES[lifecycle]).when(DeregisterAgent(agent_id=AID, at=at())).then(
        AgentDeregistered(agent_id=AID)
    ).and_state(lifecycle="deregistered")


def test_deregistering_twice_is_rejected_as_gone() -> None:
    given(AGENT_DECIDER, *LIFECYCLES["deregistered"]).when(
        DeregisterAgent(agent_id=AID, at=at())
    ).then_rejected("agent_deregistered", kind="gone")


def test_every_rejection_names_the_agent_in_its_detail() -> None:
    rejection = (
        given(AGENT_DECIDER)
        .when(StartAgent(agent_id=AID, at=at()))
        .then_rejected("agent_not_found")
    )
    assert AID in rejection.detail


# --- evolve --------------------------------------------------------------------------


def test_events_for_an_agent_that_does_not_exist_leave_no_state() -> None:
    assert AGENT_DECIDER.fold([started, stopped, offline, deregistered]) is None


def test_folding_the_lifecycle_histories_gives_each_lifecycle() -> None:
    for lifecycle, history in LIFECYCLES.items():
        state = AGENT_DECIDER.fold(history)
        assert state is not None and state.lifecycle == lifecycle


def test_a_heartbeat_that_did_not_resume_leaves_the_lifecycle_alone() -> None:
    state = AGENT_DECIDER.fold([*LIFECYCLES["stopped"], HeartbeatRecorded(agent_id=AID)])
    assert state is not None and state.lifecycle == "stopped"


def test_the_registry_maps_aggregate_types_to_deciders() -> None:
    from domain.registry import DECIDERS

    assert DECIDERS["agent"] is AGENT_DECIDER
    assert AGENT_DECIDER.event_type("heartbeat_recorded") is HeartbeatRecorded
    assert AGENT_DECIDER.command_type("RegisterAgent") is RegisterAgent
    assert register().aggregate_id == AID
    with pytest.raises(KeyError):
        AGENT_DECIDER.event_type("exploded")


# --- command validation --------------------------------------------------------------


def error_locations(error: ValidationError) -> list[tuple[str | int, ...]]:
    return [tuple(e["loc"]) for e in error.errors()]


@pytest.mark.parametrize("level", [-0.01, 1.01, 2])
def test_a_capability_level_outside_zero_to_one_is_invalid(level: float) -> None:
    with pytest.raises(ValidationError) as raised:
        register(capabilities=({"name": "python", "level": level},))
    assert error_locations(raised.value) == [("capabilities", 0, "level")]


@pytest.mark.parametrize("level", [0.0, 1.0])
def test_capability_levels_zero_and_one_are_valid(level: float) -> None:
    assert (
        register(capabilities=(Capability(name="x", level=level),)).capabilities[0].level == level
    )


def test_duplicate_capability_names_are_invalid_on_register() -> None:
    with pytest.raises(ValidationError) as raised:
        register(capabilities=(PYTHON, Capability(name="python", level=0.1)))
    assert error_locations(raised.value) == [("capabilities",)]
    assert "python" in str(raised.value)


def test_duplicate_capability_names_are_invalid_on_update() -> None:
    with pytest.raises(ValidationError) as raised:
        UpdateCapabilities(agent_id=AID, at=at(), capabilities=(SQL, SQL))
    assert error_locations(raised.value) == [("capabilities",)]


def test_a_negative_cost_per_task_is_invalid() -> None:
    with pytest.raises(ValidationError) as raised:
        register(cost_per_task=-1)
    assert error_locations(raised.value) == [("cost_per_task",)]


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"max_concurrent_tasks": 0}, ("max_concurrent_tasks",)),
        ({"agent_id": ""}, ("agent_id",)),
        ({"name": ""}, ("name",)),
        ({"capabilities": ({"name": "has space", "level": 0.5},)}, ("capabilities", 0, "name")),
        ({"nickname": "x"}, ("nickname",)),
    ],
)
def test_other_invalid_registrations_name_the_field(
    fields: dict[str, Any], location: tuple[str | int, ...]
) -> None:
    with pytest.raises(ValidationError) as raised:
        register(**fields)
    assert error_locations(raised.value) == [location]


def test_commands_and_events_are_frozen() -> None:
    with pytest.raises(ValidationError):
        register().name = "Eve"
    with pytest.raises(ValidationError):
        registered.name = "Eve"
