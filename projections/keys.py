"""The Redis keys the read models write and the API reads, spelled once.

Every key starts with the deployment's ``redis_prefix`` (``SWARMLOG_REDIS_PREFIX``), so
two swarmlogs (or two test runs) can share one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """The keys under ``prefix``: the earnings leaderboard (a sorted set, member = agent
    id, score = micro-tokens earned), stake by tier (a hash, field = tier, value =
    micro-tokens staked) and one hash per agent (its live fields)."""

    prefix: str

    @property
    def pattern(self) -> str:
        """A glob (``SCAN ... MATCH``) matching every key under ``prefix``: what removing
        a deployment's Redis views deletes."""
        return f"{self.prefix}:*"

    @property
    def leaderboard(self) -> str:
        """The earnings leaderboard: a sorted set of agent id -> micro-tokens earned."""
        return f"{self.prefix}:leaderboard:earnings"

    @property
    def stake_by_tier(self) -> str:
        """Micro-tokens staked per tier: a hash of tier -> micro-tokens."""
        return f"{self.prefix}:economy:stake_by_tier"

    def agent(self, agent_id: str) -> str:
        """The hash of one agent's live fields."""
        return f"{self.prefix}:agent:{agent_id}"
