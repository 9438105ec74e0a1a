"""Problem details (RFC 9457) for every error the API answers, and the exception handlers.

A body is ``{"type", "title", "status", "detail", "code", "field"}`` (plus ``errors`` for
request validation), served as ``application/problem+json``. ``type`` is the URN
``urn:swarmlog:problem:<code>``; ``code`` names the rule that was broken (a domain
Rejection's code, or the API's own: ``validation_error``, ``bad_position`` ...) and
``field`` the offending field or header where there is one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import structlog
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.messages import Rejection, RejectionKind

log = structlog.get_logger("swarmlog.api")

PROBLEM_JSON = "application/problem+json"

#: Rejection.kind -> HTTP status.
STATUS_OF_KIND: dict[RejectionKind, int] = {
    "not_found": 404,
    "conflict": 409,
    "invalid": 422,
    "forbidden": 403,
    "gone": 410,
    "precondition": 412,
}

TITLES: dict[int, str] = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

#: Header names as clients write them (FastAPI reports them lower-cased).
_HEADERS = {
    "if-match": "If-Match",
    "idempotency-key": "Idempotency-Key",
    "x-correlation-id": "X-Correlation-ID",
    "last-event-id": "Last-Event-ID",
}


class FieldError(BaseModel):
    """One invalid field of a request and what is wrong with it."""

    field: str
    message: str


class ProblemBody(BaseModel):
    """An RFC 9457 problem, as every 4xx/5xx answer carries it (``application/problem+json``).

    ``code`` names the broken rule, ``field`` the offending field, parameter or header
    (dotted: ``tasks.3.payload.a``); ``errors`` lists every invalid field of a request;
    some problems carry more (a rejected command: ``command_id``, ``version``).
    """

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None
    errors: list[FieldError] | None = None


class Problem(Exception):
    """An error the API answers with a problem+json body; raise it from routes and deps."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    @classmethod
    def from_rejection(
        cls,
        rejection: Rejection,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Problem:
        """The problem for a domain Rejection (status from its kind)."""
        return cls(
            STATUS_OF_KIND.get(rejection.kind, 422),
            rejection.code,
            rejection.detail,
            field=rejection.field,
            headers=headers,
            extra=extra,
        )

    def body(self) -> dict[str, Any]:
        """The RFC 9457 body."""
        return {
            "type": f"urn:swarmlog:problem:{self.code}",
            "title": TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
            "field": self.field,
            **self.extra,
        }

    def response(self) -> JSONResponse:
        """The problem as a response."""
        return JSONResponse(
            self.body(), status_code=self.status, headers=self.headers, media_type=PROBLEM_JSON
        )


def field_name(loc: Sequence[Any]) -> str:
    """A FastAPI/pydantic error location as a dotted field name.

    The leading ``body``/``path``/``query``/``header`` is dropped (``body.tasks.3.type`` is
    ``tasks.3.type``) and header names are spelled as clients write them (``If-Match``).
    """
    parts = list(loc)
    where = (
        parts[0] if parts and parts[0] in ("body", "path", "query", "header", "cookie") else None
    )
    if where is not None:
        parts = parts[1:]
    if not parts:
        return str(where or "body")
    if where == "header" and len(parts) == 1:
        return _HEADERS.get(str(parts[0]).lower(), str(parts[0]))
    return ".".join(str(p) for p in parts)


def validation_problem(
    errors: Sequence[Mapping[str, Any]], *, prefix: Sequence[Any] = ()
) -> Problem:
    """A 422 problem listing every error as ``{field, message}``; ``field`` is the first."""
    items = [
        {
            "field": field_name([*prefix, *e.get("loc", ())]),
            "message": str(e.get("msg", "")).removeprefix("Value error, "),
        }
        for e in errors
    ]
    first = items[0]["field"] if items else None
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items) or "invalid request"
    return Problem(422, "validation_error", detail, field=first, extra={"errors": items})


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    response = exc.response()
    if getattr(request.state, "read_model_stale", False):
        response.headers["X-Read-Model-Stale"] = "true"
    return response


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(exc.errors()).response()


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, "Error")
    return Problem(exc.status_code, code, detail, headers=exc.headers).response()


#: Seconds during which further 503s for the same kind of failure are counted, not logged:
#: an outage is logged once (the role's ServiceWatch says when the service is back), not
#: once per request that meets it.
UNAVAILABLE_LOG_QUIET_S = 60.0

# exception type name -> [monotonic time of the last line logged, requests not logged since]
_unavailable_logged: dict[str, list[float]] = {}


def _log_unavailable(request: Request, exc: Exception) -> None:
    kind = type(exc).__name__
    now = time.monotonic()
    seen = _unavailable_logged.get(kind)
    if seen is not None and now - seen[0] < UNAVAILABLE_LOG_QUIET_S:
        seen[1] += 1
        return
    unlogged = int(seen[1]) if seen is not None else 0
    _unavailable_logged[kind] = [now, 0]
    log.warning(
        "dependency unavailable: answering 503 (further ones of this kind are counted, not"
        f" logged, for {UNAVAILABLE_LOG_QUIET_S:.0f} s)",
        path=request.url.path,
        error=repr(exc),
        **({"not_logged_before": unlogged} if unlogged else {}),
    )


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    _log_unavailable(request, exc)
    return Problem(
        503,
        "service_unavailable",
        f"a backing service did not answer ({type(exc).__name__}); retry later",
        headers={"Retry-After": "1"},
    ).response()


async def _on_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", path=request.url.path, exc_info=exc)
    return Problem(500, "internal_error", "an unexpected error; see the server log").response()


_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def document(openapi: dict[str, Any]) -> dict[str, Any]:
    """``openapi`` (FastAPI's document) with every problem an operation can answer.

    Every operation may answer 422 (request validation, or input that cannot be stored:
    api/guard.py) and 503 (a backing service unreachable, or SSE streams full); every
    operation but GET also 413 (body too large) and 415 (body not JSON), and one with a
    body 400 (a body that cannot be parsed). Each of these, and each 4xx/5xx a route
    declares without a model of its own, is documented as ``application/problem+json``
    with the ``Problem`` schema (replacing FastAPI's ``HTTPValidationError``).
    """
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    defs = ProblemBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(defs.pop("$defs", {}))
    schemas["Problem"] = defs
    for item in openapi.get("paths", {}).values():
        for method, op in item.items():
            if method not in _METHODS:
                continue
            responses: dict[str, Any] = op.setdefault("responses", {})
            codes = {422, 503}
            if method != "get":
                codes |= {413, 415}
            if "requestBody" in op:
                codes.add(400)
            for code in codes:
                responses.setdefault(str(code), {"description": TITLES[code]})
            for status, response in responses.items():
                if not (status.isdigit() and int(status) >= 400):
                    continue
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema and schema.get("$ref", "").split("/")[-1] not in (
                    "HTTPValidationError",
                    "",
                ):
                    continue  # a model of its own (GET /ready's 503 is a Readiness)
                if response.get("description") == "Validation Error":
                    response["description"] = "invalid request (problem+json with errors)"
                response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_REF}}
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused not in str(openapi.get("paths")):
            schemas.pop(unused, None)
    return openapi


def install(app: FastAPI) -> None:
    """Register the problem+json exception handlers on ``app``: problems, request
    validation (422), HTTP errors (404, 405 ...), Kafka/PostgreSQL/Redis unreachable (503)
    and anything else (500); and make its OpenAPI document them (``document``)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    description=app.description,
                    routes=app.routes,
                    tags=app.openapi_tags,
                    servers=app.servers,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI documents this override
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    for unavailable in (
        KafkaError,
        asyncpg.exceptions.PostgresConnectionError,
        asyncpg.exceptions.CannotConnectNowError,
        asyncpg.exceptions.TooManyConnectionsError,
        RedisConnectionError,
        RedisTimeoutError,
        ConnectionError,
        TimeoutError,
    ):
        app.add_exception_handler(unavailable, _on_unavailable)
    app.add_exception_handler(Exception, _on_error)
