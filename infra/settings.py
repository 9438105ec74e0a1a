"""Configuration: one pydantic-settings ``Settings`` read from the environment.

Every variable is prefixed ``SWARMLOG_`` except the three service URLs, which use the
names the rest of the ecosystem uses (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``,
``REDIS_URL``). Where those three are set, ``swarmlog up`` starts nothing and uses them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All knobs of a swarmlog process; times are in seconds unless the name says ``_ms``."""

    model_config = SettingsConfigDict(env_prefix="SWARMLOG_", extra="ignore")

    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "KAFKA_BOOTSTRAP_SERVERS", "SWARMLOG_KAFKA_BOOTSTRAP_SERVERS"
        ),
    )
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "SWARMLOG_DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "SWARMLOG_REDIS_URL")
    )

    state_dir: Path = Path(".swarmlog")
    #: Prefix of every topic, consumer group and transactional id; tests use a fresh one each.
    topic_prefix: str = "swarm"
    #: PostgreSQL schema holding the read models; tests use a fresh one each.
    db_schema: str = "swarmlog"
    #: Prefix of every Redis key.
    redis_prefix: str = "swarmlog"
    #: Partitions of the command topic and of every event topic (they are co-partitioned).
    partitions: int = 3
    #: Replication factor of the topics swarmlog creates; None (the default) takes the
    #: cluster's ``default.replication.factor`` (1 on `swarmlog up`'s single node, 3 on
    #: `swarmlog up --brokers 3`). Their ``min.insync.replicas`` is 2 from 3 replicas up,
    #: else 1. More than the live brokers is refused by Kafka (infra/topics.py says so).
    replication_factor: int | None = Field(default=None, ge=1)

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    #: API processes sharing the port (uvicorn workers); 1 serves from the CLI's process.
    api_workers: int = 1
    #: How long a command route waits for the decider's outcome before answering 202.
    command_wait_s: float = 5.0
    #: Most SSE clients one API process serves before answering 503.
    sse_max_clients: int = 200
    #: How long an SSE send may block before the client is dropped.
    sse_send_timeout_s: float = 10.0
    #: Most bytes a request body may have (counted as it streams in): beyond, a 413.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: Bytes of recent records each shared SSE consumer (one per stream layout and API
    #: process) keeps for its clients (~2.9 KB an event); a client left behind is dropped
    #: and resumes with Last-Event-ID. A record counts its key, value and headers plus
    #: the Python objects holding them (infra/kafka.record_bytes).
    sse_window_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    #: Bytes of recent command outcomes an API process keeps for ``GET /commands/{id}``
    #: (~2.4 KB an outcome, counted as for ``sse_window_bytes``); a command waiting for
    #: its outcome gets it whatever this is.
    client_outcome_cache_bytes: int = Field(default=32 * 1024 * 1024, gt=0)

    #: Scheduler: how often it looks for work, and how aging lifts old work by one priority.
    scheduler_tick_s: float = 0.2
    aging_interval_s: float = 30.0
    #: An agent with no heartbeat for this long is marked offline.
    heartbeat_timeout_s: float = 15.0
    #: API: a heartbeat counts from the ``sent_at`` its agent says, but never from more
    #: than this many seconds before the API took it up (a slow or wrong agent clock).
    heartbeat_max_skew_s: float = Field(default=5.0, ge=0)
    #: Economy: a command not answered by an event within this long is sent again (same id).
    economy_resend_s: float = 10.0
    #: Workflow engine: the same, for the commands it sends.
    workflow_resend_s: float = 30.0

    projector_batch_size: int = 500

    #: Command processor: bytes of recent command outcomes kept in memory to answer a
    #: repeated command id at once; older ones are read back from the outcome topic.
    processor_outcome_cache_bytes: int = 8 * 1024 * 1024
    #: Largest Kafka record the command processor writes (key, value, headers and batch
    #: overhead, as aiokafka counts it against max_request_size): aiokafka's default
    #: max_request_size, under the broker's default message.max.bytes (1 MiB + 12). An
    #: event over it is a ``too_large`` rejection; an outcome over it loses its state.
    #: Between 64 KiB and 1 MiB: the producers keep aiokafka's 1 MiB max_request_size.
    record_max_bytes: int = Field(default=1024 * 1024, ge=64 * 1024, le=1024 * 1024)

    def require_services(self) -> tuple[str, str, str]:
        """Return (kafka, database, redis) URLs, or raise RuntimeError naming the missing one."""
        missing = [
            name
            for name, value in (
                ("KAFKA_BOOTSTRAP_SERVERS", self.kafka_bootstrap_servers),
                ("DATABASE_URL", self.database_url),
                ("REDIS_URL", self.redis_url),
            )
            if not value
        ]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} not set: run `swarmlog up` and `eval $(swarmlog env)`,"
                " or set them to running services"
            )
        assert self.kafka_bootstrap_servers and self.database_url and self.redis_url
        return self.kafka_bootstrap_servers, self.database_url, self.redis_url
