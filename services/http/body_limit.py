"""A request body larger than TEXTSERVE_MAX_BODY_BYTES gets 413, before the service reads it.

The largest request the other limits admit (TEXTSERVE_MAX_TEXTS_PER_REQUEST texts of
TEXTSERVE_MAX_TEXT_CHARS characters, JSON-escaped) is a few MB; anything bigger is refused
here instead of being read into memory, parsed and only then refused: a body with a
Content-Length over the limit at once, unread; a chunked body (no Content-Length) as soon as
the bytes received pass the limit.
"""

from __future__ import annotations

import json
import time

from services import metrics
from services.http.admission import admitting_route
from services.http.outcome import request_outcome


def too_large_message(limit: int, size: int | None) -> str:
    if size is None:  # chunked: refused as it passed the limit
        return f"the request body passed the limit of {limit} bytes (TEXTSERVE_MAX_BODY_BYTES) while it was being sent"
    return f"the request body has {size} bytes; the limit is {limit} bytes (TEXTSERVE_MAX_BODY_BYTES)"


class LimitBodySize:
    """ASGI middleware: 413 `{"error": ...}` for a body over `limit` bytes; others pass through."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        declared = next((value for name, value in scope.get("headers", []) if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            # The body is not read: the server discards what the client still sends of it.
            return await self.refuse(scope, send, too_large_message(self.limit, int(declared)), started)
        if declared is not None:
            return await self.app(scope, receive, send)  # the server reads exactly that many bytes
        received = 0
        refused = False
        response_started = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not refused:
                    refused = True
                    if not response_started:
                        await self.refuse(scope, send, too_large_message(self.limit, None), started)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded_send(message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def refuse(self, scope, send, message: str, started: float) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
        request_outcome(scope)["counted"] = True  # the app's own ending (the client "left") is not counted again
        endpoint = admitting_route(scope["method"], scope["path"]) or "unmatched"
        metrics.requests_total.labels(model="", endpoint=endpoint, status="413").inc()
        metrics.request_duration_seconds.labels(model="", endpoint=endpoint).observe(time.perf_counter() - started)
