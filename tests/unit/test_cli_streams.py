"""``swarmlog streams --only``: a process manager name that does not exist is refused
with a message naming the option, before anything starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from infra import bootstrap
from infra.cli import app
from infra.clock import SystemClock
from infra.kafka import Kafka
from infra.settings import Settings
from infra.topics import Topics


def test_an_unknown_process_manager_is_refused_naming_the_option() -> None:
    result = CliRunner().invoke(app, ["streams", "--only", "sheduler"])
    assert result.exit_code == 2
    assert "--only" in result.output and "sheduler" in result.output


def test_unknown_process_manager_names_are_refused() -> None:
    with pytest.raises(ValueError, match="nope"):
        clients = bootstrap.Clients(
            Settings(), Kafka("unused:9092"), Topics(prefix="u"), SystemClock()
        )
        bootstrap.build_process_managers(clients, ("workflow", "nope"))
