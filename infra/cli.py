"""The ``swarmlog`` command line: one typer command per function.

The stack commands (``up``, ``down``, ``status``, ``env``) run the local Kafka, PostgreSQL
and Redis of :mod:`infra.stack`. Progress and tables go to stderr; the only thing written
to stdout is ``export`` lines, so that ``eval "$(swarmlog up)"`` and ``eval "$(swarmlog
env)"`` set the service variables in the calling shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from infra import bootstrap, stack
from infra.settings import Settings

app = typer.Typer(
    name="swarmlog",
    help="swarmlog: an event-sourced CQRS backend on Apache Kafka.",
    no_args_is_help=True,
    add_completion=False,
    # Markdown joins a docstring's wrapped lines into paragraphs in --help.
    rich_markup_mode="markdown",
)

_err = Console(stderr=True)
_log = structlog.get_logger("swarmlog")


def _default_state_dir() -> Path:
    return Settings().state_dir


StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        help="Where the local stack keeps its data, logs, pids and ports"
        " (default: $SWARMLOG_STATE_DIR or .swarmlog).",
        default_factory=_default_state_dir,
        show_default=False,
        file_okay=False,
    ),
]


def _services_table(state_dir: Path) -> Table:
    root = state_dir.resolve()
    services = stack.status(state_dir)
    table = Table(
        title=f"swarmlog local stack in {root}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("service", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("pid", justify="right", no_wrap=True)
    # Addresses get copied from here, so they are never shortened; each log path goes on the
    # line below its address, which keeps the table within 80 columns.
    table.add_column("address / log", overflow="fold")
    for service in services:
        log = Path(service["log"])
        shown = log.relative_to(root) if log.is_relative_to(root) else log
        table.add_row(
            service["name"],
            "[green]running[/]" if service["running"] else "[red]stopped[/]",
            str(service["pid"] or "-"),
            f"{escape(service['address'] or '-')}\n[dim]{escape(str(shown))}[/]",
        )
    return table


@app.command()
def up(
    state_dir: StateDir,
    brokers: Annotated[
        int | None,
        typer.Option(
            "--brokers",
            min=1,
            help="Kafka nodes: 1, or 3 for a KRaft cluster (each node broker and controller;"
            " replication factor 3, min.insync.replicas 2). Default: what --state-dir holds,"
            " else 1.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start Kafka, PostgreSQL and Redis locally, or reuse them if they already run.

    Needs no Docker and no configuration: the Kafka broker jars are fetched from Maven
    Central once (into ~/.cache/swarmlog), PostgreSQL and Redis are Debian's packages
    (scripts/setup.sh installs them). Each listens on 127.0.0.1 on a port chosen the first
    time and kept. If KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL are all set,
    nothing is started and those are used.

    Prints the services on stderr and `export` lines on stdout:
    eval "$(swarmlog up)" sets the variables in your shell.

    With --brokers 3, KAFKA_BOOTSTRAP_SERVERS lists the three brokers; run again, it
    starts only the brokers that died.
    """
    try:
        info = stack.up(state_dir, console=_err, brokers=brokers)
    except stack.StackError as error:
        message = f"[red]swarmlog up failed:[/] {escape(str(error))}"
        _err.print(message, soft_wrap=True, highlight=False)
        _err.print("Services that did start keep running; `swarmlog down` stops them.")
        raise typer.Exit(1) from error
    if info.started:
        _err.print(_services_table(state_dir))
    typer.echo(stack.env_exports(info))


@app.command()
def down(
    state_dir: StateDir,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge",
            help="Also delete the state directory: every topic, table and key is lost.",
        ),
    ] = False,
) -> None:
    """Stop the local Kafka, PostgreSQL and Redis that `swarmlog up` started.

    Processes are stopped by their recorded pid (SIGTERM, then SIGKILL after 20 s;
    PostgreSQL with `pg_ctl stop -m fast`). Data stays for the next `up` unless --purge.
    """
    try:
        messages = stack.down(state_dir, purge=purge)
    except stack.StackError as error:
        message = f"[red]swarmlog down failed:[/] {escape(str(error))}"
        _err.print(message, soft_wrap=True, highlight=False)
        raise typer.Exit(1) from error
    for message in messages:
        _err.print(message, soft_wrap=True, highlight=False)


@app.command()
def status(state_dir: StateDir) -> None:
    """Show whether each local service runs, with its pid, address and log file.

    Exits 0 when all three run, 1 otherwise.
    """
    _err.print(_services_table(state_dir))
    if not all(service["running"] for service in stack.status(state_dir)):
        raise typer.Exit(1)


@app.command()
def env(state_dir: StateDir) -> None:
    """Print `export` lines for KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL.

    Use as: eval "$(swarmlog env)". Starts nothing: prints the variables already set in
    the environment if all three are, else the local stack's if it runs, else fails.
    """
    info = stack.environment_info()
    if info is None:
        found = stack.info(state_dir)
        if found is None:
            _err.print(
                f"The local stack in {state_dir} is not running: run `swarmlog up`.",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(1)
        info = found
    typer.echo(stack.env_exports(info))


def _settings(state_dir: Path) -> Settings:
    """Settings from the environment; service URLs from the local stack when unset."""
    settings = Settings()
    if settings.kafka_bootstrap_servers and settings.database_url and settings.redis_url:
        return settings
    found = stack.info(state_dir)
    if found is None:
        _err.print(
            "KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL and REDIS_URL are not set and no local"
            f" stack runs in {state_dir}: run `swarmlog up` first.",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(1)
    return settings.model_copy(
        update={
            "kafka_bootstrap_servers": found.kafka_bootstrap_servers,
            "database_url": found.database_url,
            "redis_url": found.redis_url,
        }
    )


#: Seconds a role gets to drain after SIGTERM or SIGINT (finish or abort the batch in
#: hand, commit, close its clients) before what is left is cancelled; a role whose
#: service is unreachable may not finish (its clients wait on the broker).
DRAIN_TIMEOUT_S = 7.0
#: Seconds after the signal at which the process exits whatever still runs (a cancelled
#: client that does not return): within the 10 s bound of a clean stop (issue 10).
EXIT_DEADLINE_S = 9.0


def _exit_by_deadline() -> None:
    """Exit the process ``EXIT_DEADLINE_S`` after the stop signal, from a daemon thread
    the event loop cannot block: what is left open is safe to drop (an open transaction
    is aborted by the broker or fenced by the next owner; the projector's offsets commit
    with its rows), as after a kill. The exit code is 1: a supervisor sees that the role
    did not stop cleanly."""

    def deadline() -> None:
        sys.stderr.write(
            f"swarmlog: still stopping {EXIT_DEADLINE_S:.0f} s after the signal; exiting now"
            " with code 1 (nothing committed is lost: an open transaction is aborted)\n"
        )
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(EXIT_DEADLINE_S, deadline)
    timer.daemon = True
    timer.start()


async def _until_signalled(run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run ``run(stop)``; SIGTERM or SIGINT sets ``stop`` (the part then finishes the batch
    in hand, commits and returns). A part that has not returned ``DRAIN_TIMEOUT_S``
    seconds after the signal is cancelled, and the process exits at the latest
    ``EXIT_DEADLINE_S`` seconds after it (``_exit_by_deadline``). An error of the part
    propagates."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            _exit_by_deadline()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    task = asyncio.create_task(run(stop), name="roles")
    signalled = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=DRAIN_TIMEOUT_S)
        if not task.done():
            _log.warning(
                f"not drained {DRAIN_TIMEOUT_S:.0f} s after the stop signal (a service"
                " unreachable?): cancelling what is left; an open transaction is aborted,"
                " nothing committed is lost"
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
    finally:
        signalled.cancel()
    await task


def run_roles(
    settings: Settings,
    roles: tuple[bootstrap.Role, ...],
    only: tuple[str, ...] = bootstrap.PROCESS_MANAGERS,
) -> None:
    """Run ``roles`` (processor, streams, projector) of ``settings`` in this process until
    SIGTERM or SIGINT, built by the composition root (``bootstrap.deploy``), which closes
    their clients afterwards. ``only`` chooses the process managers of ``streams``.

    Outages of Kafka, PostgreSQL or Redis are waited out; what a role cannot survive (a
    newer copy fenced it, a misconfiguration) ends it: the traceback, then one line
    naming the role and the reason, and exit code 1 (typer.Exit).
    """

    async def deployed(stop: asyncio.Event) -> None:
        # Deployed inside the signal handling: a SIGTERM while the roles still wait for a
        # service at start stops them like one while they run.
        async with bootstrap.deploy(settings, roles, only=only) as deployment:
            await deployment.run(stop)

    async def main() -> None:
        await _until_signalled(deployed)

    try:
        asyncio.run(main())
    except Exception as error:
        _log.exception("role stopped by an error it cannot survive", roles=list(roles))
        _err.print(
            f"[red]swarmlog {' '.join(roles)} stopped:[/] {escape(type(error).__name__)}:"
            f" {escape(str(error))}",
            soft_wrap=True,
            highlight=False,
        )
        raise typer.Exit(1) from error


@app.command()
def processor(state_dir: StateDir) -> None:
    """Run the command processor: commands -> deciders -> events, transactionally.

    Run several copies to share the command partitions. Stops cleanly on SIGTERM.
    Configured by SWARMLOG_* variables (see infra/settings.py), e.g.
    SWARMLOG_TOPIC_PREFIX and SWARMLOG_PARTITIONS.
    """
    bootstrap.configure_logging()
    run_roles(_settings(state_dir), ("processor",))


@app.command()
def streams(
    state_dir: StateDir,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="Run only this process manager (scheduler, economy or workflow); repeat "
            "for several. Default: all three in this process.",
        ),
    ] = None,
) -> None:
    """Run the process managers: the scheduler (assignment, leases, heartbeats), the
    economy (rewards, slashing, ledger credits, governance deadlines) and the workflow
    engine (runs, step tasks, outcomes, cancellation).

    Copies of each elect one leader; the others stand by. On a machine with cores to
    spare, one process per manager (``--only workflow`` ...) lets them run in parallel.
    Stops cleanly on SIGTERM.
    """
    chosen = tuple(only) if only else bootstrap.PROCESS_MANAGERS
    unknown = sorted(set(chosen) - set(bootstrap.PROCESS_MANAGERS))
    if unknown:
        raise typer.BadParameter(
            f"{', '.join(unknown)}: choose from {', '.join(bootstrap.PROCESS_MANAGERS)}",
            param_hint="--only",
        )
    bootstrap.configure_logging()
    run_roles(_settings(state_dir), ("streams",), chosen)


@app.command()
def projector(state_dir: StateDir) -> None:
    """Run the projector: events -> PostgreSQL read models and Redis hot views.

    Offsets are kept in PostgreSQL with the rows. Copies share the partitions.
    """
    bootstrap.configure_logging()
    run_roles(_settings(state_dir), ("projector",))


@app.command()
def api(
    state_dir: StateDir,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (default 8000).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="API processes sharing the port (default 1).")
    ] = None,
) -> None:
    """Serve the HTTP API (commands, queries, SSE); OpenAPI at /docs."""
    bootstrap.configure_logging()
    settings = _settings(state_dir)
    updates = {
        k: v
        for k, v in (("api_host", host), ("api_port", port), ("api_workers", workers))
        if v is not None
    }
    _serve_api(settings.model_copy(update=updates))


#: Seconds uvicorn waits for open requests and streams after SIGTERM before closing them
#: (then the lifespan shutdown closes the API's clients): a clean stop within 10 s.
API_GRACEFUL_SHUTDOWN_S = 5


def _exit_zero(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _serve_api(settings: Settings) -> None:
    """Serve the HTTP API with uvicorn until SIGTERM, in ``settings.api_workers``
    processes (uvicorn's workers share the port; each builds its parts through
    ``create_app``'s lifespan, which asks the composition root for them)."""
    import uvicorn

    from api.app import create_app

    asyncio.run(bootstrap.connect(settings))  # create missing topics once, before the workers
    # uvicorn drains on SIGTERM (no new connections, open requests finished, lifespan
    # shutdown closing the SSE streams and flushing the producer), then raises the
    # signal again for its default action, which would make a clean stop exit -15: this
    # handler, restored by uvicorn before it does so, turns that into exit 0.
    signal.signal(signal.SIGTERM, _exit_zero)
    if settings.api_workers > 1:
        # Workers build the app from the environment: hand the settings down through it.
        kafka_url, database_url, redis_url = settings.require_services()
        os.environ.update(
            KAFKA_BOOTSTRAP_SERVERS=kafka_url, DATABASE_URL=database_url, REDIS_URL=redis_url
        )
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=settings.api_host,
            port=settings.api_port,
            workers=settings.api_workers,
            log_level="warning",
            timeout_graceful_shutdown=API_GRACEFUL_SHUTDOWN_S,
        )
        return
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=API_GRACEFUL_SHUTDOWN_S,
    )  # uvicorn handles SIGTERM itself


audit_app = typer.Typer(help="Audits of the read models against the log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("ledger")
def audit_ledger(state_dir: StateDir) -> None:
    """Check the ledger invariant (supply = balances + staked + unstaking + in flight) on
    the read models and on a fold of the log, and that the two agree; exit 1 on any
    difference."""
    from projections.audit import LedgerAudit
    from projections.audit import audit_ledger as run_audit

    settings = _settings(state_dir)

    async def main() -> LedgerAudit:
        async with bootstrap.open_operator(settings) as op:
            return await run_audit(op.kafka, op.topics, op.pool, op.schema)

    result = asyncio.run(main())
    table = Table(title="swarmlog ledger audit", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("check")
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in result.checks:
        table.add_row(
            check.name, "[green]ok[/]" if check.ok else "[red]DIFFERS[/]", escape(check.detail)
        )
    _err.print(table)
    if not result.ok:
        raise typer.Exit(1)


deadletters_app = typer.Typer(invoke_without_command=True)
app.add_typer(deadletters_app, name="deadletters")


@deadletters_app.callback()
def deadletters(
    ctx: typer.Context,
    state_dir: StateDir,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    topic: Annotated[
        str | None,
        typer.Option(help="Only records from this topic (e.g. swarm.task.events)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print them as a JSON array on stdout.")
    ] = False,
    from_log: Annotated[
        bool,
        typer.Option(
            "--from-log",
            help="Read the dead-letter topic instead of the dead_letters table (which the"
            " projector keeps): for when no projector runs.",
        ),
    ] = False,
) -> None:
    """List dead letters, newest first: when, where the record was
    (topic:partition:offset, which `replay` takes), why, and whether it was replayed.

    `swarmlog deadletters replay REF` re-applies one after a fix.
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    from projections.deadletters import list_dead_letters

    settings = _settings(state_dir)

    async def main() -> list[dict[str, Any]]:
        async with bootstrap.open_operator(settings) as op:
            return await list_dead_letters(
                op.kafka, op.topics, op.pool, op.schema, limit=limit, topic=topic, from_log=from_log
            )

    rows = asyncio.run(main())
    if as_json:
        typer.echo(json.dumps(rows, default=str, indent=2))
        return
    table = Table(
        title=f"swarmlog dead letters ({len(rows)}, newest first)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("at", no_wrap=True)
    table.add_column("record", overflow="fold")
    table.add_column("reason", overflow="fold")
    table.add_column("replayed", no_wrap=True)
    for row in rows:
        where = f"{row['source_topic']}:{row['source_partition']}:{row['source_offset']}"
        replayed = row["replayed_at"].isoformat(timespec="seconds") if row["replayed_at"] else "-"
        table.add_row(
            row["dead_lettered_at"].isoformat(timespec="seconds"),
            f"{escape(where)}\n[dim]{escape(row['id'])}[/]",
            escape(row["reason"]),
            replayed,
        )
    _err.print(table)


@deadletters_app.command("replay")
def deadletters_replay(
    state_dir: StateDir,
    ref: Annotated[
        str,
        typer.Argument(
            help="The dead letter's id, or the record's position TOPIC:PARTITION:OFFSET."
        ),
    ],
) -> None:
    """Replay a dead letter, after fixing what refused it.

    An event is re-applied by the projector code in this process, read from its topic
    (never written to the event store again), with the later events of its aggregate
    that were ignored without it. Any other record (a command) is produced to its topic
    again with the same key, value and headers, for its role to read again. Exit 1 if
    there is no such dead letter or it is still refused (nothing changes then).
    """
    from projections.deadletters import Replayed, replay
    from projections.projector import ReplayError

    settings = _settings(state_dir)

    async def main() -> Replayed:
        async with bootstrap.open_operator(settings) as op:
            return await replay(
                op.kafka,
                op.topics,
                op.pool,
                op.schema,
                ref,
                lambda: bootstrap.open_projector(op.clients),
            )

    try:
        done = asyncio.run(main())
    except (LookupError, ReplayError) as error:
        _err.print(f"[red]not replayed:[/] {escape(str(error))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from error
    source = done.source
    typer.echo(f"{source.topic}:{source.partition}:{source.offset}: {done.how}")


@app.command()
def demo(
    state_dir: StateDir,
    package: Annotated[
        list[str] | None,
        typer.Option(
            help="Installed Python package to analyse; repeat for several"
            " (default: asyncio, email, json)."
        ),
    ] = None,
    kill_at: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Kill the busiest agent when this fraction of tasks is done (0: kill none).",
        ),
    ] = 0.35,
    pace_ms: Annotated[
        int, typer.Option(min=0, help="Agents' think time per task, in milliseconds.")
    ] = 150,
    keep_stack: Annotated[
        bool, typer.Option(help="Leave Kafka, PostgreSQL and Redis running afterwards.")
    ] = False,
) -> None:
    """Run the whole stack and a demo swarm analysing real code; print a summary.

    Starts Kafka, PostgreSQL and Redis (or uses the ones the environment names), the
    swarmlog processes and four SDK agents with different capabilities; submits one task
    per module of the packages; kills one agent part-way; prints what each agent did,
    requeues, throughput, latency, events on the log and the most complex functions found.
    """
    from demo.swarm import DEFAULT_PACKAGES, run_demo

    bootstrap.configure_logging("WARNING")
    try:
        asyncio.run(
            run_demo(
                state_dir=state_dir,
                packages=tuple(package or DEFAULT_PACKAGES),
                kill_at=kill_at,
                pace_ms=pace_ms,
                keep_stack=keep_stack,
            )
        )
    except (RuntimeError, ValueError, stack.StackError) as error:
        _err.print(
            f"[red]swarmlog demo failed:[/] {escape(str(error))}", soft_wrap=True, highlight=False
        )
        raise typer.Exit(1) from error


if __name__ == "__main__":
    app()
