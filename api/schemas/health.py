"""Liveness and readiness bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Health(BaseModel):
    """The process is up."""

    status: str


class Readiness(BaseModel):
    """Each dependency's check: ``ok`` or why it failed."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    failed: list[str]
