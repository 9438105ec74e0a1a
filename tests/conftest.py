"""Fixtures shared by every test: one real Kafka, PostgreSQL and Redis per test session.

Where ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and ``REDIS_URL`` are all set, the
session uses those services and starts nothing. Otherwise it starts its own stack with
:func:`infra.stack.up` in a temporary state directory and stops it (by pid) and deletes it
at the end, so a test run leaves no process and no data behind. Tests isolate themselves
with fresh topic, consumer-group, schema and key names, never by restarting services.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from infra.stack import StackInfo, down, environment_info, up


@pytest.fixture(scope="session")
def stack_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The state directory of this session's own stack; None when the environment names services."""
    if environment_info() is not None:
        return None
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def services(stack_state_dir: Path | None) -> Iterator[StackInfo]:
    """Where Kafka, PostgreSQL and Redis are for this session (see the module docstring)."""
    if stack_state_dir is None:
        external = environment_info()
        assert external is not None
        yield external
        return
    console = Console(stderr=True)
    try:
        info = up(stack_state_dir, console=console)
    except BaseException:
        down(stack_state_dir, purge=True)  # stop whatever did start before the failure
        raise
    try:
        yield info
    finally:
        for message in down(stack_state_dir, purge=True):
            console.print(message, soft_wrap=True, highlight=False)
