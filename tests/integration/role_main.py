"""Run one swarmlog process role from the environment (until SIGTERM), for the fault tests
while ``swarmlog processor|projector|streams`` are not CLI subcommands yet:

    python -m tests.integration.role_main processor
"""

from __future__ import annotations

import sys

from infra import bootstrap
from infra.settings import Settings


def main(role: str) -> None:
    bootstrap.configure_logging("WARNING")
    run = {
        "processor": bootstrap.run_processor,
        "projector": bootstrap.run_projector,
        "streams": bootstrap.run_streams,
    }[role]
    run(Settings())


if __name__ == "__main__":
    main(sys.argv[1])
