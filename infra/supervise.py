"""Process supervision for the demo and the benches: swarmlog's roles (``swarmlog
processor|streams|projector|api``) and agents as child processes of one run.

A run works under one prefix (its topics, consumer groups, PostgreSQL schema and Redis
keys; ``role_env``) on the services of the local stack or of the environment
(``infra.stack.StackInfo``). ``Children`` starts each child with its output in
``<log_dir>/<name>.log`` and its pid recorded, and stops children by those pids only
(SIGTERM, then SIGKILL after a grace period): never by name, since other runs on the
same machine run the same programs. ``wait_ready`` waits for the API's ``/ready``
while watching the children; ``remove_run`` deletes what a run left on the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from infra.stack import StackInfo
from infra.topics import Topics

CLI = (sys.executable, "-m", "infra.cli")
"""How a role is started: ``swarmlog`` with this interpreter."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice; another process may take it
    before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def role_env(services: StackInfo, prefix: str, **settings: object) -> dict[str, str]:
    """The environment of a child working under ``prefix`` on ``services``: this process's
    environment, the three service URLs, ``prefix`` as the topic prefix, PostgreSQL
    schema and Redis prefix, and each of ``settings`` as ``SWARMLOG_<NAME>`` (a Settings
    field name, e.g. ``scheduler_tick_s=0.02``)."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": services.kafka_bootstrap_servers,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "SWARMLOG_TOPIC_PREFIX": prefix,
        "SWARMLOG_DB_SCHEMA": prefix,
        "SWARMLOG_REDIS_PREFIX": prefix,
    }
    env.update({f"SWARMLOG_{name.upper()}": str(value) for name, value in settings.items()})
    return env


@dataclass
class Children:
    """Child processes of one run, by name, stopped by their recorded pids; each writes
    its stdout and stderr to ``<log_dir>/<name>.log``."""

    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path = Path(".")

    def start(
        self, name: str, argv: list[str], env: dict[str, str], *, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as child ``name`` (in a session of its own, in ``cwd`` if given),
        its output to ``<log_dir>/<name>.log``."""
        log = open(self.log_path(name), "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        return proc

    def start_role(
        self,
        role: str,
        env: dict[str, str],
        *args: str,
        name: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``swarmlog <role> <args>`` as child ``name`` (default: the role), in
        ``cwd`` if given."""
        return self.start(name or role, [*CLI, role, *args], env, cwd=cwd)

    def start_roles(
        self,
        env: dict[str, str],
        roles: Iterable[str] = ("processor", "streams", "projector", "api"),
    ) -> None:
        """Start each of ``roles`` as a child of its own name."""
        for role in roles:
            self.start_role(role, env)

    @property
    def pids(self) -> dict[str, int]:
        """Each child's pid, by name."""
        return {name: proc.pid for name, proc in self.procs.items()}

    def log_path(self, name: str) -> Path:
        """Where child ``name`` writes its output."""
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters child ``name`` wrote ('' if none yet)."""
        path = self.log_path(name)
        return path.read_text(errors="replace")[-max_chars:] if path.exists() else ""

    def check(self) -> None:
        """Raise RuntimeError naming the first child that exited, its exit code and log."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {self.log_path(name)}"
                )

    def kill(self, name: str) -> None:
        """SIGKILL child ``name`` (by its pid) and reap it."""
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self, prefix: str = "", timeout_s: float = 15.0) -> None:
        """SIGTERM the children whose name starts with ``prefix`` (all by default), by
        pid; wait up to ``timeout_s`` seconds, then SIGKILL."""
        chosen = {n: p for n, p in self.procs.items() if n.startswith(prefix)}
        for proc in chosen.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in chosen.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            del self.procs[name]


async def wait_ready(base_url: str, children: Children, timeout_s: float = 90.0) -> None:
    """Wait until ``GET <base_url>/ready`` answers 200. Raises RuntimeError if a child
    exits meanwhile (naming it and its log) or after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as http:
        while time.monotonic() < deadline:
            children.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"the API at {base_url} was not ready in {timeout_s:.0f} s")


async def remove_run(services: StackInfo, topics: Topics, schema: str, redis_prefix: str) -> None:
    """Delete what a run left on ``services``: its topics, its PostgreSQL schema and its
    Redis keys (``<redis_prefix>:*``). Best effort: a step that fails is skipped."""
    with contextlib.suppress(Exception):
        admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap_servers)
        await admin.start()
        try:
            await admin.delete_topics([spec.name for spec in topics.specs()])
        finally:
            await admin.close()
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(services.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    with contextlib.suppress(Exception):
        r = aioredis.from_url(services.redis_url)
        try:
            # Deletes everything under the run's prefix (RedisKeys.pattern; infra cannot import it).
            keys = [k async for k in r.scan_iter(match=f"{redis_prefix}:*")]
            for start in range(0, len(keys), 1000):
                await r.delete(*keys[start : start + 1000])
        finally:
            await r.aclose()
