"""Unit tests of sdk/tracker.py: an assignment seen twice runs once."""

from __future__ import annotations

import pytest

from sdk.tracker import AssignmentTracker


def test_the_same_attempt_offered_twice_is_taken_once() -> None:
    tracker = AssignmentTracker()
    assert tracker.claim("t1", 1)
    assert not tracker.claim("t1", 1)  # the poll after a reconnect sees it again
    assert tracker.active == {("t1", 1)}


def test_a_finished_attempt_listed_again_by_a_lagging_read_model_is_not_rerun() -> None:
    tracker = AssignmentTracker()
    tracker.claim("t1", 1)
    tracker.release("t1", 1)
    assert len(tracker) == 0
    assert not tracker.claim("t1", 1)


def test_a_later_attempt_of_the_same_task_is_new_and_an_earlier_one_is_stale() -> None:
    tracker = AssignmentTracker()
    tracker.claim("t1", 1)
    tracker.release("t1", 1)
    assert tracker.claim("t1", 2)  # failed, retried, assigned to us again
    assert not tracker.claim("t1", 1)  # a replayed message about the first attempt
    assert tracker.is_active("t1")


def test_an_unknown_attempt_matches_any_attempt_of_the_task() -> None:
    tracker = AssignmentTracker()
    assert tracker.claim("t1", None)
    assert not tracker.claim("t1", 1)
    assert not tracker.claim("t1", None)
    other = AssignmentTracker()
    other.claim("t2", 3)
    assert not other.claim("t2", None)


def test_the_oldest_finished_tasks_are_forgotten_but_never_one_in_flight() -> None:
    tracker = AssignmentTracker(capacity=2)
    tracker.claim("running", 1)
    for i in range(5):
        tracker.claim(f"done{i}", 1)
        tracker.release(f"done{i}", 1)
    assert tracker.seen("running")
    assert tracker.seen("done4")
    assert not tracker.seen("done0")
    assert tracker.claim("done0", 1)  # forgotten: taken again (the API's start decides)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AssignmentTracker(capacity=0)


def test_a_task_in_flight_here_is_never_taken_back() -> None:
    tracker = AssignmentTracker()
    tracker.claim("t1", 1)  # the start path claims before it sends the start
    assert not tracker.take_back("t1", 1)
    assert tracker.active == {("t1", 1)}


def test_a_task_not_running_here_is_taken_back_once_and_its_offer_is_then_a_repeat() -> None:
    tracker = AssignmentTracker()
    assert tracker.take_back("t1", 2)  # a dead process of this agent ran attempt 2
    assert not tracker.take_back("t1", 2)  # a second reconciliation meanwhile
    assert not tracker.claim("t1", 2)  # the stream replays attempt 2's assignment
    tracker.release("t1", 2)
    assert tracker.claim("t1", 3)  # the retry, assigned to us again, runs


def test_a_listing_older_than_what_this_process_saw_is_not_acted_on() -> None:
    tracker = AssignmentTracker()
    tracker.claim("t1", 3)
    tracker.release("t1", 3)
    assert not tracker.take_back("t1", 2)
    assert tracker.take_back("t1", 3)  # attempt 3 ended here, yet the server says it runs
