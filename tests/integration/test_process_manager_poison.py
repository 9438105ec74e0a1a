"""No input stops a process manager: against real Kafka, with the real command processor,
the scheduler, economy and workflow runners read malformed records written straight to
every topic they follow (and to the coordination topic), events that decode but whose
fold raises, and events from which they cannot build the command they owe. Each is
written to the dead-letter topic with its reason, once, and every runner is still
running and still does its job afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from domain import account as ac
from domain import agent as ag
from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.ids import derived_id
from domain.messages import Event
from domain.recorded import RecordedEvent
from infra.clock import ManualClock
from infra.kafka import Kafka
from infra.mapper import encode_event
from infra.stack import StackInfo
from infra.topics import Topics
from streams.economy_runner import EconomyRunner
from streams.scheduler import Policy
from streams.scheduler_runner import SchedulerRunner
from streams.workflow import start_id
from streams.workflow_runner import WorkflowRunner
from tests.integration.helpers import (
    Running,
    envelope,
    now,
    processor_with_client,
    read_records,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT = 30.0
EXPLODE = "explode"  # a submitted task of this type makes the runners' fold raise


class _Fragile:
    """A runner whose fold raises on a TaskSubmitted of type ``EXPLODE`` (a stand-in for
    a fold bug a foreign event trips; the economy also has a real one, below)."""

    def apply(self, stored: RecordedEvent) -> None:
        e = stored.event
        if isinstance(e, tk.TaskSubmitted) and e.type == EXPLODE:
            raise ValueError("this fold cannot take it")
        super().apply(stored)  # type: ignore[misc]


class FragileScheduler(_Fragile, SchedulerRunner):
    pass


class FragileEconomy(_Fragile, EconomyRunner):
    pass


class FragileWorkflow(_Fragile, WorkflowRunner):
    pass


# Which runners fold which event topic, and a CloudEvent type on it that each of them
# wants (so the record is not skipped before it is decoded).
READERS = {
    "task": (
        {"/swarmlog/scheduler", "/swarmlog/economy", "/swarmlog/workflow"},
        b"io.swarmlog.task.submitted",
    ),
    "agent": ({"/swarmlog/scheduler", "/swarmlog/economy"}, b"io.swarmlog.agent.registered"),
    "account": ({"/swarmlog/scheduler", "/swarmlog/economy"}, b"io.swarmlog.account.tier_changed"),
    "proposal": ({"/swarmlog/economy"}, b"io.swarmlog.proposal.created"),
    "workflow": ({"/swarmlog/workflow"}, b"io.swarmlog.workflow.execution_requested"),
    "workflow_run": ({"/swarmlog/workflow"}, b"io.swarmlog.workflow_run.started"),
}
EVERY_RUNNER = {"/swarmlog/scheduler", "/swarmlog/economy", "/swarmlog/workflow"}


def _headers(ce_type: bytes, **change: bytes | None) -> list[tuple[str, bytes | None]]:
    base: dict[str, bytes | None] = {
        "ce_id": uuid.uuid4().hex.encode(),
        "ce_source": b"/elsewhere",
        "ce_type": ce_type,
        "ce_subject": b"x-1",
        "ce_time": now().isoformat().encode(),
        "content-type": b"application/json",
        "ce_sequence": b"1",
        "ce_specversion": b"1.0",
    }
    for name, value in change.items():
        if value == b"drop":
            base.pop(name, None)
        else:
            base[name] = value
    return list(base.items())


def _garbage(ce_type: bytes) -> dict[str, tuple[list[tuple[str, Any]], bytes, str]]:
    """Malformed records (headers, value) of a wanted type, and a word of the reason each
    is expected to be dead-lettered with."""
    return {
        "no headers": ([], b"\xffnot json", "ce_specversion"),
        "no time": (_headers(ce_type, ce_time=b"drop"), b"{}", "ce_time"),
        "sequence not an integer": (_headers(ce_type, ce_sequence=b"abc"), b"{}", "sequence"),
        "schema version too large": (
            _headers(ce_type, ce_schemaversion=b"99999999999999999999"),
            b"{}",
            "schemaversion",
        ),
        "header with no value": (_headers(ce_type, ce_subject=None), b"{}", "no bytes value"),
        "type not UTF-8": (_headers(b"\xff\xfe"), b"{}", "invalid CloudEvent"),
        "not JSON": (_headers(ce_type, **{"content-type": b"text/plain"}), b"{}", "not JSON"),
        "JSON not an object": (_headers(ce_type), b"[1, 2]", "not a JSON object"),
    }


def _stored(aggregate_type: str, aggregate_id: str, event: Event) -> RecordedEvent:
    return RecordedEvent(
        id=str(uuid.uuid4()),
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        version=1,
        time=now(),
        correlation_id="elsewhere",
        causation_id="elsewhere",
        event=event,
    )


async def _write(
    producer: AIOKafkaProducer, topic: str, headers: Any, value: bytes, key: bytes | None = b"x-1"
) -> tuple[str, int, int]:
    meta = await (await producer.send(topic, value=value, key=key, headers=headers))
    return (topic, meta.partition, meta.offset)


async def _dead_letters(
    bootstrap: str, topics: Topics
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(headers, data) of every dead letter."""
    return [
        ({k: v.decode() for k, v in r.headers}, orjson.loads(r.value))
        for r in await read_records(bootstrap, topics.deadletter)
    ]


async def test_poison_on_every_topic_a_process_manager_reads_is_dead_lettered_and_each_goes_on(
    services: StackInfo,
) -> None:
    bootstrap = services.kafka_bootstrap_servers
    async with processor_with_client(bootstrap) as (topics, client, log):
        clock = ManualClock(start=now())

        async def do(*commands: Any) -> None:
            envs = [envelope(c) for c in commands]
            for env, o in zip(envs, await client.execute_many(envs, WAIT), strict=True):
                assert o is not None and o.status == "accepted", f"{env.command!r}: {o}"

        t = clock.now()
        await do(
            ag.RegisterAgent(
                agent_id="a1",
                name="a1",
                at=t,
                capabilities=(ag.Capability(name="python", level=1.0),),
            ),
            ag.StartAgent(agent_id="a1", at=t),
        )
        kafka = Kafka(bootstrap)  # subclasses of the runners: built here, not by the root
        runners = [
            FragileScheduler(
                kafka, topics, policy=Policy(heartbeat_timeout_s=3600), clock=clock, tick_s=0.05
            ),
            FragileEconomy(kafka, topics, clock=clock, tick_s=0.05, resend_s=1.0),
            FragileWorkflow(kafka, topics, clock=clock, tick_s=0.05, resend_s=2.0),
        ]
        running = [Running(r, r.name) for r in runners]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for r in running:
                await wait_until(
                    lambda r=r: r.check() or r.role.caught_up.is_set(),
                    WAIT,  # type: ignore[misc]
                    what=f"the {r.task.get_name()} runner to lead",
                )

            # 1. Records that do not decode, on every topic a runner follows.
            expected: dict[tuple[str, str], str] = {}  # (record, runner) -> reason word
            for aggregate, (readers, ce_type) in READERS.items():
                for headers, value, word in _garbage(ce_type).values():
                    at = await _write(producer, topics.events(aggregate), headers, value)
                    for source in readers:
                        expected[("/".join(map(str, at)), source)] = word
            # ... and on the coordination topic, which carries none.
            for value in (b"\x00\x01", b'{"leader": "me"}'):
                at = await _write(producer, topics.coordination, [("x", b"y")], value, key=None)
                for source in EVERY_RUNNER:
                    expected[("/".join(map(str, at)), source)] = "coordination topic"

            # 2. Events that decode but whose fold raises.
            explode = _stored(
                "task",
                "t-explode",
                tk.TaskSubmitted(
                    task_id="t-explode",
                    type=EXPLODE,
                    payload={},
                    required_capabilities=(),
                    priority="normal",
                    max_cost=None,
                    lease_timeout_s=30,
                    run_timeout_s=60,
                    max_attempts=1,
                ),
            )
            at = await _write(producer, topics.events("task"), *_record(topics, explode))
            for source in EVERY_RUNNER:
                expected[("/".join(map(str, at)), source)] = "cannot fold"
            # A quality of 1e308 overflows the economy's reward arithmetic (a real fold).
            infinite = _stored(
                "task",
                "t-inf",
                tk.TaskCompleted(task_id="t-inf", agent_id="a1", result={}, quality=1e308),
            )
            at = await _write(producer, topics.events("task"), *_record(topics, infinite))
            expected[("/".join(map(str, at)), "/swarmlog/economy")] = "OverflowError"

            # 3. Events from which a runner cannot build the command it owes.
            long_id = "t" * 200  # AssignTask takes at most 128 characters
            await _write(
                producer,
                topics.events("task"),
                *_record(
                    topics,
                    _stored(
                        "task",
                        long_id,
                        tk.TaskSubmitted(
                            task_id=long_id,
                            type="job",
                            payload={},
                            required_capabilities=("python",),
                            priority="normal",
                            max_cost=None,
                            lease_timeout_s=30,
                            run_timeout_s=60,
                            max_attempts=1,
                        ),
                    ),
                ),
            )
            await _write(
                producer,
                topics.events("agent"),
                *_record(
                    topics,
                    _stored(
                        "agent",
                        "bad agent!",
                        ag.AgentRegistered(  # not an account id OpenAccount takes
                            agent_id="bad agent!",
                            name="b",
                            capabilities=(),
                            max_concurrent_tasks=1,
                            cost_per_task=0,
                        ),
                    ),
                ),
            )
            long_run = "r" * 200
            request = _stored(
                "workflow",
                "def-x",
                wf.WorkflowExecutionRequested(
                    workflow_id="def-x",
                    run_id=long_run,
                    version=1,
                    inputs={},
                    spec=wf.WorkflowSpec(steps=(wf.StepSpec(id="a", task_type="a"),)),
                ),
            )
            await _write(producer, topics.events("workflow"), *_record(topics, request))
            unbuilt = {
                (derived_id("assign", long_id, 1), "/swarmlog/scheduler", "AssignTask"),
                (derived_id("open-account", "bad agent!"), "/swarmlog/economy", "OpenAccount"),
                (start_id(request.id), "/swarmlog/workflow", "StartWorkflowRun"),
            }

            # 4. Every runner still does its job.
            t = clock.now()
            await do(
                tk.SubmitTask(task_id="after", type="job", required_capabilities=("python",), at=t)
            )
            await log.wait_for(tk.TaskAssigned, task_id="after", agent_id="a1", timeout=WAIT)
            await do(ag.RegisterAgent(agent_id="a2", name="a2", at=t))
            await log.wait_for(ac.AccountOpened, account_id="a2", timeout=WAIT)
            spec = wf.WorkflowSpec(steps=(wf.StepSpec(id="a", task_type="a"),))
            await do(
                wf.CreateWorkflow(workflow_id="def-1", name="d", spec=spec, at=t),
                wf.ExecuteWorkflow(workflow_id="def-1", run_id="run-after", at=t),
            )
            await log.wait_for(wr.WorkflowRunStarted, run_id="run-after", timeout=WAIT)

            def complete(letters: list[tuple[dict[str, Any], dict[str, Any]]]) -> bool:
                records = {(h["ce_subject"], h["ce_source"]) for h, _ in letters}
                commands = {(d.get("command_id"), h["ce_source"]) for h, d in letters}
                return set(expected) <= records and {(c, s) for c, s, _ in unbuilt} <= commands

            await wait_until(
                lambda: _complete_now(bootstrap, topics, complete),
                WAIT,
                what="every poison dead-lettered",
            )
            await asyncio.sleep(1.0)  # 20 ticks: nothing may be dead-lettered again
            letters = await _dead_letters(bootstrap, topics)
            for r in running:
                r.check()
        finally:
            await producer.stop()
            for r in running:
                if not r.task.done():
                    await r.stop()

    by_record = {
        (h["ce_subject"], h["ce_source"]): d
        for h, d in letters
        if h["ce_type"] == "io.swarmlog.deadletter"
    }
    for key, word in expected.items():
        assert word in by_record[key]["reason"], (key, by_record[key]["reason"])
    counts = Counter((h["ce_subject"], h["ce_source"]) for h, _ in letters)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert set(by_record) == set(expected), set(by_record) ^ set(expected)
    commands = {
        (d["command_id"], h["ce_source"]): d
        for h, d in letters
        if h["ce_type"] == "io.swarmlog.deadletter.command"
    }
    assert set(commands) == {(c, s) for c, s, _ in unbuilt}
    for cid, source, command_type in unbuilt:
        letter = commands[(cid, source)]
        assert letter["command_type"] == command_type
        assert letter["reason"].startswith("cannot build the command: ValidationError")
    assert derived_id("assign", long_id, 1) in runners[0].dead_commands


def _record(topics: Topics, stored: RecordedEvent) -> tuple[Any, bytes, bytes]:
    """(headers, value, key) of ``stored`` as the processor would write it."""
    record = encode_event(topics.events(stored.aggregate_type), stored)
    return record.headers, record.value, record.key


async def _complete_now(bootstrap: str, topics: Topics, complete: Any) -> bool:
    return bool(complete(await _dead_letters(bootstrap, topics)))
