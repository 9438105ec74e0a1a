"""Given/when/then for deciders: "given these events, when this command, then these events".

    given(TASK_DECIDER, submitted).when(start).then_rejected("task_not_assigned")

``given`` folds the history into a state, ``when`` runs ``decide`` once, and the
``then`` methods compare the outcome. Failures are raised with ``pytest.fail`` so the
message shows the whole scenario without needing pytest's assertion rewriting here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from domain.messages import Command, Decider, Event, Rejection, RejectionKind


@dataclass(frozen=True)
class Given:
    """A history of events for one decider, folded into the state a command is decided on."""

    decider: Decider[Any, Any, Any]
    history: tuple[Event, ...]

    @property
    def state(self) -> Any:
        """The state the history folds to."""
        return self.decider.fold(self.history)

    def when(self, command: Command) -> When:
        """Decide ``command`` on the folded history."""
        return When(self, command, self.decider.decide(command, self.state))


@dataclass(frozen=True)
class When:
    """The outcome of deciding one command on a given history."""

    given: Given
    command: Command
    outcome: list[Event] | Rejection

    def _scenario(self) -> str:
        history = "\n".join(f"    {e!r}" for e in self.given.history) or "    (no events)"
        return f"given:\n{history}\nwhen:\n    {self.command!r}\ngot:\n    {self.outcome!r}"

    def then(self, *expected: Event) -> Then:
        """Assert that exactly ``expected`` events were decided, in order."""
        if isinstance(self.outcome, Rejection):
            pytest.fail(f"expected events {list(expected)!r}, was rejected\n{self._scenario()}")
        if list(self.outcome) != list(expected):
            pytest.fail(f"expected events:\n    {list(expected)!r}\n{self._scenario()}")
        return Then(self, self.outcome)

    def then_rejected(
        self, code: str, *, kind: RejectionKind | None = None, field: str | None = None
    ) -> Rejection:
        """Assert that the command was rejected with ``code`` (and ``kind``/``field`` if given)."""
        if not isinstance(self.outcome, Rejection):
            pytest.fail(f"expected rejection {code!r}, got events\n{self._scenario()}")
        if self.outcome.code != code:
            pytest.fail(f"expected rejection {code!r}\n{self._scenario()}")
        if kind is not None and self.outcome.kind != kind:
            pytest.fail(f"expected rejection kind {kind!r}\n{self._scenario()}")
        if field is not None and self.outcome.field != field:
            pytest.fail(f"expected rejection field {field!r}\n{self._scenario()}")
        return self.outcome


@dataclass(frozen=True)
class Then:
    """Accepted events, with the state they lead to for follow-up checks."""

    when: When
    events: Sequence[Event]

    @property
    def state(self) -> Any:
        """The state after the history and the new events."""
        return self.when.given.decider.fold(self.events, self.when.given.state)

    def and_state(self, **fields: Any) -> Any:
        """Assert that the resulting state has these field values; return the state."""
        state = self.state
        wrong = {k: getattr(state, k) for k, v in fields.items() if getattr(state, k) != v}
        if wrong:
            pytest.fail(
                f"expected state {fields!r}, but {wrong!r}\n{self.when._scenario()}\n"
                f"state:\n    {state!r}"
            )
        return state


def given(decider: Decider[Any, Any, Any], *events: Event) -> Given:
    """Start a scenario: ``decider``'s aggregate after ``events`` (none: it does not exist)."""
    return Given(decider, tuple(events))
