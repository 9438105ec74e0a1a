"""Unit tests of sdk/models.py: request bodies, token amounts, keys, assignment parsing."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from sdk.models import (
    ASSIGNED_TYPE,
    Assignment,
    CommandResult,
    assignment_from_task,
    capabilities_body,
    derived_key,
    format_tokens,
    micro_to_tokens,
    parse_assignment,
    tokens_to_micro,
)


def cloud_event(task_id: str = "t1", agent_id: str = "a1", attempt: int = 1) -> str:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": "e1",
            "source": "swarmlog",
            "type": ASSIGNED_TYPE,
            "subject": task_id,
            "time": "2025-01-01T00:00:00Z",
            "datacontenttype": "application/json",
            "data": {"task_id": task_id, "agent_id": agent_id, "attempt": attempt},
        }
    )


def test_an_assignment_message_gives_task_agent_attempt_and_position() -> None:
    assert parse_assignment(ASSIGNED_TYPE, cloud_event("t9", "a2", 3), "v1:4.0.7") == Assignment(
        task_id="t9", agent_id="a2", attempt=3, position="v1:4.0.7"
    )


def test_the_task_id_falls_back_to_the_subject() -> None:
    event = json.loads(cloud_event())
    del event["data"]["task_id"]
    event["subject"] = "from-subject"
    assignment = parse_assignment(ASSIGNED_TYPE, json.dumps(event), "p")
    assert assignment is not None and assignment.task_id == "from-subject"


def test_other_messages_are_skipped() -> None:
    other = json.loads(cloud_event())
    other["type"] = "io.swarmlog.task.started"
    assert parse_assignment("io.swarmlog.task.started", json.dumps(other), "p") is None
    assert parse_assignment("message", json.dumps(other), "p") is None
    assert parse_assignment(ASSIGNED_TYPE, "", "p") is None  # an empty keep-alive


def test_a_malformed_assignment_is_a_value_error_naming_its_position() -> None:
    with pytest.raises(ValueError, match="p7"):
        parse_assignment(ASSIGNED_TYPE, "{not json", "p7")
    with pytest.raises(ValueError, match="agent_id"):
        parse_assignment(
            ASSIGNED_TYPE, json.dumps({"type": ASSIGNED_TYPE, "data": {"task_id": "t1"}}), "p8"
        )
    with pytest.raises(ValueError, match="data"):
        parse_assignment(ASSIGNED_TYPE, json.dumps({"type": ASSIGNED_TYPE}), "p9")


def test_a_polled_task_item_is_an_assignment_carrying_the_task() -> None:
    item = {
        "task_id": "t1",
        "type": "analyse",
        "payload": {"module": "json"},
        "status": "assigned",
        "agent_id": "a1",
        "attempts": 2,
        "version": 4,
    }
    assignment = assignment_from_task(item)
    assert assignment == Assignment("t1", "a1", 2)
    assert assignment is not None and assignment.task == item
    assert assignment_from_task({"status": "assigned"}) is None


def test_capabilities_map_to_the_api_list() -> None:
    assert capabilities_body({"python": 0.9, "sql": 1}) == [
        {"name": "python", "level": 0.9},
        {"name": "sql", "level": 1.0},
    ]
    assert capabilities_body([{"name": "go", "level": 0.5}]) == [{"name": "go", "level": 0.5}]
    with pytest.raises(ValueError, match="python"):
        capabilities_body({"python": 1.5})
    with pytest.raises(ValueError, match="python"):
        capabilities_body({"python": True})


def test_token_amounts_are_exact_decimal_strings() -> None:
    assert format_tokens("0.5") == "0.5"
    assert format_tokens("0.500000") == "0.5"
    assert format_tokens(Decimal("12")) == "12"
    assert format_tokens(3) == "3"
    assert format_tokens("0.000001") == "0.000001"
    for bad in ("-1", "abc", "0.0000001", "NaN", "Infinity"):
        with pytest.raises(ValueError):
            format_tokens(bad)
    with pytest.raises(ValueError, match="exact"):
        format_tokens(0.1)  # type: ignore[arg-type]


def test_micro_tokens_convert_both_ways() -> None:
    assert micro_to_tokens(1_500_000) == "1.5"
    assert micro_to_tokens(0) == "0"
    assert micro_to_tokens(1) == "0.000001"
    assert tokens_to_micro("1.5") == 1_500_000
    assert tokens_to_micro("0.000001") == 1


def test_derived_keys_are_stable_per_logical_call_and_distinct_between_calls() -> None:
    start = derived_key("a1", "t1", 1, "start")
    assert start == derived_key("a1", "t1", 1, "start")
    assert start != derived_key("a1", "t1", 2, "start")
    assert start != derived_key("a1", "t1", 1, "complete")
    # parts are delimited: ("a", "b1") and ("ab", "1") differ
    assert derived_key("a", "b1") != derived_key("ab", "1")


def test_a_202_result_is_pending() -> None:
    result = CommandResult(202, {"command_id": "c1"}, "k1")
    assert result.pending and result.command_id == "c1"
    assert not CommandResult(200, {}, "k2").pending
