"""``swarmlog demo``: the whole stack and a swarm of SDK agents analysing real code.

Steps: start (or reuse) Kafka, PostgreSQL and Redis; start the swarmlog processes
(processor, streams, projector, API) as child processes; start one process per agent;
publish the shipped ``package-analysis`` workflow template (demo/templates/), instantiate
it for the chosen packages and execute it: one task discovers the modules, the map step
fans out one ``analyse-module`` task per module (8 at a time), and a report step ranks
the findings, gated on every module having been analysed. Part-way through, SIGKILL
the agent holding the most work: when its heartbeats stop, its tasks are lost and the
workflow's retry policy runs those units again on other agents. Wait for the run to
finish and the read models to catch up; print a summary (the run's steps and timings,
agents, findings, economy) read back from the read models and the log, never from the
demo's own memory.

The demo earns: before work starts each agent gets a grant from the treasury and stakes
a different amount (Bronze to Diamond), so rewards differ by tier; the killed agent is
slashed for the work it had started; half-way through, the stakers vote a proposal that
doubles the base reward, which the rewards pay from its execution on. The summary shows
balances, tiers, the earnings leaderboard, the proposal and whether the ledger balances.
Each run has its own topics, schema and Redis prefix (``demo<stamp>``), so its figures
are its own. The children are supervised by infra/supervise.py.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from demo.analysis import discover_modules
from demo.workflow import load_template
from infra import kafka, stack
from infra.settings import Settings
from infra.supervise import Children, free_port, role_env, wait_ready
from infra.topics import Topics

DEFAULT_PACKAGES = ("asyncio", "email", "json")

#: The swarm: name, capabilities, tasks at once, cost per task (tokens).
AGENTS: tuple[tuple[str, dict[str, float], int, str], ...] = (
    ("ada", {"python": 0.95, "large-modules": 0.9}, 2, "0.4"),
    ("grace", {"python": 0.85}, 2, "0.2"),
    ("linus", {"python": 0.7, "large-modules": 0.8}, 2, "0.3"),
    ("margaret", {"python": 0.9}, 1, "0.1"),
)


#: Each agent's grant and stake (tokens): Diamond, Gold, Silver, Bronze.
STAKES: dict[str, int] = {"ada": 12_000, "grace": 1_500, "linus": 600, "margaret": 150}


async def _until(probe: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


async def fund_agents(http: httpx.AsyncClient) -> None:
    """Grant each agent its stake (plus 50 tokens) from the treasury and stake it."""
    for name, stake in STAKES.items():
        r = await http.post(
            f"/accounts/{name}/grant", json={"amount": str(stake + 50), "reason": "demo grant"}
        )
        if r.status_code != 200:
            raise RuntimeError(f"grant to {name} failed: {r.status_code} {r.text}")

    async def credited(name: str) -> bool:
        r = await http.get(f"/accounts/{name}")
        return r.status_code == 200 and r.json()["balance"] != "0.000000"

    for name, stake in STAKES.items():
        await _until(lambda n=name: credited(n), f"the grant to {name}")
        r = await http.post(f"/accounts/{name}/stake", json={"amount": str(stake)})
        if r.status_code != 200:
            raise RuntimeError(f"stake of {name} failed: {r.status_code} {r.text}")


async def propose_double_reward(http: httpx.AsyncClient, proposal_id: str) -> None:
    """Propose doubling the base reward (2 s window) and have every staker vote for it."""
    r = await http.post(
        "/proposals",
        json={
            "proposal_id": proposal_id,
            "title": "double the base reward",
            "proposer": "ada",
            "change": {"base_reward": "20"},
            "window_s": 2,
            "quorum_bp": 5000,
            "threshold_bp": 5000,
        },
    )
    if r.status_code != 201:
        raise RuntimeError(f"proposal failed: {r.status_code} {r.text}")
    for name in STAKES:
        await http.post(f"/proposals/{proposal_id}/votes", json={"voter": name, "choice": "for"})


async def economy_summary(http: httpx.AsyncClient, proposal_id: str | None) -> dict[str, Any]:
    """Accounts, leaderboard, totals and the proposal, read back over the API."""
    accounts = []
    for name in STAKES:
        r = await http.get(f"/accounts/{name}")
        if r.status_code == 200:
            accounts.append(r.json())
    proposal = None
    if proposal_id is not None:
        r = await http.get(f"/proposals/{proposal_id}")
        proposal = r.json() if r.status_code == 200 else None
    return {
        "accounts": accounts,
        "leaderboard": (await http.get("/leaderboard")).json(),
        "totals": (await http.get("/economy/summary")).json(),
        "proposal": proposal,
    }


async def start_workflow(http: httpx.AsyncClient, run_id: str, packages: tuple[str, ...]) -> str:
    """Publish the shipped ``package-analysis`` template, instantiate it for ``packages``
    as the workflow ``run_id`` and execute it; return the workflow run's id.

    Raises RuntimeError (with the API's problem detail) when a step is refused."""
    template = load_template()
    r = await http.post("/workflow-templates", json=template)
    if r.status_code != 201:
        raise RuntimeError(f"publishing the template failed: {r.status_code} {r.text}")
    version = r.json().get("version")

    async def instantiated() -> bool:
        r = await http.post(
            f"/workflow-templates/{template['name']}/instantiate",
            json={
                "workflow_id": run_id,
                "name": f"analyse {', '.join(packages)}",
                "params": {"packages": list(packages), "top": 10},
                "version": version,
            },
            headers={"Idempotency-Key": f"{run_id}-instantiate"},
        )
        if r.status_code == 404:  # the template's version is not in the read model yet
            return False
        if r.status_code != 201:
            raise RuntimeError(f"instantiating the template failed: {r.status_code} {r.text}")
        return True

    await _until(instantiated, "the template in the read model")
    r = await http.post(
        f"/workflows/{run_id}/execute",
        json={"inputs": {}},
        headers={"Idempotency-Key": f"{run_id}-execute"},
    )
    if r.status_code != 202:
        raise RuntimeError(f"executing the workflow failed: {r.status_code} {r.text}")
    return str(r.json()["run_id"])


async def _run(http: httpx.AsyncClient, run_id: str) -> dict[str, Any] | None:
    """The workflow run as ``GET /workflow-runs/{id}`` shows it (None until projected)."""
    r = await http.get(f"/workflow-runs/{run_id}")
    return r.json() if r.status_code == 200 else None


async def _analysed(conn: asyncpg.Connection, schema: str) -> int:
    """Modules analysed so far (completed ``analyse-module`` tasks in the read model)."""
    return int(
        await conn.fetchval(
            f"SELECT count(*) FROM {schema}.tasks WHERE type = 'analyse-module'"
            " AND status = 'completed'"
        )
    )


async def _counts(conn: asyncpg.Connection, schema: str) -> dict[str, int]:
    rows = await conn.fetch(f"SELECT status, count(*) AS n FROM {schema}.tasks GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def _busiest_agent(conn: asyncpg.Connection, schema: str, among: set[str]) -> str | None:
    row = await conn.fetchrow(
        f"SELECT agent_id, count(*) AS n FROM {schema}.tasks WHERE status IN"
        " ('assigned', 'running') AND agent_id = ANY($1::text[]) GROUP BY agent_id"
        " ORDER BY n DESC, agent_id LIMIT 1",
        sorted(among),
    )
    return row["agent_id"] if row else None


async def _caught_up(settings: Settings, conn: asyncpg.Connection) -> tuple[int, int]:
    """(events on the log, events projected) once the projector has reached the log's end."""
    topics = Topics.of(settings)
    bootstrap = settings.require_services()[0]
    tps: list[TopicPartition] = []
    for topic in topics.event_topics.values():
        tps += await kafka.partitions_of(bootstrap, topic)
    c = kafka.consumer(bootstrap)
    await c.start()
    try:
        ends = await c.end_offsets(tps)
        begins = await c.beginning_offsets(tps)
    finally:
        await c.stop()
    for _ in range(300):
        rows = await conn.fetch(
            f"SELECT topic, partition, next_offset FROM {settings.db_schema}.projection_offsets"
        )
        done = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        if all(done.get((tp.topic, tp.partition), begins[tp]) >= ends[tp] for tp in tps):
            break
        await asyncio.sleep(0.2)
    # Offsets overcount: each transaction's commit marker takes an offset too. Count records.
    on_log = 0

    def count(_: Any) -> None:
        nonlocal on_log
        on_log += 1

    await kafka.read_to_end(bootstrap, tps, count)
    projected = await conn.fetchval(f"SELECT count(*) FROM {settings.db_schema}.events")
    return on_log, projected


async def summarise(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """The demo's figures, read back from the read models of ``schema``.

    Returns a dict: ``agents`` (per agent: completed, failed, lost, lifecycle), ``tasks``
    (counts by status), ``requeues``, ``throughput_per_s``, ``latency_ms`` (p50/p90/p99 of
    submit-to-completed and submit-to-assigned), ``findings`` (most complex functions).
    """
    agents = [
        dict(r)
        for r in await conn.fetch(
            f"SELECT agent_id, name, lifecycle, tasks_completed, tasks_failed, tasks_lost"
            f" FROM {schema}.agents ORDER BY tasks_completed DESC, agent_id"
        )
    ]
    latency = await conn.fetchrow(
        f"""
        SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY done_ms) AS p50,
               percentile_cont(0.9) WITHIN GROUP (ORDER BY done_ms) AS p90,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY done_ms) AS p99,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY assign_ms) AS a50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY assign_ms) AS a99,
               count(*) AS n,
               extract(epoch FROM max(finished_at) - min(submitted_at)) AS span_s
          FROM (SELECT extract(epoch FROM finished_at - submitted_at) * 1000 AS done_ms,
                       extract(epoch FROM assigned_at - submitted_at) * 1000 AS assign_ms,
                       finished_at, submitted_at
                  FROM {schema}.tasks WHERE status = 'completed') t
        """
    )
    findings = await conn.fetch(
        f"""
        SELECT f->>'name' AS function, t.result->>'module' AS module,
               (f->>'complexity')::int AS complexity, (f->>'line')::int AS line
          FROM {schema}.tasks t, jsonb_array_elements(t.result->'most_complex') f
         WHERE t.status = 'completed'
         ORDER BY complexity DESC, module, function LIMIT 10
        """
    )
    totals = await conn.fetchrow(
        f"SELECT coalesce(sum((result->'lines'->>'total')::int), 0) AS lines,"
        f" coalesce(sum((result->>'functions')::int), 0) AS functions,"
        f" coalesce(sum((result->>'classes')::int), 0) AS classes,"
        f" coalesce(sum(requeues), 0) AS requeues"
        f" FROM {schema}.tasks WHERE status = 'completed' OR requeues > 0"
    )
    span = float(latency["span_s"] or 0.0)
    return {
        "agents": agents,
        "tasks": await _counts(conn, schema),
        "requeues": int(totals["requeues"]),
        "completed": int(latency["n"]),
        "throughput_per_s": (latency["n"] / span) if span else 0.0,
        "latency_ms": {k: float(latency[k] or 0.0) for k in ("p50", "p90", "p99", "a50", "a99")},
        "code": {k: int(totals[k]) for k in ("lines", "functions", "classes")},
        "findings": [dict(r) for r in findings],
    }


def _seconds(start: str | None, end: str | None) -> str:
    """``end - start`` of two ISO-8601 times, as "1.23 s" (or "" if either is missing)."""
    if not start or not end:
        return ""
    delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    return f"{delta.total_seconds():.2f} s"


def render_workflow(console: Console, run: dict[str, Any] | None) -> None:
    """Print the workflow run's steps: status, attempts, tasks, timings."""
    if not run:
        console.print("[red]The workflow run is not in the read model.[/]")
        return
    w = Table(
        title=f"Workflow run {run.get('run_id')} of {run.get('workflow_id')}: {run.get('status')}"
        f" ({_seconds(run.get('started_at'), run.get('finished_at'))})",
        title_justify="left",
    )
    for col in ("step", "status", "tasks done", "attempts (max)", "tasks submitted", "took"):
        w.add_column(col, justify="left" if col in ("step", "status") else "right")
    for step in run.get("steps", []):
        total = step.get("items_total")
        done = step.get("items_done")
        w.add_row(
            step.get("step_id", "?"),
            step.get("status", "?"),
            f"{done}/{total}" if total is not None else str(done if done is not None else ""),
            str(step.get("attempts", "")),
            str(len(step.get("task_ids") or [])),
            _seconds(step.get("started_at"), step.get("finished_at")),
        )
    console.print(w)
    if run.get("error"):
        console.print(f"[red]The run failed at {run.get('failed_step')}: {run['error']}[/]")


def render(console: Console, summary: dict[str, Any], extra: dict[str, Any]) -> None:
    """Print the summary as tables a person can read."""
    console.rule("[bold]swarmlog demo: summary (read back from the read models and the log)")
    t = Table(title="Agents", title_justify="left")
    for col in ("agent", "state", "completed", "failed", "taken back"):
        t.add_column(col, justify="right" if col not in ("agent", "state") else "left")
    for a in summary["agents"]:
        t.add_row(
            a["name"],
            a["lifecycle"],
            str(a["tasks_completed"]),
            str(a["tasks_failed"]),
            str(a["tasks_lost"]),
        )
    console.print(t)
    lat = summary["latency_ms"]
    tasks = ", ".join(f"{k} {v}" for k, v in sorted(summary["tasks"].items()))
    console.print(
        f"Tasks: {tasks}; requeued {summary['requeues']} time(s) after "
        f"[bold]{extra.get('killed', 'no agent')}[/] was killed with SIGKILL.\n"
        f"Throughput: {summary['throughput_per_s']:.1f} tasks/s over {summary['completed']} "
        f"completed tasks. Submit-to-completed p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms,"
        f" p99 {lat['p99']:.0f} ms; submit-to-assigned p50 {lat['a50']:.0f} ms,"
        f" p99 {lat['a99']:.0f} ms.\n"
        f"Events on the log: {extra['events_on_log']} (projected into the archive:"
        f" {extra['events_projected']}). Wall time {extra['wall_s']:.1f} s."
    )
    render_workflow(console, summary.get("workflow"))
    code = summary["code"]
    f = Table(
        title=f"Findings: the most complex functions of {', '.join(extra['packages'])}"
        f" ({code['lines']} lines, {code['functions']} functions, {code['classes']} classes)",
        title_justify="left",
    )
    f.add_column("cyclomatic complexity", justify="right")
    f.add_column("function", overflow="fold")
    f.add_column("module", overflow="fold")
    f.add_column("line", justify="right")
    for row in summary["findings"]:
        f.add_row(str(row["complexity"]), row["function"], row["module"], str(row["line"]))
    console.print(f)
    economy = extra.get("economy")
    if economy:
        e = Table(title="Economy: accounts (tokens)", title_justify="left")
        for col in ("account", "tier", "balance", "staked", "earned", "slashed"):
            e.add_column(col, justify="left" if col in ("account", "tier") else "right")
        for a in economy["accounts"]:
            e.add_row(
                a["account_id"], a["tier"], a["balance"], a["staked"], a["earned"], a["slashed"]
            )
        console.print(e)
        board = ", ".join(
            f"{x['rank']}. {x['account_id']} {x['earned']}" for x in economy["leaderboard"]
        )
        t = economy["totals"]
        p = economy["proposal"]
        console.print(
            f"Leaderboard: {board or '(empty)'}.\n"
            f"Supply {t['supply']} = balances {t['balances']} + staked {t['staked']} +"
            f" unstaking {t['unstaking']} + in flight {t['in_flight']}:"
            f" {'balanced' if t['balanced'] else 'NOT BALANCED'}."
            + (
                f"\nGovernance: '{p['title']}' {p['status']} ({p['votes_for']} for,"
                f" {p['votes_against']} against of {p['total_power']} staked); base reward now"
                f" {t['parameters']['base_reward']}."
                if p
                else ""
            )
        )


async def run_demo(
    *,
    state_dir: Path,
    packages: tuple[str, ...] = DEFAULT_PACKAGES,
    kill_at: float = 0.35,
    pace_ms: int = 150,
    keep_stack: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the demo end to end and return its summary (see ``summarise``), plus
    ``killed`` (the agent killed), ``events_on_log`` and ``events_projected``.

    ``kill_at`` is the fraction of tasks completed at which the busiest agent is killed
    (0 disables it); ``pace_ms`` is each agent's think time per task in milliseconds.
    Raises RuntimeError (naming the service or process and its log) when a part fails.
    """
    console = console or Console()
    started_at = time.monotonic()
    modules = [m for p in packages for m in discover_modules(p)]
    already_running = stack.environment_info() is not None or stack.info(state_dir) is not None
    info = stack.up(state_dir, console=console)
    stamp = time.strftime("%Y%m%d%H%M%S")
    run_id = f"demo{stamp}"
    port = free_port()
    env = role_env(info, run_id, api_port=port, heartbeat_timeout_s=3, scheduler_tick_s=0.05)
    settings = Settings(
        kafka_bootstrap_servers=info.kafka_bootstrap_servers,
        database_url=info.database_url,
        redis_url=info.redis_url,
        topic_prefix=run_id,
        db_schema=run_id,
        redis_prefix=run_id,
    )
    log_dir = state_dir / "demo" / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir=log_dir)
    base_url = f"http://127.0.0.1:{port}"
    killed: str | None = None
    proposal_id: str | None = None
    economy: dict[str, Any] | None = None
    try:
        console.print(
            f"[bold]Run {run_id}[/]: {len(modules)} modules of {', '.join(packages)};"
            f" logs in {log_dir}"
        )
        children.start_roles(env)
        await wait_ready(base_url, children)
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
            await fund_agents(http)
        for name, caps, slots, cost in AGENTS:
            argv = [
                sys.executable,
                "-m",
                "demo.agent",
                "--api",
                base_url,
                "--name",
                name,
                "--max-concurrent",
                str(slots),
                "--cost",
                cost,
                "--pace-ms",
                str(pace_ms),
            ]
            for cap, level in caps.items():
                argv += ["--capability", f"{cap}={level}"]
            children.start(f"agent-{name}", argv, env)
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
            workflow_run = await start_workflow(http, run_id, packages)
        conn = await asyncpg.connect(info.database_url)
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            ) as progress:
                bar = progress.add_task("workflow: discovering modules", total=len(modules))
                deadline = time.monotonic() + 600
                async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
                    while time.monotonic() < deadline:
                        run = await _run(http, workflow_run)
                        analysed = await _analysed(conn, run_id)
                        steps = {s["step_id"]: s for s in (run or {}).get("steps", [])}
                        now = ", ".join(f"{sid} {s['status']}" for sid, s in steps.items())
                        progress.update(
                            bar, completed=analysed, description=f"workflow: {now or 'starting'}"
                        )
                        if kill_at and killed is None and analysed >= kill_at * len(modules):
                            alive = {n for n, *_ in AGENTS if f"agent-{n}" in children.procs}
                            killed = await _busiest_agent(conn, run_id, alive)
                            if killed:
                                children.kill(f"agent-{killed}")
                                progress.console.print(
                                    f"[red]killed agent {killed} (SIGKILL) with work in hand;"
                                    " when its heartbeats stop its tasks are lost, and the"
                                    " workflow retries those steps on other agents[/]"
                                )
                        if proposal_id is None and analysed >= 0.5 * len(modules):
                            proposal_id = f"{run_id}-double-reward"
                            await propose_double_reward(http, proposal_id)
                            progress.console.print(
                                "[cyan]the stakers vote to double the base"
                                " reward (voting closes in 2 s)[/]"
                            )
                        if run is not None and run["status"] in (
                            "completed",
                            "failed",
                            "cancelled",
                        ):
                            break
                        await asyncio.sleep(0.25)
                    else:
                        raise RuntimeError("the demo's workflow did not finish in 10 minutes")
            children.stop_all("agent-")  # their last events (stopped) belong in the count
            await asyncio.sleep(3.0)  # the economy settles its last credits (and the vote)
            on_log, projected = await _caught_up(settings, conn)
            summary = await summarise(conn, run_id)
            async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as http:
                economy = await economy_summary(http, proposal_id)
                summary["workflow"] = await _run(http, workflow_run)
        finally:
            await conn.close()
    finally:
        children.stop_all()
        if not keep_stack and not already_running:  # stop only what the demo started
            stack.down(state_dir)
    summary.update(
        killed=killed,
        events_on_log=on_log,
        events_projected=projected,
        wall_s=time.monotonic() - started_at,
        packages=list(packages),
        run_id=run_id,
        economy=economy,
    )
    render(console, summary, summary)
    return summary
