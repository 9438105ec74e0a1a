"""The producers' cached partitioner puts every key where aiokafka's default (and the
Java client) would, so the command, outcome and event topics stay co-partitioned."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from infra.kafka import CachedPartitioner


def test_every_key_goes_to_the_default_partitioners_partition_before_and_after_a_clear() -> None:
    cached = CachedPartitioner(size=10)  # cleared many times over
    for _ in range(2):
        for i in range(300):
            key = f"acct-{i}".encode()
            for n in (1, 3, 12):
                partitions = list(range(n))
                assert cached(key, partitions, partitions) == DefaultPartitioner()(
                    key, partitions, partitions
                )
