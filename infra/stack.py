"""The local stack: Kafka (one node or a cluster), PostgreSQL and Redis as plain processes.

``swarmlog up`` calls :func:`up`, which needs no Docker and no configuration. Where the
environment already names services (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and
``REDIS_URL``, all three), it starts nothing and hands those back. Otherwise it starts,
each only if it is not already running:

* **Kafka** 3.9.1, the Apache broker from Maven Central (jars fetched once with Maven via
  ``infra/kafka/pom.xml`` into ``~/.cache/swarmlog/kafka-3.9.1/libs``), run on the
  machine's Java as one KRaft node that is both broker and controller, configured for a
  single node (replication factor 1 for the offsets and transaction logs, or transactions
  hang at init; see DESIGN.md). With ``brokers=3`` (``swarmlog up --brokers 3``) it is a
  three-node KRaft cluster instead; see "A Kafka cluster" below.
* **PostgreSQL** from Debian's packages: ``initdb`` with trust auth and superuser
  ``swarmlog``, run as the ``postgres`` OS user when we are root (PostgreSQL refuses to run
  as root), database ``swarmlog``.
* **Redis** from Debian's ``redis-server``, no persistence.

Everything lives under ``state_dir`` (default ``.swarmlog``)::

    stack.json                 ports, Kafka cluster id, where PostgreSQL's data is
    kafka/server.properties    generated on every start
    kafka/log4j.properties
    kafka/data/                the Kafka log (formatted once)
    kafka/kafka.log  kafka/kafka.pid
    kafka-2/ kafka-3/          the same for nodes 2 and 3 of a cluster (node 1 is kafka/)
    postgres/data/  postgres/postgres.log  postgres/run/ (unix socket)
    redis/redis.log  redis/redis.pid

When we are root and the ``postgres`` user cannot reach ``state_dir`` (a checkout under
``/root``, or pytest's ``/tmp/pytest-of-root``, both mode 700), PostgreSQL's directory is
``/var/tmp/swarmlog-<hash of state_dir>/postgres`` instead, recorded in ``stack.json``.

A Kafka cluster (``brokers`` of 3 up to 9, recorded in ``stack.json`` as
``kafka_brokers``): every node is a combined broker and controller (``process.roles=
broker,controller``), and all of them are the voters of the KRaft controller quorum
(``controller.quorum.voters``, static). Combined nodes rather than separate controllers:
three JVMs instead of six on one machine, and the quorum still survives the loss of any
one node (a majority of three is two), which is the fault the cluster is there to take.
Kafka's operations guide (KRaft, "Deploying Considerations") advises dedicated controllers
for critical deployments, where brokers and controllers scale and fail apart;
docker-compose.cluster.yml has the same layout as here. The brokers are configured so
that one of three may die with nothing acknowledged lost: ``default.replication.factor=3``,
``min.insync.replicas=2``, the offsets and transaction-state logs with replication factor 3
and min ISR 2, and
``unclean.leader.election.enable=false`` (an out-of-sync replica never becomes leader).
With acks=all (every swarmlog producer, infra/kafka.py) a write is acknowledged only once
two replicas hold it. Each node's heap is 128-512 MB (one node alone keeps 256-768 MB).
A cluster's state directory stays a cluster: ``up`` with another broker count raises
StackError (``down --purge`` first). Ports are fixed at the first ``up``: the voters list
names them, so a dead node is restarted on its own ports, and new ports are chosen only
when no node runs.

Services listen on 127.0.0.1 only, on free ports chosen at the first ``up`` and kept.
Processes are started in their own session, so they outlive the caller; :func:`down` stops
them by recorded pid. Every failure to start raises :class:`StackError` naming the service,
its log file and the log's last lines, or the Debian package to install.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from infra.settings import Settings

__all__ = [
    "KAFKA_VERSION",
    "SERVICES",
    "StackError",
    "StackInfo",
    "down",
    "ensure_kafka_jars",
    "env_exports",
    "environment_info",
    "info",
    "kafka_jars_dir",
    "status",
    "stop_service",
    "up",
]

KAFKA_VERSION = "3.9.1"
SCALA_VERSION = "2.13"
DATABASE_NAME = "swarmlog"
DATABASE_USER = "swarmlog"
#: The OS user PostgreSQL runs as when we are root; Debian's package creates it.
POSTGRES_OS_USER = "postgres"

KAFKA_READY_TIMEOUT_S = 90.0
POSTGRES_READY_TIMEOUT_S = 60.0
REDIS_READY_TIMEOUT_S = 15.0
#: How long a service gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT_S = 20.0

ENV_VARS = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")
_HOST = "127.0.0.1"
_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_KAFKA_CORE_JAR = f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar"
_COMPLETE_MARKER = ".swarmlog-complete"
_LOG_TAIL_LINES = 20
# sockaddr_un.sun_path is 108 bytes; PostgreSQL appends "/.s.PGSQL.<port>".
_MAX_SOCKET_DIR = 90

T = TypeVar("T")

#: Services this process started, kept so that they are reaped (no zombies, no
#: "still running" ResourceWarning) when they exit while we are alive.
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(RuntimeError):
    """A service of the local stack could not be found, started or stopped."""


@dataclass(frozen=True)
class StackInfo:
    """Where the services are.

    ``started`` is False when the three environment variables were used (nothing local is
    managed); True when the services are the local ones run by :func:`up`, whether this
    call started them or found them running.
    """

    kafka_bootstrap_servers: str
    database_url: str
    redis_url: str
    started: bool


# --------------------------------------------------------------------------- public API


def up(
    state_dir: Path,
    *,
    console: Console | None = None,
    brokers: int | None = None,
    own: bool = False,
) -> StackInfo:
    """Start Kafka, PostgreSQL and Redis under ``state_dir`` (or reuse them) and say where.

    If ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and ``REDIS_URL`` are all set, starts
    nothing and returns them with ``started=False``, unless ``own`` is True: then the
    environment's services are ignored and ``state_dir``'s own are started (for tests and
    benchmarks that stop services, which must never stop the ones the environment names).
    Otherwise each service that is not
    already running (pid file, live process, answering its port) is started and waited for:
    Kafka until its metadata lists every broker (up to 90 s), PostgreSQL until ``pg_ctl
    -w`` returns and database ``swarmlog`` exists, Redis until PING answers. Idempotent: a
    second call reuses the running processes and returns the same URLs; on a cluster where
    some brokers died, only those are started again. Progress goes to ``console`` (stderr
    by default).

    ``brokers`` is the number of Kafka nodes: 1 (one node) or 3 to 9 (a KRaft cluster, see
    the module docstring); None means what ``state_dir`` already holds, else 1. The
    returned ``kafka_bootstrap_servers`` lists every broker, comma-separated.

    Raises StackError naming the service, its log file and the log's last lines when one
    fails to start, or the Debian package to install when a program is missing; also when
    ``brokers`` is 2 or out of range, or differs from the cluster ``state_dir`` holds.
    """
    console = console or Console(stderr=True)
    if brokers is not None:
        _check_broker_count(brokers)
    external = None if own else environment_info()
    if external is not None:
        _say(console, "[dim]Using KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL.[/]")
        if brokers is not None and brokers > 1:
            _say(console, f"[yellow]--brokers {brokers} ignored: no Kafka is started.[/]")
        return external
    settings = Settings()
    given = (settings.kafka_bootstrap_servers, settings.database_url, settings.redis_url)
    partial = [name for name, value in zip(ENV_VARS, given, strict=True) if value]
    if partial and not own:
        _say(
            console,
            f"[yellow]Ignoring {', '.join(partial)}: the local stack is used unless all of "
            f"{', '.join(ENV_VARS)} are set.[/]",
        )

    layout = _Layout(state_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    with _locked(layout.lock):
        state = _load_state(layout)
        count = _resolve_broker_count(layout, state, brokers)
        libs = ensure_kafka_jars(console=console)
        # Kafka takes longest, so it is launched first and waited for last.
        kafka = _launch_kafka(layout, state, libs, console, count)
        _save_state(layout, state)
        pg_url = _ensure_postgres(layout, state, console)
        _save_state(layout, state)
        redis_url = _ensure_redis(layout, state, console)
        _save_state(layout, state)
        bootstrap = _await_kafka(layout, kafka, console)
    return StackInfo(
        kafka_bootstrap_servers=bootstrap, database_url=pg_url, redis_url=redis_url, started=True
    )


def down(state_dir: Path, *, purge: bool = False) -> list[str]:
    """Stop what :func:`up` started under ``state_dir``, by recorded pid; return what was done.

    Kafka and Redis get SIGTERM, then SIGKILL after 20 s (every broker of a cluster at once,
    so that none waits for the others to leave); PostgreSQL is stopped with
    ``pg_ctl stop -m fast`` (signals if that fails). Data stays in place unless ``purge``,
    which then deletes ``state_dir`` and PostgreSQL's directory outside it, if any. A pid
    whose process is gone or is no longer the service is only forgotten, never signalled.
    """
    layout = _Layout(state_dir)
    if not layout.root.exists():
        return [f"Nothing to stop: {layout.root} does not exist."]
    messages: list[str] = []
    with _locked(layout.lock):
        state = _load_state(layout)
        messages.extend(_stop_brokers(layout, state))
        messages.append(_stop_postgres(layout, state))
        messages.append(_stop_pidfile("Redis", layout.redis_pid, "redis-server"))
        if purge:
            pg_root = _pg_root_from_state(layout, state)
            if state.get("postgres_fallback") and pg_root.parent.name.startswith("swarmlog-"):
                shutil.rmtree(pg_root.parent, ignore_errors=True)
                messages.append(f"Deleted {pg_root.parent}.")
    if purge:
        shutil.rmtree(layout.root, ignore_errors=True)
        messages.append(f"Deleted {layout.root}.")
    return messages


#: The services :func:`stop_service` knows, by the name it takes.
SERVICES = ("kafka", "postgres", "redis")


def stop_service(state_dir: Path, service: str) -> str:
    """Stop one service of the local stack under ``state_dir``, by recorded pid; say what was done.

    ``service`` is ``"kafka"`` (every broker of a ``--brokers 3`` cluster: to stop one
    broker, kill its pid from :func:`status`), ``"postgres"`` or ``"redis"``; the other two
    keep running.
    It is stopped as :func:`down` stops it (SIGTERM then SIGKILL after 20 s; PostgreSQL
    with ``pg_ctl stop -m fast``) and its data and ports stay recorded, so a later
    :func:`up` on the same ``state_dir`` starts it again on the same port (unless another
    program took the port meanwhile, which ``up`` then says). Meant for outage tests.

    Returns a message such as ``"Redis: stopped (pid 1234)."``. Raises ValueError for an
    unknown ``service``; StackError if ``state_dir`` holds no stack.
    """
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}: expected one of {', '.join(SERVICES)}")
    layout = _Layout(state_dir)
    if not layout.state_file.exists():
        raise StackError(f"No local stack under {layout.root} (no {layout.state_file.name})")
    with _locked(layout.lock):
        if service == "kafka":
            return " ".join(_stop_brokers(layout, _load_state(layout)))
        if service == "postgres":
            return _stop_postgres(layout, _load_state(layout))
        return _stop_pidfile("Redis", layout.redis_pid, "redis-server")


def status(state_dir: Path) -> list[dict[str, Any]]:
    """Describe each local service under ``state_dir``; starts nothing.

    Returns one dict per service, Kafka (one per broker of a cluster: ``Kafka 1``, ``Kafka
    2``, ...), PostgreSQL, Redis in that order, with keys ``name`` (str), ``running``
    (bool: the recorded pid is a live process of that service), ``pid`` (int or None),
    ``address`` (the broker's host:port or the URL, None before the first ``up``) and
    ``log`` (Path of its log file).
    """
    layout = _Layout(state_dir)
    state = _load_state(layout) if layout.state_file.exists() else {}
    pg_root = _pg_root_from_state(layout, state)
    pg_pid = _live_pid(pg_root / "data" / "postmaster.pid", "postgres")
    redis_pid = _live_pid(layout.redis_pid, "redis-server")
    urls = _urls(state)
    nodes = _broker_nodes(layout, state)
    kafka: list[dict[str, Any]] = []
    for node in nodes:
        paths = layout.broker(node)
        pid = _live_pid(paths.pid, "kafka.Kafka")
        port = state.get(_port_keys(node)[0])
        kafka.append(
            {
                "name": "Kafka" if len(nodes) == 1 else f"Kafka {node}",
                "running": pid is not None,
                "pid": pid,
                "address": f"{_HOST}:{port}" if port else None,
                "log": paths.log,
            }
        )
    return [
        *kafka,
        {
            "name": "PostgreSQL",
            "running": pg_pid is not None,
            "pid": pg_pid,
            "address": urls[1],
            "log": pg_root / "postgres.log",
        },
        {
            "name": "Redis",
            "running": redis_pid is not None,
            "pid": redis_pid,
            "address": urls[2],
            "log": layout.redis_log,
        },
    ]


def info(state_dir: Path) -> StackInfo | None:
    """Return the URLs of the local stack under ``state_dir`` if all three services run, else None.

    Starts nothing; ``swarmlog env`` uses it.
    """
    layout = _Layout(state_dir)
    if not layout.state_file.exists():
        return None
    if not all(service["running"] for service in status(state_dir)):
        return None
    kafka, database, redis_url = _urls(_load_state(layout))
    if not (kafka and database and redis_url):
        return None
    return StackInfo(kafka, database, redis_url, started=True)


def environment_info() -> StackInfo | None:
    """Return the services named by the environment (``started=False``) if all three are set.

    Reads ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL`` and ``REDIS_URL`` (or their
    ``SWARMLOG_`` forms) through :class:`infra.settings.Settings`; None if any is missing.
    """
    settings = Settings()
    if settings.kafka_bootstrap_servers and settings.database_url and settings.redis_url:
        return StackInfo(
            kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
            database_url=settings.database_url,
            redis_url=settings.redis_url,
            started=False,
        )
    return None


def env_exports(info: StackInfo) -> str:
    """Return ``export NAME=value`` lines (shell-quoted) for the three service variables."""
    values = (info.kafka_bootstrap_servers, info.database_url, info.redis_url)
    return "\n".join(
        f"export {name}={shlex.quote(value)}" for name, value in zip(ENV_VARS, values, strict=True)
    )


def kafka_jars_dir() -> Path:
    """Return where the broker's jars are cached: ``~/.cache/swarmlog/kafka-3.9.1/libs``.

    ``$XDG_CACHE_HOME`` replaces ``~/.cache`` where set.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "swarmlog" / f"kafka-{KAFKA_VERSION}" / "libs"


def ensure_kafka_jars(*, console: Console | None = None) -> Path:
    """Fetch the Kafka broker jars from Maven Central once; return the directory holding them.

    Runs ``mvn dependency:copy-dependencies`` on ``infra/kafka/pom.xml`` into a temporary
    directory that is renamed into place only when complete. Raises StackError if Maven or
    Java is missing (naming the Debian package) or the download fails (with Maven's output).
    """
    libs = kafka_jars_dir()
    if (libs / _COMPLETE_MARKER).exists() and (libs / _KAFKA_CORE_JAR).exists():
        return libs
    console = console or Console(stderr=True)
    libs.parent.mkdir(parents=True, exist_ok=True)
    with _locked(libs.parent / ".fetch.lock"):
        if (libs / _COMPLETE_MARKER).exists() and (libs / _KAFKA_CORE_JAR).exists():
            return libs
        mvn = _require_program("mvn", "maven")
        _java()
        staging = libs.parent / f"libs.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(_POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
        ]
        started = time.monotonic()
        with console.status(
            f"Fetching the Kafka {KAFKA_VERSION} broker jars from Maven Central (once) …"
        ):
            result = subprocess.run(
                command,
                cwd=libs.parent,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0 or not (staging / _KAFKA_CORE_JAR).exists():
            shutil.rmtree(staging, ignore_errors=True)
            output = (result.stdout + result.stderr).strip().splitlines()[-_LOG_TAIL_LINES:]
            raise StackError(
                f"Kafka: fetching the broker jars with Maven failed (exit {result.returncode}):"
                f" {shlex.join(command)}\n" + "\n".join(output)
            )
        (staging / _COMPLETE_MARKER).write_text(f"kafka {KAFKA_VERSION}\n")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        count = len(list(libs.glob("*.jar")))
        _say(
            console,
            f"[green]✓[/] Fetched {count} Kafka {KAFKA_VERSION} jars into {libs}"
            f" ({time.monotonic() - started:.1f} s)",
        )
    return libs


# --------------------------------------------------------------------------- layout, state


class _BrokerPaths:
    """The files of one Kafka node: node 1 in ``kafka/`` (where a single node always lived,
    so older state directories still work), node n in ``kafka-<n>/``."""

    def __init__(self, root: Path, node: int) -> None:
        self.node = node
        self.dir = root / ("kafka" if node == 1 else f"kafka-{node}")
        self.data = self.dir / "data"
        self.properties = self.dir / "server.properties"
        self.log4j = self.dir / "log4j.properties"
        self.log = self.dir / "kafka.log"
        self.pid = self.dir / "kafka.pid"


class _Layout:
    """Paths under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).expanduser().resolve()
        self.state_file = self.root / "stack.json"
        self.lock = self.root / ".stack.lock"
        # Kafka node 1 (the only one, unless a cluster).
        first = self.broker(1)
        self.kafka_dir = first.dir
        self.kafka_data = first.data
        self.kafka_properties = first.properties
        self.kafka_log4j = first.log4j
        self.kafka_log = first.log
        self.kafka_pid = first.pid
        self.redis_dir = self.root / "redis"
        self.redis_log = self.redis_dir / "redis.log"
        self.redis_pid = self.redis_dir / "redis.pid"

    def broker(self, node: int) -> _BrokerPaths:
        """The files of Kafka node ``node`` (1-based)."""
        return _BrokerPaths(self.root, node)

    def fallback_pg_root(self) -> Path:
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"swarmlog-{digest}" / "postgres"


def _load_state(layout: _Layout) -> dict[str, Any]:
    try:
        loaded = json.loads(layout.state_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise StackError(f"{layout.state_file} is unreadable ({error}); delete it") from error
    return loaded if isinstance(loaded, dict) else {}


def _save_state(layout: _Layout, state: dict[str, Any]) -> None:
    partial = layout.state_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    partial.replace(layout.state_file)


def _urls(state: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    ports = [state.get(_port_keys(node)[0]) for node in range(1, _recorded_brokers(state) + 1)]
    kafka = ",".join(f"{_HOST}:{port}" for port in ports) if all(ports) else None
    database = (
        f"postgresql://{DATABASE_USER}@{_HOST}:{state['postgres_port']}/{DATABASE_NAME}"
        if state.get("postgres_port")
        else None
    )
    redis_url = f"redis://{_HOST}:{state['redis_port']}/0" if state.get("redis_port") else None
    return kafka, database, redis_url


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` so that concurrent ups and downs take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- processes


def _say(console: Console, message: str) -> None:
    # soft_wrap: a path or URL must stay on one line to be copied, whatever the width.
    console.print(message, soft_wrap=True, highlight=False)


def _require_program(name: str, package: str) -> str:
    found = shutil.which(name)
    if not found:
        raise StackError(
            f"`{name}` not found: install it with `apt-get install {package}`"
            " (scripts/setup.sh installs everything the local stack needs)",
        )
    return found


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    return _require_program("java", "default-jre-headless")


def _read_pid(pid_file: Path) -> int | None:
    try:
        first = pid_file.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _is_alive(pid: int, expect: str) -> bool:
    """True if ``pid`` is a running (not zombie) process whose command line contains ``expect``."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]  # our own child, now exited and reaped
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path("/proc") / str(pid)
    if not proc.exists():
        return True  # no procfs: trust the signal check
    try:
        stat = (proc / "stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return expect in cmdline


def _live_pid(pid_file: Path, expect: str) -> int | None:
    pid = _read_pid(pid_file)
    return pid if pid is not None and _is_alive(pid, expect) else None


def _terminate(pid: int, expect: str, timeout_s: float = STOP_TIMEOUT_S) -> str:
    """SIGTERM ``pid``, wait up to ``timeout_s``, then SIGKILL; say which it took."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _is_alive(pid, expect):
            return "stopped"
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not _is_alive(pid, expect):
            break
        time.sleep(0.1)
    return f"killed (no exit {timeout_s:.0f} s after SIGTERM)"


def _stop_pidfile(name: str, pid_file: Path, expect: str) -> str:
    pid = _read_pid(pid_file)
    if pid is None:
        return f"{name}: not running."
    if not _is_alive(pid, expect):
        pid_file.unlink(missing_ok=True)
        return f"{name}: not running (forgot stale pid {pid})."
    outcome = _terminate(pid, expect)
    pid_file.unlink(missing_ok=True)
    return f"{name}: {outcome} (pid {pid})."


def _spawn(command: list[str], *, cwd: Path, log: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session with output appended to ``log``; record its pid."""
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    pid_file.write_text(f"{process.pid}\n")
    _children[process.pid] = process
    return process


def _log_tail(log: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64_000))
            text = handle.read().decode(errors="replace")
    except OSError as error:
        return f"(cannot read {log}: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _failure(service: str, what: str, log: Path) -> StackError:
    return StackError(
        f"{service}: {what}. Log: {log}\n--- last {_LOG_TAIL_LINES} lines of {log.name} ---\n"
        f"{_log_tail(log)}"
    )


def _run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion, in a helper thread if this thread already runs a loop."""

    async def main() -> T:
        return await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    values: list[T] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            values.append(asyncio.run(main()))
        except BaseException as error:  # handed back to the caller's thread
            errors.append(error)

    thread = threading.Thread(target=worker, name="swarmlog-stack-check")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return values[0]


# --------------------------------------------------------------------------- ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The services set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((_HOST, port))
        except OSError:
            return False
    return True


def _port_answers(port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _free_ports(count: int, avoid: set[int]) -> list[int]:
    """Return ``count`` distinct free ports, none in ``avoid``."""
    probes: list[socket.socket] = []
    try:
        while len(probes) < count:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((_HOST, 0))
            if probe.getsockname()[1] in avoid:
                probe.close()
                continue
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _ports_for(
    state: dict[str, Any], keys: tuple[str, ...], service: str, console: Console
) -> list[int]:
    """Return the saved ports for ``keys``, replacing them all if any is now taken."""
    saved = [state.get(key) for key in keys]
    kept = [port for port in saved if isinstance(port, int) and _port_free(port)]
    if len(kept) == len(keys):
        return kept
    # Another service may have been given a port it has not bound yet: never hand it out twice.
    others = {v for k, v in state.items() if k.endswith("_port") and k not in keys}
    fresh = _free_ports(len(keys), avoid={port for port in others if isinstance(port, int)})
    if all(saved):
        _say(
            console,
            f"[yellow]{service}: port(s) {saved} are taken by another program; using {fresh}.[/]",
        )
    state.update(zip(keys, fresh, strict=True))
    return fresh


# --------------------------------------------------------------------------- Kafka


#: Most Kafka nodes ``up`` runs; 2 is refused (a quorum of two survives no loss).
MAX_BROKERS = 9
#: Replication factor and min ISR a cluster gives its topics (internal ones included):
#: one broker of three may die with every acknowledged write still on two.
CLUSTER_REPLICATION_FACTOR = 3
CLUSTER_MIN_INSYNC_REPLICAS = 2


@dataclass
class _KafkaLaunch:
    node: int
    pid: int
    port: int
    started: bool
    since: float


def _check_broker_count(brokers: int) -> None:
    if brokers != 1 and not 3 <= brokers <= MAX_BROKERS:
        raise StackError(
            f"Kafka: --brokers {brokers}: use 1 (one node) or 3 to {MAX_BROKERS} (a cluster;"
            " two nodes cannot lose one, neither their controller quorum nor min ISR 2)"
        )


def _recorded_brokers(state: dict[str, Any]) -> int:
    count = state.get("kafka_brokers")
    return count if isinstance(count, int) and count >= 1 else 1


def _broker_nodes(layout: _Layout, state: dict[str, Any]) -> list[int]:
    """Node numbers to look at: those the state records, and any other node directory."""
    count = _recorded_brokers(state)
    for path in layout.root.glob("kafka-*"):
        suffix = path.name.removeprefix("kafka-")
        if suffix.isdigit():
            count = max(count, int(suffix))
    return list(range(1, count + 1))


def _port_keys(node: int) -> tuple[str, str]:
    """The ``stack.json`` keys of node ``node``'s broker and controller ports."""
    if node == 1:
        return "kafka_port", "kafka_controller_port"
    return f"kafka_{node}_port", f"kafka_{node}_controller_port"


def _resolve_broker_count(layout: _Layout, state: dict[str, Any], requested: int | None) -> int:
    """The number of Kafka nodes to run: ``requested``, else what the state dir holds, else 1.

    Raises StackError when ``requested`` differs from a cluster already formatted here (a
    KRaft quorum's voters are fixed when it is formatted).
    """
    formatted = any(
        (layout.broker(node).data / "meta.properties").exists()
        for node in _broker_nodes(layout, state)
    )
    recorded = _recorded_brokers(state)
    if requested is None:
        return recorded
    if formatted and requested != recorded:
        raise StackError(
            f"Kafka: {layout.root} holds a {recorded}-broker Kafka; `swarmlog up --brokers"
            f" {recorded}` starts it again. For {requested}, use another --state-dir, or"
            " `swarmlog down --purge` first (which deletes every topic)"
        )
    return requested


def _cluster_id() -> str:
    """A KRaft cluster id as Kafka's ``Uuid.randomUuid`` makes one: 16 random bytes in
    URL-safe base64 without padding, drawn again while it starts with ``-`` (which a
    command line would read as an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _write_kafka_config(
    paths: _BrokerPaths, brokers: int, port: int, controller_port: int, voters: str
) -> None:
    if brokers == 1:
        replication = """# A single node: internal topics with replication 1, or transactions hang
# at init.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
default.replication.factor=1
min.insync.replicas=1"""
    else:
        rf, isr = CLUSTER_REPLICATION_FACTOR, CLUSTER_MIN_INSYNC_REPLICAS
        replication = f"""# A cluster: every topic (the offsets and transaction logs too) on {rf}
# brokers, a write acknowledged (acks=all) only once {isr} replicas hold it: one node may die.
offsets.topic.replication.factor={rf}
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={isr}
default.replication.factor={rf}
min.insync.replicas={isr}"""
    shape = (
        "One KRaft node that is both broker and controller"
        if brokers == 1
        else f"Node {paths.node} of {brokers} KRaft nodes, each broker and controller (voter)"
    )
    paths.properties.write_text(
        f"""# Generated by swarmlog (infra/stack.py) on every start; edits are overwritten.
# {shape}, on loopback only.
process.roles=broker,controller
node.id={paths.node}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{controller_port}
advertised.listeners=PLAINTEXT://{_HOST}:{port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={paths.data}

{replication}
# Only an in-sync replica may become leader: never trade acknowledged writes for uptime.
unclean.leader.election.enable=false

# Tests join groups constantly; do not wait 3 s for more members.
group.initial.rebalance.delay.ms=0
num.partitions=3
# Topics are created explicitly (infra/), never by a typo.
auto.create.topics.enable=false
"""
    )
    paths.log4j.write_text(
        """# Generated by swarmlog: everything to stdout, which goes to kafka.log.
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.authorizer.logger=WARN
"""
    )


def _launch_kafka(
    layout: _Layout, state: dict[str, Any], libs: Path, console: Console, brokers: int
) -> list[_KafkaLaunch]:
    """Start every Kafka node that does not run; do not wait for them (:func:`_await_kafka`).

    While some nodes of a cluster run, the dead ones are started on their recorded ports
    (the running voters know them by those); only when none runs may ports change.
    """
    nodes = list(range(1, brokers + 1))
    state["kafka_brokers"] = brokers
    running = {node: _live_pid(layout.broker(node).pid, "kafka.Kafka") for node in nodes}
    keys = tuple(key for node in nodes for key in _port_keys(node))
    have_ports = all(state.get(key) for key in keys)
    if have_ports and any(running.values()):
        for node in nodes:
            taken = [
                state[key]
                for key in _port_keys(node)
                if running[node] is None and not _port_free(state[key])
            ]
            if taken:
                raise StackError(
                    f"Kafka: node {node}'s port(s) {taken} are taken by another program, and the"
                    " running nodes know it by them: `swarmlog down`, then `swarmlog up"
                    f" --brokers {brokers}` chooses new ports for all"
                )
    else:
        for pid in running.values():
            if pid is not None:  # running but we lost its ports: restart all on known ones
                _terminate(pid, "kafka.Kafka")
        running = dict.fromkeys(nodes)
        _ports_for(state, keys, "Kafka", console)
    voters = ",".join(f"{node}@{_HOST}:{state[_port_keys(node)[1]]}" for node in nodes)
    java = _java()
    classpath = f"{libs}/*"
    to_start = [node for node in nodes if running[node] is None]
    for node in to_start:
        paths = layout.broker(node)
        paths.dir.mkdir(parents=True, exist_ok=True)
        port, controller_port = (int(state[key]) for key in _port_keys(node))
        _write_kafka_config(paths, brokers, port, controller_port, voters)
    _format_kafka(
        layout,
        state,
        java,
        classpath,
        [n for n in to_start if not (layout.broker(n).data / "meta.properties").exists()],
        brokers,
    )
    launches: list[_KafkaLaunch] = []
    for node in nodes:
        port = int(state[_port_keys(node)[0]])
        pid = running[node]
        if pid is not None:
            launches.append(_KafkaLaunch(node, pid, port, started=False, since=time.monotonic()))
            continue
        paths = layout.broker(node)
        # One node keeps the heap it always had; three share 2 cores with everything else.
        heap = ["-Xms256m", "-Xmx768m"] if brokers == 1 else ["-Xms128m", "-Xmx512m"]
        command = [
            java,
            *heap,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{paths.log4j}",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(paths.properties),
        ]
        process = _spawn(command, cwd=paths.dir, log=paths.log, pid_file=paths.pid)
        launches.append(_KafkaLaunch(node, process.pid, port, started=True, since=time.monotonic()))
    return launches


def _format_kafka(
    layout: _Layout,
    state: dict[str, Any],
    java: str,
    classpath: str,
    nodes: list[int],
    brokers: int,
) -> None:
    """Format the KRaft storage of ``nodes`` (all at once: a JVM start each) with the
    state's cluster id; raise StackError naming the first that failed and its log."""
    if not nodes:
        return
    cluster_id = state.setdefault("kafka_cluster_id", _cluster_id())
    running: list[tuple[int, list[str], subprocess.Popen[str]]] = []
    for node in nodes:
        paths = layout.broker(node)
        command = [
            java,
            "-cp",
            classpath,
            f"-Dlog4j.configuration=file:{paths.log4j}",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",  # one argument even for an id from an older run
            "-c",
            str(paths.properties),
            "--ignore-formatted",
        ]
        process = subprocess.Popen(
            command,
            cwd=paths.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        running.append((node, command, process))
    failed: list[int] = []
    for node, command, process in running:
        output, _ = process.communicate()
        with open(layout.broker(node).log, "a") as log:
            log.write(f"\n--- {shlex.join(command)}\n{output}")
        if process.returncode != 0:
            failed.append(node)
    if failed:
        node = failed[0]
        raise _failure(
            _broker_name(node, brokers),
            "formatting the KRaft storage failed",
            layout.broker(node).log,
        )
    state["kafka_formatted"] = True


def _broker_name(node: int, brokers: int) -> str:
    return "Kafka" if brokers == 1 else f"Kafka {node}"


def _stop_brokers(layout: _Layout, state: dict[str, Any]) -> list[str]:
    """SIGTERM every live Kafka node at once, SIGKILL those still there after 20 s."""
    nodes = _broker_nodes(layout, state)
    messages: dict[int, str] = {}
    live: dict[int, int] = {}
    for node in nodes:
        name = _broker_name(node, len(nodes))
        pid_file = layout.broker(node).pid
        pid = _read_pid(pid_file)
        if pid is None:
            messages[node] = f"{name}: not running."
        elif not _is_alive(pid, "kafka.Kafka"):
            pid_file.unlink(missing_ok=True)
            messages[node] = f"{name}: not running (forgot stale pid {pid})."
        else:
            live[node] = pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while live and time.monotonic() < deadline:
        for node, pid in list(live.items()):
            if not _is_alive(pid, "kafka.Kafka"):
                messages[node] = f"{_broker_name(node, len(nodes))}: stopped (pid {pid})."
                layout.broker(node).pid.unlink(missing_ok=True)
                del live[node]
        time.sleep(0.1)
    for node, pid in live.items():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not _is_alive(pid, "kafka.Kafka"):
                break
            time.sleep(0.1)
        messages[node] = (
            f"{_broker_name(node, len(nodes))}: killed (no exit {STOP_TIMEOUT_S:.0f} s after"
            f" SIGTERM) (pid {pid})."
        )
        layout.broker(node).pid.unlink(missing_ok=True)
    return [messages[node] for node in nodes]


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library logger while we poll a service that is expected to refuse at first."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


async def _kafka_brokers(bootstrap: str) -> set[int]:
    """The node ids of the brokers the cluster's metadata lists (live ones); empty if none
    answers yet."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="swarmlog-stack", request_timeout_ms=5000
    )
    try:
        await asyncio.wait_for(admin.start(), 10)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 10)
        return {int(broker["node_id"]) for broker in cluster.get("brokers", [])}
    except Exception:  # noqa: BLE001 - not ready yet, the caller retries
        return set()
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _await_kafka(layout: _Layout, launches: list[_KafkaLaunch], console: Console) -> str:
    """Wait until the metadata lists every node as a broker; return the bootstrap list."""
    bootstrap = ",".join(f"{_HOST}:{launch.port}" for launch in launches)
    brokers = len(launches)
    nodes = {launch.node for launch in launches}
    since = min(launch.since for launch in launches)
    deadline = since + KAFKA_READY_TIMEOUT_S
    with console.status(f"Waiting for Kafka on {bootstrap} …"):
        while True:
            for launch in launches:
                if not _is_alive(launch.pid, "kafka.Kafka"):
                    paths = layout.broker(launch.node)
                    paths.pid.unlink(missing_ok=True)
                    raise _failure(
                        _broker_name(launch.node, brokers),
                        f"the broker (pid {launch.pid}) exited",
                        paths.log,
                    )
            if all(_port_answers(launch.port) for launch in launches):
                with _quiet("aiokafka"):
                    if _run_async(lambda: _kafka_brokers(bootstrap)) >= nodes:
                        break
            if time.monotonic() > deadline:
                late = [launch for launch in launches if launch.started] or launches
                raise _failure(
                    _broker_name(late[0].node, brokers),
                    f"the metadata on {bootstrap} did not list every broker within"
                    f" {KAFKA_READY_TIMEOUT_S:.0f} s (pids {[x.pid for x in launches]} still"
                    " run; `swarmlog down` stops them)",
                    layout.broker(late[0].node).log,
                )
            time.sleep(0.25)
    for launch in launches:
        took = time.monotonic() - launch.since
        verb = f"started in {took:.1f} s" if launch.started else "running"
        name = f"Kafka {KAFKA_VERSION}" + (f" node {launch.node}" if brokers > 1 else "")
        _say(console, f"[green]✓[/] {name} {verb} on {_HOST}:{launch.port} (pid {launch.pid})")
    return bootstrap


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bindir(data_dir: Path | None = None) -> Path:
    """Find the PostgreSQL server programs, preferring the major version of an existing cluster."""
    candidates: list[Path] = []
    if data_dir is not None and (data_dir / "PG_VERSION").exists():
        major = (data_dir / "PG_VERSION").read_text().strip()
        candidates.append(Path("/usr/lib/postgresql") / major / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            bindir = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(bindir))

    def major_of(path: Path) -> float:
        try:
            return float(path.parent.name)
        except ValueError:
            return 0.0

    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major_of, reverse=True))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise StackError(
        "PostgreSQL: `initdb`/`pg_ctl` not found (looked in /usr/lib/postgresql/*/bin,"
        " `pg_config --bindir` and PATH): install them with `apt-get install postgresql`"
        " (scripts/setup.sh installs everything the local stack needs)",
    )


def _as_postgres_user(command: list[str]) -> list[str]:
    """Prefix ``command`` so that it runs as the ``postgres`` OS user when we are root."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", POSTGRES_OS_USER, "--", *command]
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={POSTGRES_OS_USER}", f"--regid={POSTGRES_OS_USER}",
                "--init-groups", "--", *command]  # fmt: skip
    raise StackError(
        "PostgreSQL: neither `runuser` nor `setpriv` found: `apt-get install util-linux`"
    )


def _ensure_postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        pass
    useradd = _require_program("useradd", "passwd")
    subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home",
         "--home-dir", "/var/lib/postgresql", "--shell", "/usr/sbin/nologin", POSTGRES_OS_USER],
        check=True, capture_output=True,
    )  # fmt: skip
    return pwd.getpwnam(POSTGRES_OS_USER)


def _pg_env() -> dict[str, str]:
    # A user's PGDATA/PGPORT/PGHOST must not steer our cluster.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _pg_root_from_state(layout: _Layout, state: dict[str, Any]) -> Path:
    return Path(state["postgres_dir"]) if state.get("postgres_dir") else layout.root / "postgres"


def _postgres_user_can_write(path: Path) -> bool:
    check = _as_postgres_user(["test", "-w", str(path), "-a", "-x", str(path)])
    return subprocess.run(check, capture_output=True, check=False).returncode == 0


def _prepare_pg_root(layout: _Layout, state: dict[str, Any], console: Console) -> Path:
    """Choose (once) and create PostgreSQL's directory, owned by the user PostgreSQL runs as."""
    if state.get("postgres_dir"):
        roots = [Path(state["postgres_dir"])]
    else:
        roots = [layout.root / "postgres", layout.fallback_pg_root()]
    if os.geteuid() != 0:
        root = roots[0]
        root.mkdir(parents=True, exist_ok=True)
        state.setdefault("postgres_dir", str(root))
        state.setdefault("postgres_fallback", False)
        return root
    account = _ensure_postgres_user()
    for index, root in enumerate(roots):
        root.mkdir(parents=True, exist_ok=True)
        os.chown(root, account.pw_uid, account.pw_gid)
        root.chmod(0o700)
        if root.parent.name.startswith("swarmlog-"):  # the fallback's own parent
            os.chown(root.parent, account.pw_uid, account.pw_gid)
            root.parent.chmod(0o700)
        if _postgres_user_can_write(root):
            if "postgres_dir" not in state:
                state["postgres_dir"] = str(root)
                state["postgres_fallback"] = index > 0
                if index > 0:
                    _say(
                        console,
                        f"[yellow]PostgreSQL: the `{POSTGRES_OS_USER}` user cannot reach"
                        f" {layout.root}, so its data lives in {root} (see stack.json).[/]",
                    )
            return root
        if index == 0 and len(roots) > 1:
            with contextlib.suppress(OSError):
                root.rmdir()
    raise StackError(
        f"PostgreSQL: the `{POSTGRES_OS_USER}` OS user cannot write {roots[-1]};"
        f" fix its permissions or delete `postgres_dir` from {layout.state_file}"
    )


def _write_pg_config(data: Path, port: int, socket_dir: Path | None) -> None:
    sockets = str(socket_dir) if socket_dir else ""
    conf = data / "swarmlog.conf"
    conf.write_text(
        f"""# Generated by swarmlog (infra/stack.py) on every start; edits are overwritten.
listen_addresses = '{_HOST}'
port = {port}
unix_socket_directories = '{sockets}'
# A test box: many short-lived pools from parallel tests.
max_connections = 200
shared_buffers = 128MB
log_line_prefix = '%m [%p] %q%u@%d '
"""
    )
    main_conf = data / "postgresql.conf"
    include = "include_if_exists = 'swarmlog.conf'"
    if include not in main_conf.read_text():
        with open(main_conf, "a") as handle:
            handle.write(f"\n# Added by swarmlog\n{include}\n")
    if os.geteuid() == 0:
        account = pwd.getpwnam(POSTGRES_OS_USER)
        os.chown(conf, account.pw_uid, account.pw_gid)


async def _ensure_database(port: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(
        host=_HOST, port=port, user=DATABASE_USER, database="postgres", timeout=10
    )
    try:
        exists = await connection.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME
        )
        if not exists:
            await connection.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    finally:
        await connection.close()


def _ensure_postgres(layout: _Layout, state: dict[str, Any], console: Console) -> str:
    """Init (once) and start PostgreSQL unless it runs; make sure database ``swarmlog`` exists."""
    root = _prepare_pg_root(layout, state, console)
    data = root / "data"
    log = root / "postgres.log"
    bindir = _pg_bindir(data)
    since = time.monotonic()
    pid = _live_pid(data / "postmaster.pid", "postgres")
    started = False
    if pid is None or not state.get("postgres_port"):
        if pid is not None:
            _stop_postgres(layout, state)
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)  # a half-made cluster from a failed initdb
            command = _as_postgres_user(
                [str(bindir / "initdb"), "-D", str(data), "--auth=trust",
                 f"--username={DATABASE_USER}", "--encoding=UTF8", "--no-locale", "--no-sync"]
            )  # fmt: skip
            result = subprocess.run(
                command, cwd=root, env=_pg_env(), capture_output=True, text=True, check=False
            )
            with contextlib.suppress(OSError):
                with open(log, "a") as handle:
                    handle.write(f"--- {shlex.join(command)}\n{result.stdout}{result.stderr}")
                if os.geteuid() == 0:  # pg_ctl appends to it as the postgres user
                    account = pwd.getpwnam(POSTGRES_OS_USER)
                    os.chown(log, account.pw_uid, account.pw_gid)
            if result.returncode != 0:
                raise StackError(
                    f"PostgreSQL: initdb failed (exit {result.returncode}): {shlex.join(command)}"
                    f"\n{(result.stdout + result.stderr).strip()[-3000:]}"
                )
        (port,) = _ports_for(state, ("postgres_port",), "PostgreSQL", console)
        socket_dir: Path | None = root / "run"
        if len(str(socket_dir)) > _MAX_SOCKET_DIR:
            socket_dir = None  # the path is too long for a unix socket: TCP only
        else:
            root.joinpath("run").mkdir(exist_ok=True)
            if os.geteuid() == 0:
                account = pwd.getpwnam(POSTGRES_OS_USER)
                os.chown(root / "run", account.pw_uid, account.pw_gid)
        _write_pg_config(data, port, socket_dir)
        command = _as_postgres_user(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
             "-t", str(int(POSTGRES_READY_TIMEOUT_S)), "start"]
        )  # fmt: skip
        with console.status(f"Starting PostgreSQL on {_HOST}:{port} …"):
            result = subprocess.run(
                command, cwd=root, env=_pg_env(), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise _failure(
                "PostgreSQL",
                f"`pg_ctl start` failed (exit {result.returncode}):"
                f" {(result.stdout + result.stderr).strip()[-500:]}",
                log,
            )
        pid = _read_pid(data / "postmaster.pid")
        started = True
    port = int(state["postgres_port"])
    deadline = time.monotonic() + POSTGRES_READY_TIMEOUT_S
    while True:
        try:
            _run_async(lambda: _ensure_database(port))
            break
        except Exception as error:
            if time.monotonic() > deadline:
                raise _failure(
                    "PostgreSQL", f"no answer on {_HOST}:{port} ({error})", log
                ) from error
            time.sleep(0.25)
    url = _urls(state)[1]
    assert url is not None
    verb = f"started in {time.monotonic() - since:.1f} s" if started else "running"
    _say(console, f"[green]✓[/] PostgreSQL {verb} at {url} (pid {pid}, data {data})")
    return url


def _stop_postgres(layout: _Layout, state: dict[str, Any]) -> str:
    data = _pg_root_from_state(layout, state) / "data"
    pid = _live_pid(data / "postmaster.pid", "postgres")
    if pid is None:
        return "PostgreSQL: not running."
    try:
        bindir: Path | None = _pg_bindir(data)
    except StackError:
        bindir = None
    if bindir is not None:
        command = _as_postgres_user(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
             "-t", str(int(STOP_TIMEOUT_S)), "stop"]
        )  # fmt: skip
        result = subprocess.run(
            command, cwd=data.parent, env=_pg_env(), capture_output=True, check=False
        )
        if result.returncode == 0 and not _is_alive(pid, "postgres"):
            return f"PostgreSQL: stopped (pid {pid})."
    return f"PostgreSQL: {_terminate(pid, 'postgres')} (pid {pid})."


# --------------------------------------------------------------------------- Redis


def _redis_pings(port: int) -> bool:
    import redis

    client = redis.Redis(host=_HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _ensure_redis(layout: _Layout, state: dict[str, Any], console: Console) -> str:
    """Start Redis unless it runs; wait for PING."""
    layout.redis_dir.mkdir(parents=True, exist_ok=True)
    since = time.monotonic()
    pid = _live_pid(layout.redis_pid, "redis-server")
    started = False
    if pid is None or not state.get("redis_port"):
        if pid is not None:
            _terminate(pid, "redis-server")
        server = _require_program("redis-server", "redis-server")
        (port,) = _ports_for(state, ("redis_port",), "Redis", console)
        command = [
            server,
            "--port", str(port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(layout.redis_dir),
            "--daemonize", "no",
        ]  # fmt: skip
        process = _spawn(
            command, cwd=layout.redis_dir, log=layout.redis_log, pid_file=layout.redis_pid
        )
        pid = process.pid
        started = True
    port = int(state["redis_port"])
    deadline = time.monotonic() + REDIS_READY_TIMEOUT_S
    while not _redis_pings(port):
        if not _is_alive(pid, "redis-server"):
            layout.redis_pid.unlink(missing_ok=True)
            raise _failure("Redis", f"redis-server (pid {pid}) exited", layout.redis_log)
        if time.monotonic() > deadline:
            raise _failure("Redis", f"no PING answer on {_HOST}:{port}", layout.redis_log)
        time.sleep(0.1)
    url = _urls(state)[2]
    assert url is not None
    verb = f"started in {time.monotonic() - since:.1f} s" if started else "running"
    _say(console, f"[green]✓[/] Redis {verb} at {url} (pid {pid})")
    return url
