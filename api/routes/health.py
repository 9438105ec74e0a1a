"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import CommandClientDep, MetricsDep, ReadModelsDep, RedisDep
from api.schemas.health import Health, Readiness

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process is up."""
    return Health(status="ok")


async def _check(what: Awaitable[object]) -> str:
    try:
        await asyncio.wait_for(what, CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"timed out after {CHECK_TIMEOUT_S} s"
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready", and says why
        return f"{type(exc).__name__}: {exc}"
    return "ok"


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(
    client: CommandClientDep, read_models: ReadModelsDep, redis: RedisDep
) -> JSONResponse:
    """Kafka metadata, PostgreSQL ``select 1`` and Redis PING, each within 2 s, and the
    command-outcome follower alive: 200 when all are, else 503 naming the ones that failed."""
    kafka_check, pg_check, redis_check = await asyncio.gather(
        _check(client.producer.client.fetch_all_metadata()),
        _check(read_models.ping()),
        _check(redis.ping()),
    )
    checks = {
        "kafka": kafka_check,
        "postgres": pg_check,
        "redis": redis_check,
        "outcomes": client.follower_problem() or "ok",
    }
    failed = [name for name, result in checks.items() if result != "ok"]
    body = Readiness(status="unavailable" if failed else "ready", checks=checks, failed=failed)
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
