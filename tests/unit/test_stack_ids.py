"""The local stack's KRaft cluster id never starts with '-' (the storage tool's command
line would take it for an option and refuse to format: a 1-in-64 start-up failure)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from infra import stack


def test_a_cluster_id_that_would_start_with_a_dash_is_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    draws: Iterator[uuid.UUID] = iter(
        [uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x00" + bytes(15))]
    )
    monkeypatch.setattr(stack.uuid, "uuid4", lambda: next(draws))
    assert stack._cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"


def test_cluster_ids_are_kafka_uuids() -> None:
    ids = {stack._cluster_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
