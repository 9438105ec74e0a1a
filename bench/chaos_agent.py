"""One agent of bench/chaos: an SDK worker whose work is a short seeded sleep.

Run by ``bench.chaos`` as a process of its own, so that it can be killed with SIGKILL and
started again under the same agent id (the worker then reconciles with the server and
hands back what its dead process held). Usable alone::

    python -m bench.chaos_agent --api http://127.0.0.1:8000 --agent-id chaos-agent-0
"""

from __future__ import annotations

import asyncio
import random
import signal
from typing import Annotated, Any

import typer

from sdk import TaskContext, Worker

app = typer.Typer(add_completion=False)

CAPABILITY = "chaos"
"""The capability every chaos task requires and every chaos agent has."""


@app.command()
def main(
    api: Annotated[str, typer.Option(help="Base URL of the swarmlog API.")],
    agent_id: Annotated[str, typer.Option(help="Agent id (also its name).")],
    max_concurrent: Annotated[int, typer.Option(min=1, help="Tasks run at once.")] = 4,
    work_ms: Annotated[
        int, typer.Option(min=0, help="Most milliseconds a task's work takes (uniform 0..N).")
    ] = 200,
    heartbeat_s: Annotated[float, typer.Option(min=0.1, help="Seconds between heartbeats.")] = 1.0,
) -> None:
    """Run one chaos agent until SIGTERM: each task reports progress once, sleeps up to
    ``--work-ms`` milliseconds and completes with ``{"by": <agent id>}`` at quality 1."""
    rng = random.Random(agent_id)

    async def handle(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        await ctx.progress(0.5, "working")
        await asyncio.sleep(rng.uniform(0, work_ms) / 1000)
        return {"by": agent_id}, 1.0

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(
            api,
            agent_id=agent_id,
            name=agent_id,
            capabilities={CAPABILITY: 1.0},
            handler=handle,
            max_concurrent_tasks=max_concurrent,
            heartbeat_interval_s=heartbeat_s,
        )
        await worker.run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    app()
