"""Request and response bodies of the HTTP API, kept apart from the domain and storage.

Money crosses the API as decimal strings of tokens (``"0.5"`` in, ``"0.500000"`` out,
always six decimals); inside it is integer micro-tokens (1 token = 1,000,000). Ids in
bodies and paths are 1 to 128 characters of ``[A-Za-z0-9_.:@-]`` starting with a
letter or digit, so they are safe in a URL path.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from domain.messages import MICRO
from domain.workflow import MAX_STEPS, TEMPLATE_NAME, ParameterSpec, StepSpec

#: Most bytes a task's payload or result may take as JSON: events carry them, and a Kafka
#: record is at most 1 MiB by default (message.max.bytes), with headers and escaping.
MAX_JSON_BYTES = 256 * 1024


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:  # api/guard.py refuses these first; this is the backstop
        raise ValueError(f"cannot be stored as JSON: {exc}") from None
    if size > MAX_JSON_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_JSON_BYTES} are allowed")
    return value


BoundedJson = Annotated[dict[str, Any], AfterValidator(_bounded_json)]

#: The largest version (an int4 column in the read models).
INT4_MAX = 2**31 - 1

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
MAX_TOKENS = Decimal(10**9)  # 10**15 micro-tokens, the domain's bound
MONEY_FIELDS = frozenset(
    {
        "cost_per_task",
        "max_cost",
        "balance",
        "staked",
        "supply",
        "earned",
        "slashed",
        "amount",
        "total_power",
    }
)

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=ID_PATTERN)]


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


def to_micro(tokens: str) -> int:
    """``"0.5"`` -> 500000 (micro-tokens); the value has passed ``Tokens`` validation."""
    return int(Decimal(tokens) * MICRO)


def format_tokens(micro: int | None) -> str | None:
    """500000 -> ``"0.500000"`` (tokens, six decimals); None stays None."""
    if micro is None:
        return None
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(int(micro)), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def public_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """An aggregate state with its money fields as token strings (nested ones too, such
    as an account's pending unstakes)."""
    if state is None:
        return None
    return {k: _public_value(k, v) for k, v in state.items()}


def _public_value(key: str, value: Any) -> Any:
    if key in MONEY_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return format_tokens(value)
    if isinstance(value, list):
        return [public_state(v) if isinstance(v, dict) else v for v in value]
    return value


class In(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class CapabilityIn(In):
    """A named skill with a level in [0, 1] (1 = expert)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    level: float = Field(ge=0.0, le=1.0)


class AgentCreate(In):
    """Register an agent; ``agent_id`` defaults to a fresh uuid4."""

    agent_id: Id | None = None
    name: str = Field(min_length=1, max_length=200)
    capabilities: list[CapabilityIn] = Field(default_factory=list, max_length=100)
    max_concurrent_tasks: int = Field(default=1, ge=1, le=1000)
    cost_per_task: Tokens = "0"


class AgentUpdate(In):
    """Replace an agent's capabilities."""

    capabilities: list[CapabilityIn] = Field(max_length=100)


Priority = Literal["low", "normal", "high", "urgent", "critical"]


class TaskCreate(In):
    """Submit a task; ``task_id`` defaults to a fresh uuid4; times in seconds."""

    task_id: Id | None = None
    type: str = Field(min_length=1, max_length=128)
    payload: BoundedJson = Field(default_factory=dict)
    required_capabilities: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    priority: Priority = "normal"
    max_cost: Tokens | None = None
    lease_timeout_s: float = Field(default=30.0, gt=0, le=86_400)
    run_timeout_s: float = Field(default=600.0, gt=0, le=7 * 86_400)
    max_attempts: int = Field(default=3, ge=1, le=100)


MAX_BATCH = 1000


class TaskBatchCreate(In):
    """Submit up to 1,000 tasks in one request."""

    tasks: list[TaskCreate] = Field(min_length=1, max_length=MAX_BATCH)


class TaskStart(In):
    """The assigned agent starts the task."""

    agent_id: Id


class TaskProgress(In):
    """The assigned agent reports progress in [0, 1]."""

    agent_id: Id
    progress: float = Field(ge=0.0, le=1.0)
    message: str | None = Field(default=None, max_length=2000)


class TaskComplete(In):
    """The assigned agent completes the task with a result and a quality in [0, 1]."""

    agent_id: Id
    result: BoundedJson = Field(default_factory=dict)
    quality: float = Field(default=1.0, ge=0.0, le=1.0)


class TaskFail(In):
    """The assigned agent reports a failure; a retryable one is retried if attempts remain."""

    agent_id: Id
    error: str = Field(min_length=1, max_length=10_000)
    retryable: bool = True


class TaskCancel(In):
    """Cancel a task that has not finished."""

    reason: str = Field(default="cancelled by user", max_length=2000)


# ---------------------------------------------------------------------------- responses


class EventRef(BaseModel):
    """An event a command wrote, and where: pass ``position`` as ``?after=`` to a query
    to read your write."""

    id: str
    type: str
    version: int
    topic: str
    partition: int | None = None
    offset: int | None = None
    position: str | None = None


class CommandResult(BaseModel):
    """An accepted command: the aggregate's id, version and state after it, its events."""

    id: str
    version: int
    state: dict[str, Any] | None
    events: list[EventRef]
    command_id: str


class CommandPending(BaseModel):
    """A command on the log whose outcome did not come in time; poll ``location``."""

    command_id: str
    status: Literal["pending"] = "pending"
    location: str


class CommandOutcomePublic(BaseModel):
    """What the decider made of a command (``GET /commands/{command_id}``)."""

    command_id: str
    command_type: str
    aggregate_type: str
    id: str
    status: str
    version: int
    events: list[EventRef]
    rejection: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    duplicate: bool = False
    decided_at: datetime


class BatchItemResult(BaseModel):
    """One task of a batch: ``status`` is accepted, rejected or pending, ``http_status``
    what the single-task route would have answered."""

    index: int
    id: str
    command_id: str
    status: Literal["accepted", "rejected", "pending"]
    http_status: int
    version: int | None = None
    events: list[EventRef] = []
    problem: dict[str, Any] | None = None


class BatchResult(BaseModel):
    """The per-task results of ``POST /tasks:batch``, in request order."""

    items: list[BatchItemResult]
    accepted: int
    rejected: int
    pending: int


class CapabilityPublic(BaseModel):
    """A capability of an agent."""

    name: str
    level: float


class AgentPublic(BaseModel):
    """An agent as the read model has it; ``status`` derived from lifecycle and load."""

    agent_id: str
    name: str
    capabilities: list[CapabilityPublic]
    max_concurrent_tasks: int
    cost_per_task: str
    lifecycle: str
    status: str
    load: int
    registered_at: datetime
    last_heartbeat_at: datetime | None
    tasks_completed: int
    tasks_failed: int
    tasks_lost: int
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AgentPublic:
        """From a row of ``projections.queries.get_agent``/``list_agents``."""
        return cls.model_validate({**row, "cost_per_task": format_tokens(row["cost_per_task"])})


class TaskPublic(BaseModel):
    """A task as the read model has it (times in seconds, money in tokens)."""

    task_id: str
    type: str
    payload: dict[str, Any]
    required_capabilities: list[str]
    priority: str
    max_cost: str | None
    lease_timeout_s: float
    run_timeout_s: float
    max_attempts: int
    status: str
    attempts: int
    requeues: int
    agent_id: str | None
    progress: float
    progress_message: str | None
    result: dict[str, Any] | None
    quality: float | None
    error: str | None
    not_before: datetime | None
    submitted_at: datetime
    queued_at: datetime | None
    assigned_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskPublic:
        """From a row of ``projections.queries.get_task``/``list_tasks``."""
        return cls.model_validate({**row, "max_cost": format_tokens(row["max_cost"])})


class CloudEventPublic(BaseModel):
    """A CloudEvent in JSON structured form, with where it is in the log (``position``).

    ``data`` is the event exactly as on Kafka (money in integer micro-tokens): the event
    is the public contract.
    """

    model_config = ConfigDict(extra="allow")

    specversion: str = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: datetime
    datacontenttype: str = "application/json"
    sequence: str
    aggregatetype: str
    correlationid: str
    causationid: str
    schemaversion: int
    data: dict[str, Any]
    position: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CloudEventPublic:
        """From a row of ``projections.queries.aggregate_history``."""
        return cls(
            id=row["event_id"],
            source=f"/swarmlog/{row['aggregate_type']}",
            type=row["type"],
            subject=row["aggregate_id"],
            time=row["time"],
            sequence=str(row["version"]),
            aggregatetype=row["aggregate_type"],
            correlationid=row["correlation_id"],
            causationid=row["causation_id"],
            schemaversion=row["schema_version"],
            data=row["data"],
            position={
                "topic": row["topic"],
                "partition": row["partition"],
                "offset": row["offset"],
            },
        )


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``?cursor=`` for the next (None: last)."""

    items: list[T]
    next_cursor: str | None = None


class Health(BaseModel):
    """The process is up."""

    status: str


class Readiness(BaseModel):
    """Each dependency's check: ``ok`` or why it failed."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    failed: list[str]


# the economy ------------------------------------------------------------------------


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


class AccountCreate(In):
    """Open an account for a holder."""

    account_id: Id


class Grant(In):
    """A grant from the treasury (an admin act)."""

    amount: PositiveTokens
    reason: str = Field(default="grant", max_length=500)


class Transfer(In):
    """Send tokens of the account's balance to another account."""

    to: Id
    amount: PositiveTokens
    memo: str = Field(default="", max_length=500)


class AmountIn(In):
    """An amount of tokens (stake, unstake)."""

    amount: PositiveTokens


class PendingUnstakePublic(BaseModel):
    """An unstake waiting for its cooldown."""

    amount: str
    available_at: datetime


class AccountPublic(BaseModel):
    """An account, money in tokens."""

    account_id: str
    holder: str
    balance: str
    staked: str
    unstaking: str
    pending_unstakes: list[PendingUnstakePublic]
    tier: str
    earned: str
    slashed: str
    supply: str
    opened_at: datetime
    version: int
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AccountPublic:
        return cls(
            **{
                k: row[k]
                for k in ("account_id", "holder", "tier", "opened_at", "version", "updated_at")
            },
            **{
                k: format_tokens(row[k])
                for k in ("balance", "staked", "unstaking", "earned", "slashed", "supply")
            },
            pending_unstakes=[
                PendingUnstakePublic(
                    amount=format_tokens(p["amount"]) or "0", available_at=p["available_at"]
                )
                for p in row["pending"]
            ],
        )


class LedgerEntryPublic(BaseModel):
    """One leg of a movement: the account's bucket and signed amount, and its cause."""

    seq: int
    event_id: str
    bucket: str
    amount: str
    kind: str
    counterparty: str | None
    task_id: str | None
    proposal_id: str | None
    command_id: str
    time: datetime


class LeaderboardEntry(BaseModel):
    """An account's rank by rewards earned."""

    rank: int
    account_id: str
    earned: str


class TierSummary(BaseModel):
    """Accounts and stake in one tier."""

    tier: str
    accounts: int
    staked: str


class FlowSummary(BaseModel):
    """Rewards or slashes in one bucket of time."""

    at: datetime
    kind: str
    amount: str
    count: int


class EconomySummary(BaseModel):
    """The economy's totals (tokens): supply = balances + staked + unstaking + in flight."""

    supply: str
    treasury: str
    balances: str
    staked: str
    unstaking: str
    in_flight: str
    accounts: int
    balanced: bool
    tiers: list[TierSummary]
    flows: list[FlowSummary]
    parameters: dict[str, Any]


class MultipliersIn(In):
    """Reward multipliers per tier, in basis points (10000 = x1.0)."""

    none: int = Field(default=10_000, ge=0, le=100_000)
    bronze: int = Field(default=10_000, ge=0, le=100_000)
    silver: int = Field(default=12_000, ge=0, le=100_000)
    gold: int = Field(default=15_000, ge=0, le=100_000)
    platinum: int = Field(default=17_500, ge=0, le=100_000)
    diamond: int = Field(default=20_000, ge=0, le=100_000)


class ParameterChangeIn(In):
    """A change to the economy's parameters (omitted: unchanged)."""

    base_reward: Tokens | None = None
    multipliers: MultipliersIn | None = None
    slash_rate_bp: int | None = Field(default=None, ge=0, le=10_000)
    unstake_cooldown_s: int | None = Field(default=None, ge=0, le=365 * 86_400)


class ProposalCreate(In):
    """Propose a parameter change; voting power is each account's stake now."""

    proposal_id: Id | None = None
    title: str = Field(min_length=1, max_length=200)
    proposer: Id
    change: ParameterChangeIn
    window_s: int = Field(gt=0, le=90 * 86_400)
    quorum_bp: int = Field(default=2_000, ge=0, le=10_000)
    threshold_bp: int = Field(default=5_000, ge=0, lt=10_000)


class VoteIn(In):
    """A vote: for, against or abstain."""

    voter: Id
    choice: Literal["for", "against", "abstain"]


class VotePublic(BaseModel):
    """A vote cast, with the voter's power (tokens staked at the proposal's creation)."""

    voter: str
    choice: str
    power: str
    time: datetime


class ProposalPublic(BaseModel):
    """A proposal with its tallies (tokens of stake)."""

    proposal_id: str
    title: str
    proposer: str
    change: dict[str, Any]
    opened_at: datetime
    closes_at: datetime
    quorum_bp: int
    threshold_bp: int
    total_power: str
    status: str
    votes_for: str
    votes_against: str
    votes_abstain: str
    voters: int
    version: int
    votes: list[VotePublic] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ProposalPublic:
        change = dict(row["change"])
        if change.get("base_reward") is not None:
            change["base_reward"] = format_tokens(change["base_reward"])
        return cls(
            **{
                k: row[k]
                for k in (
                    "proposal_id",
                    "title",
                    "proposer",
                    "opened_at",
                    "closes_at",
                    "quorum_bp",
                    "threshold_bp",
                    "status",
                    "voters",
                    "version",
                )
            },
            change=change,
            **{
                k: format_tokens(row[k])
                for k in ("total_power", "votes_for", "votes_against", "votes_abstain")
            },
            votes=None
            if row.get("votes") is None
            else [
                VotePublic(
                    voter=v["voter"],
                    choice=v["choice"],
                    power=format_tokens(v["power"]) or "0",
                    time=v["time"],
                )
                for v in row["votes"]
            ],
        )


# workflows --------------------------------------------------------------------------

#: Most bytes a workflow's steps (with their payloads) may take as JSON: the definition
#: travels whole in its events, and in every run's start event.
MAX_SPEC_BYTES = 256 * 1024

TemplateName = Annotated[
    str, Field(pattern=TEMPLATE_NAME, description="lower-case letters, digits, . _ -")
]
ParameterName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Steps = Annotated[
    list[StepSpec],
    Field(
        min_length=1,
        max_length=MAX_STEPS,
        description="the steps, a DAG through depends_on (domain/workflow.py StepSpec)",
    ),
]
Compensations = Annotated[
    list[StepSpec],
    Field(
        max_length=MAX_STEPS,
        description="steps run when a step with on_failure 'compensate' names them",
    ),
]


class WorkflowCreate(In):
    """Create a workflow definition; ``id`` defaults to a fresh uuid4."""

    id: Id | None = None
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    steps: Steps
    compensations: Compensations = Field(default_factory=list)


class WorkflowUpdate(In):
    """Replace a definition's steps (with its compensations: none if omitted), name
    and/or description (omitted: unchanged); the definition's version goes up by one."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)
    steps: Steps | None = None
    compensations: Compensations | None = None


class WorkflowExecute(In):
    """Run the definition's current version on ``inputs``; ``run_id`` defaults to a
    fresh uuid4 (derived from the Idempotency-Key when there is one)."""

    run_id: Id | None = None
    inputs: BoundedJson = Field(default_factory=dict)


class RunCancel(In):
    """Cancel a run that has not finished."""

    reason: str = Field(default="cancelled by user", max_length=2000)


class TemplatePublish(In):
    """Publish a new version of the template ``name`` (version 1 if it is new)."""

    name: TemplateName
    description: str = Field(default="", max_length=10_000)
    parameters: dict[ParameterName, ParameterSpec] = Field(default_factory=dict, max_length=100)
    steps: Steps
    compensations: Compensations = Field(default_factory=list)


class TemplateInstantiate(In):
    """Make a workflow definition from a template version (the latest when ``version``
    is omitted), its expressions seeing the bound parameters as ``params``."""

    params: BoundedJson = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=INT4_MAX)
    workflow_id: Id | None = None
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=10_000)


class WorkflowPublic(BaseModel):
    """A workflow definition as the read model has it. ``version`` is the definition's
    version; ``aggregate_version`` (also the ``ETag``) is what If-Match compares, and
    executions raise it too."""

    id: str
    name: str
    description: str
    version: int
    status: str
    steps: list[dict[str, Any]]
    compensations: list[dict[str, Any]]
    params: dict[str, Any]
    template: str | None
    runs: int
    created_at: datetime
    updated_at: datetime
    aggregate_version: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkflowPublic:
        """From a row of ``projections.queries.get_workflow``/``list_workflows``."""
        spec = row["spec"]
        return cls.model_validate(
            {**row, "steps": spec["steps"], "compensations": spec.get("compensations", [])}
        )


class TemplatePublic(BaseModel):
    """One version of a workflow template."""

    name: str
    version: int
    description: str
    parameters: dict[str, dict[str, Any]]
    steps: list[dict[str, Any]]
    compensations: list[dict[str, Any]]
    published_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TemplatePublic:
        """From a row of ``projections.queries.get_template``/``list_templates``."""
        spec = row["spec"]
        return cls.model_validate(
            {**row, "steps": spec["steps"], "compensations": spec.get("compensations", [])}
        )


class StepPublic(BaseModel):
    """One step of a run: its state, tries, tasks, result and timings.

    ``items_total``/``items_done``: a map step's items and how many succeeded (1 for a
    plain step); ``attempts`` the highest attempt of any of its tasks; ``task_ids`` every
    task scheduled for it; ``error`` why it failed or was skipped; ``duration_s`` from
    start to finish (seconds).
    """

    step_id: str
    kind: Literal["step", "compensation"]
    task_type: str
    status: str
    items_total: int | None
    items_done: int
    attempts: int
    task_ids: list[str]
    result: Any = None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    compensating_for: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StepPublic:
        """From a step of ``projections.queries.get_run``."""
        start, end = row["started_at"], row["finished_at"]
        duration = (end - start).total_seconds() if start and end else None
        return cls.model_validate({**row, "duration_s": duration})


class Progress(BaseModel):
    """How many of the run's steps (not counting compensations) have finished."""

    done: int
    total: int


def run_links(run_id: str, workflow_id: str) -> dict[str, str]:
    """Where to read a run, follow its events, cancel it, and read its workflow."""
    return {
        "self": f"/workflow-runs/{run_id}",
        "events": f"/events?run_id={run_id}&from=beginning",
        "cancel": f"/workflow-runs/{run_id}/cancel",
        "workflow": f"/workflows/{workflow_id}",
    }


class RunPublic(BaseModel):
    """A workflow run as the read model has it; ``steps`` only on ``GET /workflow-runs/{id}``.

    ``status`` is pending (requested, not started yet), running, compensating,
    completed, failed or cancelled; ``version`` the definition version it runs.
    """

    run_id: str
    workflow_id: str
    version: int
    status: str
    inputs: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    failed_step: str | None
    compensated: bool
    progress: Progress
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    aggregate_version: int
    steps: list[StepPublic] | None = None
    links: dict[str, str]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunPublic:
        """From a row of ``projections.queries.get_run``/``list_runs``."""
        steps = row.get("steps")
        return cls.model_validate(
            {
                **row,
                "progress": {"done": row["steps_done"], "total": row["steps_total"]},
                "steps": None if steps is None else [StepPublic.from_row(s) for s in steps],
                "links": run_links(row["run_id"], row["workflow_id"]),
            }
        )


class RunAccepted(BaseModel):
    """An execution request on the log: the run to follow (``links.self``).

    ``status`` is the read model's when it already has the run, else ``pending``;
    ``version`` the definition version the run gets (None if the outcome did not come
    in time).
    """

    run_id: str
    workflow_id: str
    status: str
    version: int | None = None
    command_id: str
    events: list[EventRef] = []
    links: dict[str, str]
