"""Money at the API: decimal strings of tokens (``"0.5"`` in, ``"0.500000"`` out, always
six decimals); inside it is integer micro-tokens, ``domain.money.MicroTokens``.

A response field is money by its type, ``TokenString`` (``MicroTokens`` shown as a token
string), and an aggregate state by the ``MicroTokens`` fields of its domain model
(``public_state``). CloudEvent data keeps the wire form, integer micro-tokens.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from types import UnionType
from typing import Annotated, Any, TypeAlias, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field, PlainSerializer

from domain.money import MAX_PRICE, MICRO, MicroTokens, Money, is_micro_tokens

MAX_TOKENS = Decimal(MAX_PRICE // MICRO)  # the domain's bound on a price, in tokens


def _check_tokens(value: str) -> str:
    try:
        amount = Decimal(value.strip())
    except InvalidOperation:
        raise ValueError('must be a decimal number of tokens, e.g. "0.5"') from None
    if not amount.is_finite():
        raise ValueError("must be a finite decimal number of tokens")
    if amount < 0:
        raise ValueError("must not be negative")
    exponent = amount.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        raise ValueError("must have at most 6 decimal places (1 micro-token)")
    if amount > MAX_TOKENS:
        raise ValueError(f"must be at most {MAX_TOKENS} tokens")
    return value.strip()


Tokens = Annotated[
    str,
    AfterValidator(_check_tokens),
    Field(description="tokens as a decimal string, at most 6 decimals", examples=["0.5"]),
]


def _positive_tokens(value: str) -> str:
    if Decimal(value) <= 0:
        raise ValueError("must be more than 0")
    return value


PositiveTokens = Annotated[
    str,
    AfterValidator(_check_tokens),
    AfterValidator(_positive_tokens),
    Field(
        description="tokens as a decimal string, more than 0, at most 6 decimals", examples=["12.5"]
    ),
]


def to_micro(tokens: str) -> int:
    """``"0.5"`` -> 500000 (micro-tokens); the value has passed ``Tokens`` validation."""
    return int(Decimal(tokens) * MICRO)


def format_tokens(micro: int) -> str:
    """500000 -> ``"0.500000"`` (tokens, six decimals)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), MICRO)
    return f"{sign}{whole}.{frac:06d}"


TokenString = Annotated[MicroTokens, PlainSerializer(format_tokens, return_type=str)]
"""A response field that is money: held as micro-tokens, written as a token string
(``"0.500000"``); the OpenAPI document declares it a string."""

#: A model, or a union of models (a state with a type per status).
StateType: TypeAlias = Any


def _models(tp: StateType) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    origin: Any = get_origin(tp)
    if origin is Annotated:
        return _models(get_args(tp)[0])
    if origin in (Union, UnionType):
        return [m for arg in get_args(tp) for m in _models(arg)]
    return []


def _item_models(annotation: Any) -> list[type[BaseModel]]:
    """The models of a tuple/list field's items (``tuple[PendingUnstake, ...]``)."""
    if get_origin(annotation) in (tuple, list):
        return [m for arg in get_args(annotation) if arg is not Ellipsis for m in _models(arg)]
    return [m for arg in get_args(annotation) for m in _item_models(arg)]


def public_state(state_type: StateType, state: dict[str, Any] | None) -> dict[str, Any] | None:
    """``state`` (a ``state_type`` dumped as JSON data) with the fields its model declares
    ``MicroTokens`` as token strings, also in the items of a list of models (an account's
    pending unstakes); nested objects (a proposal's ``change``) keep the domain's form."""
    if state is None:
        return None
    return _public(_models(state_type), state)


def _public(models: list[type[BaseModel]], state: dict[str, Any]) -> dict[str, Any]:
    money: set[str] = set()
    items: dict[str, list[type[BaseModel]]] = {}
    for model in models:
        for name, info in model.model_fields.items():
            if is_micro_tokens(info.annotation) or any(isinstance(m, Money) for m in info.metadata):
                money.add(name)
            elif found := _item_models(info.annotation):
                items.setdefault(name, []).extend(found)
    return {k: _public_value(v, k in money, items.get(k, [])) for k, v in state.items()}


def _public_value(value: Any, money: bool, item_models: list[type[BaseModel]]) -> Any:
    if money and isinstance(value, int) and not isinstance(value, bool):
        return format_tokens(value)
    if item_models and isinstance(value, list):
        return [_public(item_models, v) if isinstance(v, dict) else v for v in value]
    return value
