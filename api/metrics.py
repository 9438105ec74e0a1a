"""Prometheus metrics of one API app: HTTP requests, commands by outcome, SSE clients.

Each app has its own ``CollectorRegistry`` (tests build many apps in one process, and the
global registry refuses a metric registered twice).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    """The API's collectors, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "swarmlog_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "swarmlog_http_request_duration_seconds",
            "Time to answer an HTTP request (to the end of the body; SSE: the whole stream).",
            ("method", "route"),
            registry=self.registry,
        )
        self.commands = Counter(
            "swarmlog_commands_total",
            "Commands sent through the API, by command type and outcome"
            " (accepted, rejected, duplicate, pending).",
            ("command", "outcome"),
            registry=self.registry,
        )
        self.sse_clients = Gauge(
            "swarmlog_sse_clients",
            "SSE streams open now.",
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (``/agents/{agent_id}``),
    so the label set stays bounded whatever ids clients send."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
