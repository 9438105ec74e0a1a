"""The economy over HTTP: accounts and the ledger, rewards for work, the leaderboard and
summary, governance on a manual clock, and the ledger audit CLI against the read models.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from httpx_sse import aconnect_sse

from projections.keys import RedisKeys
from tests.e2e.support import assert_problem, register
from tests.e2e.test_live import cloudevent, take

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


async def account_where(swarm: Any, account_id: str, **fields: str) -> dict[str, Any]:
    """Wait until GET /accounts/{id} has these field values; return it."""

    async def probe() -> dict[str, Any] | None:
        r = await swarm.client.get(f"/accounts/{account_id}")
        if r.status_code != 200:
            return None
        body = r.json()
        return body if all(body[k] == v for k, v in fields.items()) else None

    return await swarm.eventually(probe, what=f"account {account_id} with {fields}")


async def test_grant_transfer_stake_unstake_and_the_ledger(swarm) -> None:
    c = swarm.client
    r = await c.post("/accounts/alice/grant", json={"amount": "1000", "reason": "welcome"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "treasury"
    await account_where(swarm, "alice", balance="1000.000000")
    r = await c.post("/accounts/alice/transfer", json={"to": "bob", "amount": "250.5"})
    assert r.status_code == 200, r.text
    assert r.json()["state"]["balance"] == "749.500000"
    await account_where(swarm, "bob", balance="250.500000")
    r = await c.post("/accounts/alice/stake", json={"amount": "600"})
    assert r.status_code == 200, r.text
    assert [e["type"] for e in r.json()["events"]] == [
        "io.swarmlog.account.tokens_staked",
        "io.swarmlog.account.tier_changed",
    ]
    alice = await account_where(swarm, "alice", staked="600.000000")
    assert alice["tier"] == "silver" and alice["balance"] == "149.500000"

    assert_problem(
        await c.post("/accounts/alice/transfer", json={"to": "bob", "amount": "149.500001"}),
        409,
        code="insufficient_balance",
        field="amount",
    )
    assert_problem(
        await c.post("/accounts/alice/stake", json={"amount": "-1"}), 422, field="amount"
    )
    assert_problem(
        await c.post("/accounts/alice/stake", json={"amount": "0.0000001"}), 422, field="amount"
    )
    assert_problem(
        await c.post("/accounts/alice/stake", json={"amount": "1e30"}), 422, field="amount"
    )
    assert_problem(await c.post("/accounts/alice/stake", json={"amount": "0"}), 422, field="amount")
    assert_problem(
        await c.post("/accounts/alice/transfer", json={"to": "alice", "amount": "1"}),
        422,
        code="self_transfer",
        field="to",
    )
    assert_problem(
        await c.post("/accounts/nobody/stake", json={"amount": "1"}), 404, code="account_not_found"
    )

    r = await c.post("/accounts/alice/unstake", json={"amount": "101"})
    assert r.status_code == 200, r.text
    assert r.json()["state"]["unstaking"][0]["amount"] == "101.000000"
    alice = await account_where(swarm, "alice", unstaking="101.000000")
    assert alice["tier"] == "bronze"
    assert len(alice["pending_unstakes"]) == 1
    # The default cooldown is a week.
    assert_problem(await c.post("/accounts/alice/withdraw"), 409, code="unstake_not_ready")

    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await c.get("/accounts/alice/ledger", params=params)
        assert r.status_code == 200, r.text
        pages.append(r.json()["items"])
        cursor = r.json()["next_cursor"]
        if not cursor:
            break
    entries = [e for page in pages for e in page]
    assert len(pages) > 1
    assert [(e["kind"], e["bucket"], e["amount"]) for e in entries] == [
        ("grant", "balance", "1000.000000"),
        ("transfer", "balance", "-250.500000"),
        ("stake", "balance", "-600.000000"),
        ("stake", "staked", "600.000000"),
        ("unstake", "staked", "-101.000000"),
        ("unstake", "unstaking", "101.000000"),
    ]
    assert entries[1]["counterparty"] == "bob" and entries[1]["command_id"]

    # The economy's events are on the SSE feed, as CloudEvents.
    async with aconnect_sse(
        c,
        "GET",
        "/events",
        params={"from": "beginning", "subject": "alice", "type": "io.swarmlog.account.*"},
    ) as es:
        got = await take(es.aiter_sse(), 3)
    assert [s.event for s in got] == [
        "io.swarmlog.account.opened",
        "io.swarmlog.account.transfer_received",
        "io.swarmlog.account.transfer_sent",
    ]
    assert cloudevent(got[1])["data"]["amount"] == 1_000_000_000

    summary = (await c.get("/economy/summary")).json()
    assert summary["supply"] == "1000.000000" and summary["balanced"] is True
    assert summary["in_flight"] == "0.000000"
    assert {t["tier"]: t["staked"] for t in summary["tiers"]}["bronze"] == "499.000000"

    # Redis keeps stake by tier (micro-tokens), written by the projector.
    # (after the commit of the rows, so it may be a moment behind them).
    r = aioredis.from_url(swarm.settings.require_services()[2])
    key = RedisKeys(swarm.settings.redis_prefix).stake_by_tier
    try:

        async def bronze() -> bytes | None:
            value: bytes | None = await r.hget(key, "bronze")
            return value if value == b"499000000" else None

        await swarm.eventually(bronze, what="stake by tier in Redis")
        assert await r.hget(key, "silver") in (None, b"0")
    finally:
        await r.aclose()


async def test_work_earns_rewards_by_tier_and_fills_the_leaderboard(swarm) -> None:
    c = swarm.client
    for agent_id, stake in (("gold-agent", "1000"), ("plain-agent", None)):
        await register(c, agent_id, capabilities={"python": 0.9}, start=True)
        await account_where(swarm, agent_id, balance="0.000000")
        if stake:
            assert (
                await c.post(f"/accounts/{agent_id}/grant", json={"amount": stake})
            ).status_code == 200
            await account_where(swarm, agent_id, balance=f"{stake}.000000")
            assert (
                await c.post(f"/accounts/{agent_id}/stake", json={"amount": stake})
            ).status_code == 200
            await account_where(swarm, agent_id, tier="gold")
    await asyncio.sleep(0.5)  # the economy runner folds the tier
    for agent_id in ("gold-agent", "plain-agent"):
        task_id = f"job-{agent_id}"
        r = await c.post(
            "/tasks", json={"task_id": task_id, "type": "lint", "required_capabilities": ["python"]}
        )
        assert r.status_code == 201, r.text

    async def assigned() -> list[dict[str, Any]] | None:
        tasks = [(await c.get(f"/tasks/job-{a}")).json() for a in ("gold-agent", "plain-agent")]
        return tasks if all(t["status"] == "assigned" for t in tasks) else None

    held: dict[str, str] = {}
    for task in await swarm.eventually(assigned, what="both tasks assigned"):
        holder = task["agent_id"]
        held[holder] = task["task_id"]
        assert (
            await c.post(f"/tasks/{task['task_id']}/start", json={"agent_id": holder})
        ).status_code == 200
        r = await c.post(
            f"/tasks/{task['task_id']}/complete", json={"agent_id": holder, "quality": 0.5}
        )
        assert r.status_code == 200, r.text
    gold = await account_where(swarm, "gold-agent", earned="7.500000")  # 10 x 1.5 x 0.5
    plain = await account_where(swarm, "plain-agent", earned="5.000000")
    assert gold["balance"] == "7.500000" and plain["balance"] == "5.000000"

    async def board() -> list[dict[str, Any]] | None:
        rows = (await c.get("/leaderboard")).json()
        return rows if len(rows) == 2 else None

    rows = await swarm.eventually(board, what="the leaderboard")
    assert [(r["rank"], r["account_id"], r["earned"]) for r in rows] == [
        (1, "gold-agent", "7.500000"),
        (2, "plain-agent", "5.000000"),
    ]
    r = await c.get("/accounts/gold-agent/ledger")
    reward = [e for e in r.json()["items"] if e["kind"] == "reward"]
    assert reward and reward[0]["task_id"] == held["gold-agent"]
    summary = (await c.get("/economy/summary", params={"bucket": "minute"})).json()
    assert summary["balanced"] is True
    assert sum(float(f["amount"]) for f in summary["flows"] if f["kind"] == "reward") == 12.5


@pytest.mark.parametrize("swarm", [{"manual_clock": True}], indirect=True)
async def test_governance_passed_rejected_and_quorum_missed(swarm) -> None:
    c = swarm.client
    for holder, stake in (("a", "600"), ("b", "300"), ("c", "100")):
        assert (
            await c.post(f"/accounts/{holder}/grant", json={"amount": stake})
        ).status_code == 200
        await account_where(swarm, holder, balance=f"{stake}.000000")
        assert (
            await c.post(f"/accounts/{holder}/stake", json={"amount": stake})
        ).status_code == 200
        await account_where(swarm, holder, staked=f"{stake}.000000")
    for pid in ("passes", "fails", "quiet"):
        r = await c.post(
            "/proposals",
            json={
                "proposal_id": pid,
                "title": f"{pid}: double the base reward",
                "proposer": "a",
                "change": {"base_reward": "20"},
                "window_s": 3600,
                "quorum_bp": 5000,
                "threshold_bp": 5000,
            },
        )
        assert r.status_code == 201, r.text
    # Stake moved after creation does not change power: a unstakes nearly everything.
    assert (await c.post("/accounts/a/unstake", json={"amount": "599"})).status_code == 200
    votes = [
        ("passes", "a", "for"),
        ("fails", "a", "against"),
        ("fails", "b", "for"),
        ("quiet", "c", "for"),
    ]
    for pid, voter, choice in votes:
        r = await c.post(f"/proposals/{pid}/votes", json={"voter": voter, "choice": choice})
        assert r.status_code == 200, r.text
    assert_problem(
        await c.post("/proposals/passes/votes", json={"voter": "a", "choice": "against"}),
        409,
        code="already_voted",
        field="voter",
    )
    assert_problem(
        await c.post("/proposals/passes/votes", json={"voter": "zed", "choice": "for"}),
        403,
        code="no_voting_power",
        field="voter",
    )

    async def proposal(pid: str, status: str) -> dict[str, Any] | None:
        r = await c.get(f"/proposals/{pid}")
        return r.json() if r.status_code == 200 and r.json()["status"] == status else None

    passes = await swarm.eventually(lambda: proposal("passes", "open"), what="passes open")
    assert passes["votes_for"] == "600.000000" and passes["total_power"] == "1000.000000"
    assert passes["votes"][0]["power"] == "600.000000"
    await asyncio.sleep(1.0)
    assert (await c.get("/proposals/passes")).json()["status"] == "open"  # not before the deadline

    swarm.clock.advance(3601)
    await swarm.eventually(lambda: proposal("passes", "executed"), what="passes executed")
    await swarm.eventually(lambda: proposal("fails", "rejected"), what="fails rejected")
    await swarm.eventually(lambda: proposal("quiet", "quorum_missed"), what="quiet missed quorum")
    listed = (await c.get("/proposals", params={"status": "executed"})).json()["items"]
    assert [p["proposal_id"] for p in listed] == ["passes"]

    async def new_base() -> dict[str, Any] | None:
        s = (await c.get("/economy/summary")).json()
        return s if s["parameters"]["base_reward"] == "20.000000" else None

    await swarm.eventually(new_base, what="the new base reward in the summary")
    # The economy runner pays the new base from now on.
    await register(c, "worker", capabilities={}, start=True)
    await account_where(swarm, "worker", balance="0.000000")
    await swarm.eventually(lambda: _params_in_force(swarm), what="the runner's parameters")
    assert (await c.post("/tasks", json={"task_id": "gov-t", "type": "x"})).status_code == 201

    async def assigned() -> bool:
        return (await c.get("/tasks/gov-t")).json()["status"] == "assigned"

    await swarm.eventually(assigned, what="gov-t assigned")
    assert (await c.post("/tasks/gov-t/start", json={"agent_id": "worker"})).status_code == 200
    assert (await c.post("/tasks/gov-t/complete", json={"agent_id": "worker"})).status_code == 200
    await account_where(swarm, "worker", earned="20.000000")


async def _params_in_force(swarm: Any) -> bool:
    return bool(swarm.economy.view.params.base_reward == 20_000_000)


def _audit(swarm: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    kafka_url, database_url, redis_url = swarm.settings.require_services()
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=kafka_url,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        SWARMLOG_TOPIC_PREFIX=swarm.topics.prefix,
        SWARMLOG_DB_SCHEMA=swarm.settings.db_schema,
        SWARMLOG_PARTITIONS=str(swarm.topics.partitions),
    )
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", "audit", "ledger"],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_audit_ledger_passes_on_a_true_ledger_and_fails_on_a_tampered_one(swarm) -> None:
    c = swarm.client
    assert (await c.post("/accounts/alice/grant", json={"amount": "10"})).status_code == 200
    await account_where(swarm, "alice", balance="10.000000")
    assert (await c.post("/accounts/alice/stake", json={"amount": "4"})).status_code == 200
    await account_where(swarm, "alice", staked="4.000000")
    done = await asyncio.to_thread(_audit, swarm)
    assert done.returncode == 0, done.stderr
    assert "DIFFERS" not in done.stderr and "supply 10000000" in done.stderr

    conn = await asyncpg.connect(swarm.settings.require_services()[1])
    try:
        await conn.execute(
            f"UPDATE {swarm.settings.db_schema}.accounts SET balance = balance + 1"
            " WHERE account_id = 'alice'"
        )
    finally:
        await conn.close()
    tampered = await asyncio.to_thread(_audit, swarm)
    assert tampered.returncode == 1, tampered.stderr
    assert "DIFFERS" in tampered.stderr
