"""The main job, small: the demo workflow on the json and email packages, with an agent
killed mid-run.

Checks the printed summary against the read models and the log, and the findings
against an independent analysis of the same files.
"""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from rich.console import Console

from demo.analysis import analyse_module, discover_modules
from demo.swarm import STAKES, run_demo
from infra.stack import StackInfo

pytestmark = pytest.mark.e2e


@pytest.fixture
def service_env(services: StackInfo, monkeypatch: pytest.MonkeyPatch) -> StackInfo:
    """The demo reads the services from the environment, as `swarmlog demo` does."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", services.kafka_bootstrap_servers)
    monkeypatch.setenv("DATABASE_URL", services.database_url)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    return services


async def test_demo_swarm_finishes_every_module_despite_a_killed_agent(
    service_env: StackInfo, tmp_path: Path
) -> None:
    console = Console(record=True, width=140)
    summary = await run_demo(
        state_dir=tmp_path,
        packages=("json", "email"),
        kill_at=0.25,
        pace_ms=400,
        console=console,
    )
    modules = discover_modules("json") + discover_modules("email")

    # The workflow ran to completion: discover, one analysis per module, the report.
    # An agent was killed with work in hand; its lost tasks were dead-lettered and the
    # map step's retry policy ran those modules again, so every module was analysed.
    run = summary["workflow"]
    assert run["status"] == "completed"
    steps = {s["step_id"]: s for s in run["steps"]}
    assert list(steps) == ["discover", "analyse", "report"]
    assert all(s["status"] == "completed" for s in steps.values())
    assert (steps["analyse"]["items_done"], steps["analyse"]["items_total"]) == (
        len(modules),
        len(modules),
    )
    assert summary["killed"] is not None
    lost = summary["tasks"].get("dead_lettered", 0)
    assert lost >= 1
    assert summary["tasks"] == {"completed": len(modules) + 2, "dead_lettered": lost}
    assert len(steps["analyse"]["task_ids"]) == len(modules) + lost
    assert steps["analyse"]["attempts"] == 2
    assert run["progress"] == {"done": 3, "total": 3}

    schema = summary["run_id"]
    conn = await asyncpg.connect(service_env.database_url)
    try:
        per_agent = {
            r["agent_id"]: r["n"]
            for r in await conn.fetch(
                f"SELECT agent_id, count(*) AS n FROM {schema}.tasks"
                " WHERE status = 'completed' GROUP BY agent_id"
            )
        }
        lost_by_killed = await conn.fetchval(
            f"SELECT tasks_lost FROM {schema}.agents WHERE agent_id = $1", summary["killed"]
        )
        offline = await conn.fetchval(
            f"SELECT lifecycle FROM {schema}.agents WHERE agent_id = $1", summary["killed"]
        )
        history = await conn.fetchval(f"SELECT count(*) FROM {schema}.events")
    finally:
        await conn.close()

    # The summary's per-agent counts are the read model's, and add up to the modules.
    assert {
        a["agent_id"]: a["tasks_completed"] for a in summary["agents"] if a["tasks_completed"]
    } == per_agent
    assert sum(per_agent.values()) == len(modules) + 2
    # The killed agent lost its work to the others and was marked offline.
    assert lost_by_killed >= 1
    assert offline == "offline"
    # Every event on the log was projected into the archive.
    assert summary["events_on_log"] == summary["events_projected"] == history

    # The findings are the real ones: recompute the top function independently.
    best = max(
        (f for m in modules for f in analyse_module(m.path, m.name)["most_complex"]),
        key=lambda f: f["complexity"],
    )
    assert summary["findings"][0]["complexity"] == best["complexity"]
    text = console.export_text()
    assert "Findings" in text and summary["findings"][0]["function"] in text
    assert f"Workflow run {run['run_id']}" in text

    # The demo earns: every agent staked into its tier, the work paid rewards, the
    # stakers' proposal passed and doubled the base reward, and the ledger balances.
    economy = summary["economy"]
    expected = {"ada": "diamond", "grace": "gold", "linus": "silver", "margaret": "bronze"}
    assert {a["account_id"] for a in economy["accounts"]} == set(STAKES)
    for a in economy["accounts"]:
        # Staked is what was staked less any slash; an agent never slashed keeps its tier.
        assert float(a["staked"]) + float(a["slashed"]) == STAKES[a["account_id"]]
        if a["slashed"] == "0.000000":
            assert a["tier"] == expected[a["account_id"]], a
    earned = sum(float(a["earned"]) for a in economy["accounts"])
    assert earned > 0 and economy["leaderboard"]
    assert economy["proposal"]["status"] == "executed"
    assert economy["totals"]["parameters"]["base_reward"] == "20.000000"
    assert economy["totals"]["balanced"] is True
    assert "Leaderboard" in text and "balanced" in text
