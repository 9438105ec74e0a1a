"""bench/soak: does any role's memory keep growing under a long steady load? Prints
figures; asserts nothing.

Against the real processes (processor, streams, projector and API as child processes,
as ``swarmlog processor|streams|projector|api`` run them) on the local stack or the
services the environment names, it drives ``--commands`` commands (default 500,000):

- heartbeats (``--task-share`` 0.1 leaves 90 % of the commands to them) from
  ``--agents`` registered and started agents, round robin, with ``POST
  /agents/{id}/heartbeat`` at ``--concurrency`` requests in flight; or, with ``--via
  topic``, written straight to the command topic (``CommandClient.execute_many`` with the
  public codec) in chunks, when the API is what limits the rate;
- task cycles through the API, three commands each: ``POST /tasks:batch`` submits, with
  at most ``--max-inflight`` tasks unfinished (heartbeats and task cycles keep pace
  with each other, so the agents stay online while tasks remain); one
  SSE client follows ``GET /events?type=io.swarmlog.task.assigned`` (so the API's shared
  SSE window is filled by every event) and resumes with its Last-Event-ID when dropped;
  task workers answer each assignment with ``POST /tasks/{id}/start`` and ``/complete``.
  The process managers add their own commands (assignments, rewards); they are not
  counted.

Every ``--sample-s`` seconds it reads each role's resident set size (psutil where
installed, else ``VmRSS`` of ``/proc/<pid>/status``) and writes it to
``<state-dir>/bench/<run>/rss.csv``. It prints RSS per role after warm-up (the first
``--warmup`` commands, default 10 %), at 100,000 commands and at the end (after the
read models caught up), each role's growth after warm-up (end and peak) against the
target of 50 MB, and the command rate.

Every child process is stopped by its pid; the run's topics, schema and Redis keys are
deleted unless ``--keep``. The caches bounded in bytes are read from the environment
as by any swarmlog process (``SWARMLOG_CLIENT_OUTCOME_CACHE_BYTES``,
``SWARMLOG_SSE_WINDOW_BYTES``).

Run: ``eval "$(swarmlog up)"; python -m bench.soak`` (smoke run: ``--commands 20000``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
import httpx
import typer
from httpx_sse import aconnect_sse
from rich.console import Console
from rich.table import Table

from commands.client import CommandClient
from domain import agent as ag
from domain import task as tk
from infra import stack
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.mapper import event_ce_type
from infra.settings import Settings
from infra.supervise import Children, free_port, remove_run, role_env, wait_ready
from infra.topics import Topics
from projections.queries import projected_offsets

try:  # psutil is optional: /proc says the same on Linux
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

app = typer.Typer(add_completion=False)
console = Console()

ROLES = ("processor", "streams", "projector", "api")
MB = 1_000_000
#: The growth after warm-up each role should stay under.
TARGET_GROWTH_BYTES = 50 * MB
ASSIGNED = event_ce_type(tk.TASK, tk.TaskAssigned.event_type)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (psutil, else /proc/<pid>/status)."""
    if psutil is not None:
        return int(psutil.Process(pid).memory_info().rss)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Counts:
    """Commands driven so far, by kind, and how they were answered."""

    heartbeats: int = 0
    submits: int = 0
    starts: int = 0
    completes: int = 0
    completed: int = 0
    rejected: int = 0
    pending: int = 0
    errors: int = 0
    sse_reconnects: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Commands driven and answered."""
        return self.heartbeats + self.submits + self.starts + self.completes

    def answered(self, status: int) -> None:
        """Count an HTTP answer to a command."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 202:
            self.pending += 1
        elif status >= 400:
            self.rejected += 1


@dataclass
class Sample:
    """Each role's RSS (bytes) at ``t`` seconds into the drive, after ``commands``."""

    t: float
    commands: int
    rss: dict[str, int]


async def _agents(http: httpx.AsyncClient, run: str, n: int) -> list[str]:
    """Register and start ``n`` agents able to run ``soak`` tasks; their ids."""
    ids = [f"{run}-a{i}" for i in range(n)]

    async def one(agent_id: str) -> None:
        r = await http.post(
            "/agents",
            json={
                "agent_id": agent_id,
                "name": agent_id,
                "max_concurrent_tasks": 20,
                "capabilities": [{"name": "soak", "level": 1.0}],
            },
        )
        r.raise_for_status()
        (await http.post(f"/agents/{agent_id}/start")).raise_for_status()

    for start in range(0, n, 20):
        await asyncio.gather(*(one(a) for a in ids[start : start + 20]))
    return ids


async def _paced(done: float, ahead_of: Callable[[], float], slack: float = 0.02) -> None:
    """Wait while ``done`` (0..1) is more than ``slack`` ahead of ``ahead_of()`` (0..1)."""
    while done > ahead_of() + slack:
        await asyncio.sleep(0.05)


async def _beat_via_api(
    http: httpx.AsyncClient,
    agents: list[str],
    total: int,
    concurrency: int,
    counts: Counts,
    tasks_progress: Callable[[], float],
) -> None:
    numbers = iter(range(total))

    async def worker() -> None:
        for i in numbers:
            await _paced(i / total, tasks_progress)
            try:
                r = await http.post(f"/agents/{agents[i % len(agents)]}/heartbeat")
            except httpx.HTTPError:
                counts.errors += 1
                continue
            counts.answered(r.status_code)
            counts.heartbeats += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _beat_via_topic(
    client: CommandClient,
    run: str,
    agents: list[str],
    total: int,
    concurrency: int,
    counts: Counts,
    tasks_progress: Callable[[], float],
    chunk: int = 500,
) -> None:
    starts = iter(range(0, total, chunk))

    async def worker() -> None:
        for start in starts:
            await _paced(start / total, tasks_progress)
            at = datetime.now(UTC)
            envelopes = [
                CommandEnvelope(
                    command_id=f"{run}-hb-{i}",
                    command=ag.RecordHeartbeat(agent_id=agents[i % len(agents)], at=at),
                    correlation_id=f"{run}-hb-{i}",
                    source="/bench/soak",
                )
                for i in range(start, min(total, start + chunk))
            ]
            outcomes = await client.execute_many(envelopes, 120.0)
            for o in outcomes:
                if o is None:
                    counts.pending += 1
                elif o.status != "accepted":
                    counts.rejected += 1
            counts.heartbeats += len(envelopes)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency // 16))))


async def _follow_assignments(
    http: httpx.AsyncClient,
    run: str,
    queue: asyncio.Queue[tuple[str, str]],
    connected: asyncio.Event,
    counts: Counts,
) -> None:
    """Queue (task id, agent id) for every assignment of this run's tasks, for ever;
    resume with the last SSE id whenever the stream ends (dropped by the API's window)."""
    last_id: str | None = None
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with aconnect_sse(
                http, "GET", "/events", params={"type": ASSIGNED}, headers=headers
            ) as es:
                es.response.raise_for_status()
                connected.set()
                async for sse in es.aiter_sse():
                    if sse.event != ASSIGNED:
                        continue  # a keep-alive ping
                    last_id = sse.id
                    ce = json.loads(sse.data)
                    if ce["subject"].startswith(f"{run}-t"):
                        queue.put_nowait((ce["subject"], ce["data"]["agent_id"]))
        except httpx.HTTPError:
            await asyncio.sleep(0.5)
        counts.sse_reconnects += 1


async def _work(
    http: httpx.AsyncClient, queue: asyncio.Queue[tuple[str, str]], counts: Counts
) -> None:
    """Start and complete each assigned task as its agent, for ever."""
    while True:
        task_id, agent_id = await queue.get()
        try:
            r = await http.post(f"/tasks/{task_id}/start", json={"agent_id": agent_id})
            counts.answered(r.status_code)
            counts.starts += 1
            if r.status_code != 200:
                continue  # e.g. reassigned meanwhile: its new assignment comes too
            r = await http.post(
                f"/tasks/{task_id}/complete", json={"agent_id": agent_id, "result": {"ok": True}}
            )
            counts.answered(r.status_code)
            counts.completes += 1
            if r.status_code == 200:
                counts.completed += 1
        except httpx.HTTPError:
            counts.errors += 1


async def _submit(
    http: httpx.AsyncClient,
    run: str,
    total: int,
    max_inflight: int,
    counts: Counts,
    progress: Callable[[], float],
    batch: int = 50,
) -> None:
    """Submit ``total`` tasks in batches, no faster than ``progress()`` (0..1) of the
    heartbeats, with at most ``max_inflight`` of them not completed."""
    i = 0
    last, moved = counts.completed, time.monotonic()
    while i < total:
        if counts.completed != last:
            last, moved = counts.completed, time.monotonic()
        if i - counts.completed >= max_inflight:
            if time.monotonic() - moved > 120:
                raise RuntimeError(f"no task completed for 120 s ({counts.completed} of {i})")
            await asyncio.sleep(0.05)
            continue
        if i / total > progress() + 0.02:
            await asyncio.sleep(0.05)
            continue
        n = min(batch, total - i)
        tasks = [
            {
                "task_id": f"{run}-t{j}",
                "type": "soak",
                "payload": {"n": j},
                "required_capabilities": ["soak"],
            }
            for j in range(i, i + n)
        ]
        try:
            r = await http.post("/tasks:batch", json={"tasks": tasks})
            r.raise_for_status()
            body = r.json()
            counts.rejected += body["rejected"]
            counts.pending += body["pending"]
        except httpx.HTTPError:
            counts.errors += 1
        counts.submits += n
        i += n


async def _settle(database_url: str, schema: str, topics: Topics, timeout_s: float) -> None:
    """Until the projector's offsets stop moving (two reads 3 s apart agree)."""
    partitions = [(t, p) for t in topics.event_topics.values() for p in range(topics.partitions)]
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        before: dict[tuple[str, int], int] | None = None
        while time.monotonic() < deadline:
            now = await projected_offsets(conn, schema, partitions)
            if now == before:
                return
            before = now
            await asyncio.sleep(3.0)
    finally:
        await conn.close()


async def bench(
    commands: int,
    agents: int,
    task_share: float,
    via: Literal["api", "topic"],
    concurrency: int,
    max_inflight: int,
    sample_s: float,
    warmup: int,
    state_dir: Path,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the soak and return its figures: ``samples`` (list of Sample), ``counts``
    (Counts), ``drive_s`` (first command to last answer, seconds) and the plan."""
    info = stack.up(state_dir, console=Console(stderr=True))
    run = f"soak{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = role_env(info, run, api_port=port, api_workers=1)
    # As the children will see them: the run's names, the rest from the environment.
    settings = Settings(topic_prefix=run, db_schema=run, redis_prefix=run)
    topics = Topics.of(settings)
    tasks_total = round(commands * task_share / 3)
    beats_total = commands - 3 * tasks_total
    log_dir = state_dir / "bench" / run
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir=log_dir)
    base = f"http://127.0.0.1:{port}"
    counts = Counts()
    samples: list[Sample] = []
    figures: dict[str, Any] = {
        "run": run,
        "log_dir": log_dir,
        "commands": commands,
        "heartbeats_planned": beats_total,
        "tasks_planned": tasks_total,
        "via": via,
        "agents": agents,
        "samples": samples,
        "counts": counts,
        "warmup": warmup,
        "outcome_cache_bytes": settings.client_outcome_cache_bytes,
        "sse_window_bytes": settings.sse_window_bytes,
    }
    background: list[asyncio.Task[Any]] = []
    client: CommandClient | None = None
    t0 = time.perf_counter()

    def sample() -> Sample:
        s = Sample(
            time.perf_counter() - t0,
            counts.total,
            {name: rss_bytes(p.pid) for name, p in children.procs.items()},
        )
        samples.append(s)
        return s

    async def sampler() -> None:
        last_print = 0.0
        while True:
            await asyncio.sleep(sample_s)
            s = sample()
            for name, proc in children.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}; see {log_dir / name}.log"
                    )
            if s.t - last_print >= 30:
                last_print = s.t
                console.print(
                    f"[dim]{s.t:6.0f} s {s.commands:>8,} commands"
                    f" ({s.commands / max(s.t, 1e-9):,.0f}/s), {counts.completed:,} tasks"
                    f" completed; RSS MB "
                    + " ".join(f"{n} {v / MB:.0f}" for n, v in s.rss.items())
                    + "[/]"
                )

    async def driven(*work: Any) -> None:
        """Await ``work``, failing as soon as a background task (sampler, assignment
        follower, task worker) fails."""
        main = asyncio.gather(*work)
        done, _ = await asyncio.wait({main, *background}, return_when=asyncio.FIRST_COMPLETED)
        if main in done:
            await main
            return
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        for task in done:
            task.result()  # a background task ended: raise its error
        raise RuntimeError(f"{', '.join(t.get_name() for t in done)} ended")

    try:
        children.start_roles(env, ROLES)
        await wait_ready(base, children, timeout_s=120.0)
        limits = httpx.Limits(
            max_connections=concurrency + 64, max_keepalive_connections=concurrency + 64
        )
        timeout = httpx.Timeout(60.0, read=None)  # the SSE stream waits between events
        async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http:
            ids = await _agents(http, run, agents)
            if via == "topic":
                client = CommandClient(Kafka(info.kafka_bootstrap_servers), topics)
                await client.start()
            queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
            connected = asyncio.Event()
            background.append(
                asyncio.create_task(_follow_assignments(http, run, queue, connected, counts))
            )
            background += [asyncio.create_task(_work(http, queue, counts)) for _ in range(16)]
            await asyncio.wait_for(connected.wait(), 30)
            await asyncio.sleep(5.0)  # roles settle after the set-up's burst
            t0 = time.perf_counter()
            samples.append(Sample(0.0, 0, {n: rss_bytes(p.pid) for n, p in children.procs.items()}))
            background.append(asyncio.create_task(sampler()))

            # Heartbeats and task cycles keep pace with each other (within 2 % of their
            # totals): agents whose heartbeats stopped go offline and get no more tasks.
            def progress() -> float:
                return counts.heartbeats / beats_total if beats_total else 1.0

            def tasks_progress() -> float:
                return counts.completed / tasks_total if tasks_total else 1.0

            beats = (
                _beat_via_api(http, ids, beats_total, concurrency, counts, tasks_progress)
                if client is None
                else _beat_via_topic(
                    client, run, ids, beats_total, concurrency, counts, tasks_progress
                )
            )

            async def last_tasks() -> None:
                """Until every task completed, or none did for 60 s."""
                last, still = counts.completed, time.perf_counter()
                while counts.completed < tasks_total and time.perf_counter() - still < 60:
                    await asyncio.sleep(0.2)
                    if counts.completed != last:
                        last, still = counts.completed, time.perf_counter()

            await driven(beats, _submit(http, run, tasks_total, max_inflight, counts, progress))
            await driven(last_tasks())
            figures["drive_s"] = time.perf_counter() - t0
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            background.clear()
        await _settle(info.database_url, run, topics, timeout_s=300)
        figures["end"] = sample()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if client is not None:
            await client.stop()
        children.stop_all()
        _write_csv(log_dir / "rss.csv", samples)
        if not keep:
            await remove_run(info, topics, schema=run, redis_prefix=run)
    return figures


def _write_csv(path: Path, samples: list[Sample]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "commands", *(f"{r}_rss_bytes" for r in ROLES)])
        for s in samples:
            w.writerow([f"{s.t:.1f}", s.commands, *(s.rss.get(r, "") for r in ROLES)])


def _at(samples: list[Sample], commands: int) -> Sample | None:
    """The first sample taken after ``commands`` commands."""
    return next((s for s in samples if s.commands >= commands), None)


def report(f: dict[str, Any]) -> None:
    """Print the figures of a run of ``bench``."""
    samples: list[Sample] = f["samples"]
    c: Counts = f["counts"]
    end: Sample = f["end"]
    warm = _at(samples, f["warmup"]) or end
    at_100k = _at(samples, 100_000) if f["commands"] > 100_000 else None
    after = [s for s in samples if s.t >= warm.t]
    console.rule("bench/soak")
    how = (
        "heartbeats through the API (POST /agents/{id}/heartbeat)"
        if f["via"] == "api"
        else "heartbeats written straight to the command topic (CommandClient, public codec)"
    )
    console.print(
        f"{c.total:,} commands in {f['drive_s']:.1f} s = {c.total / f['drive_s']:,.0f} commands/s:"
        f" {c.heartbeats:,} heartbeats from {f['agents']} agents, {how}; task cycles through"
        f" the API: {c.submits:,} submitted (POST /tasks:batch), {c.starts:,} started,"
        f" {c.completes:,} completed ({c.completed:,} accepted)"
    )
    console.print(
        f"answers: {c.rejected:,} rejected, {c.pending:,} pending (202), {c.errors:,} HTTP"
        f" errors; the assignment stream resumed {c.sse_reconnects} time(s) with its"
        f" Last-Event-ID"
    )
    console.print(
        f"bounds in effect: outcome cache {f['outcome_cache_bytes'] / MB:.1f} MB, SSE window"
        f" {f['sse_window_bytes'] / MB:.1f} MB per shared consumer; samples in"
        f" {f['log_dir']}/rss.csv"
    )
    table = Table(title="RSS per role (MB)")
    table.add_column("role")
    table.add_column(f"after warm-up ({warm.commands:,} cmds)", justify="right")
    table.add_column("at 100k" + (f" ({at_100k.commands:,})" if at_100k else ""), justify="right")
    table.add_column(f"end ({end.commands:,})", justify="right")
    table.add_column("growth", justify="right")
    table.add_column("peak growth", justify="right")
    table.add_column("< 50 MB", justify="center")
    for role in ROLES:
        growth = end.rss[role] - warm.rss[role]
        peak = max(s.rss[role] for s in after) - warm.rss[role]
        table.add_row(
            role,
            f"{warm.rss[role] / MB:.1f}",
            f"{at_100k.rss[role] / MB:.1f}" if at_100k else "-",
            f"{end.rss[role] / MB:.1f}",
            f"{growth / MB:+.1f}",
            f"{peak / MB:+.1f}",
            "yes" if growth < TARGET_GROWTH_BYTES else "[red]no[/]",
        )
    console.print(table)


@app.command()
def main(
    commands: Annotated[
        int,
        typer.Option(
            min=1000, help="Commands to drive (heartbeats and task submit/start/complete)."
        ),
    ] = 500_000,
    agents: Annotated[
        int, typer.Option(min=1, help="Agents sending heartbeats and running tasks.")
    ] = 100,
    task_share: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of the commands that are task cycles (3 commands each)."
        ),
    ] = 0.1,
    via: Annotated[
        str,
        typer.Option(help="Send heartbeats through the 'api' or straight to the command 'topic'."),
    ] = "api",
    concurrency: Annotated[int, typer.Option(min=1, help="Heartbeat requests in flight.")] = 48,
    max_inflight: Annotated[
        int, typer.Option(min=1, help="Tasks submitted and not yet completed, at most.")
    ] = 500,
    sample_s: Annotated[float, typer.Option(min=0.5, help="Seconds between RSS samples.")] = 5.0,
    warmup: Annotated[
        int | None,
        typer.Option(help="Commands before the reference sample (default: 10 % of --commands)."),
    ] = None,
    state_dir: Annotated[Path, typer.Option(help="Local stack state directory.")] = Path(
        ".swarmlog"
    ),
    keep: Annotated[bool, typer.Option(help="Keep the run's topics, schema and keys.")] = False,
) -> None:
    """Drive a long steady load through every role and print how their memory grows.

    Starts the processor, streams, projector and API as child processes on a fresh
    topic prefix and schema, registers --agents agents, then drives --commands commands:
    heartbeats (through the API, or with --via topic straight to the command topic) and
    task submit/start/complete cycles through the API. Samples each role's RSS every
    --sample-s seconds and prints it after warm-up, at 100k commands and at the end,
    with each role's growth after warm-up (target: under 50 MB) and the command rate.
    Smoke run: --commands 20000.
    """
    if via not in ("api", "topic"):
        raise typer.BadParameter("--via is 'api' or 'topic'")
    f = asyncio.run(
        bench(
            commands,
            agents,
            task_share,
            via,
            concurrency,
            max_inflight,  # type: ignore[arg-type]  # set above whenever this path runs
            sample_s,
            warmup if warmup is not None else commands // 10,
            state_dir,
            keep,
        )
    )
    report(f)


if __name__ == "__main__":
    app()
