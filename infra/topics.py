"""Every Kafka topic swarmlog uses, declared once, and their idempotent creation.

The command topic, the command-outcome topic and every event topic have the same number
of partitions and are all keyed by aggregate id with Kafka's default partitioner
(murmur2), so they are co-partitioned: the events of the aggregates that command
partition p owns are in partition p of each event topic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

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
    #: None: the cluster's ``default.replication.factor`` (see :func:`ensure_topics`).
    replication_factor: int | None = None

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

    def specs(self, replication_factor: int | None = None) -> list[TopicSpec]:
        """Every topic with its configs; with ``replication_factor``, each also carries the
        ``min.insync.replicas`` that goes with it (:func:`min_insync_replicas`)."""
        isr = (
            {"min.insync.replicas": str(min_insync_replicas(replication_factor))}
            if replication_factor is not None
            else {}
        )
        store = {
            "retention.ms": FOREVER,
            "retention.bytes": FOREVER,
            "cleanup.policy": "delete",
            **isr,
        }
        week = {"retention.ms": WEEK_MS, "cleanup.policy": "delete", **isr}
        specs = [
            TopicSpec(self.commands, self.partitions, week),
            TopicSpec(self.outcomes, self.partitions, week),
            TopicSpec(self.deadletter, 1, {**store}),
            TopicSpec(self.coordination, 1, week),
        ]
        specs += [TopicSpec(t, self.partitions, store) for t in self.event_topics.values()]
        return specs


def min_insync_replicas(replication_factor: int) -> int:
    """The ``min.insync.replicas`` of a topic with ``replication_factor`` replicas: 2 from 3
    up (an acks=all write then survives the loss of any one broker, and one broker may be
    down with writes going on), else 1 (with 2, one broker down would stop every write)."""
    return 2 if replication_factor >= 3 else 1


async def cluster_replication_factor(admin: AIOKafkaAdminClient) -> int:
    """The cluster's ``default.replication.factor``, read with DescribeConfigs (KIP-133)
    from one broker the metadata lists. Raises RuntimeError if no broker answers with it
    (e.g. an ACL refuses DescribeConfigs: then set ``SWARMLOG_REPLICATION_FACTOR``)."""
    cluster = await admin.describe_cluster()
    brokers = cluster.get("brokers") or []
    if not brokers:
        raise RuntimeError("Kafka's metadata lists no broker")
    name = "default.replication.factor"
    resource = ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["node_id"]), {name: None})
    for response in await admin.describe_configs([resource]):
        for described in response.to_object()["resources"]:
            for entry in described["config_entries"]:
                if entry["config_names"] == name:
                    return int(entry["config_value"])
    raise RuntimeError(
        f"broker {brokers[0]['node_id']} did not describe {name} (not allowed to"
        " DescribeConfigs?): set SWARMLOG_REPLICATION_FACTOR"
    )


async def ensure_topics(bootstrap_servers: str, topics: Topics) -> list[str]:
    """Create every topic of ``topics`` that does not exist yet; return the names created.

    Each is created with ``topics.replication_factor`` replicas, or where that is None
    with the cluster's ``default.replication.factor`` (:func:`cluster_replication_factor`),
    and the ``min.insync.replicas`` that goes with it (:func:`min_insync_replicas`).
    Idempotent: existing topics are left as they are (a partition count that differs
    from the declaration raises RuntimeError, since co-partitioning depends on it).
    Raises RuntimeError with Kafka's message when the broker refuses a topic (e.g. a
    replication factor larger than the number of live brokers).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [s for s in topics.specs() if s.name not in existing]
        created: list[str] = []
        if wanted:
            replication_factor = topics.replication_factor or await cluster_replication_factor(
                admin
            )
            specs = {s.name: s for s in topics.specs(replication_factor)}
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=s.name,
                        num_partitions=s.partitions,
                        replication_factor=replication_factor,
                        topic_configs=specs[s.name].configs,
                    )
                    for s in wanted
                ]
            )
            refused = [
                (error[0], error[1], error[2] if len(error) > 2 else None)
                for error in response.topic_errors
                # another process may have won the race to create it
                if error[1] not in (0, TopicAlreadyExistsError.errno)
            ]
            if refused:
                topic, code, message = refused[0]
                name = for_code(code).__name__
                raise RuntimeError(
                    f"Kafka refused to create {len(refused)} topic(s), e.g. {topic} with"
                    f" replication factor {replication_factor}: {name}"
                    + (f" ({message})" if message else "")
                )
            # Not those another process created first (TopicAlreadyExists above).
            created = [error[0] for error in response.topic_errors if error[1] == 0]
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
