"""Every aggregate's decider, by aggregate type."""

from __future__ import annotations

from typing import Any

from domain.agent import AGENT_DECIDER
from domain.messages import Decider
from domain.task import TASK_DECIDER

DECIDERS: dict[str, Decider[Any, Any, Any]] = {
    AGENT_DECIDER.aggregate_type: AGENT_DECIDER,
    TASK_DECIDER.aggregate_type: TASK_DECIDER,
}
