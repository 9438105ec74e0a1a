"""The processor's memory of decided command ids: bounded by a byte budget (the outcome
cache) and by what the outcome topic retains (the digests), never by uptime."""

from __future__ import annotations

from dataclasses import dataclass

from commands.idempotency import (
    CACHE_ENTRY_OVERHEAD,
    DecidedCommands,
    OutcomeCache,
    command_digest,
    command_memory_bytes,
    outcome_subject,
    pack_position,
    unpack_position,
)


def test_the_outcome_cache_never_holds_more_than_its_byte_budget_and_evicts_the_least_recent() -> (
    None
):
    cache = OutcomeCache(budget_bytes=3 * (100 + CACHE_ENTRY_OVERHEAD))
    for i in range(3):
        cache.put(command_digest(f"c{i}"), bytes(100))
    cache.get(command_digest("c0"))  # c0 is now the most recently used

    cache.put(command_digest("c3"), bytes(100))

    assert cache.get(command_digest("c1")) is None
    assert cache.get(command_digest("c0")) is not None
    assert len(cache) == 3 and cache.used_bytes <= cache.budget_bytes
    for i in range(10_000):
        cache.put(command_digest(f"more-{i}"), bytes(i % 500))
        assert cache.used_bytes <= cache.budget_bytes


def test_a_value_larger_than_the_whole_budget_is_not_cached_and_replacing_keeps_the_count_right() -> (
    None
):
    cache = OutcomeCache(budget_bytes=1000)
    d = command_digest("big")
    cache.put(d, bytes(2000))
    assert cache.get(d) is None and cache.used_bytes == 0

    cache.put(d, bytes(10))
    cache.put(d, bytes(20))
    assert cache.get(d) == bytes(20) and cache.used_bytes == 20 + CACHE_ENTRY_OVERHEAD


def test_a_zero_budget_caches_nothing() -> None:
    cache = OutcomeCache(budget_bytes=0)
    cache.put(command_digest("x"), b"{}")
    assert len(cache) == 0 and cache.get(command_digest("x")) is None


def test_positions_pack_and_unpack() -> None:
    for partition, offset in ((0, 0), (2, 17), (65_535, 2**40)):
        assert unpack_position(pack_position(partition, offset)) == (partition, offset)


def test_the_first_outcome_read_back_in_log_order_wins_over_its_duplicates() -> None:
    decided = DecidedCommands()
    d = command_digest("cmd-1")
    decided.remember_first(d, 1, 10)
    decided.remember_first(d, 1, 55)  # the duplicate's outcome, later on the log

    assert decided.position(d) == (1, 10)
    assert decided.position(command_digest("cmd-2")) is None
    assert d in decided and len(decided) == 1


def test_ids_whose_outcomes_retention_deleted_are_forgotten_oldest_first() -> None:
    decided = DecidedCommands()
    for i in range(10):
        decided.remember(command_digest(f"c{i}"), 0, 100 + i)

    dropped = decided.forget_before({0: 104})

    assert dropped == 4
    assert [decided.position(command_digest(f"c{i}")) for i in (3, 4)] == [None, (0, 104)]
    assert decided.forget_before({0: 104}) == 0 and len(decided) == 6
    assert decided.forget_before({0: 1_000}) == 6 and len(decided) == 0


def test_forgetting_stops_at_the_first_id_still_retained() -> None:
    decided = DecidedCommands()
    decided.remember(command_digest("old-p0"), 0, 5)
    decided.remember(command_digest("kept-p1"), 1, 50)
    decided.remember(command_digest("old-p0-again"), 0, 6)

    assert decided.forget_before({0: 100, 1: 10}) == 1
    assert decided.position(command_digest("kept-p1")) == (1, 50)


def test_an_entry_costs_a_small_constant_whatever_the_uptime() -> None:
    per_entry = command_memory_bytes(100_000)
    assert 16 <= per_entry < 30, per_entry


def test_sealed_and_merged_segments_answer_like_a_dict_and_the_newest_entry_wins() -> None:
    decided = DecidedCommands()
    n = 3 * DecidedCommands.SEGMENT_IDS + 17
    for i in range(n):
        decided.remember(command_digest(f"c{i}"), i % 3, 1_000 + i)
    decided.forget(command_digest("c7"))  # sealed by now
    assert len(decided) == n - 1
    decided.remember(command_digest("c5"), 2, 99_999)  # a collision's replacement

    assert decided.position(command_digest("c5")) == (2, 99_999)
    assert decided.position(command_digest("c7")) is None
    assert decided.position(command_digest(f"c{n - 1}")) == ((n - 1) % 3, 1_000 + n - 1)
    assert all(
        decided.position(command_digest(f"c{i}")) == (i % 3, 1_000 + i) for i in range(8, n - 1, 97)
    )
    assert decided.position(command_digest("never")) is None


def test_retention_drops_whole_sealed_segments_oldest_first() -> None:
    decided = DecidedCommands()
    n = 2 * DecidedCommands.SEGMENT_IDS
    for i in range(n + 5):
        decided.remember(command_digest(f"c{i}"), 0, i)

    assert decided.forget_before({0: n - 1}) == 0  # the merged segment still has one kept
    assert decided.forget_before({0: n + 2}) == n + 2
    assert decided.position(command_digest(f"c{n + 1}")) is None
    assert decided.position(command_digest(f"c{n + 2}")) == (0, n + 2)


@dataclass
class _Rec:
    headers: list[tuple[str, bytes]]


def test_the_command_id_of_an_outcome_record_is_read_from_its_headers_only() -> None:
    ours = _Rec([("ce_source", b"/swarmlog/processor"), ("ce_subject", b"cmd-9")])
    foreign = _Rec([("ce_source", b"/elsewhere"), ("ce_subject", b"cmd-9")])
    bad = _Rec([("ce_source", b"/swarmlog/processor"), ("ce_subject", b"\xff\xfe")])

    assert outcome_subject(ours) == "cmd-9"
    assert outcome_subject(foreign) is None
    assert outcome_subject(bad) is None
    assert outcome_subject(_Rec([])) is None
