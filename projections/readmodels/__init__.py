"""Every read model, registered once: a module per read model (its tables, how a batch of
events changes them, its Redis view and its queries), listed here in the order the
projector applies them in each batch's transaction (also the order rows are locked in,
which keeps concurrent projectors deadlock-free).

To add a read model: write its module (a ``ReadModel`` subclass with ``name``, ``ddl``,
``apply`` and, if it keeps a Redis view, ``sync_redis``; its row logic as pure functions
in projections/views.py) and add its class to ``READ_MODELS``. ``projections.schema.
migrate`` creates its tables, the projector applies it, and the event archive records the
events it applied.
"""

from __future__ import annotations

from projections.readmodels.accounts import Accounts
from projections.readmodels.agents import Agents
from projections.readmodels.archive import EventArchive
from projections.readmodels.base import Applied, ReadModel
from projections.readmodels.dead_letters import DeadLetters
from projections.readmodels.proposals import Proposals
from projections.readmodels.tasks import Tasks
from projections.readmodels.workflows import Workflows

__all__ = [
    "READ_MODELS",
    "Applied",
    "DeadLetters",
    "EventArchive",
    "ReadModel",
]

#: The read models of the event topics, in the order they are applied.
READ_MODELS: tuple[type[ReadModel], ...] = (Agents, Tasks, Accounts, Proposals, Workflows)
