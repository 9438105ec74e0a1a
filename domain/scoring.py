"""How well an agent fits a task: the scheduler's scoring and ordering policy.

The score is a weighted mean of five terms, each in [0, 1]:

- skill: the mean of the agent's levels in the task's required capabilities
  (1.0 when the task requires none);
- reliability: the agent's success rate over its history, with Laplace smoothing,
  ``(completed + 1) / (completed + failed + 2)`` (rule of succession), so a new
  agent starts at 0.5 rather than 0 or 1;
- headroom: ``1 - load / max_concurrent_tasks``, spreading work;
- thrift: ``1 - cost / max_cost`` when the task caps the cost, else
  ``1 / (1 + cost / 1 token)``, preferring cheaper agents;
- standing: the agent's staking tier (domain/economy.py), none 0 .. diamond 1 in equal
  steps, so stake raises an agent's standing in assignment. Its weight is small: it
  decides between agents that otherwise fit about equally well.

Priority aging: a queued task rises one priority level for every ``aging_interval_s``
seconds it has waited, so low priority work is never starved.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.messages import MICRO

WEIGHTS = {"skill": 0.45, "reliability": 0.25, "headroom": 0.2, "thrift": 0.1, "standing": 0.1}
_TOTAL = sum(WEIGHTS.values())
STANDING = {"none": 0.0, "bronze": 0.2, "silver": 0.4, "gold": 0.6, "platinum": 0.8, "diamond": 1.0}


@dataclass(frozen=True)
class Candidate:
    """What the scorer needs of an agent (``cost_per_task`` in micro-tokens)."""

    capabilities: dict[str, float]
    max_concurrent_tasks: int
    load: int
    cost_per_task: int
    completed: int
    failed: int
    tier: str = "none"


def eligible(agent: Candidate, required: tuple[str, ...], max_cost: int | None) -> bool:
    """True when ``agent`` has every required capability (level > 0), a free slot, and a
    cost within ``max_cost`` (micro-tokens; None = any)."""
    if agent.load >= agent.max_concurrent_tasks:
        return False
    if max_cost is not None and agent.cost_per_task > max_cost:
        return False
    return all(agent.capabilities.get(c, 0.0) > 0.0 for c in required)


def score(agent: Candidate, required: tuple[str, ...], max_cost: int | None) -> float:
    """The agent's fitness for a task in [0, 1]: the weighted mean of the module
    docstring's terms."""
    skill = (
        sum(agent.capabilities.get(c, 0.0) for c in required) / len(required) if required else 1.0
    )
    reliability = (agent.completed + 1) / (agent.completed + agent.failed + 2)
    headroom = 1.0 - agent.load / agent.max_concurrent_tasks
    if max_cost:
        thrift = 1.0 - agent.cost_per_task / max_cost
    else:
        thrift = 1.0 / (1.0 + agent.cost_per_task / MICRO)
    return (
        WEIGHTS["skill"] * skill
        + WEIGHTS["reliability"] * reliability
        + WEIGHTS["headroom"] * headroom
        + WEIGHTS["thrift"] * thrift
        + WEIGHTS["standing"] * STANDING.get(agent.tier, 0.0)
    ) / _TOTAL


def effective_priority(rank: int, waited_s: float, aging_interval_s: float) -> float:
    """Priority rank (low=0 .. critical=4) plus one level per ``aging_interval_s`` waited."""
    if aging_interval_s <= 0:
        return float(rank)
    return rank + max(0.0, waited_s) / aging_interval_s
