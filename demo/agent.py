"""One demo agent process: an SDK worker that does the demo workflow's tasks
(discover a package's modules, analyse one module, rank the findings: demo/workflow.py).

Run by ``swarmlog demo`` (one process per agent, so that one can be killed with
SIGKILL mid-run); usable alone::

    python -m demo.agent --api http://127.0.0.1:8000 --name ada --capability python=0.9
"""

from __future__ import annotations

import asyncio
import signal
from typing import Annotated, Any

import typer

from demo.workflow import handle as do_task
from sdk import TaskContext, Worker

app = typer.Typer(add_completion=False)


def _capabilities(values: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for value in values:
        name, sep, level = value.partition("=")
        try:
            out[name] = float(level) if sep else 1.0
        except ValueError:
            raise typer.BadParameter(
                f"--capability {value!r}: expected NAME=LEVEL, LEVEL in [0, 1]"
            ) from None
    return out


@app.command()
def main(
    api: Annotated[str, typer.Option(help="Base URL of the swarmlog API.")],
    name: Annotated[str, typer.Option(help="Agent name (also its id unless --agent-id).")],
    capability: Annotated[
        list[str], typer.Option(help="NAME=LEVEL with LEVEL in [0, 1]; repeat for several.")
    ],
    agent_id: Annotated[str | None, typer.Option(help="Agent id (default: the name).")] = None,
    max_concurrent: Annotated[int, typer.Option(min=1, help="Tasks run at once.")] = 1,
    cost: Annotated[str, typer.Option(help="Cost per task, in tokens (decimal string).")] = "0",
    pace_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="Extra think time per task in milliseconds, so a person can "
            "watch the swarm (the analysis itself takes a few ms).",
        ),
    ] = 0,
) -> None:
    """Run one agent until SIGTERM."""
    caps = _capabilities(capability)

    async def handle(ctx: TaskContext) -> tuple[dict[str, Any], float]:
        await ctx.progress(0.1, ctx.type)
        result = await asyncio.to_thread(do_task, ctx.type, ctx.payload)
        if pace_ms:
            await asyncio.sleep(pace_ms / 1000)
        await ctx.progress(0.9, "reporting")
        return result, 1.0

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        worker = Worker(
            api,
            agent_id=agent_id or name,
            name=name,
            capabilities=caps,
            handler=handle,
            max_concurrent_tasks=max_concurrent,
            cost_per_task=cost,
            heartbeat_interval_s=1.0,
        )
        await worker.run(stop)

    asyncio.run(run())


if __name__ == "__main__":
    app()
