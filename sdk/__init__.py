"""The Python client for swarmlog agents: HTTP commands and queries, SSE assignment streams.

Only the public HTTP API is used, so an agent in any language can do the same::

    from sdk import Worker

    async def handler(task):
        await task.progress(0.5, "halfway")
        return {"answer": 42}, 0.9          # (result, quality in [0, 1])

    await Worker("http://localhost:8000", agent_id="a1", name="demo",
                 capabilities={"python": 0.9}, handler=handler).run(stop_event)
"""

from sdk.client import SwarmClient
from sdk.errors import (
    DeadlineExceeded,
    NonRetryableError,
    SwarmConnectionError,
    SwarmError,
    TaskRevoked,
)
from sdk.models import Assignment, CommandResult, TaskPage
from sdk.worker import HandlerResult, Reconciliation, TaskContext, Worker

__all__ = [
    "Assignment",
    "CommandResult",
    "DeadlineExceeded",
    "HandlerResult",
    "NonRetryableError",
    "Reconciliation",
    "SwarmClient",
    "SwarmConnectionError",
    "SwarmError",
    "TaskContext",
    "TaskPage",
    "TaskRevoked",
    "Worker",
]
