"""bench/economy: reward accruals end to end, and the ledger audit's time. Prints figures;
asserts nothing.

Against the real processes (processor, streams, projector as child processes) on the
local stack or the services the environment names: ``--accruals`` ``PayReward``
commands from the treasury to ``--accounts`` accounts go on the command topic; each is
decided (the treasury's debit), credited by the economy process manager
(``RewardAccrued``) and projected. accruals/s = accruals / (first command sent -> last
credit in the ledger read model). Then ``swarmlog audit ledger``'s check runs once and
is timed.

Every reward is debited from the one treasury aggregate, so the debits are decided in
one command partition, in order: that partition is the ceiling of this figure.

Run: ``eval "$(swarmlog up)"; python -m bench.economy --accruals 100000 --accounts 1000``.
"""

from __future__ import annotations

import asyncio
import os
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
from demo.swarm import Children
from domain.account import MintTokens, PayReward
from domain.economy import TREASURY
from infra import stack
from infra.audit import audit_ledger
from infra.codec import CommandEnvelope
from infra.topics import Topics, ensure_topics

app = typer.Typer(add_completion=False)
console = Console()


async def bench(
    accruals: int, accounts: int, state_dir: Path, processors: int = 1, chunk: int = 2000
) -> dict[str, Any]:
    """Run the benchmark and return its figures."""
    info = stack.up(state_dir, console=Console(stderr=True))
    run = f"econ{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": info.kafka_bootstrap_servers,
        "DATABASE_URL": info.database_url,
        "REDIS_URL": info.redis_url,
        "SWARMLOG_TOPIC_PREFIX": run,
        "SWARMLOG_DB_SCHEMA": run,
        "SWARMLOG_REDIS_PREFIX": run,
        "SWARMLOG_SCHEDULER_TICK_S": "0.02",
        "SWARMLOG_PROJECTOR_BATCH_SIZE": "2000",
    }
    topics = Topics(prefix=run)
    await ensure_topics(info.kafka_bootstrap_servers, topics)
    log_dir = state_dir / "bench" / run
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir=log_dir)
    figures: dict[str, Any] = {"run": run, "accruals": accruals, "accounts": accounts}
    client = CommandClient(info.kafka_bootstrap_servers, topics)
    try:
        for i in range(processors):  # copies share the command partitions (one core each)
            children.start(f"processor-{i}", [sys.executable, "-m", "infra.cli", "processor"], env)
        for role in ("streams", "projector"):
            children.start(role, [sys.executable, "-m", "infra.cli", role], env)
        await client.start()
        await asyncio.sleep(8.0)  # roles join their groups and rebuild their views
        # Set-up, not timed: the treasury mints the whole budget once, so no reward mints.
        [minted] = await client.execute_many([
            CommandEnvelope(command_id=f"{run}-mint", correlation_id=f"{run}-mint",
                            command=MintTokens(account_id=TREASURY, amount=accruals * 2_000_000,
                                               at=datetime.now(UTC)),
                            source="/bench/economy")
        ], 30.0)
        if minted is None or minted.status != "accepted":
            raise RuntimeError(f"the treasury could not mint the budget: {minted}")
        conn = await asyncpg.connect(info.database_url)
        try:
            t0 = time.perf_counter()
            at = datetime.now(UTC)
            for start in range(0, accruals, chunk):
                await client.send_many([
                    CommandEnvelope(
                        command_id=f"{run}-reward-{i}",
                        command=PayReward(account_id=TREASURY, to=f"acct-{i % accounts}",
                                          amount=1_000_000 + i % 7, task_id=f"task-{i}", at=at),
                        correlation_id=f"{run}-reward-{i}",
                        source="/bench/economy",
                    )
                    for i in range(start, min(accruals, start + chunk))
                ])
            sent_s = time.perf_counter() - t0
            done = 0
            while time.perf_counter() - t0 < 1800:
                done = await conn.fetchval(
                    f"SELECT count(*) FROM {run}.ledger_entries WHERE kind = 'reward'"
                    " AND bucket = 'balance' AND amount > 0"
                ) if await conn.fetchval("SELECT to_regclass($1)", f"{run}.ledger_entries") else 0
                if done >= accruals:
                    break
                await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - t0
        finally:
            await conn.close()
        a0 = time.perf_counter()
        audit = await audit_ledger(info.kafka_bootstrap_servers, topics, info.database_url, run)
        figures.update(
            sent_s=sent_s, accrued=done, elapsed_s=elapsed,
            accruals_per_s=done / elapsed if elapsed else 0.0,
            audit_s=time.perf_counter() - a0, audit_ok=audit.ok,
        )
    finally:
        await client.stop()
        children.stop_all()
    return figures


@app.command()
def main(
    accruals: Annotated[int, typer.Option(min=1, help="Reward accruals to run.")] = 100_000,
    accounts: Annotated[int, typer.Option(min=1, help="Accounts they go to.")] = 1_000,
    state_dir: Annotated[Path, typer.Option(help="Local stack state directory.")] = Path(".swarmlog"),
    processors: Annotated[int, typer.Option(min=1, help="Command processor copies.")] = 1,
) -> None:
    """Run the economy benchmark and print its figures."""
    f = asyncio.run(bench(accruals, accounts, state_dir, processors))
    console.rule("bench/economy")
    console.print(f"{f['accrued']} of {f['accruals']} accruals across {accounts} accounts in"
                  f" {f['elapsed_s']:.1f} s = {f['accruals_per_s']:.0f} accruals/s end to end"
                  f" (commands sent in {f['sent_s']:.1f} s; {processors} processor copies)")
    console.print(f"ledger audit: {'ok' if f['audit_ok'] else 'DIFFERS'} in {f['audit_s']:.2f} s")


if __name__ == "__main__":
    app()
