"""The one keyset pagination helper: a page of ``limit`` items, the cursor after the last
one when more rows exist, and the cursor read back as the key the query takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api.pagination import INT8, TEXT, TIME, Keyset
from api.problems import Problem

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NEWEST = Keyset("things", (TIME, TEXT), lambda row: (row["at"], row["id"]))
BY_SEQ = Keyset("seq", (INT8,), lambda row: (row["seq"],))


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"at": T0 - timedelta(seconds=i), "id": f"t{i}", "seq": i} for i in range(n)]


def test_a_full_page_names_the_key_of_its_last_item() -> None:
    page = NEWEST.page(_rows(3), 2, lambda row: row["id"])
    assert page.items == ["t0", "t1"]
    assert page.next_cursor is not None
    assert NEWEST.after(page.next_cursor) == (T0 - timedelta(seconds=1), "t1")


def test_the_last_page_has_no_cursor() -> None:
    page = BY_SEQ.page(_rows(2), 2, lambda row: row["seq"])
    assert (page.items, page.next_cursor) == ([0, 1], None)
    assert BY_SEQ.after(None) is None


def test_a_one_part_key_is_read_back_as_the_value_itself() -> None:
    cursor = BY_SEQ.page(_rows(5), 3, lambda row: row["seq"]).next_cursor
    assert BY_SEQ.after(cursor) == 2


def test_another_lists_cursor_is_a_problem_naming_cursor() -> None:
    cursor = BY_SEQ.page(_rows(5), 3, lambda row: row).next_cursor
    with pytest.raises(Problem) as caught:
        NEWEST.after(cursor)
    assert (caught.value.status, caught.value.field) == (422, "cursor")
