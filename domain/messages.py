"""Base shapes shared by every aggregate: commands, events, rejections and the decider.

A decider (Jérémie Chassaing, "Functional Event Sourcing Decider", 2021) is the triple
``initial_state``, ``decide(command, state) -> events | Rejection`` and
``evolve(state, event) -> state``: pure data in, pure data out. Every decider here takes
the command first, as Chassaing's ``decide: Command -> State -> Event list`` does.
Nothing here reads a clock or does IO; times arrive on the command (``at``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict

MICRO = 1_000_000
"""Micro-tokens per token: every amount of money is an integer number of micro-tokens."""


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns an event's JSON data from one schema version into the next (pure)."""


class Message(BaseModel):
    """A frozen pydantic model that rejects unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Command(Message):
    """An imperative request to change one aggregate.

    Subclasses set ``aggregate_type`` and name their aggregate id field in ``id_field``.
    ``at`` is the time the command was issued (timezone-aware; a naive time is a
    ValidationError); it is the only clock the domain sees.
    """

    aggregate_type: ClassVar[str]
    id_field: ClassVar[str]
    at: AwareDatetime

    @property
    def aggregate_id(self) -> str:
        """The id of the aggregate this command is addressed to (the Kafka key)."""
        return str(getattr(self, self.id_field))


class Event(Message):
    """Something that happened to one aggregate; past tense, immutable, never changed.

    ``event_type`` is the short name within the aggregate (``"assigned"``); the CloudEvent
    type on the wire is ``io.swarmlog.<aggregate>.<event_type>`` (see infra/mapper.py).
    ``schema_version`` starts at 1; a change of shape is a new version with an upcaster:
    ``upcasters[n - 1]`` turns the data of a version-``n`` record into version ``n + 1``,
    so an event at schema version ``v`` declares ``v - 1`` of them, on its class
    (eventsourcing's ``upcast_vN_vN+1``). The reader (infra/mapper.py) applies them to an
    older record's data before it validates the data as this class.
    """

    aggregate_type: ClassVar[str]
    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
    upcasters: ClassVar[tuple[Upcaster, ...]] = ()


RejectionKind = Literal["not_found", "conflict", "invalid", "forbidden", "gone", "precondition"]


class Rejection(Message):
    """A typed refusal of a command: nothing is written.

    ``kind`` says what class of refusal it is (the API maps not_found to 404, conflict to
    409, invalid to 422, forbidden to 403, gone to 410, precondition to 412); ``code``
    names the rule that was broken (``task_not_running``); ``field`` names the offending
    field where there is one.
    """

    kind: RejectionKind
    code: str
    detail: str
    field: str | None = None


S = TypeVar("S", bound=BaseModel)
C = TypeVar("C", bound=Command)
E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Decider(Generic[C, S, E]):
    """One aggregate type's decider: its name, message types and pure functions.

    ``initial_state`` is ``None`` (the aggregate does not exist yet); ``decide`` returns
    a non-empty list of events or a Rejection, never a silent empty list; ``evolve``
    never raises and never checks rules (it runs again on every replay).

    ``pack``, where a decider has one, cuts decided events that list many units into
    more events that each take at most about the given bytes of JSON and fold to the same
    state: the caller that writes the events (the command processor) applies it with
    what its store takes in one event, so no transport limit lives in the decider.
    """

    aggregate_type: str
    command_types: tuple[type[C], ...]
    event_types: tuple[type[E], ...]
    decide: Callable[[C, S | None], list[E] | Rejection]
    evolve: Callable[[S | None, E], S | None]
    initial_state: S | None = None
    describe: Callable[[S], dict[str, Any]] | None = None
    pack: Callable[[list[E], int], list[E]] | None = None

    def packed(self, events: list[E], max_event_bytes: int) -> list[E]:
        """``events`` cut to about ``max_event_bytes`` of JSON each by ``pack`` (as they
        are where the decider has none)."""
        return events if self.pack is None else self.pack(events, max_event_bytes)

    def summary(self, state: S | None) -> dict[str, Any] | None:
        """The state as a command outcome shows it: ``describe(state)`` where the decider
        has one (a state too large to repeat in every outcome), else the whole state as
        JSON-ready data; None for an aggregate that does not exist."""
        if state is None:
            return None
        if self.describe is not None:
            return self.describe(state)
        return state.model_dump(mode="json")

    def fold(self, events: Iterable[E], state: S | None = None) -> S | None:
        """Fold events over ``state`` (default: the initial state)."""
        current = self.initial_state if state is None else state
        for event in events:
            current = self.evolve(current, event)
        return current

    def event_type(self, name: str) -> type[E]:
        """Return the event class whose ``event_type`` is ``name``; KeyError if none."""
        for cls in self.event_types:
            if cls.event_type == name:
                return cls
        raise KeyError(name)

    def command_type(self, name: str) -> type[C]:
        """Return the command class named ``name`` (its class name); KeyError if none."""
        for cls in self.command_types:
            if cls.__name__ == name:
                return cls
        raise KeyError(name)


def rejected(kind: RejectionKind, code: str, detail: str, field: str | None = None) -> Rejection:
    """Build a Rejection (shorthand used by the deciders)."""
    return Rejection(kind=kind, code=code, detail=detail, field=field)
