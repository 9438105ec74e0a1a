"""Read-model queries: every SQL statement the API runs against the projector's tables,
gathered from the read models that own them (projections/readmodels/, the queries at the
end of each module) so the API has one place to import them from.

Each function takes an asyncpg pool or connection (``Db``) and the schema name (checked
with ``checked_schema``, since it is interpolated), and returns plain dicts keyed by
column (JSON columns decoded, money as integer micro-tokens). Pagination is keyset: each
list function takes the sort key of the last row already seen (``after``) and returns at
most ``limit`` rows after it, in a fixed total order.
"""

from __future__ import annotations

from projections.db import Db
from projections.offsets import projected_offsets, unreached
from projections.readmodels.accounts import (
    account_ledger,
    economy_summary,
    get_account,
    stakes,
)
from projections.readmodels.agents import get_agent, list_agents
from projections.readmodels.archive import aggregate_history
from projections.readmodels.dead_letters import find_dead_letters, list_dead_letters
from projections.readmodels.proposals import economy_parameters, get_proposal, list_proposals
from projections.readmodels.tasks import get_task, list_tasks
from projections.readmodels.workflows import (
    get_run,
    get_template,
    get_workflow,
    list_runs,
    list_templates,
    list_workflows,
)

__all__ = [
    "Db",
    "account_ledger",
    "aggregate_history",
    "economy_parameters",
    "economy_summary",
    "find_dead_letters",
    "get_account",
    "get_agent",
    "get_proposal",
    "get_run",
    "get_task",
    "get_template",
    "get_workflow",
    "list_agents",
    "list_dead_letters",
    "list_proposals",
    "list_runs",
    "list_tasks",
    "list_templates",
    "list_workflows",
    "ping",
    "projected_offsets",
    "stakes",
    "unreached",
]


async def ping(db: Db) -> None:
    """Raise if PostgreSQL does not answer ``select 1``."""
    await db.fetchval("SELECT 1")
