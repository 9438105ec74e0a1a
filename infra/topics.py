"""Every Kafka topic swarmlog uses, declared once, and their idempotent creation.

The command topic, the command-outcome topic and every event topic have the same number
of partitions and are all keyed by aggregate id with Kafka's default partitioner
(murmur2), so they are co-partitioned: the events of the aggregates that command
partition p owns are in partition p of each event topic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from domain.registry import DECIDERS
from infra.settings import Settings

FOREVER = "-1"
WEEK_MS = str(7 * 24 * 3600 * 1000)


@dataclass(frozen=True)
class TopicSpec:
    """A topic's name, partition count and topic-level configs."""

    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    """The topic names for one deployment, all under ``prefix``.

    ``events[aggregate_type]`` are the stores (retained forever); ``commands`` and
    ``outcomes`` keep a week (the window in which a repeated command id is recognised);
    ``deadletter`` keeps what could not be read, forever, with the reason.
    """

    prefix: str = "swarm"
    partitions: int = 3
    replication_factor: int = 1

    @classmethod
    def of(cls, settings: Settings) -> Topics:
        """The topics of the deployment ``settings`` describe."""
        return cls(
            prefix=settings.topic_prefix,
            partitions=settings.partitions,
            replication_factor=settings.replication_factor,
        )

    @property
    def commands(self) -> str:
        """The command topic (keyed by aggregate id)."""
        return f"{self.prefix}.commands"

    @property
    def outcomes(self) -> str:
        """The command-outcome topic (keyed by aggregate id, co-partitioned)."""
        return f"{self.prefix}.command-outcomes"

    @property
    def deadletter(self) -> str:
        """The dead-letter topic: records that could not be read, with the reason."""
        return f"{self.prefix}.deadletter"

    @property
    def coordination(self) -> str:
        """One partition; the process managers' leader is whoever the group gives it to."""
        return f"{self.prefix}.coordination"

    def events(self, aggregate_type: str) -> str:
        """The event topic of ``aggregate_type`` (``swarm.task.events``)."""
        return f"{self.prefix}.{aggregate_type}.events"

    @property
    def event_topics(self) -> dict[str, str]:
        """Aggregate type -> event topic, for every aggregate."""
        return {name: self.events(name) for name in sorted(DECIDERS)}

    def specs(self) -> list[TopicSpec]:
        """Every topic with its configs."""
        isr = "2" if self.replication_factor >= 3 else "1"
        store = {
            "retention.ms": FOREVER,
            "retention.bytes": FOREVER,
            "cleanup.policy": "delete",
            "min.insync.replicas": isr,
        }
        week = {"retention.ms": WEEK_MS, "cleanup.policy": "delete", "min.insync.replicas": isr}
        specs = [
            TopicSpec(self.commands, self.partitions, week),
            TopicSpec(self.outcomes, self.partitions, week),
            TopicSpec(self.deadletter, 1, {**store}),
            TopicSpec(self.coordination, 1, week),
        ]
        specs += [TopicSpec(t, self.partitions, store) for t in self.event_topics.values()]
        return specs


async def ensure_topics(bootstrap_servers: str, topics: Topics) -> list[str]:
    """Create every topic of ``topics`` that does not exist yet; return the names created.

    Idempotent: existing topics are left as they are (a partition count that differs
    from the declaration raises RuntimeError, since co-partitioning depends on it).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [s for s in topics.specs() if s.name not in existing]
        created: list[str] = []
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race
                await admin.create_topics(
                    [
                        NewTopic(
                            name=s.name,
                            num_partitions=s.partitions,
                            replication_factor=topics.replication_factor,
                            topic_configs=s.configs,
                        )
                        for s in wanted
                    ]
                )
            created = [s.name for s in wanted]
        present = [s for s in topics.specs() if s.name in existing]
        if present:
            described = await admin.describe_topics([s.name for s in present])
            counts = {d["topic"]: len(d["partitions"]) for d in described}
            for s in present:
                if counts.get(s.name, s.partitions) != s.partitions:
                    raise RuntimeError(
                        f"topic {s.name} has {counts[s.name]} partitions, declared {s.partitions}"
                    )
        return created
    finally:
        await admin.close()
