"""Money: every amount is an integer number of micro-tokens (1 token = 1,000,000).

``MicroTokens`` is the one declaration of that type. It is an ``int`` to Python, mypy
and pydantic (``Annotated`` with a marker), so arithmetic and validation are those of
``int``; the marker lets a boundary find the fields that are money by their type, not
by their name: the HTTP API shows them as token strings (api/schemas/money.py), while
events and CloudEvent data keep integer micro-tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from domain.messages import MICRO

__all__ = ["MAX_PRICE", "MICRO", "MicroTokens", "Money", "is_micro_tokens"]


@dataclass(frozen=True)
class Money:
    """The marker on ``MicroTokens``: the annotated integer is micro-tokens."""


MicroTokens = Annotated[int, Money()]
"""An amount of money in integer micro-tokens (1 token = 1,000,000 micro-tokens)."""

MAX_PRICE = 10**15
"""The largest price a command may name (micro-tokens, 10^9 tokens): an agent's
``cost_per_task``, a task's ``max_cost``; also the most tokens the HTTP API takes in
any amount."""


def is_micro_tokens(annotation: Any) -> bool:
    """Whether ``annotation`` is ``MicroTokens`` or ``MicroTokens | None``."""
    origin: Any = get_origin(annotation)
    if origin is Annotated:
        return any(isinstance(m, Money) for m in annotation.__metadata__)
    if origin in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return len(members) == 1 and is_micro_tokens(members[0])
    return False
