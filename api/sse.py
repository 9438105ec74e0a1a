"""The SSE response every live route answers with: one that ends quietly once started.

An exception after the response has started (a client too slow to take a message within
``send_timeout``, which sse-starlette raises as a ``TimeoutError``; a broker failing
under the stream) cannot become a problem+json any more: the status line is sent.
Left to propagate, Starlette's exception middleware, which maps ``TimeoutError`` and
``KafkaError`` to 503 problems, fails with "Caught handled exception, but response
already started" and the stream's clean-up (its ``background`` task) never runs. So
the stream is ended, its clean-up run, and the cause logged; the client reconnects with
its Last-Event-ID. An exception before the response starts propagates as usual.
"""

from __future__ import annotations

import structlog
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Message, Receive, Scope, Send

log = structlog.get_logger("swarmlog.api.sse")


class LiveResponse(EventSourceResponse):
    """An ``EventSourceResponse`` that ends, rather than fails, on an error once started."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the stream (see the module docstring)."""
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            await send(message)
            if message["type"] == "http.response.start":
                started = True

        try:
            await super().__call__(scope, receive, watched)
        except Exception as exc:
            if not started:
                raise
            if isinstance(exc, SendTimeoutError):
                log.info("sse client dropped: a send timed out", path=scope.get("path"))
            else:
                log.warning("sse stream ended by an error", path=scope.get("path"), error=repr(exc))
            if self.background is not None:
                await self.background()
