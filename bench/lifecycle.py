"""bench/lifecycle: tasks through the full lifecycle (submit, assign, start, complete,
projected) with SDK agents that do no work. Prints figures; asserts nothing.

Two phases, against the real processes (processor, streams, projector, API as child
processes) on the local stack or the services the environment names:

1. acknowledgement latency: single ``POST /tasks`` at a steady ``--rate`` commands/s for
   ``--ack-seconds``; an acknowledgement is the route's answer with the decider's
   outcome (the command is on the log, decided, its events committed);
2. sustained lifecycles: ``--tasks`` tasks submitted with ``POST /tasks:batch`` and run by
   ``--agents`` no-op agents; lifecycles/s = tasks / (first submit -> last completion
   projected), with submit-to-assigned and submit-to-completed percentiles from the read
   model, and projection lag (event time to the commit of its row in the archive);
   and the agents' liveness under that load: how many times an agent was marked offline
   (every agent lives throughout, so each is a false heartbeat timeout), how many tasks
   were requeued for it, and the gaps between an agent's recorded heartbeats (by the
   time each was sent; the agents send one every 2 s).

Run: ``eval "$(swarmlog up)"; python -m bench.lifecycle --tasks 2000 --agents 8``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import httpx
import structlog
import typer
from rich.console import Console

from infra import stack
from infra.supervise import Children, free_port, role_env, wait_ready
from sdk import TaskContext, Worker

app = typer.Typer(add_completion=False)
console = Console()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _ack_phase(http: httpx.AsyncClient, rate: float, seconds: float, run: str) -> list[float]:
    latencies: list[float] = []
    interval = 1.0 / rate
    start = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        r = await http.post(
            "/tasks",
            json={"task_id": f"{run}-ack-{i}", "type": "noop", "required_capabilities": ["ack"]},
        )
        if r.status_code == 201:
            latencies.append((time.perf_counter() - t0) * 1000)

    i = 0
    while time.perf_counter() - start < seconds:
        target = start + i * interval
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
    if pending:
        await asyncio.gather(*pending)
    return latencies


async def bench(
    tasks: int, agents: int, rate: float, ack_seconds: float, state_dir: Path, api_workers: int = 1
) -> dict[str, Any]:
    """Run both phases and return the figures (milliseconds and per-second rates)."""
    info = stack.up(state_dir, console=Console(stderr=True))
    run = f"bench{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = role_env(info, run, api_port=port, scheduler_tick_s=0.02, api_workers=api_workers)
    log_dir = state_dir / "bench" / run
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir=log_dir)
    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    workers: list[asyncio.Task[None]] = []
    figures: dict[str, Any] = {"run": run, "tasks": tasks, "agents": agents}
    try:
        children.start_roles(env)
        await wait_ready(base, children)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=base, timeout=30.0, limits=limits) as http:
            await http.post(
                "/tasks",
                json={"task_id": f"{run}-warm", "type": "noop", "required_capabilities": ["ack"]},
            )
            console.print(f"phase 1: POST /tasks at {rate:.0f}/s for {ack_seconds:.0f} s")
            acks = await _ack_phase(http, rate, ack_seconds, run)
            figures["ack_ms"] = {"n": len(acks), "p50": _pct(acks, 0.5), "p99": _pct(acks, 0.99)}

            async def noop(ctx: TaskContext) -> tuple[dict[str, Any], float]:
                return {}, 1.0

            for i in range(agents):
                w = Worker(
                    base,
                    agent_id=f"{run}-agent-{i}",
                    name=f"noop-{i}",
                    capabilities={"noop": 1.0},
                    handler=noop,
                    max_concurrent_tasks=32,
                    heartbeat_interval_s=2.0,
                )
                workers.append(asyncio.create_task(w.run(stop)))
            await asyncio.sleep(2.0)
            console.print(f"phase 2: {tasks} lifecycles with {agents} no-op agents")
            t0 = time.perf_counter()
            for chunk in range(0, tasks, 500):
                batch = [
                    {"task_id": f"{run}-t{i}", "type": "noop", "required_capabilities": ["noop"]}
                    for i in range(chunk, min(tasks, chunk + 500))
                ]
                r = await http.post("/tasks:batch", json={"tasks": batch})
                r.raise_for_status()
        conn = await asyncpg.connect(info.database_url)
        try:
            while True:
                done = await conn.fetchval(
                    f"SELECT count(*) FROM {run}.tasks WHERE type = 'noop' AND status = 'completed'"
                    f" AND task_id LIKE $1",
                    f"{run}-t%",
                )
                if done >= tasks or time.perf_counter() - t0 > 600:
                    break
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - t0
            rows = await conn.fetch(
                f"SELECT extract(epoch FROM assigned_at - submitted_at) * 1000 AS assign_ms,"
                f" extract(epoch FROM finished_at - submitted_at) * 1000 AS done_ms"
                f" FROM {run}.tasks WHERE task_id LIKE $1 AND status = 'completed'",
                f"{run}-t%",
            )
            lag = [
                float(v)
                for v in await conn.fetchval(
                    f"SELECT array_agg(extract(epoch FROM projected_at - time) * 1000)"
                    f" FROM {run}.events WHERE aggregate_id LIKE $1",
                    f"{run}-t%",
                )
                or []
            ]
            offline = await conn.fetchval(
                f"SELECT count(*) FROM {run}.events WHERE aggregate_type = 'agent'"
                f" AND aggregate_id LIKE $1 AND type LIKE '%.marked_offline'",
                f"{run}-agent-%",
            )
            requeued = await conn.fetchval(
                f"SELECT count(*) FROM {run}.events WHERE aggregate_id LIKE $1"
                f" AND type LIKE '%.requeued' AND data->>'reason' = 'agent_offline'",
                f"{run}-t%",
            )
            gaps = [
                float(v)
                for v in await conn.fetchval(
                    f"SELECT array_agg(gap) FROM (SELECT extract(epoch FROM time - lag(time)"
                    f" OVER (PARTITION BY aggregate_id ORDER BY version)) * 1000 AS gap"
                    f" FROM {run}.events WHERE aggregate_id LIKE $1"
                    f" AND type LIKE '%.heartbeat_recorded') g WHERE gap IS NOT NULL",
                    f"{run}-agent-%",
                )
                or []
            ]
        finally:
            await conn.close()
        assign = [float(r["assign_ms"]) for r in rows]
        complete = [float(r["done_ms"]) for r in rows]
        figures.update(
            completed=done,
            elapsed_s=elapsed,
            lifecycles_per_s=done / elapsed if elapsed else 0.0,
            submit_to_assigned_ms={"p50": _pct(assign, 0.5), "p99": _pct(assign, 0.99)},
            submit_to_completed_ms={"p50": _pct(complete, 0.5), "p99": _pct(complete, 0.99)},
            projection_lag_ms={"p50": _pct(lag, 0.5), "p99": _pct(lag, 0.99)},
            marked_offline=offline,
            requeued_agent_offline=requeued,
            heartbeat_gap_ms={
                "p50": _pct(gaps, 0.5),
                "p99": _pct(gaps, 0.99),
                "max": max(gaps, default=float("nan")),
            },
        )
    finally:
        stop.set()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        children.stop_all()
    return figures


@app.command()
def main(
    tasks: Annotated[int, typer.Option(min=1, help="Lifecycles to run in phase 2.")] = 2000,
    agents: Annotated[int, typer.Option(min=1, help="No-op SDK agents.")] = 8,
    rate: Annotated[float, typer.Option(min=1, help="Commands/s in phase 1.")] = 100.0,
    ack_seconds: Annotated[float, typer.Option(min=1, help="Length of phase 1, seconds.")] = 10.0,
    state_dir: Annotated[Path, typer.Option(help="Local stack state directory.")] = Path(
        ".swarmlog"
    ),
    api_workers: Annotated[int, typer.Option(min=1, help="API processes (uvicorn workers).")] = 1,
) -> None:
    """Run the lifecycle benchmark and print its figures."""
    # The agents' per-task info logs would cost this process more than the agents' work.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    f = asyncio.run(bench(tasks, agents, rate, ack_seconds, state_dir, api_workers))
    console.rule("bench/lifecycle")
    console.print(
        f"acknowledgement latency at {rate:.0f} commands/s: p50 {f['ack_ms']['p50']:.1f} ms,"
        f" p99 {f['ack_ms']['p99']:.1f} ms ({f['ack_ms']['n']} commands)"
    )
    console.print(
        f"sustained: {f['completed']} lifecycles in {f['elapsed_s']:.1f} s ="
        f" {f['lifecycles_per_s']:.0f} lifecycles/s with {agents} agents and"
        f" {api_workers} API process(es)"
    )
    console.print(
        f"submit->assigned p50 {f['submit_to_assigned_ms']['p50']:.0f} ms,"
        f" p99 {f['submit_to_assigned_ms']['p99']:.0f} ms; submit->completed p50"
        f" {f['submit_to_completed_ms']['p50']:.0f} ms, p99"
        f" {f['submit_to_completed_ms']['p99']:.0f} ms"
    )
    console.print(
        f"projection lag (event time -> row committed): p50"
        f" {f['projection_lag_ms']['p50']:.0f} ms, p99 {f['projection_lag_ms']['p99']:.0f} ms"
    )
    g = f["heartbeat_gap_ms"]
    console.print(
        f"heartbeat timeouts among the {agents} live agents: {f['marked_offline']} marked"
        f" offline, {f['requeued_agent_offline']} tasks requeued for it; gap between"
        f" an agent's recorded heartbeats p50 {g['p50']:.0f} ms, p99 {g['p99']:.0f} ms,"
        f" max {g['max']:.0f} ms"
    )


if __name__ == "__main__":
    app()
