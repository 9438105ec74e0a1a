"""bench/workflow: a 1 -> N -> 1 fan-out/fan-in run through the workflow engine, against
the same tasks orchestrated by hand. Prints figures; asserts nothing.

Against the real processes (processor and streams, as child processes) on the local
stack or the services the environment names. ``--agents`` no-op agents live in this
process and speak to the command topic directly (no HTTP, so neither phase pays for the
API): they follow the task topic and answer each ``TaskAssigned`` to them with
``StartTask`` and ``CompleteTask`` at once.

1. workflow: a definition ``start`` -> ``fan`` (a map over ``inputs.items``, ``--items``
   items, ``--parallelism`` at once) -> ``join`` (its payload is every item's result) is
   executed; time = ``ExecuteWorkflow`` sent -> ``WorkflowRunCompleted`` read.
2. direct: the same shape with no engine: this process submits one task, on its
   completion the N item tasks at once, on their last completion one more; time = first
   submit sent -> last ``TaskCompleted`` read.

Overhead = workflow time - direct time, per step (3), per task (N + 2) and in % of the
direct time (the issue's target: under 20 %). Also: the hop from a step's last task
completing to the next step's first task submitted (the engine's latency per step,
from the events' times), and the records each phase wrote, per topic. A small warm-up
run of both shapes comes first, so neither phase pays for cold caches.

The streams worker runs the economy too (it pays a reward per completed task, in both
phases alike).

Run: ``eval "$(swarmlog up)"; python -m bench.workflow --items 1000 --agents 8``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from aiokafka import TopicPartition
from rich.console import Console
from rich.table import Table

from commands.client import CommandClient
from domain import agent as ag
from domain import task as tk
from domain import workflow as wf
from domain import workflow_run as wr
from domain.messages import Command
from domain.recorded import RecordedEvent
from infra import kafka, stack
from infra.cloudevents import DecodeError
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.mapper import decode_event
from infra.supervise import Children, role_env
from infra.topics import Topics, ensure_topics

app = typer.Typer(add_completion=False)
console = Console()


def _env(command: Command, command_id: str | None = None) -> CommandEnvelope:
    cid = command_id or str(uuid.uuid4())
    return CommandEnvelope(
        command_id=cid, command=command, correlation_id=cid, source="/bench/workflow"
    )


def _now() -> datetime:
    return datetime.now(UTC)


class Swarm:
    """No-op agents and an observer, on one consumer of the task and workflow_run topics.

    ``completed`` maps task id -> monotonic time its TaskCompleted was read; ``ended``
    run id -> the run's end event; ``events`` keeps every event read (for the hops).
    """

    def __init__(
        self, bootstrap: str, topics: Topics, client: CommandClient, agent_ids: list[str]
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.client = client
        self.agent_ids = set(agent_ids)
        self.completed: dict[str, float] = {}
        self.ended: dict[str, RecordedEvent] = {}
        self.events: list[RecordedEvent] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following both topics from their ends."""
        tps: list[TopicPartition] = []
        for t in ("task", "workflow_run"):
            tps += await kafka.partitions_of(self.bootstrap, self.topics.events(t))
        self._consumer = kafka.consumer(self.bootstrap)
        await self._consumer.start()
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._follow(), name="swarm")

    async def stop(self) -> None:
        """Stop following."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _follow(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            commands: list[CommandEnvelope] = []
            mono = time.monotonic()
            for records in batch.values():
                for record in records:
                    try:
                        stored = decode_event(record)
                    except DecodeError:
                        continue
                    self.events.append(stored)
                    e = stored.event
                    if isinstance(e, tk.TaskAssigned) and e.agent_id in self.agent_ids:
                        at = _now()
                        commands += [
                            _env(tk.StartTask(task_id=e.task_id, agent_id=e.agent_id, at=at)),
                            _env(
                                tk.CompleteTask(
                                    task_id=e.task_id,
                                    agent_id=e.agent_id,
                                    result={"ok": True},
                                    at=at,
                                )
                            ),
                        ]
                    elif isinstance(e, tk.TaskCompleted):
                        self.completed[e.task_id] = mono
                    elif isinstance(
                        e, (wr.WorkflowRunCompleted, wr.WorkflowRunFailed, wr.WorkflowRunCancelled)
                    ):
                        self.ended[e.run_id] = stored
            if commands:
                await self.client.send_many(commands)

    async def until(self, done: Any, timeout_s: float, what: str) -> float:
        """Wait until ``done()``; the monotonic time it was first seen true."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            await asyncio.sleep(0.01)
        return time.monotonic()


def _spec(parallelism: int, items: int) -> wf.WorkflowSpec:
    return wf.WorkflowSpec(
        steps=(
            wf.StepSpec(id="start", task_type="noop"),
            wf.StepSpec(
                id="fan",
                task_type="noop",
                depends_on=("start",),
                map=wf.MapSpec(
                    items="inputs.items", max_parallelism=parallelism, max_items=max(items, 1)
                ),
            ),
            wf.StepSpec(
                id="join",
                task_type="noop",
                depends_on=("fan",),
                payload_from={"results": "steps.fan.result"},
            ),
        )
    )


async def _workflow_phase(
    swarm: Swarm, run_id: str, items: int, parallelism: int, timeout_s: float
) -> float:
    """One run through the engine; seconds from the request sent to its end read."""
    wid = f"def-{run_id}"
    client = swarm.client
    [created] = await client.execute_many(
        [
            _env(
                wf.CreateWorkflow(
                    workflow_id=wid, name=wid, spec=_spec(parallelism, items), at=_now()
                )
            )
        ],
        30.0,
    )
    if created is None or created.status != "accepted":
        raise RuntimeError(f"could not create the workflow: {created}")
    t0 = time.monotonic()
    await client.send_many(
        [
            _env(
                wf.ExecuteWorkflow(
                    workflow_id=wid, run_id=run_id, inputs={"items": list(range(items))}, at=_now()
                )
            )
        ]
    )
    t1 = await swarm.until(lambda: run_id in swarm.ended, timeout_s, f"run {run_id}")
    end = swarm.ended[run_id].event
    if isinstance(end, wr.WorkflowRunCompleted):
        return t1 - t0
    raise RuntimeError(f"run {run_id} did not complete: {end!r}")


async def _direct_phase(swarm: Swarm, prefix: str, items: int, timeout_s: float) -> float:
    """The same 1 -> N -> 1 tasks submitted by hand; seconds from the first submit to the
    last completion read."""
    client = swarm.client

    def submit(task_ids: Iterable[str]) -> list[CommandEnvelope]:
        at = _now()
        return [
            _env(tk.SubmitTask(task_id=t, type="noop", max_attempts=1, at=at)) for t in task_ids
        ]

    first, last = f"{prefix}-start", f"{prefix}-join"
    fan = [f"{prefix}-fan-{i}" for i in range(items)]
    t0 = time.monotonic()
    await client.send_many(submit([first]))
    await swarm.until(lambda: first in swarm.completed, timeout_s, "the first task")
    target = len(swarm.completed) + items  # nothing else completes meanwhile
    await client.send_many(submit(fan))
    await swarm.until(lambda: len(swarm.completed) >= target, timeout_s, "the fan")
    await client.send_many(submit([last]))
    t1 = await swarm.until(lambda: last in swarm.completed, timeout_s, "the last task")
    return t1 - t0


def _hops(events: list[RecordedEvent], run_id: str) -> list[float]:
    """Seconds from each step's last task completing to the next step's first task
    submitted (event times: the agents' and the engine's clocks, one machine)."""
    steps: dict[str, str] = {}  # task id -> step id
    for s in events:
        if isinstance(s.event, wr.StepTasksScheduled) and s.event.run_id == run_id:
            for u in s.event.tasks:
                steps[u.task_id] = s.event.step_id
    done: dict[str, datetime] = {}
    first: dict[str, datetime] = {}
    for s in events:
        step = steps.get(s.aggregate_id)
        if step is None:
            continue
        if isinstance(s.event, tk.TaskCompleted):
            done[step] = max(done.get(step, s.time), s.time)
        elif isinstance(s.event, tk.TaskSubmitted):
            first[step] = min(first.get(step, s.time), s.time)
    order = ["start", "fan", "join"]
    return [
        (first[b] - done[a]).total_seconds()
        for a, b in itertools.pairwise(order)
        if a in done and b in first
    ]


async def _offsets(bootstrap: str, topics: list[str]) -> dict[TopicPartition, int]:
    tps: list[TopicPartition] = []
    for t in topics:
        tps += await kafka.partitions_of(bootstrap, t)
    c = kafka.consumer(bootstrap)
    await c.start()
    try:
        return dict(await c.end_offsets(tps))
    finally:
        await c.stop()


async def _records_between(
    bootstrap: str, start: dict[TopicPartition, int]
) -> dict[str, tuple[int, int]]:
    """Committed records and their value bytes, per topic, from ``start`` to the current
    ends (transaction markers take offsets too, but are not records and are not counted)."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()

    def count(record: Any) -> None:
        counts[record.topic] += 1
        sizes[record.topic] += len(record.value or b"")

    await kafka.read_to_end(bootstrap, list(start), count, start=start)
    return {t: (counts[t], sizes[t]) for t in counts}


def _cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far, from /proc (Linux), and
    this process's own as ``agents``; a process whose figure cannot be read is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"agents": time.process_time()}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


async def _settled(bootstrap: str, topics: list[str], quiet_s: float = 2.0) -> None:
    """Wait until no topic has grown for ``quiet_s`` seconds (rewards, resends settle)."""
    before = await _offsets(bootstrap, topics)
    while True:
        await asyncio.sleep(quiet_s)
        after = await _offsets(bootstrap, topics)
        if after == before:
            return
        before = after


async def bench(
    items: int,
    agents: int,
    slots: int,
    parallelism: int,
    state_dir: Path,
    rounds: int = 3,
    timeout_s: float = 600.0,
    split: bool = False,
) -> dict[str, Any]:
    """Run the warm-up and ``rounds`` rounds of both phases; return the figures (seconds
    per round, and CPU seconds and records of the last round). ``split`` runs the
    workflow engine in a process of its own (``swarmlog streams --only workflow``)."""
    info = stack.up(state_dir, console=Console(stderr=True))
    run = f"wfb{uuid.uuid4().hex[:8]}"
    # heartbeat_timeout_s: the no-op agents send no heartbeats
    env = role_env(info, run, scheduler_tick_s=0.02, heartbeat_timeout_s=3600)
    bootstrap = info.kafka_bootstrap_servers
    topics = Topics(prefix=run)
    await ensure_topics(bootstrap, topics)
    watched = [topics.commands, topics.outcomes, *topics.event_topics.values()]
    log_dir = state_dir / "bench" / run
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir=log_dir)
    client = CommandClient(Kafka(bootstrap), topics)
    figures: dict[str, Any] = {
        "run": run,
        "items": items,
        "agents": agents,
        "slots": slots,
        "parallelism": parallelism,
    }
    swarm: Swarm | None = None
    try:
        children.start_role("processor", env)
        if split:
            children.start_role("streams", env, "--only", "scheduler", "--only", "economy")
            children.start_role("streams", env, "--only", "workflow", name="workflow")
        else:
            children.start_role("streams", env)
        await client.start()
        agent_ids = [f"{run}-agent-{i}" for i in range(agents)]
        swarm = Swarm(bootstrap, topics, client, agent_ids)
        await swarm.start()
        at = _now()
        outcomes = await client.execute_many(
            [
                _env(c)
                for a in agent_ids
                for c in (
                    ag.RegisterAgent(agent_id=a, name=a, max_concurrent_tasks=slots, at=at),
                    ag.StartAgent(agent_id=a, at=at),
                )
            ],
            60.0,
        )
        if any(o is None or o.status != "accepted" for o in outcomes):
            raise RuntimeError(f"could not register the agents: {outcomes}")
        await asyncio.sleep(3.0)  # the streams worker's runners lead and rebuild their views
        console.print("warm-up: 1 -> 20 -> 1, through the engine and by hand")
        await _workflow_phase(swarm, f"{run}-warm", 20, parallelism, timeout_s)
        await _direct_phase(swarm, f"{run}-warm", 20, timeout_s)
        await _settled(bootstrap, watched)

        pids = {name: p.pid for name, p in children.procs.items()}

        figures["direct_s"], figures["workflow_s"], figures["hops_s"] = [], [], []
        for r in range(rounds):  # alternate, so drift on a shared machine hits both alike
            console.print(f"round {r + 1}: 1 -> {items} -> 1 tasks by hand")
            start, cpu = await _offsets(bootstrap, watched), _cpu_s(pids)
            figures["direct_s"].append(
                await _direct_phase(swarm, f"{run}-direct-{r}", items, timeout_s)
            )
            await _settled(bootstrap, watched)
            figures["direct_cpu"] = _cpu_between(cpu, _cpu_s(pids))
            figures["direct_records"] = await _records_between(bootstrap, start)

            console.print(f"round {r + 1}: 1 -> {items} -> 1 through the engine")
            start, cpu = await _offsets(bootstrap, watched), _cpu_s(pids)
            run_id = f"{run}-run-{r}"
            figures["workflow_s"].append(
                await _workflow_phase(swarm, run_id, items, parallelism, timeout_s)
            )
            await _settled(bootstrap, watched)
            figures["workflow_cpu"] = _cpu_between(cpu, _cpu_s(pids))
            figures["workflow_records"] = await _records_between(bootstrap, start)
            figures["hops_s"].append(_hops(swarm.events, run_id))
    finally:
        if swarm is not None:
            await swarm.stop()
        await client.stop()
        children.stop_all()
    return figures


@app.command()
def main(
    items: Annotated[int, typer.Option(min=1, help="Items of the fan-out step.")] = 1000,
    agents: Annotated[int, typer.Option(min=1, help="No-op agents.")] = 8,
    slots: Annotated[int, typer.Option(min=1, help="Tasks each agent runs at once.")] = 32,
    parallelism: Annotated[int, typer.Option(min=1, help="The map's max_parallelism.")] = 1000,
    state_dir: Annotated[Path, typer.Option(help="Local stack state directory.")] = Path(
        ".swarmlog"
    ),
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of both phases (medians).")] = 3,
    split: Annotated[
        bool,
        typer.Option(
            help="Run the workflow engine in its own process, apart from the scheduler and"
            " the economy."
        ),
    ] = False,
) -> None:
    """Run the workflow benchmark and print its figures."""
    f = asyncio.run(bench(items, agents, slots, parallelism, state_dir, rounds, split=split))
    wf_s, direct_s = statistics.median(f["workflow_s"]), statistics.median(f["direct_s"])
    over = wf_s - direct_s
    tasks = items + 2
    console.rule("bench/workflow")
    console.print(
        f"1 -> {items} -> 1 with {agents} no-op agents x {slots} slots, map"
        f" parallelism {parallelism}; medians of {rounds} alternating rounds"
    )
    console.print(
        f"through the workflow engine: {wf_s:.2f} s"
        f" ({', '.join(f'{x:.2f}' for x in f['workflow_s'])});"
        f" the same tasks by hand: {direct_s:.2f} s"
        f" ({', '.join(f'{x:.2f}' for x in f['direct_s'])})"
    )
    console.print(
        f"engine overhead: {over:+.2f} s = {over / 3 * 1000:+.0f} ms per step,"
        f" {over / tasks * 1000:+.2f} ms per task, {over / direct_s * 100:+.1f} % of"
        f" the direct time (target < 20 %)"
    )
    hops = "; ".join(", ".join(f"{h * 1000:.0f}" for h in r) for r in f["hops_s"])
    console.print(
        f"step to step, ms (last task of a step completed -> first of the next"
        f" submitted; start->fan, fan->join per round): {hops}"
    )
    cpu = ", ".join(
        f"{name} {f['direct_cpu'][name]:.1f} -> {f['workflow_cpu'].get(name, 0.0):.1f}"
        for name in f["direct_cpu"]
    )
    console.print(
        f"CPU seconds per process in the last round, direct -> workflow (until the"
        f" log is quiet): {cpu}"
    )
    table = Table(title="records written in the last round (and their bytes), per topic")
    table.add_column("topic")
    table.add_column("direct", justify="right")
    table.add_column("workflow", justify="right")
    d, w = f["direct_records"], f["workflow_records"]

    def cell(n_bytes: tuple[int, int]) -> str:
        return f"{n_bytes[0]:,} ({n_bytes[1] / 1e6:.1f} MB)"

    for topic in sorted(set(d) | set(w)):
        table.add_row(
            topic.removeprefix(f["run"] + "."),
            cell(d.get(topic, (0, 0))),
            cell(w.get(topic, (0, 0))),
        )
    total = [tuple(map(sum, zip(*x.values(), strict=True))) for x in (d, w)]
    table.add_row("total", cell(total[0]), cell(total[1]))  # type: ignore[arg-type]  # sums of int pairs
    console.print(table)


if __name__ == "__main__":
    app()
