"""Commands a process manager owes but cannot build: recorded, not raised.

A process manager's ``plan`` builds each command from what its view folded from the
log; data another producer wrote may pass an event's validation and still fail a
command's (an id too long, a reason too long). One such command must not stop the
others: ``build`` records the failure, the plan goes on, and the runner dead-letters
the command (streams/leader.py) and passes its id back in ``skip`` from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Unbuilt:
    """A command that could not be built: its id, its type, the fields it was to be built
    from and why it failed."""

    command_id: str
    command_type: str
    fields: dict[str, Any]
    reason: str


def build(
    failures: list[Unbuilt] | None, command_id: str, cls: type[M], /, **fields: Any
) -> M | None:
    """``cls(**fields)``. When that raises and ``failures`` is a list, the failure is
    appended to it and None returned; with ``failures`` None it raises, as the call would."""
    if failures is None:
        return cls(**fields)
    try:
        return cls(**fields)
    except Exception as exc:  # noqa: BLE001 - a validator may raise anything
        failures.append(Unbuilt(command_id, cls.__name__, fields, f"{type(exc).__name__}: {exc}"))
        return None
