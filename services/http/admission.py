"""Admission: the texts a worker holds in flight, and the fast refusal once it holds its limit.

Each HTTP worker counts the texts (or words to generate) it has admitted and not yet answered;
a request whose cost would take the count past TEXTSERVE_MAX_PENDING_TEXTS gets 429 with
Retry-After (`Admission.reserve`, called by the service once the body is parsed and its cost
known).

Once the count has reached the limit, no request of any cost can be admitted, so
`RefuseWhenFull` answers an inference POST at once, before its body is read, parsed and
validated: `python -m loadtests.overload --ignore-retry-after` (a retry storm) measured a
refusal that went the whole way costing as much CPU as a served small request, so the refusals
themselves became the load and their p99 grew with the number of clients (docs/performance.md).
"""

from __future__ import annotations

import json
import re
import time

from services import metrics
from services.http.errors import ApiError
from services.http.request_timing import INFERENCE_HEADER, QUEUE_HEADER, TOTAL_HEADER, milliseconds

RETRY_AFTER_S = "1"
# The routes that admit work, as their templates (the metrics' bounded endpoint label).
ADMITTING_ROUTES = {
    re.compile(r"/classify"): "/classify",
    re.compile(r"/classify-image"): "/classify-image",
    re.compile(r"/explain"): "/explain",
    re.compile(r"/lm/(score|next|generate|vectors|neighbors)"): "/lm/{api}",
    re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer"): "/v2/models/{name}/infer",
}


class Admission:
    """One worker's count of admitted, unanswered texts against its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = 0

    @property
    def full(self) -> bool:
        return self.pending >= self.limit

    def refusal_message(self) -> str:
        return (f"overloaded: {self.pending} texts (or words to generate) are already waiting in this worker "
                f"(limit {self.limit}, TEXTSERVE_MAX_PENDING_TEXTS); retry shortly")

    def reserve(self, cost: int) -> None:
        """Count `cost` against the limit, or refuse: 429, or 413 for a request that could never fit."""
        if cost > self.limit:  # retrying would not help: say so
            raise ApiError(413, f"{cost} texts (or words to generate) in one request; a worker holds at most {self.limit} "
                                "at once (TEXTSERVE_MAX_PENDING_TEXTS): send fewer per request")
        if self.pending + cost > self.limit:
            raise ApiError(429, self.refusal_message(), {"Retry-After": RETRY_AFTER_S})
        self.pending += cost

    def release(self, cost: int) -> None:
        self.pending -= cost


def admitting_route(method: str, path: str) -> str | None:
    """The route template of an inference POST, None for anything else."""
    if method != "POST":
        return None
    return next((template for pattern, template in ADMITTING_ROUTES.items() if pattern.fullmatch(path)), None)


class RefuseWhenFull:
    """ASGI middleware: an inference POST that reaches a full worker gets its 429 here, with the
    same message, Retry-After and timing headers as a refusal from the service, and is counted
    in the same metrics; everything else passes through untouched."""

    def __init__(self, app, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.admission.full:
            return await self.app(scope, receive, send)
        route = admitting_route(scope["method"], scope["path"])
        if route is None:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        body = json.dumps({"error": self.admission.refusal_message()}).encode()
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", RETRY_AFTER_S.encode()), (QUEUE_HEADER, b"0.000"), (INFERENCE_HEADER, b"0.000"),
            (TOTAL_HEADER, milliseconds(time.perf_counter() - started))]})
        await send({"type": "http.response.body", "body": body})
        # The body is not read: the server discards what the client still sends of it.
        metrics.requests_total.labels(model="", endpoint=route, status="429").inc()
        metrics.request_duration_seconds.labels(model="", endpoint=route).observe(time.perf_counter() - started)
