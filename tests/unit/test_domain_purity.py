"""domain/ stays pure (STYLE.md rule 1): it imports only the standard library, pydantic,
jmespath and itself, and never reads a clock or makes an id on its own."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

DOMAIN = Path(__file__).resolve().parents[2] / "domain"
# jmespath is a pure expression evaluator (no IO, no clock): workflow conditions use it.
ALLOWED_THIRD_PARTY = {
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_extensions",
    "jmespath",
}
# Standard library, but IO, clocks or randomness: the domain gets these handed in instead.
FORBIDDEN_STDLIB = {
    "asyncio",
    "os",
    "random",
    "secrets",
    "socket",
    "subprocess",
    "threading",
    "time",
}
# Calls that read a clock or make a random id: times and ids arrive on the command.
FORBIDDEN_CALLS = {
    "uuid.uuid1",
    "uuid.uuid4",
    "uuid1",
    "uuid4",
    "datetime.now",
    "datetime.utcnow",
    "datetime.today",
    "date.today",
    "datetime.datetime.now",
    "datetime.datetime.utcnow",
    "datetime.date.today",
    "time.time",
    "time.time_ns",
    "time.monotonic",
    "time.perf_counter",
    "now",
    "utcnow",
    "open",
}


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def impurities(source: str, filename: str = "<source>") -> list[str]:
    """Every import outside stdlib/pydantic/domain and every clock or id call in ``source``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
        for module in modules:
            top = module.split(".")[0]
            where = f"{filename}:{getattr(node, 'lineno', 0)}"
            if module in FORBIDDEN_CALLS or module.removeprefix("datetime.") in FORBIDDEN_CALLS:
                found.append(f"{where} imports {module}")
            elif top == "domain" or top in ALLOWED_THIRD_PARTY:
                continue
            elif top not in sys.stdlib_module_names:
                found.append(f"{where} imports non-stdlib {module}")
            elif top in FORBIDDEN_STDLIB:
                found.append(f"{where} imports {module} (IO, clock or randomness)")
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{filename}:{node.lineno} calls {name}()")
    return found


def domain_files() -> list[Path]:
    return sorted(DOMAIN.rglob("*.py"))


def test_there_are_domain_modules_to_check() -> None:
    names = {p.name for p in domain_files()}
    assert {"messages.py", "agent.py", "task.py", "backoff.py"} <= names


@pytest.mark.parametrize("path", domain_files(), ids=lambda p: str(p.relative_to(DOMAIN)))
def test_the_domain_imports_only_stdlib_pydantic_and_itself_and_reads_no_clock(
    path: Path,
) -> None:
    assert impurities(path.read_text(), str(path.relative_to(DOMAIN.parent))) == []


@pytest.mark.parametrize(
    "source",
    [
        "import fastapi",
        "from aiokafka import AIOKafkaProducer",
        "from infra.mapper import encode_event",
        "import random",
        "from uuid import uuid4",
        "import uuid\nuuid.uuid4()",
        "from datetime import datetime\ndatetime.now()",
        "import datetime\ndatetime.datetime.utcnow()",
        "import time\ntime.time()",
        "open('x')",
    ],
)
def test_the_purity_check_catches_impure_code(source: str) -> None:
    assert impurities(source)


def test_the_purity_check_allows_pure_code() -> None:
    source = (
        "from __future__ import annotations\n"
        "import hashlib\n"
        "from datetime import datetime, timedelta\n"
        "from pydantic import BaseModel\n"
        "from domain.messages import Command\n"
        "from .backoff import backoff_seconds\n"
        "at = datetime(2024, 1, 1) + timedelta(seconds=1)\n"
    )
    assert impurities(source) == []
