"""bench/chaos: random faults under load, then checks that nothing accepted was lost,
stuck or doubled. The CI test (tests/e2e/test_chaos.py) runs a short version of the
same harness (``run_chaos``) and asserts each check; ``python -m bench.chaos`` runs a
longer one and prints its figures.

What a run does, on a **private** local stack (``infra.stack.up`` in ``--state-dir``;
the services named by ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and ``REDIS_URL``
are ignored, since the run stops PostgreSQL and Redis):

1. starts the four roles (processor, streams, projector, API) and ``--agents`` agents
   (``bench.chaos_agent``, SDK workers) as child processes (infra/supervise.py), each
   agent funded and staked so that completions pay rewards through the economy;
2. drives ``--tasks`` tasks through ``POST /tasks`` spread over the fault window, as a
   real client does: each with its own ``Idempotency-Key``, resent with the same key on
   a connection error, a timeout, a 5xx, a 429 or a 202 until it is answered 201;
3. the faults, for ``--duration`` seconds in all: every ``--kill-interval`` seconds
   (seeded jitter, x0.5 to x1.5) a random target (processor, streams, projector, API or
   one agent) is killed with SIGKILL and started again after ``--restart-delay``
   seconds, for the whole window; in its last part PostgreSQL and then Redis are stopped
   for ``--outage`` seconds each (``infra.stack.stop_service``) and started again
   (``infra.stack.up``), the kills going on meanwhile; a quarter into each outage every
   role is also killed and started again, so each is seen to start while the service
   is down (``--no-restart-roles-in-outages`` leaves that out). A role that exits by
   itself is recorded and started again, as a supervisor would;
4. waits up to ``--settle-timeout`` seconds after the faults stop for every task to be
   completed in the read model, stops the agents and lets the projector catch up;
5. checks, from the log read with read_committed and from the read models: every
   accepted task submitted exactly once (and every submission answered 201), every task
   completed exactly once, within the bound after the faults stopped, every aggregate's
   versions 1..n with no event id twice, the agents', tasks' and archive's rows equal to
   the log folded up to the projector's stored offsets (read in the same snapshot),
   Redis's agent views equal to the rows, the ledger audit (projections/audit.py), and
   no role exiting by itself.

Why the harness lives here and the test imports it: the bench and the test run the
same faults and the same checks, and bench/ may use public names only, so the harness
is a public module in bench/ (as bench.soak is for its unit test) rather than in
tests/ (which bench must not import).

Run: ``python -m bench.chaos --help``; e.g. ``python -m bench.chaos --duration 180
--tasks 1000 --agents 4 --seed 7``. On this 2-core machine the whole system completes
about 15 chaos tasks/s between faults, so the defaults (1,000 tasks over 180 s) leave
room for the backlog the faults build up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import httpx
import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.table import Table

from bench.chaos_agent import CAPABILITY
from domain import task as tk
from domain.recorded import RecordedEvent
from infra import stack
from infra.bootstrap import open_operator
from infra.cloudevents import DecodeError
from infra.kafka import Kafka
from infra.mapper import decode_event
from infra.settings import Settings
from infra.stack import StackInfo
from infra.supervise import Children, free_port, role_env, wait_ready
from infra.topics import Topics
from projections import views
from projections.audit import Check, audit_ledger
from projections.keys import RedisKeys

app = typer.Typer(add_completion=False)

ROLES = ("processor", "streams", "projector", "api")
"""The swarmlog roles the chaos kills (besides agents)."""

TARGETS = (*ROLES, "agent")
"""What a kill picks from, uniformly; ``agent`` is then one agent, uniformly."""

SERVICES = ("postgres", "redis")
"""The services stopped and started once each, in this order, after the kills."""


GRANT_TOKENS = 1_050
STAKE_TOKENS = 1_000


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run's size and faults. Times in seconds.

    ``duration_s`` is the whole fault window: kills throughout, and after ``duration_s``
    minus the outages (each ``outage_s`` plus about 5 s for the restart) the outages, one
    after the other; tasks are submitted evenly over it. ``settle_timeout_s`` bounds the
    time from the faults' end until every task is completed in the read model. ``seed``
    fixes the kill schedule and targets. ``restart_roles_in_outages`` kills and starts
    every role a quarter into each outage (besides the random kills), so each role is
    seen to start while each service is down.
    """

    tasks: int = 300
    agents: int = 3
    duration_s: float = 60.0
    kill_interval_s: float = 4.0
    restart_delay_s: float = 0.5
    outage_s: float = 6.0
    settle_timeout_s: float = 60.0
    seed: int = 0
    agent_slots: int = 4
    work_ms: int = 200
    concurrency: int = 8
    heartbeat_timeout_s: float = 5.0
    max_attempts: int = 20
    restart_roles_in_outages: bool = True


@dataclass
class ChaosReport:
    """What a run did and found.

    ``kills`` counts SIGKILLs by target kind; ``kill_log`` is (seconds since the faults
    began, child name) per kill; ``exits`` names each child that exited by itself (and
    its log's last line); ``outages`` is (service, seconds since the faults began, seconds
    down, seconds its start took);
    ``submit_answers`` counts the answers to ``POST /tasks`` (HTTP status, or the
    exception's class name); ``settle_s`` is from the faults' end to the last task's
    completion on the log (0 if all completed before), ``read_model_settle_s`` to when
    the read model showed every task completed (None if not within the bound);
    ``open_at_faults_end`` and ``open_at_bound`` count the tasks not completed in the
    read model, by status, when the faults stopped and (if they did not all complete in
    time) when the bound passed: a backlog (queued) or stuck work (assigned, running).
    """

    config: ChaosConfig
    run: str
    log_dir: Path
    kills: Counter[str] = field(default_factory=Counter)
    kill_log: list[tuple[float, str]] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    outages: list[tuple[str, float, float, float]] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    submit_answers: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    faults_s: float = 0.0
    settle_s: float | None = None
    read_model_settle_s: float | None = None
    open_at_faults_end: Counter[str] = field(default_factory=Counter)
    open_at_bound: Counter[str] = field(default_factory=Counter)
    events: list[RecordedEvent] = field(default_factory=list, repr=False)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)


def start_private_stack(state_dir: Path, console: Console | None = None) -> StackInfo:
    """``infra.stack.up(state_dir)`` with the environment's service URLs ignored: the
    chaos stops services, so it must run on a stack of its own. Raises StackError."""
    return stack.up(state_dir, console=console or Console(stderr=True), own=True)


class _Chaos:
    """The children of one run and the faults done to them."""

    def __init__(
        self, config: ChaosConfig, info: StackInfo, state_dir: Path, report: ChaosReport
    ) -> None:
        self.config = config
        self.info = info
        self.state_dir = state_dir
        self.report = report
        self.rng = random.Random(config.seed)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = role_env(
            info,
            report.run,
            api_port=self.port,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            scheduler_tick_s=0.05,
        )
        self.env["PYTHONUNBUFFERED"] = "1"
        self.children = Children(log_dir=report.log_dir)
        self.current: dict[str, str] = {}  # target -> its current child's name
        self.incarnation: Counter[str] = Counter()
        self.agent_ids = [f"{report.run}-agent-{i}" for i in range(config.agents)]
        self.stopping = False
        self.locks: dict[str, asyncio.Lock] = {}

    def start(self, target: str) -> None:
        """Start ``target`` (a role, or ``agent-<i>``) as a new child ``<target>.<n>``."""
        self.incarnation[target] += 1
        name = f"{target}.{self.incarnation[target]}"
        if target.startswith("agent-"):
            agent_id = self.agent_ids[int(target.removeprefix("agent-"))]
            argv = [
                sys.executable,
                "-m",
                "bench.chaos_agent",
                "--api",
                self.base_url,
                "--agent-id",
                agent_id,
                "--max-concurrent",
                str(self.config.agent_slots),
                "--work-ms",
                str(self.config.work_ms),
            ]
            self.children.start(name, argv, self.env)
        else:
            self.children.start_role(target, self.env, name=name)
        self.current[target] = name

    def kill(self, target: str) -> str:
        """SIGKILL ``target``'s current child (by pid); return its name."""
        name = self.current.pop(target)
        if self.children.procs[name].poll() is None:
            self.children.kill(name)
        else:
            self.children.procs.pop(name)
        return name

    async def watch(self) -> None:
        """Every 0.5 s: a child that exited by itself is recorded and started again."""
        while not self.stopping:
            for target, name in list(self.current.items()):
                proc = self.children.procs.get(name)
                if proc is not None and proc.poll() is not None and not self.stopping:
                    lines = self.children.log_tail(name, 2000).strip().splitlines()
                    self.report.exits.append(
                        f"{name} exited with {proc.returncode}: {lines[-1] if lines else ''}"
                    )
                    self.children.procs.pop(name)
                    self.start(target)
            await asyncio.sleep(0.5)

    async def kills(self, t0: float, done: asyncio.Event) -> None:
        """Kill a random target every ``kill_interval_s`` (x0.5..1.5) until ``done``."""
        while True:
            wait = self.config.kill_interval_s * self.rng.uniform(0.5, 1.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), wait)
            if done.is_set():
                return
            kind = self.rng.choice(TARGETS)
            target = f"agent-{self.rng.randrange(self.config.agents)}" if kind == "agent" else kind
            await self.restart(target, kind, t0)

    async def restart(self, target: str, kind: str, t0: float) -> None:
        """SIGKILL ``target`` (counted as a kill of ``kind``), start it again after
        ``restart_delay_s``; one restart of a target at a time."""
        async with self.locks.setdefault(target, asyncio.Lock()):
            name = self.kill(target)
            self.report.kills[kind] += 1
            self.report.kill_log.append((time.monotonic() - t0, name))
            await asyncio.sleep(self.config.restart_delay_s)
            self.start(target)

    async def outages(self, t0: float, after_s: float, done: asyncio.Event) -> None:
        """After ``after_s`` seconds, stop each of ``SERVICES`` in turn for ``outage_s``
        seconds and start it again; then set ``done``. With ``restart_roles_in_outages``,
        every role is also killed and started again a quarter into each outage."""
        try:
            await asyncio.sleep(after_s)
            for service in SERVICES:
                t = time.monotonic()
                await asyncio.to_thread(stack.stop_service, self.state_dir, service)
                down = time.monotonic()
                if self.config.restart_roles_in_outages:
                    await asyncio.sleep(self.config.outage_s / 4)
                    await asyncio.gather(*(self.restart(role, role, t0) for role in ROLES))
                await asyncio.sleep(max(0.0, down + self.config.outage_s - time.monotonic()))
                await asyncio.to_thread(start_private_stack, self.state_dir, Console(stderr=True))
                back = time.monotonic()
                self.report.outages.append(
                    (service, t - t0, back - t, back - down - self.config.outage_s)
                )
        finally:
            done.set()


async def post_until_answered(
    http: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    key: str,
    answers: Counter[str] | None = None,
    max_delay_s: float = 2.0,
) -> httpx.Response:
    """``POST path`` with ``Idempotency-Key: key`` as a real client does: resent with the
    same key on a connection error or timeout, a 5xx, a 429 or a 202 (capped exponential
    backoff with jitter, 0.2 s doubling to ``max_delay_s``) until any other answer, which
    is returned. Each answer's status (or exception class name) is counted in
    ``answers``."""
    headers = {"Idempotency-Key": key}
    delay = 0.2
    while True:
        try:
            answer = await http.post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            if answers is not None:
                answers[type(exc).__name__] += 1
        else:
            if answers is not None:
                answers[str(answer.status_code)] += 1
            if answer.status_code not in (202, 429) and answer.status_code < 500:
                return answer
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(max_delay_s, delay * 2)


async def _submit(
    http: httpx.AsyncClient, run: str, i: int, cfg: ChaosConfig, r: ChaosReport
) -> None:
    """Submit task ``i`` (``post_until_answered``): accepted on a 201, else refused."""
    task_id = f"{run}-t{i}"
    body = {
        "task_id": task_id,
        "type": "chaos",
        "required_capabilities": [CAPABILITY],
        "max_attempts": cfg.max_attempts,
        "payload": {"i": i},
    }
    answer = await post_until_answered(http, "/tasks", body, f"{run}-submit-{i}", r.submit_answers)
    if answer.status_code in (200, 201):
        r.accepted.add(task_id)
    else:
        r.refused[task_id] = f"{answer.status_code} {answer.text[:300]}"


async def _drive(base_url: str, cfg: ChaosConfig, r: ChaosReport) -> None:
    """Submit ``cfg.tasks`` tasks evenly over the fault window, ``concurrency`` at once."""
    interval = cfg.duration_s / cfg.tasks
    start = time.monotonic()
    gate = asyncio.Semaphore(cfg.concurrency)
    timeout = httpx.Timeout(10.0, connect=2.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:

        async def one(i: int) -> None:
            async with gate:
                await _submit(http, r.run, i, cfg, r)

        pending = []
        for i in range(cfg.tasks):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
            pending.append(asyncio.create_task(one(i)))
        await asyncio.gather(*pending)


async def _fund(base_url: str, agent_ids: list[str]) -> None:
    """Grant each agent ``GRANT_TOKENS`` from the treasury and stake ``STAKE_TOKENS``."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
        for a in agent_ids:
            g = await post_until_answered(
                http,
                f"/accounts/{a}/grant",
                {"amount": str(GRANT_TOKENS), "reason": "chaos"},
                f"{a}-grant",
            )
            if g.status_code != 200:
                raise RuntimeError(f"grant to {a}: {g.status_code} {g.text}")
        for a in agent_ids:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                acc = await http.get(f"/accounts/{a}")
                if acc.status_code == 200 and acc.json()["balance"] != "0.000000":
                    break
                await asyncio.sleep(0.2)
            s = await post_until_answered(
                http, f"/accounts/{a}/stake", {"amount": str(STAKE_TOKENS)}, f"{a}-stake"
            )
            if s.status_code != 200:
                raise RuntimeError(f"stake of {a}: {s.status_code} {s.text}")


async def _statuses(conn: asyncpg.Connection, schema: str, tasks: int) -> Counter[str]:
    """The read model's tasks that are not completed, by status (``unprojected``: driven
    but not in the read model yet)."""
    rows = await conn.fetch(
        f"SELECT status, count(*) AS n FROM {schema}.tasks WHERE status <> 'completed'"
        " GROUP BY status"
    )
    out = Counter({r["status"]: int(r["n"]) for r in rows})
    total = int(await conn.fetchval(f"SELECT count(*) FROM {schema}.tasks"))
    if tasks > total:
        out["unprojected"] = tasks - total
    return out


async def _completed_count(conn: asyncpg.Connection, schema: str) -> int:
    return int(
        await conn.fetchval(f"SELECT count(*) FROM {schema}.tasks WHERE status = 'completed'")
    )


async def _read_log(kafka: Kafka, topics: Topics) -> tuple[list[Any], list[RecordedEvent], int]:
    """Every committed record of every event topic, the events among them (each with its
    position), and how many records did not decode."""
    records: list[Any] = []
    for topic in topics.event_topics.values():
        await kafka.read_to_end(await kafka.partitions_of(topic), records.append)
    events: list[RecordedEvent] = []
    bad = 0
    for record in records:
        try:
            events.append(decode_event(record))
        except DecodeError:
            bad += 1
    return records, events, bad


def check_submissions(events: list[RecordedEvent], r: ChaosReport) -> Check:
    """Every accepted task submitted exactly once; nothing submitted that was not
    accepted; every submission answered 201 in the end."""
    submitted = Counter(e.aggregate_id for e in events if isinstance(e.event, tk.TaskSubmitted))
    twice = sorted(t for t, n in submitted.items() if n > 1)
    missing = sorted(r.accepted - submitted.keys())
    unasked = sorted(submitted.keys() - r.accepted)
    problems = []
    if twice:
        problems.append(f"{len(twice)} submitted twice, e.g. {twice[:3]}")
    if missing:
        problems.append(f"{len(missing)} accepted but not on the log, e.g. {missing[:3]}")
    if unasked:
        problems.append(f"{len(unasked)} on the log but never answered 201, e.g. {unasked[:3]}")
    if r.refused:
        first = sorted(r.refused.items())[:3]
        problems.append(f"{len(r.refused)} refused: {first}")
    if len(r.accepted) != r.config.tasks:
        problems.append(f"{len(r.accepted)} of {r.config.tasks} accepted")
    return Check(
        "every accepted task submitted exactly once",
        not problems,
        "; ".join(problems) or f"{len(r.accepted)} tasks, each once",
    )


def check_completions(
    events: list[RecordedEvent], r: ChaosReport, faults_end: datetime
) -> list[Check]:
    """Every accepted task completed exactly once, the last within the bound after the
    faults ended (by the TaskCompleted events' times)."""
    last: dict[str, RecordedEvent] = {}
    completed: dict[str, list[RecordedEvent]] = defaultdict(list)
    for e in events:
        if e.aggregate_type == tk.TASK:
            last[e.aggregate_id] = e
            if isinstance(e.event, tk.TaskCompleted):
                completed[e.aggregate_id].append(e)
    twice = sorted(t for t, es in completed.items() if len(es) > 1)
    missing = sorted(r.accepted - completed.keys())
    r.completed = sum(1 for t in r.accepted if t in completed)
    detail = []
    if twice:
        detail.append(f"{len(twice)} completed twice, e.g. {twice[:3]}")
    if missing:
        detail.append(
            f"{len(missing)} not completed; last events: "
            + ", ".join(_last_event(t, last.get(t)) for t in missing[:5])
        )
    if r.open_at_bound:
        detail.append(f"open in the read model at the bound: {_counts(r.open_at_bound)}")
    times = [es[0].time for es in completed.values()]
    r.settle_s = max(0.0, (max(times) - faults_end).total_seconds()) if times else None
    bound = r.config.settle_timeout_s
    in_time = not missing and r.settle_s is not None and r.settle_s <= bound
    return [
        Check(
            "every task completed exactly once",
            not twice and not missing,
            "; ".join(detail) or f"{r.completed} tasks, each once",
        ),
        Check(
            f"every task completed within {bound:.0f} s after the faults stopped",
            in_time,
            f"last completion {r.settle_s:.1f} s after" if r.settle_s is not None else "none",
        ),
    ]


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def _last_event(task_id: str, e: RecordedEvent | None) -> str:
    if e is None:
        return f"{task_id} (no event)"
    where = f"{e.position.topic}/{e.position.partition}@{e.position.offset}" if e.position else "?"
    return f"{task_id} v{e.version} {type(e.event).__name__} at {where}"


def check_sequences(events: list[RecordedEvent]) -> Check:
    """Each aggregate's versions are 1..n in log order, and no event id is on the log twice."""
    ids = Counter(e.id for e in events)
    dupes = sorted(i for i, n in ids.items() if n > 1)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in events:
        groups[(e.aggregate_type, e.aggregate_id)].append(e.version)
    wrong = [f"{k}: {v[:12]}" for k, v in groups.items() if v != list(range(1, len(v) + 1))]
    detail = []
    if dupes:
        detail.append(f"{len(dupes)} event ids twice, e.g. {dupes[:3]}")
    if wrong:
        detail.append(f"{len(wrong)} aggregates with a gap or repeat: {wrong[:3]}")
    return Check(
        "every aggregate's sequence is 1..n, no event twice",
        not detail,
        "; ".join(detail) or f"{len(groups)} aggregates, {len(events)} events",
    )


def _rows(records: list[Any], key: str) -> dict[str, dict[str, Any]]:
    out = {}
    for rec in records:
        row = dict(rec)
        for c, v in row.items():
            if isinstance(v, str) and c in (
                "capabilities",
                "payload",
                "required_capabilities",
                "result",
            ):
                row[c] = json.loads(v)
        out[row[key]] = row
    return out


def _diff(name: str, got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(got.keys() ^ want.keys())[:3]:
        out.append(f"{name} {k}: {'only in the read model' if k in got else 'only on the log'}")
    for k in sorted(got.keys() & want.keys()):
        if got[k] != want[k]:
            cols = sorted(c for c in want[k] if got[k].get(c) != want[k][c])
            out.append(
                f"{name} {k}: "
                + ", ".join(f"{c} read model {got[k].get(c)!r}, log {want[k][c]!r}" for c in cols)
            )
    return out


async def check_read_models(
    pool: asyncpg.Pool, kafka: Kafka, topics: Topics, schema: str, redis_url: str
) -> list[Check]:
    """The agents, tasks and archive rows equal the log folded up to the offsets the
    projector stored (read in one repeatable-read snapshot with the rows, the log read
    after it, so no race with a projector still running); Redis's agent hashes equal
    the rows."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        offsets = {
            (r["topic"], r["partition"]): r["next_offset"]
            for r in await conn.fetch(
                f"SELECT topic, partition, next_offset FROM {schema}.projection_offsets"
            )
        }
        agents = _rows(await conn.fetch(f"SELECT * FROM {schema}.agents"), "agent_id")
        tasks = _rows(await conn.fetch(f"SELECT * FROM {schema}.tasks"), "task_id")
        archive = await conn.fetch(
            f'SELECT event_id, topic, partition, "offset" FROM {schema}.events'
        )
    _, events, _ = await _read_log(kafka, topics)
    projected = [
        e
        for e in events
        if e.position is not None
        and e.position.offset < offsets.get((e.position.topic, e.position.partition), 0)
    ]
    want_agents, want_tasks = views.fold_rows(projected)
    diffs = _diff("agent", agents, want_agents) + _diff("task", tasks, want_tasks)
    fold = Check(
        "read models (agents, tasks) equal the log folded to the projected offsets",
        not diffs,
        "; ".join(diffs[:5]) or f"{len(agents)} agents, {len(tasks)} tasks",
    )
    want_archive = Counter(
        (e.id, e.position.topic, e.position.partition, e.position.offset)
        for e in projected
        if e.position
    )
    got_archive = Counter((r["event_id"], r["topic"], r["partition"], r["offset"]) for r in archive)
    extra = got_archive - want_archive
    lacking = want_archive - got_archive
    archived = Check(
        "the event archive holds every projected event once",
        not extra and not lacking,
        f"{sum(extra.values())} extra, {sum(lacking.values())} missing, e.g."
        f" {list((extra or lacking).keys())[:2]}"
        if extra or lacking
        else f"{len(archive)} events",
    )
    load = Counter(t["agent_id"] for t in tasks.values() if t["status"] in ("assigned", "running"))
    keys = RedisKeys(schema)
    wrong = []
    red = aioredis.from_url(redis_url, decode_responses=True)
    try:
        for agent_id, row in sorted(agents.items()):
            h = await red.hgetall(keys.agent(agent_id))
            status = row["lifecycle"]
            if status == "running":
                status = "busy" if load[agent_id] else "idle"
            want = (row["lifecycle"], status, str(load[agent_id]))
            got = (h.get("lifecycle"), h.get("status"), h.get("load"))
            if got != want:
                wrong.append(f"{agent_id}: redis {got}, rows {want}")
    finally:
        await red.aclose()
    hot = Check(
        "Redis agent views (lifecycle, status, load) equal the rows",
        not wrong,
        "; ".join(wrong[:3]) or f"{len(agents)} agents",
    )
    return [fold, archived, hot]


async def _caught_up(
    pool: asyncpg.Pool, kafka: Kafka, topics: Topics, schema: str, timeout_s: float
) -> bool:
    """Wait until the projector's stored offsets pass the last record of every event
    topic partition (read now); False after ``timeout_s``."""
    records, _, _ = await _read_log(kafka, topics)
    last: dict[tuple[str, int], int] = {}
    for rec in records:
        last[(rec.topic, rec.partition)] = max(
            last.get((rec.topic, rec.partition), 0), rec.offset + 1
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = await pool.fetch(
            f"SELECT topic, partition, next_offset FROM {schema}.projection_offsets"
        )
        stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        if all(stored.get(tp, 0) >= n for tp, n in last.items()):
            return True
        await asyncio.sleep(0.3)
    return False


async def run_chaos(
    config: ChaosConfig,
    state_dir: Path,
    *,
    console: Console | None = None,
    keep_stack: bool = False,
    log_root: Path | None = None,
) -> ChaosReport:
    """Run the chaos (see the module docstring) on a private stack under ``state_dir``
    and return its report, checks included (a failed check is in the report, not
    raised). The stack is stopped and purged at the end unless ``keep_stack``; every
    child is stopped by its pid. Each child's output is kept in ``<log_root>/<run>/``
    (default ``log_root``: ``<state_dir>-logs``, beside the state directory, which the
    purge deletes), one file per incarnation (``api.3.log``). Raises RuntimeError
    (naming the child and its log) if the roles never get ready before the faults,
    StackError if the stack cannot start.
    """
    console = console or Console(stderr=True)
    run = f"chaos{uuid.uuid4().hex[:8]}"
    log_dir = (log_root or state_dir.with_name(state_dir.name + "-logs")) / run
    log_dir.mkdir(parents=True, exist_ok=True)
    report = ChaosReport(config=config, run=run, log_dir=log_dir)
    info = start_private_stack(state_dir, console)
    chaos = _Chaos(config, info, state_dir, report)
    settings = Settings(
        kafka_bootstrap_servers=info.kafka_bootstrap_servers,
        database_url=info.database_url,
        redis_url=info.redis_url,
        topic_prefix=run,
        db_schema=run,
        redis_prefix=run,
    )
    watcher: asyncio.Task[None] | None = None
    try:
        for role in ROLES:
            chaos.start(role)
        await wait_ready(chaos.base_url, chaos.children)
        await _fund(chaos.base_url, chaos.agent_ids)
        for i in range(config.agents):
            chaos.start(f"agent-{i}")
        watcher = asyncio.create_task(chaos.watch())
        outages = len(SERVICES) * (config.outage_s + 5.0)
        kill_s = max(config.kill_interval_s * 1.5, config.duration_s - outages)
        console.print(
            f"[bold]{run}[/]: {config.tasks} tasks, {config.agents} agents; kills every"
            f" ~{config.kill_interval_s:.1f} s throughout; after {kill_s:.0f} s"
            f" {', '.join(SERVICES)} down {config.outage_s:.0f} s each; logs in {log_dir}"
        )
        t0 = time.monotonic()
        driver = asyncio.create_task(_drive(chaos.base_url, config, report))
        done = asyncio.Event()
        await asyncio.gather(chaos.kills(t0, done), chaos.outages(t0, kill_s, done))
        faults_end_wall = datetime.now(UTC)
        faults_end = time.monotonic()
        report.faults_s = faults_end - t0
        console.print(f"faults over after {report.faults_s:.0f} s; settling")
        conn = await asyncpg.connect(info.database_url)
        try:
            report.open_at_faults_end = await _statuses(conn, run, config.tasks)
            bound = faults_end + config.settle_timeout_s
            while time.monotonic() < bound:
                if driver.done() and await _completed_count(conn, run) >= config.tasks:
                    report.read_model_settle_s = time.monotonic() - faults_end
                    break
                await asyncio.sleep(0.5)
            else:
                report.open_at_bound = await _statuses(conn, run, config.tasks)
        finally:
            await conn.close()
        if not driver.done():
            driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await driver
        chaos.stopping = True
        if watcher is not None:
            watcher.cancel()
        chaos.children.stop_all("agent-")
        await asyncio.sleep(2.0)  # the economy credits the last rewards
        async with open_operator(settings) as op:
            caught_up = await _caught_up(op.pool, op.kafka, op.topics, run, 30.0)
            _, events, bad = await _read_log(op.kafka, op.topics)
            report.events = events
            report.checks.append(check_submissions(events, report))
            report.checks += check_completions(events, report, faults_end_wall)
            report.checks.append(check_sequences(events))
            if bad:
                report.checks.append(
                    Check("every record on the event topics decodes", False, f"{bad} did not")
                )
            report.checks.append(
                Check(
                    "the projector caught up with the log",
                    caught_up,
                    "within 30 s of the agents' stop",
                )
            )
            report.checks += await check_read_models(
                op.pool, op.kafka, op.topics, run, info.redis_url
            )
            audit = await audit_ledger(op.kafka, op.topics, op.pool, run)
            report.checks += [Check(f"ledger: {c.name}", c.ok, c.detail) for c in audit.checks]
        report.checks.append(
            Check("no role exited by itself", not report.exits, "; ".join(report.exits[:3]))
        )
    finally:
        chaos.stopping = True
        if watcher is not None and not watcher.done():
            watcher.cancel()
        chaos.children.stop_all()
        if not keep_stack:
            stack.down(state_dir, purge=True)
    return report


def render(report: ChaosReport, console: Console) -> None:
    """Print a run's figures and each check's result."""
    cfg = report.config
    console.rule(f"bench/chaos {report.run} (seed {cfg.seed})")
    kills = ", ".join(f"{k} {report.kills[k]}" for k in TARGETS)
    console.print(
        f"kills (SIGKILL, restarted after {cfg.restart_delay_s} s): {kills};"
        f" total {sum(report.kills.values())}"
    )
    for service, at_s, down_s, restart_s in report.outages:
        console.print(
            f"outage: {service} stopped at {at_s:.0f} s, down {down_s:.1f} s"
            f" (restart took {restart_s:.1f} s)"
        )
    console.print(
        "kill times (s after the faults began): "
        + ", ".join(f"{t:.0f} {name}" for t, name in report.kill_log)
    )
    console.print(f"roles that exited by themselves: {len(report.exits)}")
    for line in report.exits[:10]:
        console.print(f"  {line}")
    answers = ", ".join(f"{k} {v}" for k, v in sorted(report.submit_answers.items()))
    console.print(
        f"tasks: {cfg.tasks} driven, {len(report.accepted)} accepted (201), {report.completed}"
        f" completed; POST /tasks answers: {answers}"
    )
    settle = f"{report.settle_s:.1f} s" if report.settle_s is not None else "never"
    rm = (
        f"{report.read_model_settle_s:.1f} s"
        if report.read_model_settle_s is not None
        else "not within the bound"
    )
    console.print(
        f"faults lasted {report.faults_s:.0f} s; time to settle after they stopped: {settle}"
        f" (last completion on the log), {rm} (read model shows every task completed)"
    )
    console.print(
        f"tasks not completed when the faults stopped: {_counts(report.open_at_faults_end)}"
        + (f"; at the bound: {_counts(report.open_at_bound)}" if report.open_at_bound else "")
    )
    table = Table(title="checks", title_justify="left")
    for col in ("check", "result", "detail"):
        table.add_column(col, overflow="fold")
    for c in report.checks:
        table.add_row(c.name, "[green]pass[/]" if c.ok else "[red]FAIL[/]", c.detail)
    console.print(table)
    console.print(f"logs: {report.log_dir}")


@app.command()
def main(
    duration: Annotated[
        float, typer.Option(min=10, help="Seconds of faults in all: kills, then the two outages.")
    ] = 180.0,
    kill_interval: Annotated[
        float, typer.Option(min=0.5, help="Mean seconds between kills (x0.5..1.5, seeded).")
    ] = 4.0,
    restart_delay: Annotated[
        float, typer.Option(min=0, help="Seconds a killed process stays down.")
    ] = 0.5,
    outage: Annotated[
        float, typer.Option(min=1, help="Seconds PostgreSQL, then Redis, stay stopped.")
    ] = 15.0,
    tasks: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tasks submitted evenly over the faults; keep the rate under what the"
            " machine completes, or the backlog, not the faults, decides the settle time.",
        ),
    ] = 1000,
    agents: Annotated[int, typer.Option(min=1, help="Agent processes (SDK workers).")] = 4,
    slots: Annotated[int, typer.Option(min=1, help="Tasks each agent runs at once.")] = 4,
    work_ms: Annotated[int, typer.Option(min=0, help="Most ms a task's work takes.")] = 200,
    settle_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds after the faults for every task to complete.")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the kill schedule and targets.")] = 0,
    restart_roles_in_outages: Annotated[
        bool,
        typer.Option(help="Also kill and start every role a quarter into each outage."),
    ] = True,
    state_dir: Annotated[
        Path, typer.Option(help="The private stack's state directory (its services get stopped).")
    ] = Path(".swarmlog-chaos"),
    keep_stack: Annotated[bool, typer.Option(help="Leave the stack running at the end.")] = False,
) -> None:
    """Kill random roles and agents with SIGKILL under load, stop PostgreSQL and Redis
    once each, then check that no accepted task was lost, stuck or doubled. Prints the
    kills per target, tasks submitted and completed, time to settle and each check's
    result; exits 1 if a check failed."""
    config = ChaosConfig(
        tasks=tasks,
        agents=agents,
        duration_s=duration,
        kill_interval_s=kill_interval,
        restart_delay_s=restart_delay,
        outage_s=outage,
        settle_timeout_s=settle_timeout,
        seed=seed,
        agent_slots=slots,
        work_ms=work_ms,
        restart_roles_in_outages=restart_roles_in_outages,
    )
    console = Console(width=None if sys.stdout.isatty() else 140)
    report = asyncio.run(run_chaos(config, state_dir, console=console, keep_stack=keep_stack))
    render(report, console)
    raise typer.Exit(0 if report.ok else 1)


if __name__ == "__main__":
    app()
