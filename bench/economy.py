"""bench/economy: reward accruals end to end, and the ledger audit's time. Prints figures;
asserts nothing.

Against the real processes (processor, streams, projector as child processes) on the
local stack or the services the environment names: ``--accruals`` ``PayReward``
commands from the treasury to ``--accounts`` accounts go on the command topic; each is
decided (the treasury's debit), credited by the economy process manager
(``AccrueReward`` -> ``RewardAccrued``) and projected. accruals/s = accruals / (first
command sent -> last credit in the ledger read model). Then ``swarmlog audit ledger``'s
check runs once and is timed. It also prints each role's CPU per accrual and the whole
machine's (every process on it, the services and anything else running), and with
``--profile-dir`` records each role with py-spy (collapsed stacks, for flame graphs).

Where the time goes. Every accrual is two commands (the debit on the treasury, the
credit on the agent), two events, two outcomes, two reads of each event by the economy
process manager and by the projector, and six ledger and archive rows. On a 2-core
machine that also runs Kafka and PostgreSQL the run is CPU-bound (1.9 of 2 cores busy),
so the figure is set by CPU per accrual, not by the treasury's one command partition:
the debits are decided in order on one partition, but one processor process decides
every partition on one core either way, and a second copy would have no idle core to
use. What brought it from 1.8 to 0.8-0.9 ms of machine CPU per accrual:

- the codec writes and reads the CloudEvents Kafka binding itself (the SDK built and
  validated a CloudEvent object and parsed every time with dateutil), with pydantic
  serializing straight to JSON bytes, and uuid5 ids without UUID objects;
- producers batch up to 512 KiB per partition: with aiokafka's 16 KiB, ``send`` waited
  on a broker round trip every ~40 records, so a batch of 500 events took a dozen round
  trips, and Kafka served that many more requests;
- the economy process manager resends a command only once the processor has decided
  past it (a backlog of 100,000 rewards drew 150,000 resends at a 10 s resend time), and
  plans only what came due since its last plan (it re-read every pending credit on
  every tick); the runners skip, before decoding, event types their view ignores (the
  scheduler decoded every account event for the tier changes alone);
- the projector writes the archive rows and ledger legs of a batch with one
  ``INSERT ... SELECT FROM unnest`` each, not one execution per row.

Measured on this 2-core machine, shared with another engineer's tests and benchmarks,
``--accruals 100000 --accounts 1000``, the old and new code run alternately: before 789
and 1,122 accruals/s (1.8-2.0 ms of machine CPU per accrual); after 2,105 and 2,382
accruals/s (0.79-0.90 ms: processor 0.28-0.31, streams 0.17-0.18, projector 0.12-0.14,
the rest Kafka, PostgreSQL and this process); the ledger audit took 10-11 s (at
20,000 accruals 2.3 s, was 3.7-4.3 s). Under a neighbour's load, single runs went as
low as 1,500/s.

Run: ``eval "$(swarmlog up)"; python -m bench.economy --accruals 100000 --accounts 1000``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console

from commands.client import CommandClient
from domain.account import MintTokens, PayReward
from domain.economy import TREASURY
from infra import stack
from infra.bootstrap import open_operator
from infra.envelope import CommandEnvelope
from infra.kafka import Kafka
from infra.settings import Settings
from infra.supervise import Children, role_env
from infra.topics import Topics, ensure_topics
from projections.audit import audit_ledger

app = typer.Typer(add_completion=False)
console = Console()


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU seconds all cores of the machine have spent busy so far (Linux /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


async def bench(
    accruals: int,
    accounts: int,
    state_dir: Path,
    processors: int = 1,
    chunk: int = 2000,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return its figures.

    ``cpu_ms_per_accrual`` gives each child role's CPU (user + system, milliseconds) per
    accrual over the timed phase. With ``profile_dir``, py-spy records each role during
    the timed phase into ``<profile_dir>/<role>.txt`` (collapsed stacks).
    """
    info = stack.up(state_dir, console=Console(stderr=True))
    run = f"econ{uuid.uuid4().hex[:8]}"
    env = role_env(info, run, scheduler_tick_s=0.02, projector_batch_size=2000)
    topics = Topics(prefix=run)
    await ensure_topics(info.kafka_bootstrap_servers, topics)
    log_dir = state_dir / "bench" / run
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir=log_dir)
    figures: dict[str, Any] = {"run": run, "accruals": accruals, "accounts": accounts}
    client = CommandClient(Kafka(info.kafka_bootstrap_servers), topics)
    try:
        for i in range(processors):  # copies share the command partitions (one core each)
            children.start_role("processor", env, name=f"processor-{i}")
        children.start_roles(env, ("streams", "projector"))
        await client.start()
        await asyncio.sleep(8.0)  # roles join their groups and rebuild their views
        # Set-up, not timed: the treasury mints the whole budget once, so no reward mints.
        [minted] = await client.execute_many(
            [
                CommandEnvelope(
                    command_id=f"{run}-mint",
                    correlation_id=f"{run}-mint",
                    command=MintTokens(
                        account_id=TREASURY, amount=accruals * 2_000_000, at=datetime.now(UTC)
                    ),
                    source="/bench/economy",
                )
            ],
            30.0,
        )
        if minted is None or minted.status != "accepted":
            raise RuntimeError(f"the treasury could not mint the budget: {minted}")
        conn = await asyncpg.connect(info.database_url)
        spies: list[subprocess.Popen[bytes]] = []
        try:
            cpu0 = {name: _cpu_s(p.pid) for name, p in children.procs.items()}
            busy0 = _machine_busy_s()
            if profile_dir is not None:
                profile_dir.mkdir(parents=True, exist_ok=True)
                spies = [
                    subprocess.Popen(  # noqa: ASYNC220 - started once, before the timing
                        [
                            str(Path(sys.executable).with_name("py-spy")),
                            "record",
                            "--pid",
                            str(p.pid),
                            "--format",
                            "raw",
                            "--rate",
                            "200",
                            "--nonblocking",
                            "-o",
                            str(profile_dir / f"{name}.txt"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for name, p in children.procs.items()
                ]
            t0 = time.perf_counter()
            at = datetime.now(UTC)
            for start in range(0, accruals, chunk):
                await client.send_many(
                    [
                        CommandEnvelope(
                            command_id=f"{run}-reward-{i}",
                            command=PayReward(
                                account_id=TREASURY,
                                to=f"acct-{i % accounts}",
                                amount=1_000_000 + i % 7,
                                task_id=f"task-{i}",
                                at=at,
                            ),
                            correlation_id=f"{run}-reward-{i}",
                            source="/bench/economy",
                        )
                        for i in range(start, min(accruals, start + chunk))
                    ]
                )
            sent_s = time.perf_counter() - t0
            # Polled on the 1,000-row accounts table, not by counting the growing ledger:
            # the poll must not take the CPU it measures.
            expected = sum(1_000_000 + i % 7 for i in range(accruals))
            while time.perf_counter() - t0 < 1800:
                if await conn.fetchval("SELECT to_regclass($1)", f"{run}.accounts"):
                    earned = await conn.fetchval(
                        f"SELECT coalesce(sum(earned), 0)::bigint FROM {run}.accounts"
                    )
                    if earned >= expected:
                        break
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - t0
            cpu = {name: _cpu_s(p.pid) - cpu0[name] for name, p in children.procs.items()}
            busy = _machine_busy_s() - busy0
            done = await conn.fetchval(
                f"SELECT count(*) FROM {run}.ledger_entries WHERE kind = 'reward'"
                " AND bucket = 'balance' AND amount > 0"
            )
        finally:
            for spy in spies:  # py-spy writes its profile on SIGINT
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                spy.wait(60)
            await conn.close()
        a0 = time.perf_counter()
        settings = Settings(
            kafka_bootstrap_servers=info.kafka_bootstrap_servers,
            database_url=info.database_url,
            redis_url=info.redis_url,
            topic_prefix=run,
            db_schema=run,
            redis_prefix=run,
        )
        async with open_operator(settings) as op:
            audit = await audit_ledger(op.kafka, op.topics, op.pool, op.schema)
        figures.update(
            sent_s=sent_s,
            accrued=done,
            elapsed_s=elapsed,
            accruals_per_s=done / elapsed if elapsed else 0.0,
            audit_s=time.perf_counter() - a0,
            audit_ok=audit.ok,
            cpu_ms_per_accrual={n: 1000 * c / max(done, 1) for n, c in cpu.items()},
            machine_ms_per_accrual=1000 * busy / max(done, 1),
            machine_busy_cores=busy / elapsed if elapsed else 0.0,
        )
    finally:
        await client.stop()
        children.stop_all()
    return figures


@app.command()
def main(
    accruals: Annotated[int, typer.Option(min=1, help="Reward accruals to run.")] = 100_000,
    accounts: Annotated[int, typer.Option(min=1, help="Accounts they go to.")] = 1_000,
    state_dir: Annotated[Path, typer.Option(help="Local stack state directory.")] = Path(
        ".swarmlog"
    ),
    processors: Annotated[int, typer.Option(min=1, help="Command processor copies.")] = 1,
    profile_dir: Annotated[
        Path | None, typer.Option(help="Record each role with py-spy into this directory.")
    ] = None,
) -> None:
    """Run the economy benchmark and print its figures."""
    f = asyncio.run(bench(accruals, accounts, state_dir, processors, profile_dir=profile_dir))
    console.rule("bench/economy")
    console.print(
        f"{f['accrued']} of {f['accruals']} accruals across {accounts} accounts in"
        f" {f['elapsed_s']:.1f} s = {f['accruals_per_s']:.0f} accruals/s end to end"
        f" (commands sent in {f['sent_s']:.1f} s; {processors} processor copies)"
    )
    console.print(
        "CPU per accrual (ms): "
        + ", ".join(f"{n} {ms:.2f}" for n, ms in f["cpu_ms_per_accrual"].items())
        + f"; whole machine {f['machine_ms_per_accrual']:.2f}"
        f" ({f['machine_busy_cores']:.2f} of {os.cpu_count()} cores busy)"
    )
    console.print(f"ledger audit: {'ok' if f['audit_ok'] else 'DIFFERS'} in {f['audit_s']:.2f} s")


if __name__ == "__main__":
    app()
