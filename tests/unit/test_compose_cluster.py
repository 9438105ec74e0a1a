"""docker-compose.cluster.yml, merged over docker-compose.yml as ``docker compose -f
docker-compose.yml -f docker-compose.cluster.yml`` merges it, lays out the same cluster
as ``swarmlog up --brokers 3``: three KRaft nodes voting, one cluster id, every broker
setting the local cluster has, and every role given all three brokers. (No Docker engine
runs these files here; this keeps them from drifting apart from infra/stack.py.)
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

from infra.stack import _BrokerPaths, _write_kafka_config

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("processor", "streams", "projector", "api")
NODES = {"kafka": 1, "kafka-2": 2, "kafka-3": 3}


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of mappings (key by key, the override winning); others replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def _services() -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    cluster = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())
    merged: dict[str, Any] = _merge(base, cluster)["services"]
    return merged


def _local_cluster_properties(tmp_path: Path) -> dict[str, str]:
    paths = _BrokerPaths(tmp_path, 2)
    paths.dir.mkdir()
    _write_kafka_config(paths, 3, 9092, 9093, "1@h:1,2@h:2,3@h:3")
    lines = paths.properties.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


def test_the_three_nodes_share_one_cluster_id_and_vote_in_one_quorum() -> None:
    services = _services()
    envs = {name: services[name]["environment"] for name in NODES}

    assert {env["KAFKA_NODE_ID"] for env in envs.values()} == {1, 2, 3}
    assert len({env["CLUSTER_ID"] for env in envs.values()}) == 1
    cluster_id = envs["kafka"]["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "not a KRaft cluster id"
    voters = {f"{node}@{name}:9093" for name, node in NODES.items()}
    for name, env in envs.items():
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert env["KAFKA_NODE_ID"] == NODES[name]
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert services[name]["image"] == services["kafka"]["image"]
        assert "healthcheck" in services[name]


def test_every_node_has_the_broker_settings_of_the_local_cluster(tmp_path: Path) -> None:
    local = _local_cluster_properties(tmp_path)
    shared = [
        "process.roles",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "default.replication.factor",
        "min.insync.replicas",
        "unclean.leader.election.enable",
        "group.initial.rebalance.delay.ms",
        "num.partitions",
        "auto.create.topics.enable",
    ]
    assert local["default.replication.factor"] == "3" and local["min.insync.replicas"] == "2"
    services = _services()

    for name in NODES:
        env = services[name]["environment"]
        compose = {key: str(env.get("KAFKA_" + key.upper().replace(".", "_"))) for key in shared}
        assert compose == {key: local[key] for key in shared}, name


def test_every_role_is_given_all_three_brokers_and_waits_for_them() -> None:
    services = _services()

    for role in ROLES:
        bootstrap = services[role]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
        assert set(bootstrap.split(",")) == {f"{name}:9092" for name in NODES}, role
        assert set(services[role]["depends_on"]) >= set(NODES), role
        # What the base file gives every role is kept.
        assert services[role]["environment"]["DATABASE_URL"].startswith("postgresql://")
