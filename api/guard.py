"""What every request must be before a route sees it: the one place input that the log,
PostgreSQL or the JSON encoder cannot hold is refused, whatever the route or schema.

``RequestGuard`` (a pure ASGI middleware) answers, as problem+json, and writes nothing:

* 413 ``request_too_large`` when the body is over ``max_body_bytes`` (counted as the body
  streams in, so a chunked body without Content-Length is bounded too);
* 415 ``unsupported_media_type`` when a body is not JSON (``application/json`` or
  ``application/*+json``; no Content-Type is read as JSON, as FastAPI does);
* 422 ``validation_error`` naming the field (``payload.a.0``, ``tasks.3.type``, the query
  parameter) when a JSON body or a query string holds what cannot be stored: NUL
  (U+0000, which PostgreSQL text and jsonb refuse) or a lone surrogate (not UTF-8) in
  any string or object key, an integer outside the signed 64-bit range, a
  non-finite number (``NaN``, ``Infinity``, ``1e400``), or JSON nested deeper than
  ``MAX_JSON_DEPTH`` levels.

``storable_path``, an app-wide dependency, does the same for path parameters once the
route is matched (and so their names known). Headers reach no command as free text but
the idempotency key and correlation id, and HTTP/1.1 servers refuse NUL in headers.

Malformed JSON is left to FastAPI, whose 422 names where the parser stopped. The body is
read here whole (it has to be, to be checked), so the limit is counted here too rather
than in Starlette's RequestBodyLimitMiddleware, whose 413 would be raised outside the
app's exception handlers.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import Problem, validation_problem
from infra.cloudevents import is_json_media_type

#: Deepest nesting of arrays and objects a JSON body may have (the body itself is level 1).
MAX_JSON_DEPTH = 32
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


class _NonFinite:
    """``NaN``/``Infinity`` as the parser met them (JSON has no such numbers)."""

    def __init__(self, text: str) -> None:
        self.text = text


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text (NUL, lone surrogate), or None if it can."""
    if "\x00" in value:
        return "must not contain NUL (U+0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    return None


def _scalar_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return "must be an integer in the signed 64-bit range (-2^63 .. 2^63-1)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, _NonFinite):
        return f"must be a finite number (got {value.text})"
    return None


def json_problem(value: Any) -> tuple[tuple[str | int, ...], str] | None:
    """The first place in decoded JSON ``value`` that cannot be stored and why, as
    (path from the root, reason); None when all of it can. Iterative, so any depth is safe."""
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(value, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                return path, f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
            if isinstance(node, dict):
                items = list(node.items())
                for key, _ in items:
                    reason = text_problem(key)
                    if reason is not None:
                        return path, f"has a key that {reason}"
            else:
                items = list(enumerate(node))
            # Reversed, so the first offending item in document order is reported.
            stack.extend((v, (*path, k), depth + 1) for k, v in reversed(items))
        else:
            reason = _scalar_problem(node)
            if reason is not None:
                return path, reason
    return None


def _loads(body: bytes) -> Any:
    return json.loads(body, parse_constant=_NonFinite)


def _is_json(content_type: str | None) -> bool:
    """A request body's type is JSON (no Content-Type is read as JSON, as FastAPI does)."""
    return content_type is None or is_json_media_type(content_type)


async def storable_path(request: Request) -> None:
    """An app-wide dependency: a 422 naming the path parameter that cannot be stored (the
    middleware leaves the path to it, as only the matched route names its parameters)."""
    for name, value in request.path_params.items():
        reason = text_problem(value) if isinstance(value, str) else None
        if reason is not None:
            raise validation_problem([{"loc": ("path", name), "msg": reason}])


class RequestGuard:
    """Refuses, before routing, what no route may receive (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> Problem:
        return Problem(
            413,
            "request_too_large",
            f"the request body is over {self.max_body_bytes} bytes",
            field="body",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._url_problem(scope)
        if problem is not None:
            await problem.response()(scope, receive, send)
            return
        if scope["method"] in _BODYLESS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large().response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body:
            problem = self._body_problem(headers.get("content-type"), body)
            if problem is not None:
                await problem.response()(scope, receive, send)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _url_problem(self, scope: Scope) -> Problem | None:
        query = scope.get("query_string", b"")
        if query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8")
            for name, value in pairs:
                reason = text_problem(name) or text_problem(value)
                if reason is not None:
                    return validation_problem([{"loc": ("query", name), "msg": reason}])
        return None

    @staticmethod
    def _body_problem(content_type: str | None, body: bytes) -> Problem | None:
        if not _is_json(content_type):
            return Problem(
                415,
                "unsupported_media_type",
                f"the body must be application/json (got {content_type})",
                field="Content-Type",
            )
        try:
            value = _loads(body)
        except RecursionError:
            return validation_problem(
                [{"loc": ("body",), "msg": f"nests deeper than {MAX_JSON_DEPTH} levels"}]
            )
        except json.JSONDecodeError:
            return None  # malformed JSON: FastAPI's 422 says where
        except UnicodeDecodeError:
            return validation_problem([{"loc": ("body",), "msg": "must be UTF-8 encoded JSON"}])
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            return validation_problem([{"loc": ("body",), "msg": f"cannot be read: {exc}"}])
        found = json_problem(value)
        if found is None:
            return None
        path, reason = found
        return validation_problem([{"loc": ("body", *path), "msg": reason}])
