"""An SDK agent as a process of its own, for end-to-end tests that kill it with SIGKILL.

``python -m tests.e2e.sdk_agent BASE_URL AGENT_ID`` runs a :class:`sdk.Worker` with the
capability ``echo`` whose handler reports progress 0.1 and then works forever: a task it
takes stays running until the process is killed (or its run timeout).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sdk import TaskContext, Worker


async def _forever(ctx: TaskContext) -> tuple[dict[str, Any], float]:
    await ctx.progress(0.1, "working")
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def main(base_url: str, agent_id: str) -> None:
    """Run the agent until the process is killed."""
    worker = Worker(
        base_url,
        agent_id=agent_id,
        name=f"forever {agent_id}",
        capabilities={"echo": 1.0},
        handler=_forever,
        heartbeat_interval_s=1.0,
    )
    await worker.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
