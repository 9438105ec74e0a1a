"""Every aggregate's decider, by aggregate type."""

from __future__ import annotations

from typing import Any

from domain.account import ACCOUNT_DECIDER
from domain.agent import AGENT_DECIDER
from domain.messages import Decider
from domain.proposal import PROPOSAL_DECIDER
from domain.task import TASK_DECIDER
from domain.workflow import TEMPLATE_DECIDER, WORKFLOW_DECIDER
from domain.workflow_run import RUN_DECIDER

DECIDERS: dict[str, Decider[Any, Any, Any]] = {
    AGENT_DECIDER.aggregate_type: AGENT_DECIDER,
    TASK_DECIDER.aggregate_type: TASK_DECIDER,
    ACCOUNT_DECIDER.aggregate_type: ACCOUNT_DECIDER,
    PROPOSAL_DECIDER.aggregate_type: PROPOSAL_DECIDER,
    WORKFLOW_DECIDER.aggregate_type: WORKFLOW_DECIDER,
    TEMPLATE_DECIDER.aggregate_type: TEMPLATE_DECIDER,
    RUN_DECIDER.aggregate_type: RUN_DECIDER,
}
