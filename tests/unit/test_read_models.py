"""The read-model registry (projections/readmodels/): every read model is declared once,
with tables of its own, and a dead letter the projector writes always fits in a Kafka
request whatever the record it is for."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from infra.deadletter_records import encode_dead_letter
from projections.keys import RedisKeys
from projections.readmodels import READ_MODELS, Applied, DeadLetters, EventArchive
from projections.schema import ddl

TABLE = re.compile(r"CREATE (?:TABLE IF NOT EXISTS|OR REPLACE VIEW) \{s\}\.(\w+)")


def test_every_read_model_has_its_own_name_and_tables() -> None:
    declared = [*READ_MODELS, EventArchive, DeadLetters]
    names = [m.name for m in declared]
    assert len(set(names)) == len(names), names
    owners: dict[str, str] = {}
    for model in declared:
        tables = TABLE.findall(model.ddl)
        assert tables, f"{model.name} declares no table"
        for table in tables:
            assert table not in owners, f"{table} declared by {owners[table]} and {model.name}"
            owners[table] = model.name
    assert {"agent_rows", "tasks", "accounts", "proposals", "workflows", "events"} <= set(owners)


def test_the_schema_ddl_creates_every_registered_read_model_in_the_schema() -> None:
    text = ddl("s_test")
    assert text.startswith("CREATE SCHEMA IF NOT EXISTS s_test;")
    assert "projection_offsets" in text
    for model in [*READ_MODELS, EventArchive, DeadLetters]:
        assert model.ddl.format(s="s_test") in text
    assert "{s}" not in text
    with pytest.raises(ValueError):
        ddl("s; DROP TABLE x")


def test_read_models_are_built_per_schema_and_keys() -> None:
    models = [m("s_test", RedisKeys("p")) for m in READ_MODELS]
    assert [m.schema for m in models] == ["s_test"] * len(READ_MODELS)
    assert all(m.keys == RedisKeys("p") for m in models)


def test_applied_merges_events_in_order_and_redis_ids_by_read_model() -> None:
    a = Applied(["e1"], {"agents": {"a1"}})
    a.merge(Applied(["e2"], {"agents": {"a2"}, "accounts": {"x"}}))
    assert a.events == ["e1", "e2"]
    assert a.redis == {"agents": {"a1", "a2"}, "accounts": {"x"}}


def test_a_dead_letter_of_the_worst_record_fits_in_a_kafka_request() -> None:
    # Every field of the record as long as can be and escaped six-fold in JSON (a control
    # character is written \u0001): encode_dead_letter cuts what it quotes, so the
    # projector needs no fallback for a letter too large to send (1 MiB request limit).
    x = "\x01"
    record = SimpleNamespace(
        topic=x * 100_000,
        partition=2**62,
        offset=2**62,
        key=(x * 100_000).encode(),
        value=(x * 2_000_000).encode(),
        headers=[(f"{i}{x * 1000}", (x * 10_000).encode()) for i in range(100)],
    )
    reason = f"projection refused task.submitted 'k': DataError: {x * 100_000}"
    letter = encode_dead_letter("t-deadletter", record, reason, datetime.now(UTC))
    size = len(letter.value) + len(letter.key or b"")
    size += sum(len(k) + len(v or b"") for k, v in letter.headers)
    assert size < 900_000
